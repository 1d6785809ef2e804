"""Hyperparameter sweeps end to end, as a tenant runs them: `mercato submit`, `resume`,
`cancel`, `status`, `results` and `logs` as real processes against a real local cluster
(daemons on loopback, trials in the bubblewrap sandbox), with a provider and the tenant
killed with SIGKILL mid-sweep.

Trials are tiny stdlib programs (tests/node/jobs/) so a whole sweep takes seconds. Most
tests share one 3-provider cluster; each test has a tenant home of its own (identity,
store, logs) and finds the cluster through MERCATO_PEER. The provider-kill test starts
a cluster of its own, since it leaves a provider dead.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from node.cli import localcluster as cluster
from node.store.job_store import JobStore, TrialRow
from node.store.node_store import LeaseRow, Store

pytestmark = [
    pytest.mark.cluster,
    # node.cli.localcluster.up drops its Popen handles of the detached daemons on return; their
    # __del__ warns that the (deliberately) running process is still running.
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]

JOBS = Path(__file__).parents[1] / "jobs"
GRID_X = [-1, 0.5, 2, 3.5]
GRID_Y = [-2, 0, 1]
GRID = [{"x": x, "y": y} for x, y in itertools.product(GRID_X, GRID_Y)]
T = TypeVar("T")


# --- helpers --------------------------------------------------------------------


@dataclass
class Cluster:
    """A running local cluster: its MERCATO_HOME and its nodes."""

    root: Path
    nodes: list[cluster.NodeRecord]

    @property
    def bootstrap(self) -> str:
        return next(n.address for n in self.nodes if n.role == "bootstrap")

    @property
    def providers(self) -> list[cluster.NodeRecord]:
        return [n for n in self.nodes if n.role == "provider"]

    def provider(self, node_id: str) -> cluster.NodeRecord:
        return next(n for n in self.providers if n.node_id == node_id)

    def provider_log(self) -> str:
        """Every provider's daemon log, concatenated."""
        return "".join(
            (Path(n.home) / "logs" / "node.log").read_text(errors="replace")
            for n in self.providers
            if (Path(n.home) / "logs" / "node.log").exists()
        )


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


@contextlib.contextmanager
def running_cluster(root: Path, providers: int) -> Iterator[Cluster]:
    """Start a cluster under ``root``; always take it down, killing what lingers."""
    nodes = cluster.up(providers, home=root, timeout_s=120.0)
    try:
        yield Cluster(root, nodes)
    finally:
        cluster.down(home=root)
        for n in nodes:
            if not _gone(n.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.pid, signal.SIGKILL)


@dataclass
class Tenant:
    """A tenant's environment: its own MERCATO_HOME, the cluster as its peer."""

    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *args: str, timeout_s: float = 100.0) -> subprocess.CompletedProcess[str]:
        """Run ``mercato ARGS`` to its end."""
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def json(self, *args: str) -> Any:
        proc = self.run(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``mercato ARGS`` in the background (output to files in the home)."""
        self.home.mkdir(parents=True, exist_ok=True)
        n = len(self.procs)
        with (
            (self.home / f"cli-{n}.out").open("wb") as out,
            (self.home / f"cli-{n}.err").open("wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", *args],
                env=self.env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        n = self.procs.index(proc)
        return (self.home / f"cli-{n}.out").read_text() + (self.home / f"cli-{n}.err").read_text()

    @property
    def store_path(self) -> Path:
        return self.home / "tenant" / "node.sqlite"

    def trials(self, job_id: str) -> list[TrialRow]:
        with Store(self.store_path) as store:
            return JobStore(store).trials(job_id)

    def leases(self, job_id: str | None = None) -> list[LeaseRow]:
        with Store(self.store_path) as store:
            return [x for x in store.list_leases() if job_id is None or x.job_id == job_id]

    def job_id(self) -> str:
        """The one job of this tenant, once the submit has stored it."""

        def one() -> str | None:
            for proc in self.procs:  # a submit that died early never stores its job: say why
                if proc.poll() not in (None, 0):
                    raise AssertionError(f"{proc.args[3:]} exited early:\n{self.output(proc)}")
            if not self.store_path.exists():
                return None
            with Store(self.store_path) as store:
                jobs = JobStore(store).list_jobs()
            return jobs[0].job_id if jobs else None

        return wait_for(one, "the job to be stored")


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def job_file(
    where: Path,
    *,
    sleep: float = 0.0,
    steps: int = 0,
    limits: dict[str, Any] | None = None,
) -> Path:
    """A copy of the quadratic job in ``where`` (its own workspace), varied as asked."""
    where.mkdir(parents=True)
    shutil.copy(JOBS / "quadratic" / "trial.py", where / "trial.py")
    spec = yaml.safe_load((JOBS / "quadratic" / "sweep.yaml").read_text())
    spec["sweep"]["parameters"]["sleep"] = {"value": sleep}
    spec["sweep"]["parameters"]["steps"] = {"value": steps}
    spec["limits"].update(limits or {})
    path = where / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def local_losses() -> dict[tuple[float, float], float]:
    """The grid run locally, outside Mercato: the same program, the same points."""
    out = {}
    for point in GRID:
        proc = subprocess.run(
            [
                sys.executable,
                str(JOBS / "quadratic" / "trial.py"),
                f"--x={point['x']}",
                f"--y={point['y']}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[(point["x"], point["y"])] = json.loads(proc.stdout.splitlines()[-1])["loss"]
    return out


def point_of(params: dict[str, Any]) -> tuple[float, float]:
    return (params["x"], params["y"])


def assert_grid_done_once(trials: list[dict[str, Any]] | list[TrialRow]) -> None:
    """Every grid point ran exactly once, under unique trial numbers, and succeeded."""
    rows = [t if isinstance(t, dict) else asdict(t) for t in trials]
    numbers = [r["number"] for r in rows]
    assert sorted(numbers) == list(range(len(GRID))), numbers
    points = sorted(point_of(r["params"]) for r in rows)
    assert points == sorted(point_of(p) for p in GRID)
    assert [r["number"] for r in rows if r["state"] != "succeeded"] == [], rows


def tasks_started(c: Cluster, job_id: str) -> dict[int, list[str]]:
    """Per trial number, the task ids the providers started for it (from their logs)."""
    out: dict[int, list[str]] = {}
    pattern = rf"task ({re.escape(job_id[:40])}\.(\d+)\.\d+) started"
    for m in re.finditer(pattern, c.provider_log()):
        out.setdefault(int(m[2]), []).append(m[1])
    return out


def started_tasks(provider_log: str) -> set[str]:
    """Task ids the providers handed to their executors (a queued task is not one)."""
    return set(re.findall(r"task (\S+) started under lease", provider_log))


def trial_processes(job_id: str) -> list[int]:
    """Pids of processes whose command line or work directory names a task of ``job_id``.

    A fresh sandbox names its trial's work dir on bwrap's command line; a trial forked
    by a warm sandbox's runner works in a directory named after its task.
    """
    needle = f"{job_id[:40]}.".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            named = b""
            with contextlib.suppress(OSError):
                named += (proc / "cmdline").read_bytes()
            with contextlib.suppress(OSError):
                named += os.readlink(proc / "cwd").encode()
            if needle in named:
                pids.append(int(proc.name))
    return pids


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three providers (2x RTX-4090, 1x A100, 4x Bow-IPU) and a bootstrap node."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), providers=3) as c:
        yield c


@contextlib.contextmanager
def tenant_at(home: Path, c: Cluster) -> Iterator[Tenant]:
    """A tenant with its home at ``home``; its background processes die with it."""
    env = {k: v for k, v in os.environ.items() if k != "MERCATO_PEER"}
    env.update(MERCATO_HOME=str(home), MERCATO_PEER=c.bootstrap)
    tenant = Tenant(home, env)
    try:
        yield tenant
    finally:
        for proc in tenant.procs:  # never leave a tenant process behind a failed test
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def tenant(tmp_path: Path, shared_cluster: Cluster) -> Iterator[Tenant]:
    with tenant_at(tmp_path / "tenant-home", shared_cluster) as t:
        yield t


@dataclass
class FinishedJob:
    tenant: Tenant
    job_id: str
    summary: dict[str, Any]  # what `submit --json` printed
    results: list[dict[str, Any]]  # what `results --json` printed


@pytest.fixture(scope="module")
def grid_job(tmp_path_factory: pytest.TempPathFactory, shared_cluster: Cluster) -> Iterator[Any]:
    """The 12-point quadratic grid, submitted once and run to the end."""
    tmp = tmp_path_factory.mktemp("grid")
    job = job_file(tmp / "job", steps=2)
    with tenant_at(tmp / "tenant-home", shared_cluster) as tenant:
        proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "4")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout)
        results = tenant.json("results", summary["job_id"])
        yield FinishedJob(tenant, summary["job_id"], summary, results)


# --- tests ----------------------------------------------------------------------


class TestGridSweep:
    def test_every_point_runs_once_and_the_best_is_the_local_best(
        self, grid_job: FinishedJob
    ) -> None:
        assert grid_job.summary["state"] == "done"
        assert grid_job.summary["trials"] == {"succeeded": len(GRID)}
        trials = grid_job.results
        assert_grid_done_once(trials)

        local = local_losses()
        for t in trials:
            assert t["value"] == pytest.approx(local[point_of(t["params"])])
        best_point = min(local, key=lambda p: local[p])
        best = grid_job.summary["best"]
        assert point_of(best["params"]) == best_point
        assert best["value"] == pytest.approx(local[best_point])

    def test_the_leases_were_released_and_paid(self, grid_job: FinishedJob) -> None:
        leases = grid_job.tenant.leases(grid_job.job_id)
        assert leases
        assert {x.state for x in leases} == {"ended"}
        assert grid_job.summary["spend_micro_credits"] > 0


class TestProviderKilled:
    def test_trials_of_a_killed_provider_are_retried_elsewhere(self, tmp_path: Path) -> None:
        with (
            running_cluster(tmp_path / "cluster", providers=3) as c,
            tenant_at(tmp_path / "tenant-home", c) as tenant,
        ):
            job = job_file(tmp_path / "job", sleep=3.0, steps=3)
            submit = tenant.start("submit", str(job), "--quiet", "--parallel", "4")
            job_id = tenant.job_id()

            def busy_provider() -> tuple[str, set[int]] | None:
                # A provider running a trial with the next one already queued behind it
                # (the tenant keeps one queued per unit, so no slot waits for a round trip).
                started = started_tasks(c.provider_log())
                assigned = [t for t in tenant.trials(job_id) if t.state == "running"]
                for t in assigned:
                    if t.task_id in started:
                        queued = {
                            q.number
                            for q in assigned
                            if q.provider == t.provider and q.task_id not in started
                        }
                        if queued:
                            return t.provider, queued
                return None

            victim, queued_there = wait_for(
                busy_provider, "a provider running a trial with one queued"
            )
            os.kill(c.provider(victim).pid, signal.SIGKILL)
            killed_ms = time.time() * 1000

            assert submit.wait(timeout=100) == 0, tenant.output(submit)
            trials = tenant.trials(job_id)
            assert_grid_done_once(trials)
            retried = [t for t in trials if victim in t.failed_providers]
            assert retried, "no trial was running on the killed provider"
            for t in retried:
                assert t.provider != victim
                assert t.attempts >= 2
            # The trials queued on the dead provider ran elsewhere, once each.
            done = {t.number: t for t in trials}
            for number in queued_there:
                assert done[number].state == "succeeded"
                assert done[number].provider != victim
            for t in trials:
                if t.provider == victim:  # finished there before it died
                    assert t.finished_ms is not None
                    assert t.finished_ms <= killed_ms + 1_000


class TestTenantKilled:
    def test_resume_finishes_the_job_without_rerunning_finished_trials(
        self, tmp_path: Path, tenant: Tenant, shared_cluster: Cluster
    ) -> None:
        job = job_file(tmp_path / "job", sleep=1.5, steps=3)
        submit = tenant.start("submit", str(job), "--quiet", "--parallel", "3")
        job_id = tenant.job_id()

        def midway() -> bool:
            states = [t.state for t in tenant.trials(job_id)]
            return states.count("succeeded") >= 3 and "running" in states

        wait_for(midway, "some trials finished and some running")
        submit.send_signal(signal.SIGKILL)
        submit.wait()

        before = {
            t.number: (t.task_id, t.attempts, t.provider, t.value, t.finished_ms)
            for t in tenant.trials(job_id)
            if t.state == "succeeded"
        }
        assert 3 <= len(before) < len(GRID)
        # Nobody runs it any more (the runner's lock died with the process): it says so.
        status = tenant.json("status", job_id)
        assert status["state"] == "interrupted"
        assert f"mercato resume {job_id}" in status["detail"]
        # What the pruner saw is kept with each finished trial, so a resumed search judges
        # new trials alike: the trial prints loss + 3 - step at steps 0, 1, 2, then its
        # final loss, a line without a step (counted as the next one, 3).
        history = {t.number: t.intermediate for t in tenant.trials(job_id) if t.number in before}
        for number, (*_, value, _) in before.items():
            assert value is not None
            want = [[s, value + 3 - s] for s in range(3)] + [[3, value]]
            assert history[number] == want, number

        resumed = tenant.run("resume", job_id, "--quiet", "--json", "--parallel", "3")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert json.loads(resumed.stdout)["state"] == "done"
        trials = tenant.trials(job_id)
        assert_grid_done_once(trials)
        after = {
            t.number: (t.task_id, t.attempts, t.provider, t.value, t.finished_ms) for t in trials
        }
        for number, row in before.items():
            assert after[number] == row, f"finished trial {number} changed on resume"
        assert all(len(t.intermediate) == 4 for t in trials)

        # The providers' side: a trial finished before the kill was started exactly once.
        started = tasks_started(shared_cluster, job_id)
        for number, (task_id, *_) in before.items():
            assert started[number] == [task_id], f"trial {number} ran again: {started[number]}"
        for t in trials:
            assert t.task_id in started[t.number]
        # The killed run's leases were settled on resume, not left active forever.
        assert "active" not in {x.state for x in tenant.leases(job_id)}


class TestSandbox:
    def test_hostile_trials_are_contained_and_the_job_finishes(
        self, tmp_path: Path, tenant: Tenant, shared_cluster: Cluster
    ) -> None:
        ws = tmp_path / "job"
        ws.mkdir()
        shutil.copy(JOBS / "hostile" / "trial.py", ws / "trial.py")
        outside = tmp_path / "outside"
        outside.mkdir()
        modes = ["read_key", "write_outside", "sleep", "flood", "flood_then_metric"]
        spec = {
            "name": "hostile",
            "sweep": {
                "program": "trial.py",
                "method": "grid",
                "parameters": {
                    "mode": {"values": modes},
                    "cluster": {"value": str(shared_cluster.root / "cluster")},
                    "outside": {"value": str(outside)},
                },
            },
            "limits": {"trial_timeout": "2s", "max_output": "64KB", "retries": 0},
        }
        (ws / "sweep.yaml").write_text(yaml.safe_dump(spec))
        # The keys are there to be stolen: the trial is told exactly where.
        keys = list((shared_cluster.root / "cluster").glob("*/identity.pem"))
        assert len(keys) == len(shared_cluster.nodes)

        proc = tenant.run("submit", str(ws / "sweep.yaml"), "--quiet", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id = json.loads(proc.stdout)["job_id"]
        by_mode = {t["params"]["mode"]: t for t in tenant.json("results", job_id)}
        assert sorted(by_mode) == sorted(modes)

        assert by_mode["read_key"]["state"] == "succeeded"
        assert by_mode["read_key"]["metrics"]["read_key"] == 0
        assert by_mode["read_key"]["metrics"]["saw_key"] == 0

        assert by_mode["write_outside"]["state"] == "succeeded"
        assert by_mode["write_outside"]["metrics"]["wrote_outside"] == 0
        assert list(outside.iterdir()) == []
        assert list((shared_cluster.root / "cluster").glob("*/escaped")) == []

        for mode in ("sleep", "flood"):  # killed at the 2 s timeout
            assert by_mode[mode]["state"] == "failed"
            assert "timed_out" in by_mode[mode]["detail"]

        # The endless printer's log, and the big one's, stop at the 64 KB cap...
        logs = tenant.home / "tenant" / "jobs" / job_id / "logs"
        for mode in ("flood", "flood_then_metric"):
            size = (logs / f"{by_mode[mode]['number']}.log").stat().st_size
            assert 0 < size <= 64_000
        # ...and a metric printed past the cap still arrives.
        assert by_mode["flood_then_metric"]["state"] == "succeeded"
        assert by_mode["flood_then_metric"]["metrics"]["flooded"] == 1 << 20


BAD_JOBS = {
    "unknown method": (("method: grid", "method: annealing"), "sweep.method"),
    "min above max": (
        ("values: [-1, 0.5, 2, 3.5]", "min: 5\n      max: 1"),
        "sweep.parameters.x.min: must be <= max",
    ),
    "budget text": (("max_spend: 10 credits", "max_spend: lots of credits"), "budget.max_spend"),
    "yaml syntax": (("values: [-2, 0, 1]", "values: [-2, 0, 1"), "line 14"),
}


class TestMalformedJob:
    @pytest.mark.parametrize("case", sorted(BAD_JOBS))
    def test_a_bad_job_file_is_refused_before_anything_is_spent(
        self, case: str, tmp_path: Path, tenant: Tenant
    ) -> None:
        (old, new), field_named = BAD_JOBS[case]
        ws = tmp_path / "job"
        ws.mkdir()
        shutil.copy(JOBS / "quadratic" / "trial.py", ws / "trial.py")
        text = (JOBS / "quadratic" / "sweep.yaml").read_text()
        assert old in text
        (ws / "sweep.yaml").write_text(text.replace(old, new))

        proc = tenant.run("submit", str(ws / "sweep.yaml"), "--quiet")
        assert proc.returncode != 0
        assert field_named in proc.stderr
        assert "Traceback" not in proc.stderr
        # Nothing was stored or signed: no job, no lease, not even a tenant key to order with.
        assert not tenant.store_path.exists()
        assert not (tenant.home / "tenant" / "identity.pem").exists()


class TestCancel:
    def test_cancel_from_another_process_stops_the_job_and_releases_its_leases(
        self, tmp_path: Path, tenant: Tenant, shared_cluster: Cluster
    ) -> None:
        job = job_file(tmp_path / "job", sleep=60.0)
        submit = tenant.start("submit", str(job), "--quiet", "--parallel", "3")
        job_id = tenant.job_id()
        # Each trial runs in a sandbox whose command line names its task (its work dir).
        wait_for(lambda: trial_processes(job_id), "a trial process to start")

        # Behind each running trial the next one waits at its provider (60 s sleepers:
        # none ends before the cancel, so none of those may ever start).
        def queued_now() -> set[str] | None:
            # Once every unit runs a trial (its canary done), the rest assigned wait.
            started = started_tasks(shared_cluster.provider_log())
            assigned = {t.task_id for t in tenant.trials(job_id) if t.state == "running"}
            if len(assigned & started) < 3:
                return None
            return assigned - started

        queued = wait_for(queued_now, "trials queued at their providers")

        cancelled = tenant.run("cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert submit.wait(timeout=60) != 0, tenant.output(submit)

        status = tenant.json("status", job_id)
        assert status["state"] == "cancelled"
        assert {t["state"] for t in status["trial_list"]} == {"cancelled"}
        leases = tenant.leases(job_id)
        assert leases
        assert {x.state for x in leases} == {"ended"}
        # The providers ended the leases too, and killed the trials (60 s sleepers).
        ended = {}
        for p in shared_cluster.providers:
            with Store(Path(p.home) / "node.sqlite") as store:
                ended.update({x.lease_id: x.state for x in store.list_leases()})
        assert {ended[x.lease_id] for x in leases} == {"ended"}
        wait_for(lambda: not trial_processes(job_id), "the trial processes to end", 30.0)
        assert re.search(
            rf"task {re.escape(job_id)}\.\d+\.\d+ (?:\(lease \S+\) )?cancelled in",
            shared_cluster.provider_log(),
        )
        assert not queued & started_tasks(shared_cluster.provider_log())


class TestResultsAndLogs:
    def test_results_as_json_and_csv_agree(self, grid_job: FinishedJob) -> None:
        as_json = grid_job.results
        proc = grid_job.tenant.run("results", grid_job.job_id, "--csv")
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert len(rows) == len(as_json) == len(GRID)
        for row, t in zip(rows, as_json, strict=True):
            assert int(row["number"]) == t["number"]
            assert row["state"] == t["state"] == "succeeded"
            assert float(row["value"]) == t["value"]
            assert (float(row["x"]), float(row["y"])) == point_of(t["params"])
            assert int(row["attempts"]) == t["attempts"]
            assert row["provider"] == t["provider"]

    def test_logs_show_a_trials_output(self, grid_job: FinishedJob) -> None:
        t = grid_job.results[5]
        proc = grid_job.tenant.run("logs", grid_job.job_id, str(t["number"]))
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert f"x={float(t['params']['x'])} y={float(t['params']['y'])}" in lines
        assert json.loads(lines[-1]) == {"loss": t["value"]}
        # intermediate values came through as they were printed
        assert [json.loads(x)["step"] for x in lines if '"step"' in x] == [0, 1]

    def test_status_and_jobs_list_the_finished_job(self, grid_job: FinishedJob) -> None:
        status = grid_job.tenant.json("status", grid_job.job_id[:10])
        assert status["job_id"] == grid_job.job_id
        assert status["state"] == "done"
        assert len(status["trial_list"]) == len(GRID)
        jobs = grid_job.tenant.json("jobs")
        assert [j["job_id"] for j in jobs] == [grid_job.job_id]

    def test_logs_of_an_unknown_trial_is_a_clear_error(self, grid_job: FinishedJob) -> None:
        proc = grid_job.tenant.run("logs", grid_job.job_id, "999")
        assert proc.returncode == 1
        assert "no log for trial 999" in proc.stderr
