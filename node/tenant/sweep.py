"""The tenant runs a sweep: leases slots by auction, feeds them trials, survives failures.

One coroutine (``SweepRunner.run``) owns the job's state; trial coroutines and the
heartbeat loop report back to it. Every trial is written to the store *before* it is
assigned, and every result is recorded at most once (``JobStore.finish_trial`` only
updates a trial that is not final), so:

* a provider that dies loses its lease; its trials go back to pending and are retried
  on a *different* provider (new auction if needed), up to ``limits.retries``;
* a slow provider answering after its trial was retried elsewhere changes nothing;
* after ``kill -9`` of the tenant, ``resume`` rebuilds the search from the store:
  finished trials are never run again, unfinished ones start over.

The runner keeps the sweep's promises (market/sweepguard.py decides, this module acts):
it never starts a trial that ``budget.max_spend`` could not pay for if every trial ran
to its timeout; it cancels a trial the provider keeps past ``trial_timeout`` plus
``TRIAL_GRACE_MS`` and gives up that provider's lease (stops paying for it); it stops
after ``limits.max_failures`` failed trials in a row; and it stops waiting for a lease
after ``max_wait_s``. Each stop sets ``stop_reason``, which the CLI prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from market.jobspec import PARAMS_FILE_ENV, SEED_ENV, JobSpec, args_json, render_command
from market.lifecycle import (
    EXECUTOR_OUTCOMES,
    SEARCH_OUTCOMES,
    LeaseState,
    TrialState,
    recorded_trial_state,
)
from market.search import FinishedTrial, Search, Trial
from market.sweepguard import Budget, FailureWatch, LeaseUse, missing_metric
from market.sweepplan import LeaseWait, TrialDeadline, pick_pending, units_wanted
from node.store.job_store import JobStore, TrialRow
from node.store.node_store import LeaseRow, Store
from node.store.verify_store import Vote
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from node.tenant.verify import Verifier
from protocol.errors import MercatoError, PeerTimeoutError, PeerUnavailableError
from protocol.messages import (
    Cancel,
    TaskAssign,
    TaskResult,
    TaskStatus,
)

log = logging.getLogger("mercato.sweep")

#: Without a budget in the job file, never pay more than this per device-hour (10 credits).
DEFAULT_MAX_PRICE = 10_000_000
#: A trial's detail while it is assigned but its provider has not started it (its
#: device is busy with an earlier trial): counted as queued, not running.
QUEUED_DETAIL = "queued at the provider"
#: Consecutive failed exchanges after which a provider's lease is given up.
MAX_SILENCE = 3
#: Least time between two reads of every trial for the progress view (the CLI's live
#: view redraws 4 times a second).
PROGRESS_S = 0.25
#: How long past ``trial_timeout`` the tenant waits for a provider's result before it
#: cancels the trial, ends the lease and retries elsewhere: the provider kills the trial
#: at the timeout itself, and its result needs a poll round trip to arrive.
TRIAL_GRACE_MS = 10_000
#: Default of ``max_wait_s``: how long a sweep waits with no lease at all.
DEFAULT_MAX_WAIT_S = 120.0


@dataclass
class Progress:
    """What the CLI shows while a sweep runs."""

    total: int | None
    done: int = 0
    running: int = 0
    failed: int = 0
    pruned: int = 0
    queued: int = 0  # assigned, waiting at the provider for a free device
    spend: int = 0  # micro-credits, estimated from leases held so far
    best: tuple[int, dict[str, Any], float] | None = None
    leases: int = 0
    rate: int = 0  # micro-credits per hour the leases held now bill, idle or not
    devices: int = 0  # devices those leases hold
    message: str = ""


@dataclass
class Slot:
    lease: LeaseRow
    capacity: int  # tasks that may be assigned at once (units x queue depth)
    active: set[int] = field(default_factory=set)  # trial numbers
    replicas: set[int] = field(default_factory=set)  # spot checks running (check ids)
    vetted: bool = False  # the provider passed this tenant's canary (or needs none)
    failures: int = 0
    lost: bool = False
    workspace_ready: bool = False
    releasing: bool = False  # a release was started and has not been answered
    # One upload per lease: the trials assigned at once would each send the workspace.
    upload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SweepError(MercatoError):
    code = "sweep_failed"


class TrialOverran(MercatoError):
    """The provider kept a trial past trial_timeout plus the grace."""

    code = "trial_overran"


class SweepRunner:
    """Drive one job to completion (or cancellation) with a Tenant."""

    def __init__(
        self,
        tenant: Tenant,
        store: Store,
        job_id: str,
        spec: JobSpec,
        workspace: bytes,
        workspace_hash: str,
        *,
        peer: str,
        seed: int = 0,
        parallel: int = 8,
        log_dir: Path,
        on_progress: Callable[[Progress], None] | None = None,
        heartbeat_interval_ms: int = 1_000,
        bid_window_ms: int = 1_500,
        max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
        trial_grace_ms: int = TRIAL_GRACE_MS,
    ) -> None:
        self.tenant = tenant
        self.store = store
        self.jobs = JobStore(store)
        self.job_id = job_id
        self.spec = spec
        self.workspace = workspace
        self.workspace_hash = workspace_hash
        self.peer = peer
        self.search = Search(spec, seed=seed)
        self.search_seed = seed
        self.parallel = parallel
        self.log_dir = log_dir
        self.on_progress = on_progress
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.bid_window_ms = bid_window_ms
        self.slots: dict[str, Slot] = {}  # lease_id ->
        self.bad_providers: set[str] = set()
        self.progress = Progress(total=self.search.trial_cap)
        self._wake = asyncio.Event()
        self._tasks: dict[int, asyncio.Task[None]] = {}  # trial number -> its run
        #: Owns every task of a run (heartbeats, trials, cancels sent for the search):
        #: set while ``run`` runs; a task's error ends the run instead of vanishing.
        self._group: asyncio.TaskGroup | None = None
        self._exhausted = False
        self._cancelled = False
        self._progress_due = 0.0
        # Whether the store may hold pending trials not yet assigned (after a restore
        # or a retry); fresh trials of the search are assigned as they are created.
        self._maybe_pending = True
        self.duplicates = 0
        self._spend_since: dict[str, int] = {}
        #: The tenant's environment, for ${envvar:NAME} (the W&B agent reads its own).
        self.environ: dict[str, str] = dict(os.environ)
        self.params_file = params_file_name(workspace)
        self.max_wait_s = max_wait_s  # None: wait for a lease as long as it takes
        self.trial_grace_ms = trial_grace_ms
        self.trial_ms = spec.limits.trial_timeout_ms + trial_grace_ms
        self.budget = Budget(spec.budget.spend_cap, self.trial_ms)
        self.failures = FailureWatch(spec.limits.max_failures)
        #: Why the sweep stopped before its search was done (None: it was not).
        self.stop_reason: str | None = None
        self._budget_blocked = False  # a trial was due but the budget could not pay it
        self._lease_wait = LeaseWait(max_wait_s)  # in loop time: how long no lease is held
        self._last_no_lease = ""
        self.verifier = Verifier(self)
        # Providers this tenant caught returning false results are never asked again.
        self.bad_providers |= self.verifier.vs.dropped()

    # --- bookkeeping ------------------------------------------------------------

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def _refresh_progress(self, rows: list[TrialRow] | None = None) -> None:
        if rows is None:
            rows = self.jobs.trials(self.job_id)
        p = self.progress
        p.done = sum(1 for r in rows if r.state is TrialState.SUCCEEDED)
        p.failed = sum(1 for r in rows if r.state is TrialState.FAILED)
        p.pruned = sum(1 for r in rows if r.state is TrialState.PRUNED)
        p.queued = sum(1 for r in rows if queued(r))
        p.running = sum(1 for r in rows if r.state is TrialState.RUNNING) - p.queued
        p.best = self.search.best()
        p.leases = sum(1 for s in self.slots.values() if not s.lost)
        now = self.tenant.clock()
        p.spend = self._spent_before + sum(
            s.lease.price * len(s.lease.devices) * max(0, now - s.lease.start_ms) // 3_600_000
            for s in self.slots.values()
        )
        held = [s for s in self.slots.values() if not s.lost]
        p.devices = sum(len(s.lease.devices) for s in held)
        p.rate = sum(s.lease.price * len(s.lease.devices) for s in held)

    _spent_before = 0

    def _restore(self) -> None:
        """Rebuild the search from the store; unfinished trials start over."""
        rows = self.jobs.trials(self.job_id)
        self.search.restore(
            [finished_trial(r) for r in rows if r.state in SEARCH_OUTCOMES],
            next_number=max((r.number for r in rows), default=-1) + 1,
            running=[Trial(r.number, r.params) for r in rows if unfinished(r)],
        )
        for r in rows:
            if r.state is TrialState.RUNNING:
                self.jobs.update_trial(self.job_id, r.number, state=TrialState.PENDING)
        self._spent_before = -sum(
            line["amount"] for line in self.store.ledger() if self._is_ours(line["lease_id"])
        )

    async def _settle_stale_leases(self) -> None:
        """End the leases a killed run of this job left active, paying what they held.

        A provider that still holds one (the tenant came back within its heartbeat
        grace) frees the units and bills the time so far; one that gave it up already
        (or is gone) answers with no receipt, and the lease is recorded as lost.
        """

        async def settle(lease: LeaseRow) -> None:
            try:
                receipt = await self.tenant.release(lease)
            except MercatoError:
                self.store.set_lease_state(lease.lease_id, LeaseState.LOST, self.tenant.clock())
            else:
                self._spent_before += receipt.amount

        held = self.store.list_leases(LeaseState.ACTIVE)
        stale = [x for x in held if x.job_id == self.job_id]
        await asyncio.gather(*(settle(x) for x in stale))

    def _is_ours(self, lease_id: str) -> bool:
        lease = self.store.get_lease(lease_id)
        return lease is not None and lease.job_id == self.job_id

    # --- main loop --------------------------------------------------------------

    async def run(self) -> Progress:
        self._restore()
        await self._settle_stale_leases()
        self._refresh_progress()
        try:
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                hb = tg.create_task(self._heartbeats())
                try:
                    await self._loop()
                finally:
                    self._group = None  # nothing new starts; the group waits for the rest
                    hb.cancel()
                    for t in self._tasks.values():
                        t.cancel()
                    self.verifier.cancel_all()
        finally:
            await self._release_all()
            if self._cancelled:
                self._cancel_unfinished()
        self._refresh_progress()
        self._notify()
        return self.progress

    def _cancel_unfinished(self) -> None:
        """A cancelled job's unfinished trials end as cancelled, not as running forever."""
        now = self.tenant.clock()
        for r in self.jobs.trials(self.job_id):
            if unfinished(r):
                self.jobs.finish_trial(
                    self.job_id,
                    r.number,
                    state=TrialState.CANCELLED,
                    detail="job cancelled",
                    finished_ms=now,
                )

    def cancel(self) -> None:
        self._cancelled = True
        self._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def _loop(self) -> None:
        while not self._cancelled:
            # Cleared before the work, not after: a trial that ends (or a lease that
            # arrives) while this pass awaits an auction must wake the next pass at
            # once, not after the 1 s timeout.
            self._wake.clear()
            self._assign_all()
            # The loop wakes at every result, and reading every trial row was most of
            # what the tenant spent per trial: progress is read at most PROGRESS_S
            # apart, and every pass only once the search is exhausted (when the count
            # of unfinished trials decides the end and the leases still wanted).
            left = 0
            if self._exhausted or time.monotonic() >= self._progress_due:
                rows = self.jobs.trials(self.job_id)
                self._refresh_progress(rows)
                self._progress_due = time.monotonic() + PROGRESS_S
                left = sum(1 for r in rows if unfinished(r))
            self._notify()
            if self._exhausted and not left and self.verifier.before_end():
                return
            if self.stop_reason is not None and not self._tasks:
                return
            need = self._wanted_slots(left)
            if need > 0 and self.stop_reason is None:
                await self._acquire(need)
            self._check_stuck()
            await self._release_idle()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that
            # arrives as the wake is set (a trial task failing does both at once), and
            # the TaskGroup's cancel is how a failed trial task ends the run.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    def _lease_uses(self) -> tuple[list[Slot], list[LeaseUse]]:
        live = [s for s in self.slots.values() if not s.lost]
        uses = [
            LeaseUse(
                s.lease.price,
                len(s.lease.devices),
                s.lease.units,
                s.lease.start_ms,
                len(s.active) + len(s.replicas),
            )
            for s in live
        ]
        return live, uses

    def _affordable(self, slot: Slot) -> bool:
        """May one more trial go to ``slot`` within budget.max_spend (worst case)?"""
        live, uses = self._lease_uses()
        if slot not in live:
            return False
        if self.budget.can_start(self._spent_before, uses, live.index(slot), self.tenant.clock()):
            return True
        self._budget_blocked = True
        return False

    def _stop(self, reason: str) -> None:
        """Start no more trials; the loop ends once the running ones are done."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning("sweep %s stops: %s", self.job_id, reason)
        self.progress.message = reason
        self._wake.set()

    def _check_stuck(self) -> None:
        """Stop when nothing runs and nothing can: the budget is spent, or no lease came."""
        if self.stop_reason is not None or self._tasks:
            return
        live = [s for s in self.slots.values() if not s.lost]
        if self._budget_blocked:
            price = max(
                [s.lease.price for s in live] or [self.max_price],
            )
            self._stop(
                self.budget.explain_exhausted(
                    self._spent_before, price, self.spec.resources.devices_per_trial
                )
            )
            return
        if live:
            self._lease_wait.holding()
            return
        if self._lease_wait.waiting(asyncio.get_running_loop().time()):
            why = self._last_no_lease or "no answer"
            self._stop(
                f"no lease after waiting {self.max_wait_s:g} s: {why} "
                "(submit --max-wait SECONDS, or --wait-forever, to keep waiting)"
            )

    @property
    def max_price(self) -> int:
        return self.spec.budget.max_price or DEFAULT_MAX_PRICE

    def _wanted_slots(self, unfinished: int) -> int:
        live = [s for s in self.slots.values() if not s.lost]
        need = units_wanted(
            # Newcomers that used their room are not replaced, unless nothing is left.
            sum(s.lease.units for s in live) + (self.verifier.held_back_units if live else 0),
            parallel=self.parallel,
            exhausted=self._exhausted,
            unfinished=unfinished,
            budget_held=self._budget_blocked and any(s.active for s in live),
        )
        if self.verifier.starved(live):  # a spot check waits for another provider
            need = max(need, self.spec.resources.devices_per_trial)
        return need

    # --- leases -----------------------------------------------------------------

    async def _acquire(self, units: int) -> None:
        _, uses = self._lease_uses()
        units = self.budget.affordable_units(
            self._spent_before,
            uses,
            self.tenant.clock(),
            self.max_price,
            self.spec.resources.devices_per_trial,
            units,
        )
        if units <= 0:
            self._budget_blocked = True
            return
        try:
            await self.tenant.refresh(self.peer)
        except MercatoError as e:
            self._last_no_lease = f"directory unavailable at {self.peer}: {e.reason}"
            self.progress.message = self._last_no_lease
            await asyncio.sleep(1.0)
            return
        report = await self.tenant.auction(
            self.spec.requirement(),
            units,
            self.max_price,
            job_spec_hash=self.spec_hash,
            workload="sweep",
            lease_ms=24 * 3_600_000,
            bid_window_ms=self.bid_window_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            exclude=sorted(self.bad_providers | self.verifier.avoid() | self.verifier.not_leased()),
        )
        if not report.leases:
            self._last_no_lease = report.failure or report.explanation or "no provider answered"
            self.progress.message = f"no lease: {self._last_no_lease}"
            await asyncio.sleep(1.0)
            return
        self._lease_wait.holding()
        for lease in report.leases:
            row = self.store.get_lease(lease.lease_id)
            if row is None:
                continue
            self.store.set_lease_job(lease.lease_id, self.job_id)
            self.slots[lease.lease_id] = Slot(lease=row, capacity=2 * lease.units)
        self.progress.message = f"leased {report.units} units: {report.explanation}"
        self._wake.set()  # new slots to fill: no waiting

    @property
    def spec_hash(self) -> str:
        from market.jobspec import spec_hash

        return spec_hash(self.spec)

    async def _upload(self, slot: Slot) -> None:
        await TaskClient(self.tenant, slot.lease).upload(self.workspace, self.workspace_hash)
        slot.workspace_ready = True

    async def _send(self, slot: Slot, body: Any, timeout_s: float | None = None) -> Any:
        return await TaskClient(self.tenant, slot.lease).send(body, timeout_s)

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval_ms / 1000)
            seq += 1
            for slot in list(self.slots.values()):
                if slot.lost:
                    continue
                if await self.tenant.heartbeat(slot.lease, seq):
                    slot.failures = 0
                else:
                    slot.failures += 1
                    if slot.failures >= MAX_SILENCE:
                        self._lose(slot, "stopped answering heartbeats")

    def _lose(self, slot: Slot, why: str) -> None:
        """Give up a lease: its trials go back to pending, never to this provider again."""
        if slot.lost:
            return
        slot.lost = True
        provider = slot.lease.provider
        log.warning("lease %s on %s lost: %s", slot.lease.lease_id, provider[:8], why)
        self.progress.message = f"provider {provider[:12]} lost ({why}); retrying its trials"
        self.bad_providers.add(provider)
        self.verifier.on_lose(slot)
        now = self.tenant.clock()
        self.store.set_lease_state(slot.lease.lease_id, LeaseState.LOST, now)
        self.store.record_outcome(provider, "failed")
        for number in list(slot.active):
            task = self._tasks.pop(number, None)
            if task is not None:
                task.cancel()
            self._requeue(number, provider, why)
        slot.active.clear()
        self._wake.set()

    def _requeue(self, number: int, provider: str, why: str) -> None:
        row = self.jobs.trial(self.job_id, number)
        if row is None or not unfinished(row):
            return
        failed = sorted(set(row.failed_providers) | {provider})
        if row.attempts > self.spec.limits.retries:
            if self.jobs.finish_trial(
                self.job_id,
                number,
                state=TrialState.FAILED,
                failed_providers=failed,
                detail=f"gave up after {row.attempts} attempts: {why}",
                finished_ms=self.tenant.clock(),
                intermediate=self._reported(number),
            ):
                self.search.tell(number, None, TrialState.FAILED)
                self._count(
                    number, TrialState.FAILED, f"gave up after {row.attempts} attempts: {why}"
                )
        else:
            self.jobs.update_trial(
                self.job_id,
                number,
                state=TrialState.PENDING,
                failed_providers=failed,
                detail=why,
            )
            self._maybe_pending = True

    async def _release_idle(self) -> None:
        """Release leases that have nothing left to do, so the tenant stops paying."""
        for slot in list(self.slots.values()):
            if self.verifier.hold_back(slot):  # a newcomer that used its room
                await self._release(slot)
        if not self._exhausted and self.stop_reason is None and not self._budget_blocked:
            return
        pending = [r for r in self.jobs.trials(self.job_id) if r.state is TrialState.PENDING]
        if pending and self.stop_reason is None and not self._budget_blocked:
            return
        for slot in list(self.slots.values()):
            if self.verifier.could_use(slot) or self.verifier.under_check(slot.lease.provider):
                continue
            if not slot.lost and not slot.active and not slot.replicas:
                await self._release(slot)

    async def _release(self, slot: Slot) -> None:
        slot.lost = True  # no new work
        slot.releasing = True  # until the provider answered: _release_all tries again
        with contextlib.suppress(MercatoError):
            receipt = await self.tenant.release(slot.lease)
            self._spent_before += receipt.amount
        slot.releasing = False
        self.slots.pop(slot.lease.lease_id, None)

    async def _release_all(self) -> None:
        for slot in list(self.slots.values()):
            if slot.lost and not slot.releasing:
                continue  # its provider is gone
            if self._cancelled:
                with contextlib.suppress(MercatoError):
                    await self._send(
                        slot, Cancel(lease_id=slot.lease.lease_id, reason="job cancelled")
                    )
            await self._release(slot)

    # --- trials -----------------------------------------------------------------

    def _next_trial(self, slot: Slot, pending: list[TrialRow]) -> int | None:
        """A pending trial this provider has not failed, or a fresh one from the search.

        ``pending`` holds the trials pending at the start of this round of assignments;
        the one returned is taken out of it. None also when the budget could not pay
        for one more trial on this slot (``_budget_blocked`` then says so).
        """
        if self.stop_reason is not None:
            return None
        i = pick_pending(pending, slot.lease.provider, self._tasks)
        if i is not None:
            if not self._affordable(slot):
                return None
            return pending.pop(i).number
        if self._exhausted or self.search.exhausted:
            self._exhausted = True
            return None
        if not self._affordable(slot):
            return None
        trial = self.search.ask()
        if trial is None:
            self._exhausted = True
            return None
        self.jobs.add_trial(self.job_id, trial.number, trial.params)
        return trial.number

    def _assign_all(self) -> None:
        self._budget_blocked = False
        pending: list[TrialRow] = []
        if self._maybe_pending:
            rows = self.jobs.trials(self.job_id)
            pending = [r for r in rows if r.state is TrialState.PENDING]
        for slot in list(self.slots.values()):
            self.verifier.assign(slot)
            while (
                not slot.lost
                and slot.vetted
                and len(slot.active) + len(slot.replicas) < slot.capacity
                and self.verifier.may_take(slot)
            ):
                number = self._next_trial(slot, pending)
                if number is None:
                    break
                slot.active.add(number)
                self.verifier.took(slot)
                row = self.jobs.trial(self.job_id, number)
                assert row is not None
                attempt = row.attempts
                self.jobs.update_trial(
                    self.job_id,
                    number,
                    state=TrialState.RUNNING,
                    attempts=attempt + 1,
                    provider=slot.lease.provider,
                    lease_id=slot.lease.lease_id,
                    task_id=self._task_id(number, attempt),
                    started_ms=self.tenant.clock(),
                    detail=QUEUED_DETAIL,
                )
                self._tasks[number] = self._start(self._trial(slot, number, attempt, row.params))
        self._maybe_pending = bool(pending)  # those no slot could take this pass

    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the run's TaskGroup (its owner)."""
        if self._group is None:
            coro.close()
            raise SweepError("the sweep is not running")
        return self._group.create_task(coro)

    def _task_id(self, number: int, attempt: int) -> str:
        return f"{self.job_id[:40]}.{number}.{attempt}"

    async def _trial(self, slot: Slot, number: int, attempt: int, params: dict[str, Any]) -> None:
        task_id = self._task_id(number, attempt)
        try:
            await self._run_trial(slot, number, task_id, params)
        except asyncio.CancelledError:
            raise
        except TrialOverran as e:
            slot.active.discard(number)
            self._requeue(number, slot.lease.provider, e.reason)
            self._lose(slot, e.reason)
            await self._quiet_cancel(slot, task_id, e.reason)
            await self._release(slot)  # stop paying: the receipt bills up to now
        except (PeerUnavailableError, PeerTimeoutError) as e:
            slot.failures += 1
            if slot.failures >= MAX_SILENCE:
                self._lose(slot, str(e.reason))
            else:
                self._requeue(number, slot.lease.provider, e.reason)
        except MercatoError as e:
            log.warning("trial %d on %s failed to run: %s", number, slot.lease.provider[:8], e)
            self._requeue(number, slot.lease.provider, e.reason)
        finally:
            slot.active.discard(number)
            if self._tasks.get(number) is asyncio.current_task():
                del self._tasks[number]
            self._wake.set()

    async def _run_trial(
        self, slot: Slot, number: int, task_id: str, params: dict[str, Any]
    ) -> None:
        if not slot.workspace_ready:
            async with slot.upload_lock:
                if not slot.workspace_ready:
                    await self._upload(slot)
        assign = self.task_assign(slot, number, task_id, params)
        client = TaskClient(self.tenant, slot.lease)
        loop = asyncio.get_running_loop()
        # The provider enforces the timeout; the tenant checks it did (market/sweepplan).
        deadline = TrialDeadline(loop.time(), self.trial_ms / 1000)
        await client.assign(assign)
        log_path = self.log_dir / f"{number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        step = 0
        sweep = self.spec.sweep_config
        metric = sweep.metric.name if sweep.metric else None
        with log_path.open("ab") as logf:

            def on_log(text: str) -> None:
                nonlocal step
                slot.failures = 0
                logf.write(text.encode())
                logf.flush()
                for line in text.splitlines():
                    step += self._intermediate(slot, number, task_id, line, metric, step)

            timer = asyncio.timeout_at(deadline.latest)
            started = False
            ran_from = 0.0

            def on_status(status: TaskStatus) -> None:
                nonlocal started, ran_from
                if status.state != "queued" and not started:
                    started = True
                    ran_from = loop.time()
                    self.jobs.update_trial(self.job_id, number, detail="")
                    timer.reschedule(deadline.started(loop.time()))

            try:
                async with timer:
                    result = await client.follow(task_id, on_log, on_status=on_status)
            except TimeoutError:
                raise TrialOverran(
                    f"provider kept trial {number} past trial_timeout "
                    f"{self.spec.limits.trial_timeout_ms / 1000:g} s + "
                    f"{self.trial_grace_ms / 1000:g} s grace: cancelled, lease ended, "
                    "retried elsewhere"
                ) from None
        slot.failures = 0
        if started and result.state == "succeeded":
            self.time_trial(slot, number, loop.time() - ran_from)
        self._record(slot, number, task_id, result, metric, client.last_envelope)

    def time_trial(self, slot: Slot, number: int, seconds: float) -> None:
        """Keep the tenant's own timing of a trial run: measured speed for ranking."""
        self.verifier.vs.record_duration(
            slot.lease.provider, f"{self.job_id}:{number}", int(seconds * 1000), self.tenant.clock()
        )

    def command_for(self, number: int, params: dict[str, Any]) -> list[str]:
        """Trial ``number``'s argv; the same wherever (and however often) it runs."""
        try:
            return render_command(
                self.spec,
                params,
                interpreter="python3",
                args_json_file=self.params_file,
                environ=self.environ,
                seed=self.verifier.seed(number),
            )
        except ValueError as e:
            raise SweepError(str(e)) from None

    def task_assign(
        self,
        slot: Slot,
        number: int,
        task_id: str,
        params: dict[str, Any],
        command: list[str] | None = None,
    ) -> TaskAssign:
        """The assignment of trial ``number`` (or of a spot check of it) to ``slot``."""
        limits = self.spec.limits
        # Every trial gets its parameters as a JSON file named by $MERCATO_PARAMS_FILE
        # (what ${args_json_file} names too), so a program whose command passes none
        # can read them; the name is one no file of the workspace has. $MERCATO_SEED is
        # the trial's seed: a re-run on another provider gets the same one.
        files = {self.params_file: args_json(params)}
        return TaskAssign(
            lease_id=slot.lease.lease_id,
            task_id=task_id,
            job_spec_hash=self.spec_hash,
            workspace_hash=self.workspace_hash,
            command=command or self.command_for(number, params),
            timeout_ms=limits.trial_timeout_ms,
            max_output_bytes=limits.max_output_bytes,
            attempt=0,
            network=limits.network,
            files=files,
            env={PARAMS_FILE_ENV: self.params_file, SEED_ENV: str(self.verifier.seed(number))},
        )

    def _intermediate(
        self, slot: Slot, number: int, task_id: str, line: str, metric: str | None, step: int
    ) -> int:
        """Feed an intermediate metric value to the pruner; cancel the trial if told to."""
        if metric is None or not line.startswith("{"):
            return 0
        try:
            values = json.loads(line)
        except ValueError:
            return 0
        value = values.get(metric) if isinstance(values, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return 0
        # W&B's hyperband counts logged values; a printed "step" is the trial's own label.
        if self.search.report(number, step, float(value)):
            self.jobs.update_trial(self.job_id, number, detail="pruning")
            self._start(self._quiet_cancel(slot, task_id, "pruned by the search"))
        return 1

    def _reported(self, number: int) -> list[list[float]]:
        """The trial's intermediate values as stored: [step, value] pairs, in step order.
        Call before ``search.tell``: the search forgets them once told."""
        return [[step, v] for step, v in sorted(self.search.reported(number).items())]

    async def _quiet_cancel(self, slot: Slot, task_id: str, reason: str) -> None:
        with contextlib.suppress(MercatoError):
            await self._send(
                slot, Cancel(lease_id=slot.lease.lease_id, task_id=task_id, reason=reason)
            )

    def _record(
        self,
        slot: Slot,
        number: int,
        task_id: str,
        result: TaskResult,
        metric: str | None,
        envelope: bytes = b"",
    ) -> None:
        """Record a trial's result exactly once."""
        if result.task_id != task_id or result.lease_id != slot.lease.lease_id:
            raise SweepError("result names another task")
        row = self.jobs.trial(self.job_id, number)
        pruning = row is not None and row.detail == "pruning"
        value = result.metrics.get(metric) if metric else None
        outcome = run_outcome(result)
        missing = metric is not None and value is None
        state = recorded_trial_state(outcome, metric_missing=missing, pruning=pruning)
        if state is TrialState.SUCCEEDED:
            detail = ""
        elif state is TrialState.PRUNED:
            detail = "pruned by the search"
        elif outcome is TrialState.SUCCEEDED:
            detail = missing_metric(metric or "", result.metrics)
        else:
            detail = f"{result.state} (exit code {result.exit_code})"
        if not self.jobs.finish_trial(
            self.job_id,
            number,
            state=state,
            value=float(value) if value is not None else None,
            metrics=dict(result.metrics),
            detail=detail,
            finished_ms=self.tenant.clock(),
            provider=slot.lease.provider,
            intermediate=self._reported(number),
            result=envelope or None,
        ):
            self.duplicates += 1  # a slow provider answered after the trial was settled
            return
        self.search.tell(number, float(value) if value is not None else None, state)
        self._count(number, state, detail)
        if state == "succeeded" and value is not None:
            row = self.jobs.trial(self.job_id, number)
            params = row.params if row is not None else {}
            self.verifier.on_result(slot, number, task_id, params, float(value), envelope)

    # --- verification outcomes (node/tenant/verify.py decides) ------------------

    def caught(
        self, liar: str, number: int | None, replacement: Vote | None, why: str | None = None
    ) -> None:
        """``liar`` returned a false result: drop it, discard its results, refuse to pay.

        Its leases of this job are given up without a release (no receipt is
        countersigned: the pending payment is refused, and the refusal recorded); every
        result it returned for this job goes back to pending and runs elsewhere, but
        the disputed trial ``number`` takes the value the other two providers agreed
        on (``replacement``) when there is one.
        """
        now = self.tenant.clock()
        why = why or f"caught returning a false result for trial {number}"
        log.warning("provider %s %s: dropped", liar[:12], why)
        vs = self.verifier.vs
        vs.set_trust(liar, vs.trust(liar).lied())
        vs.drop(liar, now)
        self.store.record_outcome(liar, "rejected")
        self.bad_providers.add(liar)
        self.verifier.forget(liar)
        for lease in self.store.list_leases():
            if lease.job_id == self.job_id and lease.provider == liar and lease.state != "ended":
                vs.refuse_payment(lease.lease_id, liar, self.job_id, why, now)
        for slot in list(self.slots.values()):
            if slot.lease.provider == liar:
                self._lose(slot, why)
        for row in self.jobs.trials(self.job_id):
            if row.provider != liar or row.state != "succeeded":
                continue
            if row.number == number and replacement is not None:
                trial = self.jobs.trial(self.job_id, number)
                assert trial is not None
                self.jobs.update_trial(
                    self.job_id,
                    number,
                    value=replacement.value,
                    metrics={**trial.metrics, self.verifier.metric or "": replacement.value},
                    provider=replacement.provider,
                    lease_id=replacement.lease_id,
                    task_id=replacement.task_id,
                    result=replacement.envelope,
                    detail=f"verified: {liar[:12]}'s false result replaced",
                )
            else:
                self.jobs.update_trial(
                    self.job_id,
                    row.number,
                    state="pending",
                    value=None,
                    metrics={},
                    provider=None,
                    result=None,
                    failed_providers=sorted(set(row.failed_providers) | {liar}),
                    detail=f"result discarded: {liar[:12]} {why}",
                )
                self._maybe_pending = True
        self._rebuild_search()
        self.progress.message = f"provider {liar[:12]} {why}: dropped, results re-run"
        self._wake.set()

    def unreproducible(self, number: int) -> None:
        """Three providers, three results: the trial cannot be trusted, nor anyone blamed."""
        self.jobs.update_trial(
            self.job_id,
            number,
            state="failed",
            detail="three providers disagree beyond verify.tolerance: not reproducible "
            "(does the program use $MERCATO_SEED?)",
        )
        self._rebuild_search()
        self._wake.set()

    def _rebuild_search(self) -> None:
        """A fresh search from the store, after results were discarded or replaced."""
        rows = self.jobs.trials(self.job_id)
        search = Search(self.spec, seed=self.search_seed)
        search.restore(
            [finished_trial(r) for r in rows if r.state in SEARCH_OUTCOMES],
            next_number=max((r.number for r in rows), default=-1) + 1,
            running=[Trial(r.number, r.params) for r in rows if unfinished(r)],
        )
        self.search = search

    def _count(self, number: int, state: TrialState, detail: str) -> None:
        """Feed the failure rule; stop the sweep when too many trials failed in a row."""
        self.failures.record(number, state, detail)
        if self.failures.should_stop:
            self._stop(self.failures.explain())


#: The file holding a trial's parameters, in the trial's working directory.
PARAMS_FILE = "mercato-params.json"


def params_file_name(workspace: bytes) -> str:
    """``PARAMS_FILE``, or a variant of it, that names no top-level file of the workspace.

    The provider writes the file into the trial's copy of the workspace: a user's own
    ``params.json`` (or even ``mercato-params.json``) must never be overwritten.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(workspace)) as tar:
            taken = {n.split("/", 1)[0].removeprefix("./") for n in tar.getnames()}
    except tarfile.TarError:
        taken = set()
    name, n = PARAMS_FILE, 0
    while name in taken:
        n += 1
        name = f"mercato-params-{n}.json"
    return name


def finished_trial(row: TrialRow) -> FinishedTrial:
    """A stored finished trial as the search restores it, intermediate values included."""
    return FinishedTrial(
        number=row.number,
        params=row.params,
        state=row.state,
        value=row.value,
        intermediate={int(step): float(value) for step, value in row.intermediate},
    )


def run_outcome(result: TaskResult) -> TrialState:
    """How the provider says the run ended; a state no run ends in (a provider that
    answers "queued" as a final result) counts as a failure."""
    try:
        outcome = TrialState(result.state)
    except ValueError:
        return TrialState.FAILED
    return outcome if outcome in EXECUTOR_OUTCOMES else TrialState.FAILED


def unfinished(row: TrialRow) -> bool:
    """Whether a trial still waits for an outcome (pending or running)."""
    return row.state in (TrialState.PENDING, TrialState.RUNNING)


def queued(row: TrialRow) -> bool:
    """Whether a trial is assigned but waits at its provider for a free device."""
    return row.state is TrialState.RUNNING and row.detail == QUEUED_DETAIL


def elapsed_s(start: float) -> float:
    return time.perf_counter() - start
