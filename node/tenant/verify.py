"""Spot-check replication for a sweep: re-run sampled trials on another provider.

The rule (how often, what agrees, who lied) is market/verification.py; this module
runs it with the sweep's own leases and task machinery. A result the rule picks is
run again, same parameters, workspace and seed, on a lease of a *different* provider;
if the metrics disagree beyond the job's tolerance, a third provider decides. The
provider in the minority is caught: the sweep drops it, discards its results, refuses
its pending payment, and the three signed results are kept as evidence
(``mercato evidence JOB``).

Before a sweep ends, the result about to be reported best is checked unless it is
already (``verify.best``), so the reported best is never one provider's word alone
when another provider could be asked.

Room for newcomers is measured in trials (``market.verification.may_take_trial``): while
a proven provider is leased, a provider still at the newcomer rate gets
``NEWCOMER_TRIALS`` trials of the sweep; then its lease is released (it is not
replaced: the units it held count as held) and the proven providers run the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from market.matching import rank
from market.verification import (
    CANARY_METRIC,
    CANARY_ROUNDS,
    MAX_VOTES,
    Tolerance,
    Trust,
    Verdict,
    best_needs_check,
    canary_answer,
    canary_command,
    liars,
    may_take_trial,
    proven,
    should_check,
    trial_seed,
    verdict_of,
)
from node.store.verify_store import VerifyStore, Vote
from node.tenant.taskclient import TaskClient
from protocol.errors import MercatoError
from protocol.messages import Advert, TaskAssign, TaskResult, TaskStatus

if TYPE_CHECKING:
    from node.tenant.sweep import Slot, SweepRunner

log = logging.getLogger("mercato.verify")

#: Times a check is placed (a provider failing to run it) before it is given up.
MAX_CHECK_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class Run:
    """A task run to its end on a provider: its signed result and how long it ran."""

    result: TaskResult
    envelope: bytes  # the provider's signed task_result envelope
    seconds: float | None  # from "running" to the result, by the tenant's clock


@dataclass
class PendingCheck:
    """A check in progress: the votes so far, and who may not cast the next one."""

    check_id: int
    number: int
    params: dict[str, Any]
    votes: list[Vote]
    excluded: set[str] = field(default_factory=set)  # failed to run it
    attempts: int = 0
    dead: bool = False  # its original provider was caught: nothing left to check

    @property
    def providers(self) -> set[str]:
        return {v.provider for v in self.votes} | self.excluded


class Verifier:
    """Owns a sweep's spot checks; the SweepRunner calls it at a few hooks."""

    def __init__(self, runner: SweepRunner) -> None:
        self.r = runner
        self.vs = VerifyStore(runner.store)
        policy = runner.spec.verify
        sweep = runner.spec.sweep_config
        self.metric = sweep.metric.name if sweep.metric else None
        self.enabled = policy.enabled and self.metric is not None
        self.rate = None if policy.rate is None else Fraction(str(policy.rate))
        self.tolerance = Tolerance(policy.tolerance.abs, policy.tolerance.rel)
        self.waiting: list[PendingCheck] = []
        self.running: dict[int, tuple[PendingCheck, Slot, asyncio.Task[None]]] = {}
        self.gave_up: set[int] = set()  # trials no other provider could check
        self._starved_since: float | None = None  # loop time
        self._starved_ms = 0  # the same moment by the tenant's clock (``Tenant.pulled_ms``)
        self.checks_run = 0
        self.canary = policy.enabled and policy.canary
        self.canaries: dict[str, asyncio.Task[None]] = {}  # lease id ->
        self.taken: dict[str, int] = {}  # trials of this sweep assigned, per provider
        self.held_back: set[str] = set()  # newcomers whose room was used: not leased again
        self.held_back_units = 0  # lease units they held, counted as held by the sweep
        self._trusts: dict[str, Trust] = {}  # the store's verify_trust rows, read once
        self.secret = self.vs.draw_secret()  # keys the draw: providers cannot predict it

    # --- hooks ------------------------------------------------------------------

    def seed(self, number: int) -> int:
        return trial_seed(self.r.search_seed, number)

    def on_result(
        self,
        slot: Slot,
        number: int,
        task_id: str,
        params: dict[str, Any],
        value: float,
        envelope: bytes,
    ) -> None:
        """A trial succeeded on ``slot``: check it with the provider's rate."""
        if not self.enabled:
            return
        provider = slot.lease.provider
        rate = self.rate if self.rate is not None else self.vs.trust(provider).rate
        key = f"{self.r.job_id}:{number}:{task_id}:{provider}"
        if should_check(rate, key, self.secret):
            self._open(
                number,
                params,
                Vote("original", provider, value, task_id, slot.lease.lease_id, envelope),
            )

    def may_take(self, slot: Slot) -> bool:
        """Whether ``slot`` may get one more trial of the sweep: a newcomer gets
        ``NEWCOMER_TRIALS`` while a proven provider is leased. A fixed ``verify.rate``
        costs the same on every provider, so it holds nobody back."""
        if not self.enabled or self.rate is not None:
            return True
        provider = slot.lease.provider
        trust = self._trust(provider)
        if proven(trust):
            return True
        others = (
            s.lease.provider
            for s in self.r.slots.values()
            if s is not slot and not s.lost and s.vetted and s.lease.provider != provider
        )
        any_proven = any(proven(self._trust(p)) for p in others)
        return may_take_trial(trust, self.taken.get(provider, 0), proven_leased=any_proven)

    def _trust(self, provider: str) -> Trust:
        """The store's record, read once: asked for every slot at every assignment pass,
        and only ``_valid`` changes it while the sweep runs (a caught provider is gone)."""
        if provider not in self._trusts:
            self._trusts[provider] = self.vs.trust(provider)
        return self._trusts[provider]

    def took(self, slot: Slot) -> None:
        provider = slot.lease.provider
        self.taken[provider] = self.taken.get(provider, 0) + 1

    def hold_back(self, slot: Slot) -> bool:
        """Whether ``slot`` has used its room and has nothing left to do: its lease is
        released, not replaced, and its provider not leased again by this sweep."""
        if (
            slot.lost
            or not slot.vetted
            or slot.active
            or slot.replicas
            or self.may_take(slot)
            or self.could_use(slot)
            or self.under_check(slot.lease.provider)
        ):
            return False
        if slot.lease.provider not in self.held_back:
            self.held_back.add(slot.lease.provider)
            self.held_back_units += slot.lease.units
        return True

    def not_leased(self) -> set[str]:
        """Providers this sweep's auctions skip: newcomers that used their room, unless a
        check waits (a check is not a trial: a held-back newcomer may run it)."""
        return set() if self.waiting else set(self.held_back)

    def outstanding(self) -> bool:
        return bool(self.waiting or self.running)

    def before_end(self) -> bool:
        """True when the sweep may end: no check left, and the best is checked."""
        if not self.enabled:
            return True
        if self.outstanding():
            return False
        if not self.r.spec.verify.best:
            return True
        best = self.r.search.best()
        if best is None or best.number in self.gave_up:
            return True
        if best.number in self.vs.verified_numbers(self.r.job_id):
            return True
        row = self.r.jobs.trial(self.r.job_id, best.number)
        if row is None or row.provider is None or row.value is None:
            return True
        if not best_needs_check(self.vs.trust(row.provider)):
            return True
        self._open(
            best.number,
            row.params,
            Vote(
                "original",
                row.provider,
                row.value,
                row.task_id or "",
                row.lease_id or "",
                row.result or b"",
            ),
        )
        return False

    def starved(self, live: list[Slot]) -> bool:
        """A check waits and no live lease can take it: a lease elsewhere is wanted."""
        if not self.waiting:
            self._starved_since = None
            return False
        providers = {s.lease.provider for s in live}
        if any(providers - c.providers for c in self.waiting):
            self._starved_since = None
            return False
        now = asyncio.get_running_loop().time()
        if self._starved_since is None:
            self._starved_since = now
            self._starved_ms = self.r.tenant.clock()
        # Nobody else for sale counts only in a directory pulled since the check began
        # to starve: the one held may be the sweep's last auction's, its adverts expired
        # long ago (the tenant pulls for auctions only), and an expired directory holds
        # nobody. Until then the check is starved, and the auction that asks for pulls.
        pulled = self.r.tenant.pulled_ms
        if pulled is not None and pulled >= self._starved_ms and not self._others_for_sale():
            for c in self.waiting:  # a one-provider market: nobody to ask, no waiting
                self._give_up(c, "no other provider in the directory sells this job")
            self.waiting.clear()
            self._starved_since = None
            return False
        if now - self._starved_since > (self.r.max_wait_s or 120.0):
            for c in self.waiting:  # nobody else sells this: the result stays unchecked
                self._give_up(c, "no other provider to check it")
            self.waiting.clear()
            self._starved_since = None
            return False
        return True

    def _others_for_sale(self) -> bool:
        """Whether the directory holds a provider, not yet involved, that fits the job.

        Busy or not: a provider whose devices are all taken right now (by us a moment
        ago, its advert not yet refreshed) still sells the job, and the check waits
        for it (``starved``); judged on free devices, the best's check was given up.
        """
        r = self.r
        shut = self.avoid() | r.bad_providers
        adverts = [all_free(a) for a in r.tenant.adverts() if a.provider not in shut]
        req = r.spec.requirement()
        return bool(rank(req, 1, r.max_price, adverts, k=1))

    def avoid(self) -> set[str]:
        """Providers a new lease for the waiting checks should not come from."""
        if not self.waiting:
            return set()
        return set.intersection(*(c.providers for c in self.waiting))

    def under_check(self, provider: str) -> bool:
        """A result of ``provider`` is being checked: its lease is not settled until then,
        so a false result's payment can still be refused."""
        checks = self.waiting + [c for c, _, _ in self.running.values()]
        return any(c.votes and c.votes[0].provider == provider for c in checks)

    def could_use(self, slot: Slot) -> bool:
        return any(slot.lease.provider not in c.providers for c in self.waiting)

    def assign(self, slot: Slot) -> None:
        """Start waiting checks this slot's provider may run, within its capacity.

        A slot of a provider new to this tenant first runs the canary; until it passes,
        the slot gets no trial and no check."""
        if not slot.vetted:
            self._vet(slot)
            if not slot.vetted:
                return
        for check in list(self.waiting):
            if slot.lost or len(slot.active) + len(slot.replicas) >= slot.capacity:
                return
            if slot.lease.provider in check.providers or self._better_checker(slot, check):
                continue
            if not self.r._affordable(slot):
                return
            self.waiting.remove(check)
            slot.replicas.add(check.check_id)
            task = self.r._start(self._run(slot, check))  # owned by the run's TaskGroup
            self.running[check.check_id] = (check, slot, task)

    def _better_checker(self, slot: Slot, check: PendingCheck) -> bool:
        """Another leased provider with more checked-valid results could take ``check``
        now: fabricators that answer alike would confirm each other, so a check goes to
        the most proven provider at hand (two newcomers check each other only when no
        proven provider is leased)."""
        mine = self.vs.trust(slot.lease.provider).verified
        for s in self.r.slots.values():
            if (
                s is slot
                or s.lost
                or not s.vetted
                or s.lease.provider in check.providers
                or len(s.active) + len(s.replicas) >= s.capacity
            ):
                continue
            if self.vs.trust(s.lease.provider).verified > mine:
                return True
        return False

    def on_lose(self, slot: Slot) -> None:
        for _, s, task in list(self.running.values()):
            if s is slot:
                task.cancel()
        canary = self.canaries.get(slot.lease.lease_id)
        if canary is not None and canary is not asyncio.current_task():
            canary.cancel()

    def cancel_all(self) -> None:
        for _, _, task in self.running.values():
            task.cancel()
        for task in self.canaries.values():
            task.cancel()

    # --- canary -----------------------------------------------------------------

    def _vet(self, slot: Slot) -> None:
        provider = slot.lease.provider
        if not self.canary or self.vs.vetted(provider):
            slot.vetted = True
        elif slot.lease.lease_id not in self.canaries and not slot.lost:
            task = self.r._start(self._canary(slot))  # owned by the run's TaskGroup
            self.canaries[slot.lease.lease_id] = task

    async def _canary(self, slot: Slot) -> None:
        """Run the keyed, timed canary on ``slot``: pass, or the provider is caught."""
        r = self.r
        provider = slot.lease.provider
        nonce = os.urandom(16)
        task_id = f"{r.job_id[:40]}.canary.{len(self.canaries)}"
        try:
            want = asyncio.create_task(asyncio.to_thread(canary_answer, nonce))
            try:
                run = await self._run_on(
                    slot, task_id, r.task_assign(slot, -1, task_id, {}, canary_command(nonce))
                )
            finally:
                answer = await want
            result = run.result
            got = result.metrics.get(CANARY_METRIC)
            if result.state == "succeeded" and isinstance(got, int | float) and got == answer:
                ms = int((run.seconds or 0.0) * 1000)
                self.vs.canary_passed(provider, ms)
                self.vs.record_duration(provider, f"canary:{CANARY_ROUNDS}", ms, r.tenant.clock())
                slot.vetted = True
                log.info("provider %s passed the canary in %d ms", provider[:8], ms)
            else:
                r.caught(
                    provider,
                    None,
                    None,
                    why=f"failed the canary ({result.state}, answered {got!r}, not {answer})",
                )
        except (MercatoError, TimeoutError) as e:
            r._lose(slot, f"the canary could not run: {e}")
        finally:
            self.canaries.pop(slot.lease.lease_id, None)
            r._wake.set()

    async def _run_on(self, slot: Slot, task_id: str, assign: TaskAssign) -> Run:
        """Upload if needed, assign, follow to the result; the run's time as timed here."""
        r = self.r
        if not slot.workspace_ready:
            async with slot.upload_lock:
                if not slot.workspace_ready:
                    await r._upload(slot)
        client = TaskClient(r.tenant, slot.lease)
        await client.assign(assign)
        loop = asyncio.get_running_loop()
        ran_from: list[float] = []

        def on_status(status: TaskStatus) -> None:
            if status.state != "queued" and not ran_from:
                ran_from.append(loop.time())

        async with asyncio.timeout(2 * r.trial_ms / 1000):
            result = await client.follow(task_id, on_status=on_status)
        seconds = loop.time() - ran_from[0] if ran_from else None
        return Run(result, client.last_envelope, seconds)

    # --- running checks ---------------------------------------------------------

    def _open(self, number: int, params: dict[str, Any], original: Vote) -> None:
        if any(c.number == number for c in self.waiting) or any(
            c.number == number for c, _, _ in self.running.values()
        ):
            return
        assert self.metric is not None
        command = self.r.command_for(number, params)
        check_id = self.vs.open_check(
            job_id=self.r.job_id,
            number=number,
            params=params,
            seed=self.seed(number),
            command=command,
            workspace_hash=self.r.workspace_hash,
            spec_hash=self.r.spec_hash,
            metric=self.metric,
            original=original,
            now_ms=self.r.tenant.clock(),
        )
        self.waiting.append(PendingCheck(check_id, number, params, [original]))
        self.r._wake.set()

    def _give_up(self, check: PendingCheck, why: str) -> None:
        log.warning("check of trial %d given up: %s", check.number, why)
        self.gave_up.add(check.number)
        self.vs.close_check(check.check_id, f"unchecked: {why}", None, self.r.tenant.clock())

    async def _run(self, slot: Slot, check: PendingCheck) -> None:
        role = "check" if len(check.votes) == 1 else "decider"
        task_id = f"{self.r.job_id[:40]}.{check.number}.v{check.check_id}{role[0]}{check.attempts}"
        check.attempts += 1
        voted = False
        try:
            result, envelope = await self._replica(slot, check, task_id)
            value = result.metrics.get(self.metric or "") if result.state == "succeeded" else None
            if not isinstance(value, int | float) or isinstance(value, bool):
                check.excluded.add(slot.lease.provider)
                log.info("check %s on %s: %s", task_id, slot.lease.provider[:8], result.state)
            else:
                vote = Vote(
                    role, slot.lease.provider, float(value), task_id, slot.lease.lease_id, envelope
                )
                check.votes.append(vote)
                self.vs.add_vote(check.check_id, vote, self.r.tenant.clock())
                self.checks_run += 1
                voted = True
        except asyncio.CancelledError:
            if not self.r.cancelled:
                self._requeue(check)
            raise
        except MercatoError as e:  # the checker's run failed: only this one is its fault
            log.info("check %s on %s failed: %s", task_id, slot.lease.provider[:8], e)
            check.excluded.add(slot.lease.provider)
        finally:
            slot.replicas.discard(check.check_id)
            self.running.pop(check.check_id, None)
            self.r._wake.set()
        # Judged outside the try: acting on a verdict writes the store, and an error
        # there is our bug (an IllegalTransitionError, say), never the checker's run
        # failing. Swallowed, it kept a caught liar's results as succeeded.
        if not (voted and self._judge(check)):
            self._requeue(check)

    def _requeue(self, check: PendingCheck) -> None:
        if check.dead:
            return
        if check.attempts >= MAX_CHECK_ATTEMPTS + 1:
            self._give_up(check, f"could not be run in {check.attempts} attempts")
        elif check not in self.waiting:
            self.waiting.append(check)

    async def _replica(
        self, slot: Slot, check: PendingCheck, task_id: str
    ) -> tuple[TaskResult, bytes]:
        """Run the trial again on ``slot``: the same command, workspace and seed."""
        r = self.r
        assign = r.task_assign(slot, check.number, task_id, check.params)
        run = await self._run_on(slot, task_id, assign)
        if run.seconds is not None and run.result.state == "succeeded":
            r.time_trial(slot, check.number, run.seconds)
        return run.result, run.envelope

    def _judge(self, check: PendingCheck) -> bool:
        """Act on the votes so far; False if another decider is still needed."""
        now = self.r.tenant.clock()
        votes = check.votes
        bad = liars([v.value for v in votes], self.tolerance)
        if bad is None:
            if len(votes) < MAX_VOTES:
                log.warning(
                    "trial %d: %s disagree: asking another provider",
                    check.number,
                    ", ".join(f"{v.provider[:8]} says {v.value:g}" for v in votes),
                )
                return False
            self.vs.close_check(check.check_id, Verdict.UNRESOLVED.value, None, now)
            self.r.unreproducible(check.number)
            return True
        honest = [v for k, v in enumerate(votes) if k not in bad]
        self._valid(*{v.provider for v in honest})
        if not bad:
            self.vs.close_check(check.check_id, Verdict.AGREED.value, None, now)
            return True
        verdict = verdict_of(bad)
        caught = [votes[k].provider for k in bad]
        self.vs.close_check(check.check_id, verdict.value, ",".join(caught), now)
        for k in bad:
            # The trial takes the value the honest votes agreed on if its original lied.
            replacement = honest[0] if k == 0 else None
            self.r.caught(votes[k].provider, check.number, replacement=replacement)
        return True

    def _valid(self, *providers: str) -> None:
        for p in providers:
            self.vs.set_trust(p, self.vs.trust(p).valid())
            self._trusts.pop(p, None)

    def forget(self, liar: str) -> None:
        """Drop the liar's votes from open checks; checks of its own results end."""
        self._trusts.pop(liar, None)  # its streak was reset
        now = self.r.tenant.clock()
        for check in list(self.waiting):
            if check.votes[0].provider == liar:
                self.waiting.remove(check)
                self.vs.close_check(
                    check.check_id, "discarded: original provider caught", liar, now
                )
            else:
                check.votes = [v for v in check.votes if v.provider != liar]
                check.excluded.add(liar)
        for check, _, task in list(self.running.values()):
            if check.votes[0].provider == liar:
                check.dead = True
                task.cancel()
                self.vs.close_check(
                    check.check_id, "discarded: original provider caught", liar, now
                )


def all_free(advert: Advert) -> Advert:
    """``advert`` as if none of its devices were taken: what the provider sells."""
    return advert.model_copy(
        update={"devices": [g.model_copy(update={"free": list(g.ids)}) for g in advert.devices]}
    )
