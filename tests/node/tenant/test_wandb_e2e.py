"""W&B semantics end to end: a plain W&B sweep file submitted to a real local cluster,
trials in the bubblewrap sandbox (tests/node/jobs/wandb).

* a command without an ${args} macro is noted at submit, and the trial still gets its
  parameters, from the JSON file $MERCATO_PARAMS_FILE names (also ${args_json_file});
  the workspace's own params.json is left alone;
* hyperband counts logged values: stored intermediate values are numbered 0, 1, ...
  whatever `step` the trial prints (100, 200, ...), and no trial is stopped at its
  first value with min_iter 1;
* --parallel 2 never runs more than 2 trials at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import test_sweep_e2e as sweep_e2e

from node.store.job_store import JobStore
from node.store.node_store import Store

# The shared 3-provider cluster and the tenant fixture of the sweep tests.
shared_cluster = sweep_e2e.shared_cluster
tenant = sweep_e2e.tenant
Tenant = sweep_e2e.Tenant

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]

JOB = Path(__file__).parents[1] / "jobs" / "wandb"


def trial_lines(tenant: Tenant, job_id: str, number: int) -> list[dict[str, Any]]:
    path = tenant.home / "tenant" / "jobs" / job_id / "logs" / f"{number}.log"
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


class TestWandbSweep:
    def test_parameters_without_args_hyperband_counts_and_parallel(
        self, tenant: Tenant, tmp_path: Path
    ) -> None:
        ws = tmp_path / "ws"
        shutil.copytree(JOB, ws)
        plan = tenant.run("plan", str(ws / "sweep.yaml"))
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "note: command item '--lr=${lr}' is passed as written" in plan.stdout
        notes = tenant.json("plan", str(ws / "sweep.yaml"))["notes"]
        assert any("MERCATO_PARAMS_FILE" in n for n in notes)
        proc = tenant.run("submit", str(ws / "sweep.yaml"), "--quiet", "--json", "--parallel", "2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["name"] == "wandb-compat"
        assert "'--lr=${lr}' is passed as written" in proc.stderr
        assert "MERCATO_PARAMS_FILE" in proc.stderr
        job_id = summary["job_id"]
        with Store(tenant.store_path) as store:
            trials = JobStore(store).trials(job_id)
        assert len(trials) == 4
        intervals = []
        for t in trials:
            lines = trial_lines(tenant, job_id, t.number)
            given, seen = lines[0], lines[1]
            # Parameters arrive through the file, whatever the command passes.
            assert seen["params"] == t.params
            assert given["argv"] == ["--lr=${lr}", given["file"]]
            assert given["file"] != "params.json"
            assert json.loads(seen["user_params_json"]) == {"mine": "do not overwrite"}
            # Hyperband numbered what it judged by count, not by the printed step.
            steps = [int(s) for s, _ in t.intermediate]
            assert steps == list(range(len(steps))), t.intermediate
            if t.state == "pruned":
                assert len(steps) >= 2, t.intermediate  # min_iter 1: judged at value 2
            times = [x["t"] for x in lines if "t" in x]
            intervals.append((times[0], times[-1]))
        assert {t.state for t in trials} <= {"succeeded", "pruned"}
        # At most 2 trials at once: no instant lies inside 3 intervals.
        for start, _ in intervals:
            inside = sum(1 for a, b in intervals if a <= start < b)
            assert inside <= 2, intervals
