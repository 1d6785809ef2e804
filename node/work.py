"""The provider runs tenants' work: workspaces in, sandboxed tasks, results out.

A lease of U units runs at most U tasks at once, each on its own slice of the lease's
devices, and queues at most U more so the tenant can keep every slot busy without a
gap between tasks. The tenant starts every exchange: it uploads the workspace in
chunks, assigns tasks, and long-polls each task for log, metrics and the signed
result. A task id is run at most once, however often it is assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from market.bidding import LeaseState, ProviderLease
from node.core import Node
from node.executor import (
    MAX_METRIC_RECORDS_PER_S,
    Executor,
    MetricDrop,
    ResourceLimits,
    TrialOutcome,
    TrialSpec,
)
from node.provider import ProviderService
from node.workspace import WorkspaceError, unpack
from protocol.envelope import Envelope
from protocol.errors import (
    BusyError,
    NotFoundError,
    SpecMismatchError,
    TooLargeError,
    UnexpectedMessageError,
)
from protocol.messages import (
    Body,
    Cancel,
    TaskAssign,
    TaskQuery,
    TaskResult,
    TaskState,
    TaskStatus,
    Usage,
    WorkspaceChunk,
    WorkspaceStatus,
)

log = logging.getLogger("mercato.work")

LOG_CHUNK = 60_000  # bytes of log per task_status (its ``log`` field holds 65 536 chars)


@dataclass
class Task:
    """One task on this provider, from assignment to signed result."""

    assign: TaskAssign
    tenant: str
    devices: tuple[str, ...] = ()
    state: TaskState = "queued"
    log: bytearray = field(default_factory=bytearray)
    metrics: dict[str, float | int] = field(default_factory=dict)
    result: bytes | None = None  # the sealed TaskResult
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""

    touch_pending: bool = False

    def touch(self) -> None:
        """Wake every long poll waiting on this task."""
        self.touch_pending = False
        self.changed.set()
        self.changed = asyncio.Event()

    def touch_soon(self) -> None:
        """Wake the polls once the current batch of output is handled, not per line."""
        if not self.touch_pending:
            self.touch_pending = True
            asyncio.get_running_loop().call_soon(self.touch)


class WorkService:
    """Handlers for workspace_chunk, task_assign, task_query and cancel."""

    def __init__(
        self,
        node: Node,
        provider: ProviderService,
        executor: Executor,
        root: Path,
        *,
        device_env: Callable[[tuple[str, ...]], dict[str, str]] | None = None,
        device_nodes: Callable[[tuple[str, ...]], list[str]] | None = None,
        limits: ResourceLimits | None = None,
        max_workspace_bytes: int = 256 << 20,
        allow_network: bool = False,
    ) -> None:
        self.node = node
        self.provider = provider
        self.executor = executor
        self.root = root
        self.workspaces = root / "workspaces"
        self.staging = root / "staging"
        self.workspaces.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.device_env = device_env or (lambda ids: {"MERCATO_DEVICES": ",".join(ids)})
        self.device_nodes = device_nodes or (lambda ids: [])
        self.limits = limits or ResourceLimits()
        self.max_workspace_bytes = max_workspace_bytes
        self.allow_network = allow_network
        self.tasks: dict[str, Task] = {}
        self._busy: dict[str, set[str]] = {}  # lease_id -> device ids running a task
        node.handlers.update(
            {
                WorkspaceChunk.TYPE: self._on_chunk,
                TaskAssign.TYPE: self._on_assign,
                TaskQuery.TYPE: self._on_query,
                Cancel.TYPE: self._on_cancel,
            }
        )
        provider.on_lease_end.append(self._lease_ended)

    # --- leases -----------------------------------------------------------------

    def _lease(self, lease_id: str, tenant: str) -> ProviderLease:
        lease = self.provider.engine.leases.get(lease_id)
        if lease is None or lease.tenant != tenant:
            raise NotFoundError(f"no lease {lease_id} for this tenant")
        if lease.state is not LeaseState.ACTIVE:
            raise UnexpectedMessageError(f"lease {lease_id} is {lease.state.value}")
        return lease

    def _lease_ended(self, lease: ProviderLease) -> None:
        for task in list(self.tasks.values()):
            if task.assign.lease_id == lease.lease_id and task.state in ("queued", "running"):
                self._cancel(task, f"lease {lease.state.value}")
        # Forget the lease's finished tasks (running ones when they finish): each holds
        # its log, up to max_output_bytes, which a long-lived provider must not keep.
        for task_id, task in list(self.tasks.items()):
            if task.assign.lease_id == lease.lease_id and task.result is not None:
                del self.tasks[task_id]
        self._busy.pop(lease.lease_id, None)

    # --- workspaces -------------------------------------------------------------

    def _ws_dir(self, digest: str) -> Path:
        return self.workspaces / digest

    async def _on_chunk(self, env: Envelope) -> Body | bytes | None:
        chunk = env.body
        assert isinstance(chunk, WorkspaceChunk)
        self._lease(chunk.lease_id, env.sender)
        digest = chunk.workspace_hash
        if self._ws_dir(digest).is_dir():
            return WorkspaceStatus(workspace_hash=digest, received=chunk.total_size, complete=True)
        if chunk.total_size > self.max_workspace_bytes:
            raise TooLargeError(
                f"workspace of {chunk.total_size} bytes exceeds this provider's "
                f"{self.max_workspace_bytes}"
            )
        part = self.workspaces / f"{digest}.part"
        have = part.stat().st_size if part.exists() else 0
        if chunk.data and chunk.offset == have:
            if have + len(chunk.data) > chunk.total_size:
                part.unlink(missing_ok=True)
                raise TooLargeError("chunk runs past the workspace's total size")
            with part.open("ab") as f:
                f.write(chunk.data)
            have += len(chunk.data)
        if have == chunk.total_size:
            data = part.read_bytes()
            staging = self.workspaces / f"{digest}.unpacking"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                unpack(data, digest, staging)
            except WorkspaceError:
                part.unlink(missing_ok=True)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            staging.rename(self._ws_dir(digest))
            part.unlink(missing_ok=True)
            log.info("workspace %s unpacked (%d bytes)", digest[:12], have)
            return WorkspaceStatus(workspace_hash=digest, received=have, complete=True)
        return WorkspaceStatus(workspace_hash=digest, received=have, complete=False)

    # --- tasks ------------------------------------------------------------------

    def _status(self, task: Task, offset: int = 0) -> TaskStatus:
        chunk = bytes(task.log[offset : offset + LOG_CHUNK])
        text = chunk.decode("utf-8", errors="replace")
        return TaskStatus(
            lease_id=task.assign.lease_id,
            task_id=task.assign.task_id,
            state=task.state,
            detail=task.cancel_reason,
            log=text[:65_536],
            log_offset=offset + len(chunk),
            metrics=dict(list(task.metrics.items())[:256]),
        )

    async def _on_assign(self, env: Envelope) -> Body | bytes | None:
        assign = env.body
        assert isinstance(assign, TaskAssign)
        known = self.tasks.get(assign.task_id)
        if known is not None:
            if known.tenant != env.sender:
                raise NotFoundError(f"task {assign.task_id} belongs to another tenant")
            return self._status(known)
        lease = self._lease(assign.lease_id, env.sender)
        if assign.job_spec_hash != lease.job_spec_hash:
            raise SpecMismatchError(
                f"task names job spec {assign.job_spec_hash[:12]}, but lease "
                f"{lease.lease_id} was bid for {lease.job_spec_hash[:12]}"
            )
        if not self._ws_dir(assign.workspace_hash).is_dir():
            raise NotFoundError(f"workspace {assign.workspace_hash[:12]} was not uploaded")
        if assign.network and not self.allow_network:
            raise UnexpectedMessageError("this provider does not give tasks network access")
        mine = [t for t in self.tasks.values() if t.assign.lease_id == lease.lease_id]
        waiting = sum(1 for t in mine if t.state == "queued")
        if waiting >= lease.units:
            raise BusyError(f"lease {lease.lease_id}: {lease.units} running and queued is full")
        task = Task(assign=assign, tenant=env.sender)
        self.tasks[assign.task_id] = task
        self._schedule(lease)
        return self._status(task)

    def _schedule(self, lease: ProviderLease) -> None:
        """Start queued tasks of ``lease`` on free device slices, oldest first."""
        per_unit = len(lease.devices) // lease.units
        busy = self._busy.setdefault(lease.lease_id, set())
        for task in list(self.tasks.values()):
            if task.assign.lease_id != lease.lease_id or task.state != "queued":
                continue
            free = [d for d in lease.devices if d not in busy]
            if len(free) < per_unit:
                return
            task.devices = tuple(free[:per_unit])
            busy.update(task.devices)
            task.state = "running"
            task.touch()
            log.info(
                "task %s started under lease %s on %s",
                task.assign.task_id,
                lease.lease_id,
                ",".join(task.devices),
            )
            self.node.spawn(self._run(task, lease))

    def _workspace_for(self, task: Task) -> Path:
        """The workspace a task starts from: shared, or a copy with its small files."""
        a = task.assign
        ws = self._ws_dir(a.workspace_hash)
        if not a.files:
            return ws
        staged = self.staging / a.task_id
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(ws, staged)
        for name, content in a.files.items():
            (staged / name).write_text(content)
        return staged

    async def _run(self, task: Task, lease: ProviderLease) -> None:
        a = task.assign
        started = self.node.clock()

        def on_output(data: bytes) -> None:
            task.log += data
            task.touch_soon()

        def on_metrics(values: dict[str, int | float]) -> None:
            # Already checked and capped by the executor's OutputCollector.
            task.metrics.update(values)
            task.touch_soon()

        state: TaskState = "failed"
        outcome: TrialOutcome | None = None
        try:
            try:
                spec = TrialSpec(
                    task_id=a.task_id,
                    argv=list(a.command),
                    workspace=self._workspace_for(task),
                    timeout_s=a.timeout_ms / 1000,
                    env=dict(a.env),
                    device_ids=task.devices,
                    device_env=self.device_env(task.devices),
                    device_nodes=self.device_nodes(task.devices),
                    max_output_bytes=a.max_output_bytes,
                    network=a.network and self.allow_network,
                    limits=self.limits,
                )
                outcome = await self.executor.run(spec, on_output, on_metrics)
                state = outcome.state.value
                if task.cancel_reason:
                    state = "cancelled"
            except Exception as e:  # the executor failed, not the task: report, never crash
                log.exception("task %s could not run", a.task_id)
                task.log += f"\n[mercato] task could not run: {e}\n".encode()
                state = "failed"
            finally:
                shutil.rmtree(self.staging / a.task_id, ignore_errors=True)
            if outcome is not None and outcome.metrics_dropped:
                self._note_dropped(task, outcome.metrics_dropped)
            finished = self.node.clock()
            try:
                result = self._result(task, state, outcome, started, finished)
                sealed = self.node.seal(result, to=task.tenant)
            except Exception as e:  # whatever the trial printed, the task must end
                log.exception("task %s: its result could not be built", a.task_id)
                reason = f"the provider could not build this task's result: {e}"[:1000]
                task.log += f"\n[mercato] {reason}\n".encode()
                task.cancel_reason = reason
                result = self._result(task, "failed", None, started, finished)
                sealed = self.node.seal(result, to=task.tenant)
            task.state = result.state
            task.metrics.update(result.metrics)
            task.result = sealed
            log.info(
                "task %s %s in %d ms (lease %s)",
                a.task_id,
                result.state,
                result.usage.wall_ms,
                a.lease_id,
            )
        finally:
            # Whatever happened above, the devices are free again, every poll wakes and
            # the work directory goes.
            self._busy.get(a.lease_id, set()).difference_update(task.devices)
            if task.result is None:  # not even a minimal result: never leave it running
                task.state = "failed"
            task.touch()
            current = self.provider.engine.leases.get(a.lease_id)
            if current is not None and current.state is LeaseState.ACTIVE:
                self._schedule(current)
            else:  # the lease ended while it ran: nobody will ask for it (see _lease_ended)
                self.tasks.pop(a.task_id, None)
            # The log is in memory; the directory can go, last and off the event loop:
            # removing it takes milliseconds of file-system work (rmdir of dirs the
            # sandbox mounted) that held up the next task's start and every long poll.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.executor.discard, a.task_id)

    def _note_dropped(self, task: Task, dropped: dict[str, int]) -> None:
        """Say in the task's log which printed metrics were not kept, and count them."""
        skipped = dropped.get(MetricDrop.RATE, 0)
        values = {r: n for r, n in dropped.items() if r != MetricDrop.RATE and n}
        if values:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(values.items()))
            task.log += (
                f"\n[mercato] dropped {sum(values.values())} metric value(s) the trial "
                f"printed ({reasons}); see docs/protocol.md for what a metric may hold\n"
            ).encode()
        if skipped:
            task.log += (
                f"\n[mercato] skipped {skipped} metric record(s) printed faster than "
                f"{MAX_METRIC_RECORDS_PER_S} a second (the latest always counts)\n"
            ).encode()
        for reason, n in dropped.items():
            self.node.metrics.metric_values_dropped.labels(reason).inc(n)

    def _result(
        self,
        task: Task,
        state: TaskState,
        outcome: TrialOutcome | None,
        started: int,
        finished: int,
    ) -> TaskResult:
        """The task's result; without an outcome, a minimal one that always validates."""
        a = task.assign
        exit_code = None if outcome is None else outcome.exit_code
        wall = (outcome.wall_ms if outcome is not None else 0) or max(0, finished - started)
        return TaskResult(
            lease_id=a.lease_id,
            task_id=a.task_id,
            state=state,
            exit_code=None if exit_code is None else max(-255, min(255, exit_code)),
            metrics={} if outcome is None else dict(list(outcome.metrics.items())[:256]),
            usage=Usage(
                wall_ms=wall,
                cpu_ms=0 if outcome is None else outcome.cpu_ms,
                device_ms=wall * max(1, len(task.devices)),
                max_rss_bytes=0 if outcome is None else outcome.max_rss_bytes,
                output_bytes=len(task.log) if outcome is None else outcome.output_bytes,
            ),
            started_ms=started,
            finished_ms=max(started, finished),
            output_hash=hashlib.sha256(bytes(task.log)).hexdigest(),
            output_truncated=False if outcome is None else outcome.output_truncated,
        )

    async def _on_query(self, env: Envelope) -> Body | bytes | None:
        q = env.body
        assert isinstance(q, TaskQuery)
        task = self.tasks.get(q.task_id)
        if task is None or task.tenant != env.sender or task.assign.lease_id != q.lease_id:
            raise NotFoundError(f"no task {q.task_id} under lease {q.lease_id}")
        # Hold the answer until what the long poll promises: new output, new metrics or
        # the result. Not for a queued task starting: that woke every poll of a queued
        # task for nothing the tenant reads, one more round trip per trial.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + q.wait_ms / 1000
        seen = dict(task.metrics)
        while len(task.log) <= q.log_offset and task.result is None and task.metrics == seen:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.changed.wait(), remaining)
        if len(task.log) > q.log_offset or task.result is None:
            return self._status(task, min(q.log_offset, len(task.log)))
        return task.result

    async def _on_cancel(self, env: Envelope) -> Body | bytes | None:
        c = env.body
        assert isinstance(c, Cancel)
        targets = [
            t
            for t in self.tasks.values()
            if t.tenant == env.sender
            and t.assign.lease_id == c.lease_id
            and (c.task_id is None or t.assign.task_id == c.task_id)
        ]
        if c.task_id is not None and not targets:
            raise NotFoundError(f"no task {c.task_id} under lease {c.lease_id}")
        for t in targets:
            self._cancel(t, c.reason or "cancelled by the tenant")
        return self._status(targets[0]) if len(targets) == 1 else None

    def _cancel(self, task: Task, reason: str) -> None:
        if task.state == "queued":
            task.state = "cancelled"
            task.cancel_reason = reason
            task.result = self.node.seal(
                TaskResult(
                    lease_id=task.assign.lease_id,
                    task_id=task.assign.task_id,
                    state="cancelled",
                    exit_code=None,
                    usage=Usage(wall_ms=0, cpu_ms=0, device_ms=0),
                    started_ms=self.node.clock(),
                    finished_ms=self.node.clock(),
                ),
                to=task.tenant,
            )
            task.touch()
        elif task.state == "running":
            task.cancel_reason = reason
            self.node.spawn(self.executor.cancel(task.assign.task_id))
