"""A dishonest provider daemon for tests: the real daemon, but its sandbox runs nothing.

``python tests/node/tenant/fabricating_provider.py --config provider.toml`` starts the
real ``mercato provider run`` with one change: every trial "succeeds" at once with
the metric named by ``$FABRICATE_METRIC`` set to ``$FABRICATE_VALUE`` (default
``loss = 1e-06``, better than any honest result of the quadratic job). Everything
else (adverts, bids, leases, signatures, receipts) is the honest code: this is what
a provider that wants to be paid without computing would run.

It runs a tenant's canary (market.verification.canary_command) honestly, as a careful
cheat would, unless ``$FABRICATE_CANARY`` is set: then it fabricates that too.

With ``$FABRICATE_UNCHECKED=<rate>`` it is a cheat that tries to predict the tenant's
spot checks: it computes the tenant's draw (market.verification.should_check) from
what it sees - the task id (the job id and the trial number), its own node id
(``$FABRICATE_NODE_ID``) - and a guess of the tenant's secret key, runs honestly the
trials it predicts will be re-run at ``rate``, and fabricates the others.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import node.daemon
from market.verification import CANARY_METRIC, should_check
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
        if predicted_checked(spec.task_id):
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


def predicted_checked(task_id: str) -> bool:
    """Whether the tenant's draw, as far as this provider can compute it, re-runs the
    trial of ``task_id`` (``job.number.attempt``); False when not predicting."""
    rate = os.environ.get("FABRICATE_UNCHECKED")
    if not rate:
        return False
    job_id, number, _ = task_id.rsplit(".", 2)
    provider = os.environ["FABRICATE_NODE_ID"]
    guess = bytes(32)  # the tenant's draw secret never leaves it: the cheat can only guess
    return should_check(Fraction(rate), f"{job_id}:{number}:{task_id}:{provider}", guess)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    node.daemon.SandboxExecutor = FabricatingExecutor  # type: ignore[misc]
    sys.exit(main(["provider", "run", *sys.argv[1:]]))
