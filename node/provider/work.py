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
import re
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from market.bidding import LeaseState, ProviderLease
from market.lifecycle import TrialState
from market.serving import SOCKET_NAME
from node.config import WorkspacesSection
from node.net.node import Node
from node.provider.executor import (
    MAX_METRIC_RECORDS_PER_S,
    Executor,
    LeaseAwareExecutor,
    MetricDrop,
    PreparingExecutor,
    ResourceLimits,
    TrialOutcome,
    TrialSpec,
    WarmingExecutor,
)
from node.provider.service import ProviderService
from node.workspace import WorkspaceError, unpack_file
from protocol.envelope import Envelope
from protocol.errors import (
    BusyError,
    InvalidFieldError,
    MercatoError,
    NotFoundError,
    SpecMismatchError,
    TooLargeError,
    UnexpectedMessageError,
)
from protocol.messages import (
    MAX_STR_BYTES,
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

#: How a run ended (the executor's word) -> the task state the wire reports.
_TASK_STATE: dict[TrialState, TaskState] = {
    TrialState.SUCCEEDED: "succeeded",
    TrialState.FAILED: "failed",
    TrialState.TIMED_OUT: "timed_out",
    TrialState.CANCELLED: "cancelled",
}

_NODE_ID = re.compile(r"[a-z2-7]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: A task's new output is answered at most this often (its result at once): a trial
#: printing without pause would otherwise answer every long poll on arrival, and the
#: tenant would poll back to back into the per-peer rate limit.
STATUS_EVERY_S = 0.1

#: How long the last chunk's answer waits for the unpack before saying "not yet".
UNPACK_WAIT_S = 1.0
MAX_FAILED_WORKSPACES = 10_000
#: Finished tasks of ended leases kept (without their logs) for the operator's view.
MAX_FINISHED_KEPT = 1000


#: The environment variable naming a task's socket; its presence makes the task a service
#: that node.provider.endpoint publishes at ``/svc/<lease_id>/``.
SOCKET_ENV = "MERCATO_SERVICE_SOCKET"


def service_socket(env: dict[str, str]) -> str | None:
    """The socket name a task's environment publishes, or None for a plain task.

    Raises InvalidFieldError for a name that is not a plain file name: the provider
    opens it under the task's work directory and nowhere else.
    """
    name = env.get(SOCKET_ENV)
    if name is None:
        return None
    if not SOCKET_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidFieldError(f"{SOCKET_ENV} must be a plain file name in the work directory")
    return name


LOG_CHUNK = 60_000  # bytes of log per task_status (its ``log`` field holds 65 536 bytes)


def log_piece(log: bytes | bytearray, offset: int) -> tuple[str, int]:
    """The text of the log from ``offset`` for one ``task_status``, and the offset after it.

    The ``log`` field holds at most 65,536 bytes of UTF-8, and a trial prints whatever
    bytes it likes: each invalid byte becomes U+FFFD, three bytes of UTF-8, so a piece
    of invalid bytes is cut to a third. A character split at the end of a piece is left
    for the next one, so valid UTF-8 arrives intact.
    """
    chunk = bytes(log[offset : offset + LOG_CHUNK])
    if offset + len(chunk) < len(log):
        # Drop an incomplete character at the end (at most 3 bytes of a 4-byte one).
        for back in range(1, min(4, len(chunk))):
            lead = chunk[-back]
            if lead < 0x80:
                break
            if lead >= 0xC0:  # a lead byte: is its character complete?
                need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                if back < need:
                    chunk = chunk[:-back]
                break
    text = chunk.decode("utf-8", errors="replace")
    if len(text.encode("utf-8")) > MAX_STR_BYTES:
        chunk = chunk[: MAX_STR_BYTES // 3]
        text = chunk.decode("utf-8", errors="replace")
    return text, offset + len(chunk)


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
    answered_at: float = -1e9  # loop time of the last status with output (STATUS_EVERY_S)

    touch_pending: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """Task ids are the tenant's own: two tenants may use the same one."""
        return (self.tenant, self.assign.task_id)

    @property
    def run_id(self) -> str:
        """The executor's name for this run (its directory), unique across tenants."""
        return f"{self.tenant}.{self.assign.task_id}"

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


@dataclass
class _Workspace:
    """One tenant's workspace on disk: an upload in progress or an unpacked directory."""

    tenant: str
    digest: str
    size: int  # bytes it counts against the budgets (declared archive size)
    used_ms: int  # last upload chunk, check or task that named it
    complete: bool = False
    leases: set[str] = field(default_factory=set)  # the leases it was uploaded or used for
    unpacking: asyncio.Future[None] | None = None  # set once the last byte is in
    error: WorkspaceError | None = None

    @property
    def busy(self) -> bool:
        """Being unpacked: neither expired nor evicted under the thread's feet."""
        return self.unpacking is not None and not self.unpacking.done()


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
        workspaces: WorkspacesSection | None = None,
    ) -> None:
        self.node = node
        self.provider = provider
        self.executor = executor
        self.root = root
        self.workspaces = root / "workspaces"
        self.device_env = device_env or (lambda ids: {"MERCATO_DEVICES": ",".join(ids)})
        self.device_nodes = device_nodes or (lambda ids: [])
        self.limits = limits or ResourceLimits()
        self.max_workspace_bytes = max_workspace_bytes
        self.allow_network = allow_network
        self.ws_limits = workspaces or WorkspacesSection()
        self._workspaces: dict[tuple[str, str], _Workspace] = {}
        # Refused uploads, remembered for partial_ttl_s: a tenant that retries gets the
        # reason at once instead of uploading the same bad archive again.
        self._failed: dict[tuple[str, str], tuple[str, int]] = {}
        self.tasks: dict[tuple[str, str], Task] = {}
        # Tasks of ended leases, newest last, their logs dropped: what ran under a lease
        # and how it ended stays on the operator's page after the lease (node.operator).
        self.finished: deque[Task] = deque(maxlen=MAX_FINISHED_KEPT)
        self._busy: dict[str, set[str]] = {}  # lease_id -> device ids running a task
        self._warmed: set[str] = set()  # leases whose sandboxes were started ahead
        self._started = False

    def start(self) -> None:
        """Make its directories, forget unfinished uploads, then take the work messages.

        A step of the daemon's start (after ``ProviderService.start``, before the node
        serves); the constructor only holds its parts. Trials run in the node's
        TaskGroup (``Node.spawn``), so closing the node ends them. Twice is a no-op.
        """
        if self._started:
            return
        self._started = True
        self.workspaces.mkdir(parents=True, exist_ok=True)
        self._forget_stale_workspaces()
        self.node.handlers.update(
            {
                WorkspaceChunk.TYPE: self._on_chunk,
                TaskAssign.TYPE: self._on_assign,
                TaskQuery.TYPE: self._on_query,
                Cancel.TYPE: self._on_cancel,
            }
        )
        self.provider.on_lease_end.append(self._lease_ended)

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
        for task in list(self.tasks.values()):
            if task.assign.lease_id == lease.lease_id and task.result is not None:
                self._forget(task)
        self._busy.pop(lease.lease_id, None)
        self._warmed.discard(lease.lease_id)
        if isinstance(self.executor, LeaseAwareExecutor):
            self.node.spawn(self.executor.lease_close(lease.lease_id))

    def _forget(self, task: Task) -> None:
        """Drop a finished task of an ended lease: nobody asks for it any more."""
        if self.tasks.get(task.key) is task:
            del self.tasks[task.key]
            # A copy without the log (up to max_output_bytes each); a poll still
            # waiting on the task reads the original.
            self.finished.append(replace(task, log=bytearray()))

    # --- workspaces -------------------------------------------------------------
    #
    # A workspace belongs to the tenant that uploaded it: workspaces/<tenant>/<hash>/,
    # its upload in progress workspaces/<tenant>/<hash>.part. Knowing a hash gives
    # another tenant nothing. Uploads count against a disk budget (all tenants and per
    # tenant) at their declared size from the first chunk; unfinished uploads and
    # unused workspaces expire; hashing and unpacking run in a thread.

    def _ws_dir(self, tenant: str, digest: str) -> Path:
        return self.workspaces / tenant / digest

    def _ws_part(self, tenant: str, digest: str) -> Path:
        return self.workspaces / tenant / f"{digest}.part"

    def _forget_stale_workspaces(self) -> None:
        """At start: keep unpacked workspaces (tenants' leases may outlive a restart).

        Unfinished uploads and unpacks, and the layout of older versions (workspaces not
        under a tenant), are removed: their owner is unknown or their state half-written.
        """
        now = self.node.clock()
        for entry in list(self.workspaces.iterdir()):
            if not (entry.is_dir() and _NODE_ID.fullmatch(entry.name)):
                _remove(entry)
                continue
            for ws in list(entry.iterdir()):
                if ws.is_dir() and _SHA256.fullmatch(ws.name):
                    size = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
                    self._workspaces[(entry.name, ws.name)] = _Workspace(
                        entry.name, ws.name, size, now, complete=True
                    )
                else:
                    _remove(ws)

    def _in_use(self, ws: _Workspace) -> bool:
        """Held by a task, or (unpacked) by a live lease it was uploaded or used for.

        A lease pins its workspace, so a sweep between two trials never loses it; an
        unfinished upload is never pinned: it expires after partial_ttl_s.
        """
        leases = self.provider.engine.leases
        ws.leases = {
            lid
            for lid in ws.leases
            if (lease := leases.get(lid)) is not None and lease.state is LeaseState.ACTIVE
        }
        return (ws.complete and bool(ws.leases)) or any(
            t.tenant == ws.tenant
            and t.assign.workspace_hash == ws.digest
            and t.state in ("queued", "running")
            for t in self.tasks.values()
        )

    async def _drop_workspace(self, ws: _Workspace) -> None:
        if self._workspaces.get((ws.tenant, ws.digest)) is ws:
            del self._workspaces[(ws.tenant, ws.digest)]
        base = self.workspaces / ws.tenant
        paths = [
            self._ws_dir(ws.tenant, ws.digest),
            self._ws_part(ws.tenant, ws.digest),
            base / f"{ws.digest}.unpacking",
        ]

        def remove_all() -> None:
            for path in paths:
                _remove(path)

        await asyncio.to_thread(remove_all)

    async def _expire_workspaces(self, now: int) -> None:
        """Remove unfinished uploads and unused workspaces past their lifetime."""
        lim = self.ws_limits
        for key, (_, at) in list(self._failed.items()):
            if now - at > lim.partial_ttl_s * 1000:
                del self._failed[key]
        for ws in list(self._workspaces.values()):
            ttl_ms = (lim.ttl_s if ws.complete else lim.partial_ttl_s) * 1000
            if now - ws.used_ms > ttl_ms and not ws.busy and not self._in_use(ws):
                log.info("workspace %s of %s expired", ws.digest[:12], ws.tenant[:12])
                await self._drop_workspace(ws)

    async def _make_room(self, tenant: str, size: int) -> None:
        """Fit ``size`` more bytes in the budgets, evicting idle workspaces, or refuse."""
        lim = self.ws_limits
        if size > lim.tenant_bytes or size > lim.disk_bytes:
            raise TooLargeError(
                f"workspace of {size} bytes exceeds this provider's workspace disk budget"
            )

        def over() -> tuple[bool, bool]:
            mine = sum(w.size for w in self._workspaces.values() if w.tenant == tenant)
            total = sum(w.size for w in self._workspaces.values())
            return mine + size > lim.tenant_bytes, total + size > lim.disk_bytes

        idle = sorted(
            (
                w
                for w in self._workspaces.values()
                if w.complete and not w.busy and not self._in_use(w)
            ),
            key=lambda w: w.used_ms,
        )
        for ws in idle:
            tenant_over, disk_over = over()
            if not (tenant_over or disk_over):
                return
            if disk_over or ws.tenant == tenant:
                log.info("workspace %s of %s evicted for room", ws.digest[:12], ws.tenant[:12])
                await self._drop_workspace(ws)
        tenant_over, disk_over = over()
        if tenant_over:
            raise BusyError(
                f"your workspaces on this provider would pass its {lim.tenant_bytes}-byte "
                "budget per tenant; finish or wait out unfinished uploads"
            )
        if disk_over:
            raise BusyError(f"this provider's {lim.disk_bytes}-byte workspace budget is full")

    async def _on_chunk(self, env: Envelope) -> Body | bytes | None:
        chunk = env.body
        assert isinstance(chunk, WorkspaceChunk)
        lease = self._lease(chunk.lease_id, env.sender)
        if lease.lease_id not in self._warmed and isinstance(self.executor, WarmingExecutor):
            # The lease's sandboxes start while its workspace arrives, not at its first trials.
            self._warmed.add(lease.lease_id)
            self.node.spawn(self.executor.warm_up(self._warm_up_specs(lease)))
        tenant, digest = env.sender, chunk.workspace_hash
        now = self.node.clock()
        await self._expire_workspaces(now)
        ws = self._workspaces.get((tenant, digest))
        if ws is not None and ws.complete:
            ws.used_ms = now
            ws.leases.add(chunk.lease_id)
            return WorkspaceStatus(workspace_hash=digest, received=chunk.total_size, complete=True)
        if chunk.total_size > self.max_workspace_bytes:
            raise TooLargeError(
                f"workspace of {chunk.total_size} bytes exceeds this provider's "
                f"{self.max_workspace_bytes}"
            )
        failed = self._failed.get((tenant, digest))
        if failed is not None:
            raise WorkspaceError(failed[0])
        if ws is None:
            await self._make_room(tenant, chunk.total_size)
            ws = self._workspaces.setdefault(
                (tenant, digest), _Workspace(tenant, digest, chunk.total_size, now)
            )
        if ws.unpacking is None:
            if chunk.total_size != ws.size:
                # The budget holds the size declared first; the hash settles which is true.
                await self._drop_workspace(ws)
                raise UnexpectedMessageError(
                    f"workspace {digest[:12]} was announced with {ws.size} bytes, "
                    f"now {chunk.total_size}: upload it again"
                )
            ws.used_ms = now
            ws.leases.add(chunk.lease_id)
            part = self._ws_part(tenant, digest)
            part.parent.mkdir(parents=True, exist_ok=True)
            have = part.stat().st_size if part.exists() else 0
            if chunk.data and chunk.offset == have:
                if have + len(chunk.data) > chunk.total_size:
                    await self._drop_workspace(ws)
                    raise TooLargeError("chunk runs past the workspace's total size")
                with part.open("ab") as f:
                    f.write(chunk.data)
                have += len(chunk.data)
            if have < chunk.total_size:
                return WorkspaceStatus(workspace_hash=digest, received=have, complete=False)
            ws.unpacking = asyncio.get_running_loop().create_future()
            self.node.spawn(self._unpack(ws))
        assert ws.unpacking is not None
        # Small workspaces are ready within one round trip; a large one answers "all
        # received, not complete" and the tenant asks again (docs/protocol.md).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ws.unpacking), UNPACK_WAIT_S)
        if ws.error is not None:
            raise ws.error
        return WorkspaceStatus(workspace_hash=digest, received=ws.size, complete=ws.complete)

    async def _unpack(self, ws: _Workspace) -> None:
        """Hash and unpack a fully received workspace, in a thread (seconds of disk work)."""
        assert ws.unpacking is not None
        tenant, digest = ws.tenant, ws.digest
        part = self._ws_part(tenant, digest)
        staging = part.parent / f"{digest}.unpacking"
        lim = self.ws_limits

        def unpack_it() -> int:
            _remove(staging)
            size = unpack_file(
                part,
                digest,
                staging,
                max_files=lim.max_files,
                max_bytes=self.max_workspace_bytes,
            )
            staging.rename(self._ws_dir(tenant, digest))
            part.unlink(missing_ok=True)
            return size

        try:
            unpacked = await asyncio.to_thread(unpack_it)
        except Exception as e:
            error = e if isinstance(e, WorkspaceError) else WorkspaceError(f"cannot unpack: {e}")
            log.info("workspace %s of %s refused: %s", digest[:12], tenant[:12], error.reason)
            ws.error = error
            self._failed[(tenant, digest)] = (error.reason, self.node.clock())
            while len(self._failed) > MAX_FAILED_WORKSPACES:
                del self._failed[next(iter(self._failed))]
            await self._drop_workspace(ws)
        else:
            ws.complete = True
            ws.used_ms = self.node.clock()
            log.info(
                "workspace %s unpacked (%d bytes, %d unpacked)", digest[:12], ws.size, unpacked
            )
        finally:
            ws.unpacking.set_result(None)

    # --- tasks ------------------------------------------------------------------

    def _status(self, task: Task, offset: int = 0) -> TaskStatus:
        text, end = log_piece(task.log, offset)
        return TaskStatus(
            lease_id=task.assign.lease_id,
            task_id=task.assign.task_id,
            state=task.state,
            detail=task.cancel_reason,
            log=text,
            log_offset=end,
            metrics=dict(list(task.metrics.items())[:256]),
        )

    async def _on_assign(self, env: Envelope) -> Body | bytes | None:
        assign = env.body
        assert isinstance(assign, TaskAssign)
        known = self.tasks.get((env.sender, assign.task_id))
        if known is not None:
            return self._status(known)
        lease = self._lease(assign.lease_id, env.sender)
        if assign.job_spec_hash != lease.job_spec_hash:
            raise SpecMismatchError(
                f"task names job spec {assign.job_spec_hash[:12]}, but lease "
                f"{lease.lease_id} was bid for {lease.job_spec_hash[:12]}"
            )
        ws = self._workspaces.get((env.sender, assign.workspace_hash))
        if ws is None or not ws.complete:
            raise NotFoundError(f"workspace {assign.workspace_hash[:12]} was not uploaded")
        ws.used_ms = self.node.clock()
        ws.leases.add(lease.lease_id)
        service_socket(dict(assign.env))  # a bad socket name is refused here, not at a request
        if assign.network and not self.allow_network:
            raise UnexpectedMessageError("this provider does not give tasks network access")
        mine = [t for t in self.tasks.values() if t.assign.lease_id == lease.lease_id]
        waiting = sum(1 for t in mine if t.state == "queued")
        if waiting >= lease.units:
            raise BusyError(f"lease {lease.lease_id}: {lease.units} running and queued is full")
        task = Task(assign=assign, tenant=env.sender)
        self.tasks[task.key] = task
        self._schedule(lease)
        if task.state == "queued" and isinstance(self.executor, PreparingExecutor):
            # Its work dir is copied while the tasks before it run, off its start's path.
            with contextlib.suppress(MercatoError):  # a bad field fails the task at its start
                self.node.spawn(self.executor.prepare(self._spec(task)))
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
            if isinstance(self.executor, LeaseAwareExecutor):
                await self.executor.lease_open(lease.lease_id, lease.devices)
            try:
                outcome = await self.executor.run(self._spec(task), on_output, on_metrics)
                state = _TASK_STATE[outcome.state]
                if task.cancel_reason:
                    state = "cancelled"
            except Exception as e:  # the executor failed, not the task: report, never crash
                log.exception("task %s could not run", a.task_id)
                task.log += f"\n[mercato] task could not run: {e}\n".encode()
                state = "failed"
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
                self._forget(task)
            # The log is in memory; the directory can go, last and off the event loop:
            # removing it takes milliseconds of file-system work (rmdir of dirs the
            # sandbox mounted) that held up the next task's start and every long poll.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.executor.discard, task.run_id)

    def _warm_up_specs(self, lease: ProviderLease) -> list[TrialSpec]:
        """One spec per slot of ``lease`` in the shape its trials most likely have: a
        ``python3`` command (as a sweep's), the provider's environment, no network."""
        per_unit = len(lease.devices) // lease.units
        specs = []
        for unit in range(lease.units):
            devices = tuple(lease.devices[unit * per_unit : (unit + 1) * per_unit])
            specs.append(
                TrialSpec(
                    task_id=f"warm-up.{unit}",
                    argv=["python3", "-"],
                    workspace=self.workspaces,
                    timeout_s=1,
                    device_ids=devices,
                    device_env=self.device_env(devices),
                    device_nodes=self.device_nodes(devices),
                    limits=self.limits,
                    warm_key=lease.lease_id,
                )
            )
        return specs

    def _spec(self, task: Task) -> TrialSpec:
        """What the executor runs for ``task`` (on the devices it has been given).

        The task's small files go into the executor's own copy of the workspace (one
        copy per trial); a service's task never shares a warm sandbox.
        """
        a = task.assign
        return TrialSpec(
            task_id=task.run_id,
            argv=list(a.command),
            workspace=self._ws_dir(task.tenant, a.workspace_hash),
            files=dict(a.files),
            warm_key=None if service_socket(dict(a.env)) else a.lease_id,
            timeout_s=a.timeout_ms / 1000,
            env=dict(a.env),
            device_ids=task.devices,
            device_env=self.device_env(task.devices),
            device_nodes=self.device_nodes(task.devices),
            max_output_bytes=a.max_output_bytes,
            network=a.network and self.allow_network,
            limits=self.limits,
        )

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
        task = self.tasks.get((env.sender, q.task_id))
        if task is None or task.assign.lease_id != q.lease_id:
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
        while task.result is None:  # coalesce output; never hold the result
            hold = task.answered_at + STATUS_EVERY_S - loop.time()
            if hold <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.changed.wait(), hold)
        if len(task.log) > q.log_offset or task.result is None:
            task.answered_at = loop.time()
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
            if isinstance(self.executor, PreparingExecutor):
                # Its copy, if one was prepared, goes: it will never start.
                self.node.spawn(self.executor.unprepare(task.run_id))
        elif task.state == "running":
            task.cancel_reason = reason
            self.node.spawn(self.executor.cancel(task.run_id))


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, whichever ``path`` is (if it exists)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
