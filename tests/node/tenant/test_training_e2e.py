"""Issue 6 end to end: a bandwidth-bound DDP job runs as one gang, services are kept up.

A real local cluster: one provider with two devices on NVLink and two cheaper providers
with one device each. The DDP job (examples/ddp-train: torch CPU, gloo, two processes
under torchrun in the bubblewrap sandbox) must land on the NVLink pair, never split over
the single-device providers, and report its final loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli import localcluster as cluster
from node.cli.localcluster import Template
from node.store.node_store import Store

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[3]
DDP_JOB = ROOT / "examples" / "ddp-train" / "job.yaml"
SERVICE_JOBS = Path(__file__).parents[1] / "jobs" / "service"
TEMPLATES = (
    Template("sim-gpu-large", 2, 2_000_000, "nvlink"),
    Template("sim-gpu-small", 1, 100_000, "none"),
    Template("sim-gpu-small", 1, 100_000, "none"),
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    h = tmp_path_factory.mktemp("gang")
    nodes = cluster.up(3, home=h, templates=TEMPLATES)
    assert len(nodes) == 4
    try:
        yield h
    finally:
        cluster.down(home=h)


def mercato(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MERCATO_HOME": str(home)}
    env.pop("MERCATO_PEER", None)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def provider_ids(home: Path) -> dict[str, str]:
    """provider name -> node id."""
    return {n.name: n.node_id for n in cluster.load_state(cluster.cluster_root(home))}


class TestTraining:
    def test_plan_classifies_bandwidth_bound_and_only_the_nvlink_pair_fits(
        self, home: Path
    ) -> None:
        out = mercato(home, "plan", str(DDP_JOB), "--json")
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["class"] == "bandwidth_bound"
        assert plan["required_bandwidth"] > 10**9
        assert plan["order"]["gang"] is True
        assert plan["order"]["devices_per_unit"] == 2
        fits = [c for c in plan["candidates"] if c["fits"]]
        assert [c["provider"] for c in fits] == [provider_ids(home)["provider-1"]]
        cheap = [c for c in plan["candidates"] if not c["fits"]]
        assert len(cheap) == 2
        assert all(
            c["price_floor_micro_credits_per_device_hour"]
            < fits[0]["price_floor_micro_credits_per_device_hour"]
            for c in cheap
        )
        assert all("devices free" in c["why_not"] for c in cheap)

    def test_ddp_runs_on_the_one_two_device_provider_and_reports_its_loss(self, home: Path) -> None:
        pytest.importorskip("torch", reason="the DDP example needs torch (pip install torch)")
        out = mercato(home, "submit", str(DDP_JOB), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        summary = json.loads(out.stdout)
        assert summary["state"] == "done"
        best = summary["best"]
        assert best is not None
        assert best["metrics"]["world_size"] == 2
        assert 0 < best["value"] < 1.0  # the MLP's final MSE, well below the start
        ids = provider_ids(home)
        assert best["provider"] == ids["provider-1"]
        log = mercato(home, "logs", summary["job_id"], "0")
        assert '"step": 60' in log.stdout
        # Only the NVLink provider ever held a lease: the job was never split.
        for name in ("provider-2", "provider-3"):
            with Store(home / "cluster" / name / "node.sqlite") as store:
                assert store.list_leases() == []
        with Store(home / "cluster" / "provider-1" / "node.sqlite") as store:
            leases = store.list_leases()
        assert len(leases) == 1
        assert len(leases[0].devices) == 2
        assert leases[0].state == "ended"


class TestService:
    def test_a_crashing_service_is_restarted_then_given_up(self, home: Path) -> None:
        out = mercato(home, "submit", str(SERVICE_JOBS / "crash.yaml"), "--json")
        summary = json.loads(out.stdout)
        assert summary["state"] == "failed"
        trial = json.loads(mercato(home, "status", summary["job_id"], "--json").stdout)
        run = trial["trial_list"][0]
        assert run["attempts"] == 2  # the first run and one restart
        assert "exit" in run["detail"]

    def test_cancel_stops_a_running_service_and_releases_its_lease(self, home: Path) -> None:
        env = {**os.environ, "MERCATO_HOME": str(home)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "submit",
                str(SERVICE_JOBS / "forever.yaml"),
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            job_id = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and job_id is None:
                jobs = json.loads(mercato(home, "jobs", "--json").stdout)
                running = [j for j in jobs if j["name"] == "steady-service"]
                if running and running[0]["state"] == "running":
                    job_id = running[0]["job_id"]
                time.sleep(0.5)
            assert job_id is not None
            time.sleep(3)  # let it serve for a bit
            assert mercato(home, "cancel", job_id).returncode == 0
            stdout, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        summary = json.loads(stdout)
        assert summary["state"] == "cancelled"
        tenant = Store(home / "tenant" / "node.sqlite")
        with tenant:
            mine = [x for x in tenant.list_leases() if x.job_id == job_id]
        assert mine
        assert all(x.state == "ended" for x in mine)
