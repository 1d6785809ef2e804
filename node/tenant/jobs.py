"""Tenant job commands: submit, resume, cancel, and read-only views of the store.

A job lives in the tenant's home (``$MERCATO_HOME/tenant``): its row and trials in the
SQLite store, its workspace archive and trial logs under ``jobs/<job_id>/``. A running
job holds ``jobs/<job_id>/runner.lock`` (flock), so two processes never drive the same
job; ``mercato cancel`` marks the job cancelled in the store and the runner notices.
A job stored as running whose lock nobody holds lost its tenant process (killed, or
the machine went down): ``jobs`` and ``status`` show it as ``interrupted``, with the
command that resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import io
import json
import os
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from market.jobspec import (
    DEFAULT_COMMAND,
    JobError,
    JobSpec,
    Problem,
    missing_envvars,
    parse_job,
    spec_hash,
)
from market.lifecycle import JobState, TrialState
from market.settlement import format_credits
from node.home import NodeHome, resolve_home
from node.net.node import wall_clock_ms
from node.net.transport import tenant_transport
from node.store.job_store import JobRow, JobStore, TrialRow
from node.store.node_store import Store
from node.store.verify_store import VerifyStore
from node.tenant.client import Tenant
from node.tenant.sweep import Progress, SweepRunner, queued
from node.workspace import pack
from protocol.errors import MercatoError


class JobNotFound(MercatoError):
    code = "job_not_found"


class JobBusy(MercatoError):
    code = "job_busy"


def tenant_home() -> NodeHome:
    return NodeHome(resolve_home() / "tenant")


def job_dir(home: NodeHome, job_id: str) -> Path:
    return home.path / "jobs" / job_id


@contextlib.contextmanager
def runner_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock for the job (released if the process dies, even -9)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # `runner_alive` probes the lock for an instant: a few tries get past a probe.
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19:
                    raise JobBusy(
                        f"another mercato process is running this job ({path}); "
                        "wait for it, or stop it first"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def runner_alive(job: JobRow) -> bool:
    """Whether a process holds the job's runner lock (a shared probe, released at once)."""
    path = Path(job.workspace_path).parent / "runner.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def check_workspace(spec: JobSpec, root: Path) -> None:
    """Refuse, before anything is spent, a sweep whose program is not in the workspace.

    Every trial runs ``python3 <program>`` in the unpacked workspace: a program that is
    not a file there (a typo, or a console script) would fail every trial, each billed.
    """
    if spec.kind != "sweep" or "${program}" not in (spec.sweep_config.command or DEFAULT_COMMAND):
        return
    program = spec.sweep_config.program
    if program is None:
        return
    target = (root / program).resolve()
    inside = target == root.resolve() or root.resolve() in target.parents
    if not inside or not target.is_file():
        raise MercatoError(
            f"sweep.program: {program!r} is not a file in the workspace {root} "
            "(trials run `python3 PROGRAM` in a copy of the job file's directory; "
            "for a console script, set sweep.command)"
        )


def load_job_file(path: Path) -> tuple[JobSpec, str]:
    """Parse a job file; errors name the field and the problem, before anything is spent."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MercatoError(f"cannot read {path}: {e.strerror}") from e
    spec = parse_job(text, str(path))
    check_environment(spec, str(path))
    return spec, text


def check_environment(spec: JobSpec, source: str) -> None:
    """Refuse a sweep whose command reads an ``${envvar:NAME}`` the tenant does not set."""
    if spec.sweep is None:
        return
    missing = missing_envvars(spec, os.environ)
    if missing:
        raise JobError(
            source,
            [
                Problem("command", f"${{envvar:{name}}}: {name} is not set in this environment")
                for name in missing
            ],
        )


def notes(spec: JobSpec) -> list[str]:
    """What the job file says that Mercato reads differently from W&B (sweeps only)."""
    return spec.notes() if spec.sweep is not None else []


def new_job_id(spec: JobSpec) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", spec.name).strip("-")[:24] or "job"
    return f"{name}-{secrets.token_hex(3)}"


def find(store: Store, ref: str) -> JobRow:
    jobs = JobStore(store)
    job = jobs.get_job(ref) or jobs.find_job(ref)
    if job is None:
        raise JobNotFound(f"no job {ref!r} (see `mercato jobs`)")
    return job


@dataclass
class JobSummary:
    job: JobRow
    trials: list[TrialRow]
    spend: int
    best: TrialRow | None

    interrupted: bool = False  # stored as running, but no process runs it
    #: Whether a spot check on another provider confirmed the best (README, "Verified
    #: results"); False also when it was not checked (a trusted provider, or verify off).
    best_verified: bool = False

    @property
    def state(self) -> str:
        return "interrupted" if self.interrupted else self.job.state

    @property
    def detail(self) -> str:
        if self.interrupted:
            return (
                "the tenant process running it stopped; continue with "
                f"`mercato resume {self.job.job_id}`"
            )
        return self.job.detail

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.trials:
            word = "queued" if queued(t) else t.state.value
            counts[word] = counts.get(word, 0) + 1
        return {
            "job_id": self.job.job_id,
            "name": self.job.name,
            "state": self.state,
            "detail": self.detail,
            "trials": counts,
            "spend_micro_credits": self.spend,
            "best": None
            if self.best is None
            else {**trial_json(self.best), "verified": self.best_verified},
        }


def trial_json(t: TrialRow) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state,
        "params": t.params,
        "value": t.value,
        "metrics": t.metrics,
        "attempts": t.attempts,
        "provider": t.provider,
        "detail": t.detail,
    }


def summarize(store: Store, job: JobRow) -> JobSummary:
    spec = parse_job(job.spec_yaml, job.job_id)
    trials = JobStore(store).trials(job.job_id)
    if spec.sweep is not None:
        metric = spec.sweep.metric
    else:
        metric = spec.training.metric if spec.training is not None else None
    done = [t for t in trials if t.state is TrialState.SUCCEEDED and t.value is not None]
    checked = VerifyStore(store).verified_numbers(job.job_id)
    best = None
    if done and metric is not None:
        sign = 1.0 if metric.goal == "minimize" else -1.0
        # Of trials tied on the metric, one a check confirmed: the runner re-ran the
        # best its search chose, which need not be the first of the tie.
        best = min(done, key=lambda t: (sign * (t.value or 0.0), t.number not in checked))
    leases = {x.lease_id for x in store.list_leases() if x.job_id == job.job_id}
    spend = -sum(line["amount"] for line in store.ledger() if line["lease_id"] in leases)
    interrupted = job.state is JobState.RUNNING and not runner_alive(job)
    verified = best is not None and best.number in checked
    return JobSummary(job, trials, spend, best, interrupted, verified)


def _progress_table(job_id: str, p: Progress) -> Table:
    table = Table(title=f"sweep {job_id}", show_header=False, min_width=60)
    table.add_column("", style="bold")
    table.add_column("")
    total = "?" if p.total is None else str(p.total)
    table.add_row(
        "trials",
        f"{p.done} done / {total}, {p.running} running, {p.queued} queued, "
        f"{p.failed} failed, {p.pruned} pruned",
    )
    table.add_row(
        "billing",
        f"{p.leases} lease(s), {p.devices} device(s): {format_credits(p.rate)} credits/hour"
        + ("" if p.running or not p.leases else "  (no trial running)"),
    )
    table.add_row("spend", f"{format_credits(p.spend)} credits")
    if p.best is not None:
        number, params, value = p.best
        table.add_row("best", f"trial {number}: {value:.6g}  {json.dumps(params)}")
    if p.message:
        table.add_row("", p.message)
    return table


async def drive(
    job: JobRow,
    spec: JobSpec,
    workspace: bytes,
    *,
    peer: str,
    parallel: int,
    store: Store,
    home: NodeHome,
    quiet: bool,
    max_wait_s: float | None = None,
) -> Progress:
    """Run (or resume) a job until done or cancelled, with a live Rich view."""
    transport = tenant_transport(peer)
    tenant = Tenant(home.load_or_create_identity(), store, transport)
    console = Console(stderr=True)
    live: Live | None = None
    runner = SweepRunner(
        tenant,
        store,
        job.job_id,
        spec,
        workspace,
        job.workspace_hash,
        peer=peer,
        seed=job.seed,
        parallel=parallel,
        log_dir=job_dir(home, job.job_id) / "logs",
        max_wait_s=max_wait_s,
    )
    jobs = JobStore(store)

    said: set[str] = set()

    def show(p: Progress) -> None:
        if live is not None:
            live.update(_progress_table(job.job_id, p))
        elif p.message.startswith(("no lease", "directory unavailable")) and p.message not in said:
            # Without the live view a wait must not be silent: each new reason, once.
            said.add(p.message)
            print(f"[{job.job_id}] waiting: {p.message}", file=sys.stderr, flush=True)
        current = jobs.get_job(job.job_id)
        if current is not None and current.state is JobState.CANCELLED:
            runner.cancel()

    runner.on_progress = show
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, runner.cancel)
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    try:
        if quiet or not console.is_terminal:
            progress = await runner.run()
        else:
            with Live(console=console, refresh_per_second=4, transient=False) as lv:
                live = lv
                progress = await runner.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await tenant.close()
        await transport.close()
    current = jobs.get_job(job.job_id)
    now = wall_clock_ms()
    if runner.cancelled or (current is not None and current.state is JobState.CANCELLED):
        jobs.set_job_state(job.job_id, JobState.CANCELLED, now, "cancelled by the tenant")
    elif runner.stop_reason is not None:
        why = runner.stop_reason + _failure_tail(jobs, job, home, runner.stop_reason)
        jobs.set_job_state(job.job_id, JobState.FAILED, now, why)
    elif progress.done == 0 and progress.failed > 0:
        why = "every trial failed" + _failure_tail(jobs, job, home, "")
        jobs.set_job_state(job.job_id, JobState.FAILED, now, why)
    else:
        jobs.set_job_state(job.job_id, JobState.DONE, now, progress.message)
    return progress


#: Lines of a failed trial's output shown with the reason a sweep failed.
TAIL_LINES = 10


def _failure_tail(jobs: JobStore, job: JobRow, home: NodeHome, said: str) -> str:
    """The commonest failure (unless ``said`` names it) and its last trial's last lines."""
    failed = [t for t in jobs.trials(job.job_id) if t.state is TrialState.FAILED]
    if not failed:
        return ""
    reason, n = Counter(t.detail for t in failed).most_common(1)[0]
    last = max((t for t in failed if t.detail == reason), key=lambda t: t.finished_ms or 0)
    out = "" if reason in said else f"; commonest failure ({n}x): {reason}"
    path = job_dir(home, job.job_id) / "logs" / f"{last.number}.log"
    try:
        lines = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    except OSError:
        lines = []
    if lines:
        body = "\n".join(f"  | {line}" for line in lines)
        out += f"\nlast lines of trial {last.number}'s output:\n{body}"
    return out


async def drive_gang(
    job: JobRow, spec: JobSpec, workspace: bytes, *, peer: str, store: Store, home: NodeHome
) -> None:
    """Run a training or service job on one gang; its run is stored as trial 0."""
    from node.tenant.diloco import DilocoRunner
    from node.tenant.gang import GangRunner

    transport = tenant_transport(peer)
    tenant = Tenant(home.load_or_create_identity(), store, transport)
    jobs = JobStore(store)
    runner: GangRunner | DilocoRunner
    if spec.training is not None and spec.training.sync.method == "diloco":
        # Loosely coupled or not, a DiLoCo job's workers talk only through the tenant.
        runner = DilocoRunner(
            tenant,
            store,
            spec,
            workspace,
            job.workspace_hash,
            peer=peer,
            log_dir=job_dir(home, job.job_id) / "logs" / "diloco",
            on_event=lambda m: print(f"[{job.job_id}] {m}", file=sys.stderr, flush=True),
            job_id=job.job_id,
        )
    else:
        runner = GangRunner(
            tenant,
            store,
            spec,
            workspace,
            job.workspace_hash,
            peer=peer,
            log_path=job_dir(home, job.job_id) / "logs" / "0.log",
            on_event=lambda m: print(f"[{job.job_id}] {m}", file=sys.stderr, flush=True),
            job_id=job.job_id,
        )

    async def watch_cancel() -> None:
        while True:
            await asyncio.sleep(1.0)
            current = jobs.get_job(job.job_id)
            if current is not None and current.state is JobState.CANCELLED:
                runner.cancel()
                return

    if jobs.trial(job.job_id, 0) is None:
        jobs.add_trial(job.job_id, 0, {})
    # The run is trial 0: running from the first lease on, so its outcome is a move.
    jobs.update_trial(job.job_id, 0, state=TrialState.RUNNING, started_ms=wall_clock_ms())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, runner.cancel)
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    try:
        async with asyncio.TaskGroup() as tg:  # owns the watcher: its errors surface
            watcher = tg.create_task(watch_cancel())
            try:
                report = await runner.run()
            finally:
                watcher.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await tenant.close()
        await transport.close()
    result = report.result
    metric = spec.training.metric if spec.training is not None else None
    value = result.metrics.get(metric.name) if (result is not None and metric) else None
    jobs.finish_trial(
        job.job_id,
        0,
        state=report.state,
        value=None if value is None else float(value),
        metrics={} if result is None else dict(result.metrics),
        attempts=report.attempts,
        provider=report.provider,
        lease_id=None if report.lease is None else report.lease.lease_id,
        detail=report.message,
        finished_ms=wall_clock_ms(),
    )
    final = {TrialState.SUCCEEDED: JobState.DONE, TrialState.CANCELLED: JobState.CANCELLED}.get(
        report.state, JobState.FAILED
    )
    if spec.kind == "service" and report.state is not TrialState.CANCELLED:
        final = JobState.FAILED
    current = jobs.get_job(job.job_id)
    if current is not None and current.state is JobState.CANCELLED:
        final = JobState.CANCELLED  # `mercato cancel` came first: the job stays cancelled
    jobs.set_job_state(job.job_id, final, wall_clock_ms(), report.message)


def submit(
    path: Path,
    *,
    peer: str,
    parallel: int,
    seed: int | None,
    quiet: bool,
    max_wait_s: float | None = None,
) -> JobSummary:
    spec, text = load_job_file(path)
    check_workspace(spec, path.resolve().parent)
    ws = pack(path.resolve().parent)
    home = tenant_home()
    job_id = new_job_id(spec)
    d = job_dir(home, job_id)
    d.mkdir(parents=True, exist_ok=True)
    archive = d / "workspace.tar"
    archive.write_bytes(ws.data)
    now = wall_clock_ms()
    with Store(home.store_path) as store, runner_lock(d / "runner.lock"):
        job = JobRow(
            job_id=job_id,
            name=spec.name,
            spec_yaml=text,
            spec_hash=spec_hash(spec),
            workspace_hash=ws.sha256,
            workspace_path=str(archive),
            state=JobState.RUNNING,
            detail="",
            seed=secrets.randbelow(2**31) if seed is None else seed,
            created_ms=now,
            updated_ms=now,
        )
        JobStore(store).create_job(job)
        # stderr: stdout carries only the summary, so `submit --json` output parses as JSON.
        print(
            f"job {job_id}: {ws.files} files ({len(ws.data)} bytes) from {path.parent}",
            file=sys.stderr,
            flush=True,
        )
        for note in notes(spec):
            print(f"note: {note}", file=sys.stderr, flush=True)
        if spec.kind == "sweep":
            asyncio.run(
                drive(
                    job,
                    spec,
                    ws.data,
                    peer=peer,
                    parallel=parallel,
                    store=store,
                    home=home,
                    quiet=quiet,
                    max_wait_s=max_wait_s,
                )
            )
        else:
            asyncio.run(drive_gang(job, spec, ws.data, peer=peer, store=store, home=home))
        return summarize(store, find(store, job_id))


def resume(
    ref: str, *, peer: str, parallel: int, quiet: bool, max_wait_s: float | None = None
) -> JobSummary:
    home = tenant_home()
    with Store(home.store_path) as store:
        job = find(store, ref)
        if job.state in (JobState.DONE, JobState.CANCELLED):
            return summarize(store, job)
        spec = parse_job(job.spec_yaml, job.job_id)
        check_environment(spec, job.job_id)
        data = Path(job.workspace_path).read_bytes()
        with runner_lock(job_dir(home, job.job_id) / "runner.lock"):
            JobStore(store).set_job_state(job.job_id, JobState.RUNNING, wall_clock_ms())
            asyncio.run(
                drive(
                    job,
                    spec,
                    data,
                    peer=peer,
                    parallel=parallel,
                    store=store,
                    home=home,
                    quiet=quiet,
                    max_wait_s=max_wait_s,
                )
            )
            return summarize(store, find(store, job.job_id))


def cancel(ref: str) -> JobRow:
    home = tenant_home()
    with Store(home.store_path) as store:
        job = find(store, ref)
        if job.state is JobState.RUNNING:
            JobStore(store).set_job_state(
                job.job_id, JobState.CANCELLED, wall_clock_ms(), "cancelled by the tenant"
            )
        return find(store, job.job_id)


def _cell(value: Any) -> str:
    """Strings and numbers as themselves; nested values as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(value, sort_keys=True)


def _dotted(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters flattened to dotted names: {"opt": {"lr": 1}} -> {"opt.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def results_csv(trials: list[TrialRow]) -> str:
    """One row per trial, one column per parameter: nested parameters as dotted columns
    (``opt.lr``), as spreadsheets and pandas expect; lists stay JSON text."""
    flat = [_dotted(t.params) for t in trials]
    keys = sorted({k for f in flat for k in f})
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["number", "state", "value", *keys, "attempts", "provider"])
    for t, f in zip(trials, flat, strict=True):
        w.writerow(
            [
                t.number,
                t.state,
                "" if t.value is None else repr(t.value),
                *["" if k not in f else _cell(f[k]) for k in keys],
                t.attempts,
                t.provider or "",
            ]
        )
    return out.getvalue()
