"""The provider role: answers orders, awards, releases, heartbeats and countersignatures.

It owns the BidEngine (market.bidding). Handlers run on the event loop one at a time
and never await between reading and changing engine state, so every reservation has
exactly one owner. Every lease and receipt is persisted before the reply that makes it
binding leaves the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from market.bidding import BidEngine, LeaseState, ProviderLease
from market.debit import DebitSchedule, NoteState, SettlementPolicy
from market.settlement import amount_owed
from node.net.node import Node
from node.store.node_store import LeaseRow, ReceiptRow, Store
from protocol.envelope import Envelope, open_envelope
from protocol.errors import MercatoError, SenderMismatchError, UnexpectedMessageError
from protocol.messages import (
    Award,
    Body,
    DebitNote,
    Decline,
    DeviceGroup,
    Heartbeat,
    Interconnect,
    Order,
    Receipt,
    Release,
)

log = logging.getLogger("mercato.provider")


class ProviderService:
    """Sell-side handlers and the timer that expires bids and silent leases."""

    def __init__(
        self,
        node: Node,
        engine: BidEngine,
        store: Store,
        settlement: SettlementPolicy | None = None,
    ) -> None:
        """Only holds its parts: nothing is read or changed until ``start``."""
        self.node = node
        self.engine = engine
        self.store = store
        self.settlement = settlement or SettlementPolicy()
        #: lease_id -> its debit schedule; the latest note's envelope while unpaid.
        self.debits: dict[str, DebitSchedule] = {}
        self._notes: dict[str, bytes] = {}
        self._delivered: set[str] = set()  # leases whose latest note envelope went out
        self.counters = {"notes_signed": 0, "notes_countersigned": 0, "notes_lapsed": 0}
        self._models = {d.id: d.model for d in engine.devices.values()}
        #: Called when a lease stops being active (released, expired, lost).
        self.on_lease_end: list[Callable[[ProviderLease], None]] = []
        #: Leases held again from the store by ``start``.
        self.restored = 0
        self._started = False

    def start(self) -> None:
        """Hold again the store's active leases, then take the node's sell-side messages.

        A step of the daemon's start, after the store opened and before the node serves
        or starts its loops (the expiry timer runs in the node's TaskGroup). Twice is a
        no-op.
        """
        if self._started:
            return
        self._started = True
        self.restored = self._restore_leases()
        node = self.node
        node.capacity = self.capacity
        node.handlers.update(
            {
                Order.TYPE: self._on_order,
                Award.TYPE: self._on_award,
                Release.TYPE: self._on_release,
                Heartbeat.TYPE: self._on_heartbeat,
                Receipt.TYPE: self._on_receipt,
                DebitNote.TYPE: self._on_debit_note,
            }
        )
        node.services.append(self._timer)

    def _restore_leases(self) -> int:
        """After a restart, hold again the leases the store says are active.

        Without this a restarted provider would see every device free and could sell
        a leased device twice. A lease that ran out while the daemon was down is marked
        ended; one whose devices are no longer configured is marked lost.
        """
        now = self.node.clock()
        restored = 0
        for row in self.store.list_leases(LeaseState.ACTIVE):
            if row.side != "provider" or row.provider != self.node.node_id:
                continue
            lease = ProviderLease(
                lease_id=row.lease_id,
                order_id=row.order_id,
                tenant=row.tenant,
                job_spec_hash=row.job_spec_hash,
                devices=row.devices,
                price=row.price,
                start_ms=row.start_ms,
                end_ms=row.end_ms,
                heartbeat_interval_ms=row.heartbeat_interval_ms,
                last_heartbeat_ms=now,
                units=row.units,
            )
            if self.engine.restore(lease, now):
                self.debits[row.lease_id] = self._restored_schedule(row, now)
                restored += 1
                continue
            state = LeaseState.ENDED if now >= row.end_ms else LeaseState.LOST
            self.store.set_lease_state(row.lease_id, state, now)
            log.warning("lease %s from before the restart is %s", row.lease_id, state.value)
        if restored:
            log.info("holding %d active leases from before the restart", restored)
        return restored

    def _restored_schedule(self, row: LeaseRow, now: int) -> DebitSchedule:
        """The lease's debit schedule after a restart, with a fresh payment grace.

        Terms come from the award the tenant signed; what was paid, from the ledger. The
        tenant could not reach us while we were down, so no note is held against it.
        """
        try:
            award = open_envelope(row.award, now_ms=now, replay=None).body
        except MercatoError:
            award = None
        interval = award.debit_interval_ms if isinstance(award, Award) else 10_000
        timeout = award.payment_timeout_ms if isinstance(award, Award) else 10_000
        schedule = DebitSchedule(len(row.devices), row.price, row.start_ms, interval, timeout)
        elapsed = max(0, (now - row.start_ms) // interval)
        schedule.seq = schedule.paid_seq = elapsed - 1
        schedule.paid_amount = self.store.lease_paid(row.lease_id)
        return schedule

    def _ended(self, lease: ProviderLease) -> None:
        self.debits.pop(lease.lease_id, None)
        self._notes.pop(lease.lease_id, None)
        self._delivered.discard(lease.lease_id)
        for callback in self.on_lease_end:
            callback(lease)

    def exposure(self, tenant: str, now: int) -> int:
        """Micro-credits of work done for ``tenant`` on active leases and not yet paid."""
        return sum(
            s.unpaid_amount(now)
            for lease_id, s in self.debits.items()
            if (lease := self.engine.leases.get(lease_id)) is not None and lease.tenant == tenant
        )

    def capacity(self) -> tuple[list[DeviceGroup], Interconnect]:
        return self.engine.device_groups(), self.engine.interconnect

    async def _on_order(self, env: Envelope) -> Body | bytes | None:
        assert isinstance(env.body, Order)
        # No re-advert for a bid: a reservation lasts one auction (the losers' are released
        # within milliseconds), and every advert costs ~fanout x N messages of rumor
        # mongering, so re-advertising each bid and its release flooded the cluster (see
        # bench/auction_bench.py). The engine, not the advert, guards against overcommit.
        now = self.node.clock()
        record = self.store.counterparty(env.sender) or {"lapsed": 0, "last_ms": 0}
        problem = self.settlement.order_problem(
            record["lapsed"], record["last_ms"], self.exposure(env.sender, now), now
        )
        if problem is not None:
            return self.engine.refuse(env.body, "unpaid_notes", problem)
        return self.engine.on_order(env.body, env.sender, now)

    async def _on_award(self, env: Envelope) -> Body | bytes | None:
        award = env.body
        assert isinstance(award, Award)
        if award.provider != self.node.node_id:
            raise SenderMismatchError("award names another provider")
        now = self.node.clock()
        terms = self.settlement.terms_problem(award.debit_interval_ms, award.payment_timeout_ms)
        if terms is not None:
            log.info("declined award %s: %s", award.lease_id, terms)
            return Decline(lease_id=award.lease_id, order_id=award.order_id, reason=terms)
        result = self.engine.on_award(award, env.sender, env.digest, now)
        if isinstance(result, Decline):
            log.info("declined award %s: %s", award.lease_id, result.reason)
            return result
        raw = self.node.seal(result, to=env.sender)
        lease = self.engine.leases[award.lease_id]
        self.debits[lease.lease_id] = DebitSchedule(
            len(lease.devices),
            lease.price,
            lease.start_ms,
            award.debit_interval_ms,
            award.payment_timeout_ms,
        )
        log.info(
            "lease %s made: %d units (%s) to tenant %s at %d micro-credits/device-h",
            lease.lease_id,
            lease.units,
            ",".join(lease.devices),
            env.sender[:12],
            lease.price,
        )
        self.store.put_lease(self._row(lease, env.raw, raw, env.digest, now))
        self.node.capacity_changed()  # a partial award may have freed devices
        return raw

    def _row(
        self, lease: ProviderLease, award: bytes, accept: bytes, award_hash: str, now: int
    ) -> LeaseRow:
        return LeaseRow(
            lease_id=lease.lease_id,
            side="provider",
            order_id=lease.order_id,
            tenant=lease.tenant,
            provider=self.node.node_id,
            provider_address=self.node.settings.address or "",
            units=lease.units,
            devices=lease.devices,
            model=self._models[lease.devices[0]],
            price=lease.price,
            job_spec_hash=lease.job_spec_hash,
            start_ms=lease.start_ms,
            end_ms=lease.end_ms,
            heartbeat_interval_ms=lease.heartbeat_interval_ms,
            state=lease.state,
            award_hash=award_hash,
            award=award,
            accept=accept,
            updated_ms=now,
        )

    async def _on_release(self, env: Envelope) -> Body | bytes | None:
        release = env.body
        assert isinstance(release, Release)
        now = self.node.clock()
        lease = self.engine.leases.get(release.lease_id or "")
        was_active = lease is not None and lease.state is LeaseState.ACTIVE
        if self.engine.on_release(release, env.sender, now) and release.lease_id is not None:
            self.node.capacity_changed()  # a lease ended; a released bid is no news
        if lease is None or not was_active or lease.state is not LeaseState.ENDED:
            return None
        self.store.set_lease_state(lease.lease_id, lease.state, now)
        self._ended(lease)
        log.info("lease %s released by its tenant", lease.lease_id)
        return self._receipt(lease, now)

    def _receipt(self, lease: ProviderLease, now: int) -> bytes:
        """Sign the usage of a lease's held time: devices x wall time, rounded up."""
        device_ms = len(lease.devices) * max(0, now - lease.start_ms)
        receipt = Receipt(
            lease_id=lease.lease_id,
            provider=self.node.node_id,
            tenant=lease.tenant,
            device_ms=device_ms,
            price=lease.price,
            amount=amount_owed(device_ms, lease.price),
        )
        raw = self.node.seal(receipt, to=lease.tenant)
        self.store.put_receipt(ReceiptRow.signed(receipt, raw, now))
        return raw

    async def _on_heartbeat(self, env: Envelope) -> Body | bytes | None:
        hb = env.body
        assert isinstance(hb, Heartbeat)
        now = self.node.clock()
        if not self.engine.on_heartbeat(hb.lease_id, env.sender, now):
            raise UnexpectedMessageError(f"lease {hb.lease_id} is unknown, ended or not yours")
        # The reply carries the latest unpaid note: the tenant countersigns it next.
        self._issue(hb.lease_id, now)
        raw = self._notes.get(hb.lease_id)
        if raw is not None and hb.lease_id in self._delivered:
            # Sent before and still unpaid (the countersignature may have been lost): the
            # same note in a fresh envelope, since the tenant's replay guard refuses the
            # old one. Both envelopes are kept; a countersignature of either pays.
            raw = self._keep_note(open_envelope(raw, now_ms=now, replay=None).body, now)
            self._notes[hb.lease_id] = raw
        if raw is not None:
            self._delivered.add(hb.lease_id)
        return raw

    def _keep_note(self, note: Body, now: int) -> bytes:
        """Seal a note for its tenant and store it (the provider's signed record)."""
        assert isinstance(note, DebitNote)
        raw = self.node.seal(note, to=note.tenant)
        self.store.put_receipt(ReceiptRow.signed(note, raw, now))
        return raw

    def _issue(self, lease_id: str, now: int) -> None:
        """Sign and keep the lease's next cumulative note if one fell due."""
        schedule = self.debits.get(lease_id)
        lease = self.engine.leases.get(lease_id)
        if schedule is None or lease is None:
            return
        due = schedule.issue(now)
        if due is None:
            return
        note = DebitNote(
            lease_id=lease_id,
            provider=self.node.node_id,
            tenant=lease.tenant,
            seq=due.seq,
            device_ms=due.device_ms,
            price=lease.price,
            amount=due.amount,
        )
        self._notes[lease_id] = self._keep_note(note, now)
        self._delivered.discard(lease_id)
        self.counters["notes_signed"] += 1
        self.node.metrics.settlement.labels("note_signed").inc()

    async def _on_debit_note(self, env: Envelope) -> Body | bytes | None:
        """The tenant's countersignature of a note: book the increment it pays, once."""
        cs = env.body
        assert isinstance(cs, DebitNote)
        if cs.countersigns is None or cs.tenant != env.sender:
            raise UnexpectedMessageError("a provider only accepts countersigned debit notes")
        ours = {r.receipt_hash: r for r in self.store.list_receipts(cs.lease_id, kind="debit_note")}
        mine = ours.get(cs.countersigns)
        if mine is None or (mine.tenant, mine.device_ms, mine.amount, mine.price) != (
            env.sender,
            cs.device_ms,
            cs.amount,
            cs.price,
        ):
            raise UnexpectedMessageError("countersignature does not match a note we signed")
        now = self.node.clock()
        increment = max(0, mine.amount - self.store.lease_paid(cs.lease_id))
        self.store.countersign_receipt(cs.countersigns, env.raw, increment, env.sender, now)
        schedule = self.debits.get(cs.lease_id)
        if schedule is not None:
            schedule.countersigned(cs.seq, cs.amount, mine.created_ms)
            if schedule.paid_seq >= schedule.seq:
                self._notes.pop(cs.lease_id, None)
                self._delivered.discard(cs.lease_id)
        self.counters["notes_countersigned"] += 1
        self.node.metrics.settlement.labels("note_countersigned").inc()
        return None

    def _lapse(self, now: int) -> list[str]:
        """End every lease whose note went unpaid past the payment timeout; say why."""
        ended = []
        for lease_id, schedule in list(self.debits.items()):
            self._issue(lease_id, now)  # a silent tenant's note is due all the same
            if schedule.state(now) is not NoteState.LAPSED:
                continue
            lease = self.engine.end(lease_id)
            if lease is None:
                continue
            why = (
                f"debit note {schedule.paid_seq + 1} not countersigned within "
                f"{schedule.timeout_ms} ms of falling due: work stopped, "
                f"{schedule.unpaid_amount(now)} micro-credits unpaid"
            )
            self.store.set_lease_state(lease_id, lease.state, now)
            self.store.set_lease_end_reason(lease_id, why)
            self.store.record_lapse(lease.tenant, now, why)
            self.counters["notes_lapsed"] += 1
            self.node.metrics.settlement.labels("note_lapsed").inc()
            log.warning("lease %s ended: %s", lease_id, why)
            self._ended(lease)
            ended.append(lease_id)
        return ended

    async def _on_receipt(self, env: Envelope) -> Body | bytes | None:
        """The tenant's countersignature: book the ledger line once."""
        cs = env.body
        assert isinstance(cs, Receipt)
        if cs.countersigns is None or cs.tenant != env.sender:
            raise UnexpectedMessageError("a provider only accepts countersigned receipts")
        ours = {r.receipt_hash: r for r in self.store.list_receipts(cs.lease_id)}
        mine = ours.get(cs.countersigns)
        if mine is None or (mine.device_ms, mine.amount, mine.price) != (
            cs.device_ms,
            cs.amount,
            cs.price,
        ):
            raise UnexpectedMessageError("countersignature does not match a receipt we signed")
        increment = max(0, mine.amount - self.store.lease_paid(cs.lease_id))
        self.store.countersign_receipt(
            cs.countersigns, env.raw, increment, env.sender, self.node.clock()
        )
        return None

    async def _timer(self) -> None:
        """Expire bids and silent leases when they are due (no polling faster than needed)."""
        while True:
            now = self.node.clock()
            times = [s.lapse_ms() for s in self.debits.values()]
            times += [s.next_due_ms() for s in self.debits.values()]
            due = min([t for t in [self.engine.next_deadline(), *times] if t is not None] or [0])
            delay = 1.0 if not due else min(1.0, max(0.0, (due - now) / 1000))
            await asyncio.sleep(delay)
            now = self.node.clock()
            if self._lapse(now):
                self.node.capacity_changed()
            changed = self.engine.expire(now)
            for key in changed:
                lease = self.engine.leases.get(key)
                if lease is not None:
                    self.store.set_lease_state(key, lease.state, now)
                    log.info("lease %s %s", key, lease.state.value)
                    self._ended(lease)
            if any(key in self.engine.leases for key in changed):
                self.node.capacity_changed()
