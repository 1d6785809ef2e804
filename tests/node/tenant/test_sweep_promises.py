"""Issue 13, "Sweeps keep their promises": budget, resume, failures, waits, stalls.

As a tenant meets them: `mercato submit` and `resume` as real processes against a real
local cluster (daemons on loopback, trials in the bubblewrap sandbox), the tenant killed
with SIGKILL mid-sweep. The stalling provider is a real daemon with one deliberate
change (it never enforces the trial timeout), driven by the real sweep runner in this
process, like the lying providers of test_tenant.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from market.jobspec import parse_job
from market.lifecycle import LeaseState
from node.config import NodeConfig, NodeSection
from node.daemon import Daemon
from node.net.transport import HttpTransport
from node.provider.executor import Executor, TrialOutcome, TrialSpec
from node.provider.inventory import DeviceDecl
from node.provider.work import WorkService
from node.store.job_store import JobRow, JobStore
from node.store.node_store import Store
from node.tenant.client import Tenant as TenantNode
from node.tenant.sweep import SweepRunner
from node.workspace import pack
from protocol.identity import Identity
from protocol.messages import TaskAssign

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep_e2e import (
    JOBS,
    Cluster,
    Tenant,
    running_cluster,
    tenant_at,
    trial_processes,
    wait_for,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three providers (2x RTX-4090 at 0.35, 1x A100 at 1.2, 4x Bow-IPU at 0.9 cr/h)."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), providers=3) as c:
        yield c


@pytest.fixture
def tenant(tmp_path: Path, cluster3: Cluster) -> Iterator[Tenant]:
    with tenant_at(tmp_path / "tenant-home", cluster3) as t:
        yield t


def quadratic(where: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The quadratic job (tests/node/jobs) in its own workspace, changed by ``edit``."""
    where.mkdir(parents=True)
    shutil.copy(JOBS / "quadratic" / "trial.py", where / "trial.py")
    spec = yaml.safe_load((JOBS / "quadratic" / "sweep.yaml").read_text())
    edit(spec)
    path = where / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ledger_spend(tenant: Tenant, job_id: str) -> int:
    with Store(tenant.store_path) as store:
        leases = {x.lease_id for x in store.list_leases() if x.job_id == job_id}
        return -sum(line["amount"] for line in store.ledger() if line["lease_id"] in leases)


# --- money and budget -----------------------------------------------------------


class TestBudget:
    def test_a_one_micro_credit_cap_spends_nothing_and_says_so(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        # Issue 13: this cap spent 2,243 micro-credits and exited 0.
        job = quadratic(tmp_path / "job", lambda s: s["budget"].update(max_spend=0.000001))
        proc = tenant.run("submit", str(job), "--quiet")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = " ".join(proc.stdout.split())  # the summary wraps at the terminal's width
        assert "budget" in out
        assert "max_spend 0.000001" in out
        job_id = tenant.job_id()
        assert tenant.leases(job_id) == []
        assert ledger_spend(tenant, job_id) == 0
        assert tenant.trials(job_id) == []

    def test_max_spend_zero_is_a_job_file_error(self, tmp_path: Path, tenant: Tenant) -> None:
        job = quadratic(tmp_path / "job", lambda s: s["budget"].update(max_spend=0))
        proc = tenant.run("submit", str(job), "--quiet")
        assert proc.returncode == 1
        assert "budget.max_spend" in proc.stderr
        assert "positive" in proc.stderr
        assert not tenant.store_path.exists() or tenant.leases() == []

    def test_the_sweep_stops_within_its_cap_and_exits_non_zero(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        # Only the RTX-4090 provider is under max_price. Each trial may run 10 s plus the
        # 10 s grace: at 0.4 cr/device-hour that is 0.0024 credits; the cap pays for the
        # worst case of two at once, so the sweep must stop long before its 12 trials.
        def edit(s: dict[str, Any]) -> None:
            s["budget"] = {"max_price": "0.4 credits", "max_spend": "0.006 credits"}
            s["limits"]["trial_timeout"] = "10s"
            s["sweep"]["parameters"]["sleep"] = {"value": 3.0}

        job = quadratic(tmp_path / "job", edit)
        proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "2")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["state"] == "failed"
        assert "max_spend 0.006" in summary["detail"]
        spend = ledger_spend(tenant, summary["job_id"])
        assert 0 < spend <= 6_000
        done = summary["trials"].get("succeeded", 0)
        assert 1 <= done < 12
        assert {x.state for x in tenant.leases(summary["job_id"])} <= {"ended"}


# --- resume ---------------------------------------------------------------------


def _random(s: dict[str, Any], method: str) -> None:
    s["sweep"]["method"] = method
    s["sweep"]["run_cap"] = 8
    s["sweep"]["parameters"]["x"] = {"distribution": "uniform", "min": -1, "max": 3.5}
    s["sweep"]["parameters"]["y"] = {"distribution": "uniform", "min": -2, "max": 1}


class TestResumeAfterKill:
    @pytest.mark.parametrize("method", ["grid", "random", "bayes"])
    def test_a_resumed_sweep_never_reruns_a_point(
        self, tmp_path: Path, tenant: Tenant, method: str
    ) -> None:
        # Issue 13: after a resume, a random sweep had 12 trials but 6 distinct points.
        def edit(s: dict[str, Any]) -> None:
            if method != "grid":
                _random(s, method)
            s["sweep"]["parameters"]["sleep"] = {"value": 1.0}

        job = quadratic(tmp_path / "job", edit)
        want = 12 if method == "grid" else 8
        submit = tenant.start("submit", str(job), "--quiet", "--parallel", "2")
        job_id = tenant.job_id()

        def midway() -> bool:
            states = [t.state for t in tenant.trials(job_id)]
            return states.count("succeeded") >= 2 and "running" in states

        wait_for(midway, "some trials finished and some running")
        submit.send_signal(signal.SIGKILL)
        submit.wait()

        listed = {j["job_id"]: j for j in tenant.json("jobs")}
        table = tenant.run("jobs").stdout
        resumed = tenant.run("resume", job_id, "--quiet", "--json", "--parallel", "2")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr + tenant.output(submit)
        trials = tenant.trials(job_id)
        points = [json.dumps(t.params, sort_keys=True) for t in trials]
        seen = [
            (t.number, t.state, t.attempts, t.detail, p)
            for t, p in zip(trials, points, strict=True)
        ]
        assert len(trials) == want, seen
        assert len(set(points)) == want, seen
        assert {t.state for t in trials} == {"succeeded"}, seen
        # Before the resume, `jobs` told the killed run from a live one, and how to go on.
        assert listed[job_id]["state"] == "interrupted"
        assert f"mercato resume {job_id}" in listed[job_id]["detail"]
        assert "interrupted" in table


# --- failures -------------------------------------------------------------------


class TestFailuresAreCheap:
    def test_a_missing_program_is_refused_before_anything_is_spent(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        job = quadratic(tmp_path / "job", lambda s: s["sweep"].update(program="nothere.py"))
        proc = tenant.run("submit", str(job), "--quiet")
        assert proc.returncode == 1
        assert "sweep.program: 'nothere.py' is not a file in the workspace" in proc.stderr
        assert not tenant.store_path.exists() or tenant.leases() == []

    def test_repeated_failures_stop_the_sweep_with_the_reason_and_a_hint(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        # The trial prints "loss"; the job file asks for "los". Every trial would fail.
        def edit(s: dict[str, Any]) -> None:
            s["sweep"]["metric"]["name"] = "los"
            s["limits"]["max_failures"] = 2

        job = quadratic(tmp_path / "job", edit)
        proc = tenant.run("submit", str(job), "--quiet", "--parallel", "1")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = " ".join(proc.stdout.split())  # the summary wraps at the terminal's width
        assert "trials failed in a row (limits.max_failures: 2)" in out
        assert "never reported the metric 'los'; it printed 'loss'" in out
        assert "last lines of trial" in out
        assert '{"loss":' in out
        job_id = tenant.job_id()
        failed = [t for t in tenant.trials(job_id) if t.state == "failed"]
        # One lease of one unit holds at most two trials at once.
        assert 2 <= len(failed) <= 3


# --- no silent waits ------------------------------------------------------------


def _dead_address() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


class TestNoSilentWaits:
    def test_a_dead_peer_ends_the_submit_with_the_reason(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        job = quadratic(tmp_path / "job", lambda s: None)
        dead = _dead_address()
        proc = tenant.run(
            "submit", str(job), "--quiet", "--peer", dead, "--max-wait", "3", timeout_s=60
        )
        assert proc.returncode == 1
        out = " ".join(proc.stdout.split())  # the summary wraps at the terminal's width
        assert "no lease after waiting 3 s" in out
        assert f"directory unavailable at {dead}" in out
        assert "--wait-forever" in out

    def test_a_max_price_below_every_floor_ends_with_the_no_bid_counts(
        self, tmp_path: Path, tenant: Tenant
    ) -> None:
        job = quadratic(tmp_path / "job", lambda s: s["budget"].update(max_price="0.01 credits"))
        proc = tenant.run("submit", str(job), "--quiet", "--max-wait", "3", timeout_s=60)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = " ".join(proc.stdout.split())  # the summary wraps at the terminal's width
        assert "no lease after waiting 3 s" in out
        assert "at or below 0.01 credits per device-hour" in out
        # --quiet is no reason to wait in silence: the reason showed while it waited.
        assert "waiting: no lease: " in proc.stderr


# --- a provider that stalls -----------------------------------------------------


class StallingExecutor:
    """A provider's executor that never enforces the trial's timeout (its one lie)."""

    def __init__(self, real: Executor) -> None:
        self.real = real

    async def run(self, spec: TrialSpec, on_output: Any, on_metrics: Any) -> TrialOutcome:
        return await self.real.run(
            dataclasses.replace(spec, timeout_s=3600.0), on_output, on_metrics
        )

    async def cancel(self, task_id: str) -> bool:
        return await self.real.cancel(task_id)

    def discard(self, task_id: str) -> None:
        self.real.discard(task_id)


async def _provider(home: Path, floor: int, bootstrap: list[str]) -> Daemon:
    config = NodeConfig(
        node=NodeSection(listen_port=0, home=home, bootstrap=bootstrap),
        devices=[DeviceDecl(model="RTX-4090", count=1, price_floor=floor, simulated=True)],
        detect_gpus=False,
    )
    return await Daemon.start(config)


class TestStallingProvider:
    async def test_the_tenant_cancels_stops_paying_and_retries_elsewhere(
        self, tmp_path: Path
    ) -> None:
        # Issue 12: a provider that stalls kept the trial, and the bill, going.
        honest = await _provider(tmp_path / "honest", 300_000, [])
        staller = await _provider(tmp_path / "staller", 100_000, [honest.address])
        work = staller.node.handlers[TaskAssign.TYPE].__self__  # type: ignore[attr-defined]
        assert isinstance(work, WorkService)
        work.executor = StallingExecutor(work.executor)  # type: ignore[assignment]
        transport = HttpTransport()
        store = Store(tmp_path / "tenant.sqlite")
        try:
            where = tmp_path / "job"
            job = quadratic(
                where,
                lambda s: (
                    s["sweep"]["parameters"].update(
                        x={"value": 2}, y={"value": 0}, sleep={"value": 30}
                    ),
                    s["limits"].update(trial_timeout="1s", retries=1),
                ),
            )
            spec = parse_job(job.read_text())
            ws = pack(where)
            jobs = JobStore(store)
            jobs.create_job(
                JobRow(
                    job_id="stall",
                    name="stall",
                    spec_yaml=job.read_text(),
                    spec_hash="",
                    workspace_hash=ws.sha256,
                    workspace_path=str(where / "ws.tar"),
                    state="running",
                    detail="",
                    seed=0,
                    created_ms=0,
                    updated_ms=0,
                )
            )
            tenant = TenantNode(Identity.generate(), store, transport)

            for _ in range(100):  # until gossip has told each provider of the other
                if len(await tenant.refresh(staller.address)) == 2:
                    break
                await asyncio.sleep(0.2)
            runner = SweepRunner(
                tenant,
                store,
                "stall",
                spec,
                ws.data,
                ws.sha256,
                peer=staller.address,
                parallel=1,
                log_dir=tmp_path / "logs",
                trial_grace_ms=1_000,
            )
            await runner.run()
            (trial,) = jobs.trials("stall")
            # Taken from the staller after 1 s + 1 s grace, run again on the honest
            # provider, which killed it at its 1 s timeout (the program sleeps 30 s).
            assert trial.failed_providers == [staller.node.node_id]
            assert trial.provider == honest.node.node_id
            assert trial.state == "failed"
            assert "timed_out" in trial.detail
            # The staller's lease was ended by the tenant, paid for a few seconds at most.
            (stalled,) = [x for x in store.list_leases() if x.provider == staller.node.node_id]
            assert stalled.state == "ended"
            paid = -sum(
                line["amount"] for line in store.ledger() if line["lease_id"] == stalled.lease_id
            )
            assert 0 < paid <= 100_000 * 10_000 // 3_600_000  # under 10 s at its price
            # And the staller's trial was stopped, not left running for 30 s.
            for _ in range(100):
                if not trial_processes("stall"):
                    break
                await asyncio.sleep(0.1)
            assert not trial_processes("stall")
            assert work.tasks == {}
            # Its outcome stays for the operator's page, without the log it held.
            # (the canary it passed first is kept too: a provider new to this tenant)
            (kept,) = [t for t in work.finished if not t.assign.task_id.startswith("stall.canary")]
            assert kept.state in ("cancelled", "timed_out")
            assert kept.log == b""
        finally:
            await transport.close()
            store.close()
            await staller.close()
            await honest.close()


class TestPlanAndLiveView:
    def test_plan_estimates_a_sweeps_runtime_and_cost(self, tmp_path: Path, tenant: Tenant) -> None:
        # Issue 13: `plan` showed "-" for runtime and cost of a sweep.
        job = quadratic(tmp_path / "job", lambda s: None)
        proc = tenant.run("plan", str(job), "--json", "--parallel", "4")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        fits = [c for c in data["candidates"] if c["fits"]]
        assert fits
        assert all(c["expected_cost_micro_credits"] is not None for c in fits)
        best = fits[0]
        estimate = data["estimate"]
        assert estimate["assumption"] == "every trial runs to limits.trial_timeout"
        # 12 trials x 60 s x the floor price, 4 at once (the provider's free devices permitting).
        assert estimate["cost_micro_credits"] == -(
            -12 * 60_000 * best["price_floor_micro_credits_per_device_hour"] // 3_600_000
        )
        assert estimate["cost_micro_credits"] == best["expected_cost_micro_credits"]
        text = tenant.run("plan", str(job)).stdout
        assert "estimate: 12 trials x 60 s (trial_timeout" in text

    def test_the_live_view_shows_what_is_billing(self) -> None:
        # A stuck job once showed "0 done, 0 running, 0 failed" while spend climbed.
        from io import StringIO

        from rich.console import Console

        from node.tenant.jobs import _progress_table
        from node.tenant.sweep import Progress

        out = StringIO()
        progress = Progress(total=12, leases=1, devices=2, rate=700_000, spend=1234)
        Console(file=out, width=120).print(_progress_table("j", progress))
        assert "1 lease(s), 2 device(s): 0.7 credits/hour  (no trial running)" in out.getvalue()


class TestTrialErrorsSurface:
    async def test_an_error_in_a_trial_task_ends_the_run_instead_of_vanishing(
        self, tmp_path: Path
    ) -> None:
        # Issue 14: trial tasks had no owner, so an error in one vanished; its trial
        # stayed "running" and the sweep leased again and again, forever.
        provider = await _provider(tmp_path / "provider", 100_000, [])
        transport = HttpTransport()
        store = Store(tmp_path / "tenant.sqlite")
        try:
            where = tmp_path / "job"
            job = quadratic(
                where,
                lambda s: s["sweep"]["parameters"].update(x={"value": 2}, y={"value": 0}),
            )
            spec = parse_job(job.read_text())
            ws = pack(where)
            JobStore(store).create_job(
                JobRow("lost", "lost", job.read_text(), "", ws.sha256, str(where), "running",
                       "", 0, 0, 0)
            )  # fmt: skip
            # A real fault in the trial task: its log directory's place is a file.
            log_dir = tmp_path / "logs"
            log_dir.write_text("not a directory")
            runner = SweepRunner(
                TenantNode(Identity.generate(), store, transport),
                store,
                "lost",
                spec,
                ws.data,
                ws.sha256,
                peer=provider.address,
                parallel=1,
                log_dir=log_dir,
            )
            # The bound only tells a hang from an answer; nothing here is about speed.
            with pytest.raises(ExceptionGroup) as info:
                await asyncio.wait_for(runner.run(), 60)
            assert info.group_contains(FileExistsError)
            # The run still released what it held: no lease is left billing, on either
            # side (a release the failure interrupted is sent again).
            assert store.list_leases(LeaseState.ACTIVE) == []
            assert provider.store.list_leases(LeaseState.ACTIVE) == []
        finally:
            await transport.close()
            store.close()
            await provider.close()
