"""A dishonest provider daemon for tests: the real daemon, but its sandbox runs nothing.

``python tests/node/tenant/fabricating_provider.py --config provider.toml`` starts the
real ``mercato provider run`` with one change: every trial "succeeds" at once with
the metric named by ``$FABRICATE_METRIC`` set to ``$FABRICATE_VALUE`` (default
``loss = 1e-06``, better than any honest result of the quadratic job). Everything
else (adverts, bids, leases, signatures, receipts) is the honest code: this is what
a provider that wants to be paid without computing would run.

It runs a tenant's canary (market.verification.canary_command) honestly, as a careful
cheat would, unless ``$FABRICATE_CANARY`` is set: then it fabricates that too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import node.daemon
from market.verification import CANARY_METRIC
from node.cli.main import main
from node.provider.executor import TrialOutcome, TrialSpec, TrialState
from node.provider.sandbox import SandboxExecutor


class FabricatingExecutor(SandboxExecutor):
    """Answers "succeeded" with a made-up metric without running the trial."""

    async def run(
        self, spec: TrialSpec, on_output: Any = None, on_metrics: Any = None
    ) -> TrialOutcome:
        if CANARY_METRIC in " ".join(spec.argv) and not os.environ.get("FABRICATE_CANARY"):
            return await super().run(spec, on_output, on_metrics)
        name = os.environ.get("FABRICATE_METRIC", "loss")
        value = float(os.environ.get("FABRICATE_VALUE", "1e-06"))
        metrics: dict[str, int | float] = {name: value}
        trial_dir = self.root_dir / spec.task_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        log_path = trial_dir / "output.log"
        line = f'{{"{name}": {value}}}\n'.encode()
        log_path.write_bytes(line)
        if on_output is not None:
            on_output(line)
        if on_metrics is not None:
            on_metrics(metrics)
        return TrialOutcome(
            task_id=spec.task_id,
            state=TrialState.SUCCEEDED,
            exit_code=0,
            metrics=metrics,
            metric_history=[metrics],
            metric_value=value,
            wall_ms=1,
            cpu_ms=0,
            max_rss_bytes=0,
            output_bytes=len(line),
            output_truncated=False,
            log_path=log_path,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    node.daemon.SandboxExecutor = FabricatingExecutor  # type: ignore[misc]
    sys.exit(main(["provider", "run", *sys.argv[1:]]))
