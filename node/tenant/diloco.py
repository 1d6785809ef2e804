"""The tenant drives a DiLoCo job: W workers on several providers, outer steps at home.

The plan (market/placement.py) splits the job into W workers of k devices; one order
of W units of k devices (not a gang) leases them, on one provider or several. Each
worker is a task (torchrun over its k devices when k > 1) that hands its blobs to its
provider's daemon (mercato_trial.diloco). The tenant, which may sit behind NAT, pulls
every blob with ``sync_query``, runs the outer step (market.diloco.OuterLoop: average,
Nesterov) and pushes the new global parameters back with ``sync_chunk``. Both ways
each blob is hashed (SHA-256) and refused on a mismatch.

Elastic: a worker whose provider cannot be reached (connection refused or cut) is left
out of the round at once: the round steps with the others and does not wait for its
deadline; should the worker come back, what it reports counts in the next round. Three
failures in a row, or a failed task, lose the worker; a replacement is leased (not on
a provider already lost); its join is answered when the round open at that moment
closes, so it starts a whole round with the others from the newest global parameters
(market.diloco.OuterLoop.join_due). Each lease is
released at the end with its receipt, so every provider is paid for the time it held
its devices, and a lost one for nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from market.diloco import BlobError, OuterLoop, decode_blob
from market.jobspec import JobSpec, spec_hash
from market.lifecycle import TrialState
from market.placement import Plan, plan
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.gang import DEFAULT_MAX_PRICE, RunReport
from node.tenant.taskclient import TaskClient
from protocol.errors import MercatoError, PeerUnavailableError
from protocol.messages import SyncChunk, SyncQuery, SyncStatus, TaskAssign, TaskResult

log = logging.getLogger("mercato.diloco")

CHUNK = 512 * 1024
#: Failed exchanges in a row after which a worker's provider counts as lost.
MAX_MISSES = 3
RETRY_S = 0.5


class WorkerLost(MercatoError):
    code = "worker_lost"


@dataclass
class Worker:
    """One DiLoCo worker: a task on one unit of a lease."""

    name: str
    index: int
    lease: LeaseRow
    task_id: str
    client: TaskClient
    seq: int = 0
    alive: bool = True
    replacement: bool = False
    #: A replacement whose join was answered at a round boundary: waited for at once.
    aligned: bool = False
    #: Its provider could not be reached at the last try: rounds do not wait for it.
    suspect: bool = False
    unreachable_at: float | None = None  # monotonic, when it first failed to answer
    result: TaskResult | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_up: int = 0
    bytes_down: int = 0


def waited_for(workers: list[Worker]) -> set[str]:
    """The workers a round waits for before its deadline.

    The live workers of the first lease whose provider answers, and replacements once
    they joined at a round boundary (OuterLoop.join_due) or had their first
    pseudo-gradient answered. A worker whose provider refused the last connection is
    not waited for (it counts if it reports in time). A replacement still starting
    (upload, imports) must not hold up a round; one answered in mid-round (the round
    timed out while it waited) has its first pseudo-gradient count in whichever round is
    open when it comes.
    """
    return {
        w.name
        for w in workers
        if w.alive and not w.suspect and (w.seq > 1 or not w.replacement or w.aligned)
    }


@dataclass
class DilocoReport(RunReport):
    """A RunReport with what the outer loop did."""

    outer_steps: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


class DilocoRunner:
    """Lease the workers, relay their outer steps, replace the lost ones."""

    def __init__(
        self,
        tenant: Tenant,
        store: Store,
        spec: JobSpec,
        workspace: bytes,
        workspace_hash: str,
        *,
        peer: str,
        log_dir: Path,
        on_event: Callable[[str], None] | None = None,
        bid_window_ms: int = 1_500,
        heartbeat_interval_ms: int = 1_000,
        job_id: str | None = None,
    ) -> None:
        t = spec.training
        assert t is not None
        assert t.sync.method == "diloco"
        self.tenant = tenant
        self.store = store
        self.spec = spec
        self.training = t
        self.workspace = workspace
        self.workspace_hash = workspace_hash
        self.peer = peer
        self.log_dir = log_dir
        self.on_event = on_event or (lambda _m: None)
        self.bid_window_ms = bid_window_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.job_id = job_id
        outer = -(-(t.steps or t.sync.inner_steps) // t.sync.inner_steps)
        self.loop = OuterLoop(outer, t.sync.round_timeout_ms)
        self.workers: list[Worker] = []
        self.leases: dict[str, LeaseRow] = {}
        self.lost_providers: list[str] = []
        self.replacements_left = t.sync.replacements
        self._cancelled = asyncio.Event()
        self._changed = asyncio.Event()
        self._uploaded: set[str] = set()
        self._plan: Plan | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        self._changed.set()

    async def plan(self) -> Plan:
        await self.tenant.refresh(self.peer)
        return plan(
            self.spec,
            self.tenant.adverts(),
            reputation=self.tenant.reputation(),
            now_ms=self.tenant.clock(),
        )

    # --- leasing ------------------------------------------------------------------

    async def _lease(self, p: Plan, units: int) -> list[LeaseRow]:
        auction = await self.tenant.auction(
            p.requirement,
            units,
            self.spec.budget.max_price or DEFAULT_MAX_PRICE,
            job_spec_hash=spec_hash(self.spec),
            workload="training",
            lease_ms=24 * 3_600_000,
            bid_window_ms=self.bid_window_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            exclude=self.lost_providers,
            k=max(8, len(p.candidates)),
        )
        if not auction.leases:
            self.on_event(f"no lease: {auction.failure or auction.explanation}")
        rows = []
        for tl in auction.leases:
            row = self.store.get_lease(tl.lease_id)
            if row is None:
                continue
            if self.job_id is not None:
                self.store.set_lease_job(row.lease_id, self.job_id)
            self.leases[row.lease_id] = row
            rows.append(row)
            self.on_event(
                f"leased {row.units} worker(s) x {len(row.devices) // row.units} {row.model} "
                f"on {row.provider[:12]} ({row.lease_id})"
            )
        return rows

    def _new_workers(self, rows: list[LeaseRow]) -> list[Worker]:
        out = []
        for row in rows:
            for u in range(row.units):
                index = len(self.workers)
                w = Worker(
                    name=f"w{index}",
                    index=index,
                    lease=row,
                    task_id=f"{row.lease_id[:40]}.w{index}.{u}",
                    client=TaskClient(self.tenant, row),
                )
                self.workers.append(w)
                out.append(w)
        return out

    def _command(self, devices: int) -> list[str]:
        cmd = list(self.training.command)
        if devices <= 1:
            return cmd if cmd[0] in ("python", "python3") else ["python", *cmd]
        if cmd[0] in ("python", "python3", "${interpreter}"):
            cmd = cmd[1:]
        return ["torchrun", "--standalone", f"--nproc_per_node={devices}", *cmd]

    async def _start(self, w: Worker) -> None:
        if w.lease.lease_id not in self._uploaded:
            await w.client.upload(self.workspace, self.workspace_hash)
            self._uploaded.add(w.lease.lease_id)
        per = len(w.lease.devices) // w.lease.units
        t = self.training
        await w.client.assign(
            TaskAssign(
                lease_id=w.lease.lease_id,
                task_id=w.task_id,
                job_spec_hash=spec_hash(self.spec),
                workspace_hash=self.workspace_hash,
                command=self._command(per),
                env={
                    "MERCATO_DILOCO_WORKER": str(w.index),
                    "MERCATO_DILOCO_WORKERS": str(len(self.workers)),
                    "MERCATO_DILOCO_INNER_STEPS": str(t.sync.inner_steps),
                    "MERCATO_DILOCO_COMPRESSION": t.sync.compression,
                    # The last outer step: an overlapping worker waits for that one only.
                    "MERCATO_DILOCO_OUTER_STEPS": str(self.loop.total_steps),
                },
                timeout_ms=self.spec.limits.trial_timeout_ms,
                max_output_bytes=self.spec.limits.max_output_bytes,
            )
        )
        self.on_event(f"worker {w.name} started on {w.lease.provider[:12]} ({w.task_id})")

    # --- the exchange -------------------------------------------------------------

    async def _pull(self, w: Worker) -> bytes | None:
        """The worker's blob ``w.seq`` (hash-checked); None once its task has ended."""
        buf = bytearray()
        digest = total = None
        misses = 0
        while True:
            if not w.alive or self._cancelled.is_set():
                return None
            asked = time.monotonic()
            try:
                body = await w.client.send(
                    SyncQuery(
                        lease_id=w.lease.lease_id,
                        task_id=w.task_id,
                        seq=w.seq,
                        offset=len(buf),
                        wait_ms=5_000,
                    ),
                    timeout_s=20,
                )
                misses = 0
                self._reached(w)
            except MercatoError as e:
                misses += 1
                self._unreachable(w, e)
                if misses >= MAX_MISSES:
                    raise WorkerLost(f"{w.name}: {e}") from e
                await asyncio.sleep(RETRY_S)
                continue
            if isinstance(body, SyncStatus):
                if w.result is not None:
                    return None
                if time.monotonic() - asked < 0.1:  # answered at once: the task has ended
                    await asyncio.sleep(0.2)  # and its result is on its way to _follow
                continue
            if not isinstance(body, SyncChunk) or body.task_id != w.task_id or body.seq != w.seq:
                raise WorkerLost(f"{w.name}: unexpected answer to sync_query")
            if digest is None:
                digest, total = body.blob_hash, body.total_size
            if body.blob_hash != digest or body.total_size != total or body.offset != len(buf):
                buf.clear()
                digest, total = body.blob_hash, body.total_size
                if body.offset != 0:
                    continue
            buf += body.data
            if total is not None and len(buf) >= total:
                data = bytes(buf)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise WorkerLost(f"{w.name}: blob {w.seq} does not match its hash")
                w.bytes_up += len(data)
                return data

    async def _push(self, w: Worker, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        offset, misses = 0, 0
        while True:
            try:
                status = await w.client.send(
                    SyncChunk(
                        lease_id=w.lease.lease_id,
                        task_id=w.task_id,
                        seq=w.seq,
                        blob_hash=digest,
                        offset=offset,
                        total_size=len(data),
                        data=data[offset : offset + CHUNK],
                    ),
                    timeout_s=30,
                )
                misses = 0
                self._reached(w)
            except MercatoError as e:
                misses += 1
                self._unreachable(w, e)
                if misses >= MAX_MISSES:
                    raise WorkerLost(f"{w.name}: {e}") from e
                await asyncio.sleep(RETRY_S)
                continue
            if not isinstance(status, SyncStatus):
                raise WorkerLost(f"{w.name}: unexpected answer to sync_chunk")
            if status.complete:
                w.bytes_down += len(data)
                return
            offset = status.received

    async def _serve(self, w: Worker) -> None:
        """One worker's life: start, join, report every round, get the answers."""
        await self._start(w)
        follow = asyncio.ensure_future(self._follow(w))
        try:
            while w.alive and not self._cancelled.is_set():
                data = await self._pull(w)
                if data is None:
                    return
                try:
                    blob = decode_blob(data)
                except BlobError as e:
                    raise WorkerLost(f"{w.name}: {e}") from e
                if w.seq == 0:
                    step = self.loop.outer_step
                    self.loop.join(blob.values, worker=w.name, now_ms=self.tenant.clock())
                    if w.replacement and step > 0:
                        await self._join_at_boundary(w, step)
                    else:
                        await self._start_together()
                    answer = self.loop.answer()
                else:
                    if self.loop.done:
                        answer = self.loop.answer()
                    else:
                        w.answered.clear()
                        self.loop.report(w.name, blob.values, self.tenant.clock())
                        self._changed.set()
                        await w.answered.wait()
                        if not w.alive:
                            return
                        answer = self.loop.answer()
                await self._push(w, answer)
                w.seq += 1
            await follow
        finally:
            if not follow.done():
                with contextlib.suppress(asyncio.TimeoutError, MercatoError):
                    await asyncio.wait_for(asyncio.shield(follow), 30)
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError, MercatoError):
                await follow

    async def _join_at_boundary(self, w: Worker, step: int) -> None:
        """Hold a replacement's join answer until the round open when it joined closes
        (OuterLoop.join_due), so that it starts a whole round with the others."""
        joined_ms = self.tenant.clock()
        began = time.monotonic()
        while not self._cancelled.is_set() and w.alive:
            others = any(o.alive and o is not w and o.seq > 0 for o in self.workers)
            if self.loop.join_due(step, joined_ms, self.tenant.clock(), others_running=others):
                break
            await asyncio.sleep(0.02)
        w.aligned = self.loop.outer_step > step and not self.loop.done
        self.on_event(
            f"worker {w.name} starts at outer step {self.loop.outer_step} "
            f"({time.monotonic() - began:.2f} s after it joined"
            f"{', at the round boundary' if w.aligned else ''})"
        )
        self._changed.set()

    async def _start_together(self) -> None:
        """Hold a join's answer until the first lease's live workers have all joined.

        A worker's first inner step is where its utilisation starts counting; without
        this, a worker whose sandbox started seconds earlier trains round 1 alone and
        then waits for the last one at the first outer step (market.diloco.OuterLoop).
        """
        while not self._cancelled.is_set():
            first = {w.name for w in self.workers if w.alive and not w.replacement}
            if self.loop.started(first, self.tenant.clock()):
                return
            await asyncio.sleep(0.02)

    async def _follow(self, w: Worker) -> None:
        path = self.log_dir / f"{w.name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as logf:

            def on_log(text: str) -> None:
                logf.write(text)
                logf.flush()

            w.result = await w.client.follow(w.task_id, on_log)
        if w.result.state != "succeeded" and not self.loop.done:
            self._lose(w, f"task {w.result.state} (exit {w.result.exit_code})")

    def _unreachable(self, w: Worker, e: MercatoError) -> None:
        """Its provider did not answer: leave the worker out of the rounds until it does.

        A refused or cut connection (PeerUnavailableError) is evidence enough to stop
        waiting for it; a slow answer (a timeout, e.g. a loaded provider) is not: the
        round's deadline covers that. The worker stays in the job (a restarted daemon
        comes back); three failures in a row lose it.
        """
        if not isinstance(e, PeerUnavailableError):
            return
        if w.suspect or not w.alive:
            return
        w.suspect = True
        w.unreachable_at = time.monotonic()
        self.on_event(f"worker {w.name}: provider unreachable, the round goes on without it")
        self._changed.set()

    def _reached(self, w: Worker) -> None:
        if w.suspect:
            w.suspect, w.unreachable_at = False, None
            self.on_event(f"worker {w.name}: provider answers again")
            self._changed.set()

    def _lose(self, w: Worker, why: str) -> None:
        if not w.alive:
            return
        w.alive = False
        w.answered.set()
        self.loop.pending.pop(w.name, None)
        since = ""
        if w.unreachable_at is not None:
            since = f" ({time.monotonic() - w.unreachable_at:.2f} s after it was first unreachable)"
        self.on_event(f"worker {w.name} on {w.lease.provider[:12]} lost: {why}{since}")
        if w.lease.provider not in self.lost_providers:
            self.lost_providers.append(w.lease.provider)
            self.store.record_outcome(w.lease.provider, "failed")
        self._changed.set()

    async def _guard(self, w: Worker, tg: asyncio.TaskGroup) -> None:
        """Run a worker; if it is lost, lease a replacement that joins where the job is."""
        try:
            await self._serve(w)
        except MercatoError as e:
            self._lose(w, str(e))
        except Exception as e:  # a bug or a peer's bad bytes must not end the whole job
            log.exception("worker %s failed", w.name)
            self._lose(w, f"{type(e).__name__}: {e}")
        if w.alive or self.loop.done or self._cancelled.is_set():
            return
        while self.replacements_left > 0 and not self.loop.done and not self._cancelled.is_set():
            self.replacements_left -= 1
            # One more unit of the planned worker size (not a new plan of the whole job).
            assert self._plan is not None
            await self.tenant.refresh(self.peer)
            rows = await self._lease(self._plan, 1)
            if rows:
                for nw in self._new_workers(rows):
                    nw.replacement = True
                    self.on_event(f"replacement {nw.name} for {w.name}")
                    tg.create_task(self._guard(nw, tg))
                return
            await asyncio.sleep(1.0)

    async def _heartbeats(self) -> None:
        """Heartbeat every lease; three misses in a row lose its workers."""
        misses: dict[str, int] = {}
        seq = 0
        while not self._cancelled.is_set() and not self._all_finished():
            await asyncio.sleep(self.heartbeat_interval_ms / 1000)
            seq += 1
            for lease_id, row in list(self.leases.items()):
                mine = [w for w in self.workers if w.lease.lease_id == lease_id and w.alive]
                if not mine:
                    continue
                ok = await self.tenant.heartbeat(row, seq)
                misses[lease_id] = 0 if ok else misses.get(lease_id, 0) + 1
                if misses[lease_id] >= 3:
                    for w in mine:
                        self._lose(w, "stopped answering heartbeats")

    def _all_finished(self) -> bool:
        return all(not w.alive or w.result is not None for w in self.workers) and bool(self.workers)

    async def _rounds(self) -> None:
        """Take each outer step when every live worker reported or the round timed out."""
        while not self.loop.done and not self._cancelled.is_set():
            if not any(w.alive for w in self.workers) and self.replacements_left <= 0:
                return
            live = waited_for(self.workers)
            if self.loop.ready(live, self.tenant.clock()):
                began = time.monotonic()
                reporters = self.loop.step()
                self.on_event(
                    f"outer step {self.loop.outer_step}/{self.loop.total_steps}: "
                    f"{len(reporters)} of {len(live)} live worker(s) "
                    f"({time.monotonic() - began:.3f} s)"
                )
                for w in self.workers:
                    if w.name in reporters or self.loop.done:
                        w.answered.set()
                continue
            self._changed.clear()
            deadline = self.loop.deadline_ms()
            wait = 1.0 if deadline is None else max(0.01, (deadline - self.tenant.clock()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(wait, 1.0))

    async def run(self) -> DilocoReport:
        report = DilocoReport(state=TrialState.FAILED)
        p = await self.plan()
        if p.missing is not None or p.split is None:
            report.message = p.missing or "the plan has no DiLoCo split"
            self.on_event(report.message)
            return report
        self.on_event(p.split.describe())
        self._plan = p
        rows = await self._lease(p, p.units)
        if sum(r.units for r in rows) < p.units:
            more = await self._lease(p, p.units - sum(r.units for r in rows))
            rows += more
        if not rows:
            report.message = "no provider accepted the order"
            return report
        try:
            async with asyncio.TaskGroup() as tg:
                for w in self._new_workers(rows):
                    tg.create_task(self._guard(w, tg))
                tg.create_task(self._rounds())
                beat = tg.create_task(self._heartbeats())
                while (
                    not (self.loop.done and self._all_finished()) and not self._cancelled.is_set()
                ):
                    if all(not w.alive for w in self.workers) and self.replacements_left <= 0:
                        break
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 1.0)
                    if self._all_finished() and self.loop.done:
                        break
                for w in self.workers:
                    w.alive = w.alive and w.result is not None
                    w.answered.set()
                self._cancelled.set()  # stops the helpers; the job itself is over
                beat.cancel()
        finally:
            for row in self.leases.values():
                with contextlib.suppress(MercatoError, TimeoutError):
                    receipt = await asyncio.wait_for(self.tenant.release(row), 10)
                    report.spend += receipt.amount
        report.workers = list(self.workers)
        report.outer_steps = self.loop.outer_step
        report.history = list(self.loop.history)
        report.lost = list(self.lost_providers)
        report.providers_tried = sorted({w.lease.provider for w in self.workers})
        report.attempts = len(self.workers)
        done = [
            w.result for w in self.workers if w.result is not None and w.result.state == "succeeded"
        ]
        if self.loop.done and done:
            report.state = TrialState.SUCCEEDED
            metrics: dict[str, float | int] = {}
            for r in done:
                for k, v in r.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v) / len(done)
            report.result = done[0].model_copy(update={"metrics": metrics})
            report.message = (
                f"{report.outer_steps} outer steps on {len(report.providers_tried)} provider(s)"
            )
        else:
            report.message = (
                f"stopped after {self.loop.outer_step} of {self.loop.total_steps} outer steps"
            )
        return report
