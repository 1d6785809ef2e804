"""The tenant role: matchmaking, the reverse auction, leases, heartbeats, receipts.

The tenant starts every exchange (it may sit behind NAT and is never called back). It
drives the pure ``market.auction.Auction`` with the replies it gets and persists every
lease and countersigned receipt in its own store, with the signed envelopes as proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from market.asking import choose_asked
from market.auction import Auction, AuctionState, TenantLease
from market.debit import (
    DEFAULT_DEBIT_INTERVAL_MS,
    DEFAULT_PAYMENT_TIMEOUT_MS,
    TASK_GRACE_MS,
    TenantMeter,
)
from market.directory import NEVER_MS, Entry, OwnDevices, as_known
from market.lifecycle import LeaseState
from market.matching import Candidate, describe, rank
from market.reputation import Reputation
from market.settlement import format_credits
from market.verification import measured_flops, slowness
from node.net.node import Node, NodeSettings, Peer, wall_clock_ms
from node.net.transport import Transport
from node.store.node_store import LeaseRow, ReceiptRow, Store
from node.store.verify_store import VerifyStore
from protocol import codec
from protocol.envelope import Envelope
from protocol.errors import MercatoError, PeerTimeoutError, PeerUnavailableError
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Bid,
    Body,
    DebitNote,
    Decline,
    Heartbeat,
    NoBid,
    Order,
    Receipt,
    Release,
    Requirement,
    WorkloadClass,
)

log = logging.getLogger("mercato.tenant")

#: How often a message whose loss costs money (a final receipt's countersignature, the
#: release of a lease we do not hold) is sent while the network loses it.
LOST_MESSAGE_TRIES = 3
#: How far back the tenant reads its own ended leases to correct the adverts it holds
#: (``Tenant.adverts``): providers re-advertise every fraction of their advert
#: TTL (60 s by default), so an advert signed this long before is long replaced.
OWN_RELEASES_MS = 600_000


@dataclass
class AuctionReport:
    """What an auction came to: the leases made, and the counted reasons when short."""

    order: Order
    state: AuctionState
    leases: list[TenantLease]
    asked: list[Candidate]
    explanation: str
    failure: str | None = None
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return sum(lease.units for lease in self.leases)


class ReceiptRejected(MercatoError):
    """A provider's receipt does not match the lease (wrong price, amount or usage)."""

    code = "receipt_rejected"


class Tenant:
    """A tenant client: one identity, one store, a transport; never listens."""

    def __init__(
        self,
        identity: Identity,
        store: Store,
        transport: Transport,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        request_timeout_s: float = 5.0,
        nonce: Callable[[], bytes] | None = None,
        debit_interval_ms: int = DEFAULT_DEBIT_INTERVAL_MS,
        payment_timeout_ms: int = DEFAULT_PAYMENT_TIMEOUT_MS,
        task_grace_ms: int = TASK_GRACE_MS,
    ) -> None:
        self.identity = identity
        #: How late past its timeout a task's result may come before we stop paying.
        self.task_grace_ms = task_grace_ms
        #: The settlement terms this tenant proposes in its awards (market.debit).
        self.debit_interval_ms = debit_interval_ms
        self.payment_timeout_ms = payment_timeout_ms
        self.store = store
        self.clock = clock
        self.node = Node(
            identity,
            NodeSettings(role="tenant", address=None, request_timeout_s=request_timeout_s),
            transport,
            clock=clock,
            nonce=nonce,  # a simulation passes a seeded source; random otherwise
        )
        self._addresses: dict[str, str] = {}  # provider -> address, from adverts and leases
        #: When ``refresh`` last pulled the directory (tenant clock, ms), or None. Held
        #: adverts expire (a TTL of seconds) and nothing else pulls them: a reader that
        #: concludes from an absence (nobody sells this) must read a pull this recent.
        self.pulled_ms: int | None = None
        self._order_seq = 0
        self._meters: dict[str, TenantMeter] = {}  # lease_id ->
        #: lease_id -> why we last refused to countersign its provider's bill.
        self.refusals: dict[str, str] = {}
        #: Releases of cancelled auctions under way (``_abandon``); ``close`` waits.
        self._abandoning: set[asyncio.Task[None]] = set()
        #: How long those may take: every release tried LOST_MESSAGE_TRIES times, and a
        #: lease's end (its release, then the receipt's countersignature) one more.
        self.abandon_timeout_s = (LOST_MESSAGE_TRIES + 1) * request_timeout_s + 1.0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    # --- directory ------------------------------------------------------------------

    async def refresh(self, peer_address: str) -> list[Advert]:
        """Pull (and verify) the live directory from any peer."""
        entries = await self.node.fetch_directory(Peer(address=peer_address, role="bootstrap"))
        self.pulled_ms = self.clock()
        adverts = [e.advert for e in entries]
        for a in adverts:
            self._addresses[a.provider] = a.address
        return adverts

    def adverts(self) -> list[Advert]:
        """The live directory, corrected by what this tenant knows itself of its leases.

        Adverts lag: one signed before our newest lease still shows its devices free
        (asking gets ``all_reserved`` from our own lease), one signed before our last
        release still shows them taken (we would not ask). market.directory.as_known.
        """
        now = self.clock()
        own = self._own_devices(now)
        out = []
        for e in self.node.directory.live(now):
            mine = own.get(e.provider)
            out.append(e.advert if mine is None else as_known(e.advert, _signed_ms(e), mine))
        return out

    def _own_devices(self, now: int) -> dict[str, OwnDevices]:
        held: dict[str, set[str]] = {}
        for row in self.store.list_leases(LeaseState.ACTIVE):
            if row.side == "tenant":
                held.setdefault(row.provider, set()).update(row.devices)
        released: dict[str, list[tuple[int, frozenset[str]]]] = {}
        # ENDED only when the provider's receipt confirmed it; a LOST lease may still
        # be held at its provider.
        for row in self.store.list_leases(LeaseState.ENDED, updated_since=now - OWN_RELEASES_MS):
            if row.side == "tenant":
                released.setdefault(row.provider, []).append(
                    (row.updated_ms, frozenset(row.devices))
                )
        return {
            p: OwnDevices(frozenset(held.get(p, ())), tuple(released.get(p, ())))
            for p in held.keys() | released.keys()
        }

    def reputation(self) -> dict[str, Reputation]:
        return {p: Reputation(**r) for p, r in self.store.reputation().items()}

    def peer_of(self, lease: LeaseRow) -> Peer:
        """The provider of a lease, as a peer to call."""
        self._addresses.setdefault(lease.provider, lease.provider_address)
        return self._peer(lease.provider)

    def _peer(self, provider: str) -> Peer:
        return Peer(address=self._addresses[provider], node_id=provider, role="provider")

    def measured_flops(self, adverts: Sequence[Advert]) -> dict[str, int]:
        """FLOP/s per device to rank each provider by: measured once this tenant timed
        its trials (market.verification.measured_flops), else the advert's claim."""
        declared = {a.provider: max((g.fp16_flops for g in a.devices), default=0) for a in adverts}
        slow = slowness(VerifyStore(self.store).durations())
        return measured_flops(declared, {p: s for p, s in slow.items() if p in declared})

    # --- auction --------------------------------------------------------------------

    def new_order_id(self) -> str:
        self._order_seq += 1
        return f"o{self.clock():x}{self.node.nonce()[:3].hex()}{self._order_seq}"

    async def auction(
        self,
        requirement: Requirement,
        units: int,
        max_price: int,
        *,
        job_spec_hash: str,
        workload: WorkloadClass = "sweep",
        expected_flop: int = 0,
        lease_ms: int = 3_600_000,
        k: int = 8,
        bid_window_ms: int = 2_000,
        heartbeat_interval_ms: int = 2_000,
        exclude: Sequence[str] = (),
        debit_interval_ms: int | None = None,
        payment_timeout_ms: int | None = None,
    ) -> AuctionReport:
        """Run one reverse auction over the current directory; return the leases made."""
        reputation = self.reputation()
        adverts = [a for a in self.adverts() if a.provider not in set(exclude)]
        for a in adverts:  # the directory may have come by gossip, not by refresh()
            self._addresses[a.provider] = a.address
        measured = self.measured_flops(adverts)
        ranked = rank(
            requirement,
            units,
            max_price,
            adverts,
            expected_flop=expected_flop,
            reputation=reputation,
            measured_flops=measured,
        )
        order_id = self.new_order_id()
        # One question per host, proven providers first, room for newcomers drawn by the
        # order id: 50 identities behind one address cannot take all k questions.
        candidates = choose_asked(ranked, k, reputation=reputation, key=order_id)
        now = self.clock()
        order = Order(
            order_id=order_id,
            tenant=self.node_id,
            job_spec_hash=job_spec_hash,
            workload=workload,
            requirement=requirement,
            units=units,
            max_price=max_price,
            bid_deadline_ms=now + bid_window_ms,
            expected_flop=expected_flop,
            lease_ms=lease_ms,
        )
        flops = {
            (a.provider, g.model): measured.get(a.provider, g.fp16_flops)
            for a in adverts
            for g in a.devices
        }
        auction = Auction(
            order,
            [c.provider for c in candidates],
            flops=flops,
            reputation=reputation,
            heartbeat_interval_ms=heartbeat_interval_ms,
            debit_interval_ms=debit_interval_ms or self.debit_interval_ms,
            payment_timeout_ms=payment_timeout_ms or self.payment_timeout_ms,
        )
        auction.start()
        if not candidates:
            auction.close(self.clock())
            # A gang needs every unit from one provider, so the count is the requirement.
            what = describe(requirement)
            if requirement.gang:
                what = f"{units} units of {what}"
            why = (
                f"no provider in the directory offers {what} at or below "
                f"{format_credits(max_price)} credits per device-hour"
            )
            return AuctionReport(order, auction.state, [], [], why, why)

        timeout_s = max(0.05, bid_window_ms / 1000)
        try:
            await asyncio.gather(
                *(self._collect(auction, c.provider, order, timeout_s) for c in candidates)
            )
            if auction.state is AuctionState.COLLECTING:
                auction.close(self.clock())
            # Awards go out concurrently; a decline or failure yields fallback awards.
            awards = auction.last_awards
            while awards:
                results = await asyncio.gather(*(self._award(auction, a) for a in awards))
                awards = [nxt for batch in results for nxt in batch]
            await self._release_losers(auction)
        except asyncio.CancelledError:
            await self._abandon(auction)
            raise
        return AuctionReport(
            order=order,
            state=auction.state,
            leases=list(auction.leases),
            asked=candidates,
            explanation=auction.outcome.explain(),
            failure=auction.failure,
            ignored=dict(auction.outcome.ignored),
        )

    async def _collect(self, auction: Auction, provider: str, order: Order, wait_s: float) -> None:
        try:
            reply = await self.node.request(self._peer(provider), order, timeout_s=wait_s)
        except MercatoError as e:
            log.info("order to %s failed: %s", provider[:8], e)
            auction.on_unreachable(provider)
        else:
            body = None if reply is None else reply.body
            sender = "" if reply is None else reply.sender
            if isinstance(body, Bid):
                auction.on_bid(sender, body, self.clock())
            elif isinstance(body, NoBid):
                auction.on_no_bid(sender, body)
            else:
                auction.on_unreachable(provider)
        if auction.ready(self.clock()):
            auction.close(self.clock())  # early close: every asked provider answered

    async def _award(self, auction: Auction, award: Award) -> list[Award]:
        peer = self._peer(award.provider)
        raw = self.node.seal(award, to=award.provider)
        award_hash = hashlib.sha256(raw).hexdigest()
        auction.award_sent(award.lease_id, award_hash, self.clock())
        try:
            reply = await self.node.request(peer, award, sealed=raw)
        except MercatoError as e:
            log.info("award to %s failed: %s", award.provider[:8], e)
            return auction.on_award_failed(award.lease_id, self.clock())
        if reply is not None and isinstance(reply.body, Accept):
            lease = auction.on_accept(reply.sender, reply.body, self.clock())
            if lease is not None:
                self.store.put_lease(self._row(auction.order, lease, raw, reply.raw))
                return []
            why = auction.refused.get(award.lease_id)
            if why is not None:
                log.warning(
                    "refused %s's accept of %s: %s", award.provider[:8], award.lease_id, why
                )
                self.store.record_outcome(award.provider, "rejected")
            return auction.on_award_failed(award.lease_id, self.clock())
        if reply is not None and isinstance(reply.body, Decline):
            self.store.record_outcome(award.provider, "declined")
            return auction.on_decline(reply.sender, reply.body, self.clock())
        return auction.on_award_failed(award.lease_id, self.clock())

    def _row(self, order: Order, lease: TenantLease, award: bytes, accept: bytes) -> LeaseRow:
        return LeaseRow(
            lease_id=lease.lease_id,
            side="tenant",
            order_id=lease.order_id,
            tenant=self.node_id,
            provider=lease.provider,
            provider_address=self._addresses[lease.provider],
            units=lease.units,
            devices=lease.devices,
            model=lease.model,
            price=lease.price,
            job_spec_hash=order.job_spec_hash,
            start_ms=lease.start_ms,
            end_ms=lease.end_ms,
            heartbeat_interval_ms=lease.heartbeat_interval_ms,
            state=LeaseState.ACTIVE,
            award_hash=lease.award_hash,
            award=award,
            accept=accept,
            updated_ms=self.clock(),
        )

    async def _release_losers(self, auction: Auction) -> None:
        """Free the bids that did not win, and end the leases a provider may hold for us."""
        await self._send_releases(auction.releases())

    async def _send_releases(self, releases: list[tuple[str, Release]]) -> None:
        """Send each (provider, Release) at once.

        A lost bid release costs nothing (the bid expires). A lost release of a lease
        (an award that got no answer, a refused accept) leaves a lease nobody heartbeats
        or pays: it lapses and its provider refuses our orders for a day. So those are
        sent again when the network loses them (as the final receipt's countersignature).
        """
        await asyncio.gather(
            *(
                self._send_while_lost(
                    self._peer(provider), release, LOST_MESSAGE_TRIES if release.lease_id else 1
                )
                for provider, release in releases
            )
        )

    async def _abandon(self, auction: Auction) -> None:
        """The auction was cancelled: give back all it holds before the cancel goes on.

        Bids it received stay reserved at their providers until they expire, and a
        lease whose accept was on its way, or made and not yet handed to the caller,
        is held for a tenant that never heartbeats nor pays it: it lapses unpaid and
        its provider refuses our orders (``unpaid_notes``). So the releases
        (market.auction.Auction.abandon) and the end of every lease made (receipt
        checked and countersigned, as ``release``) run in a task this tenant owns,
        shielded from the cancel and bounded by ``abandon_timeout_s``; the cancelled
        caller waits for it, and ``close`` waits for any a second cancel left running.
        """
        owed = auction.abandon(self.clock())
        made = [row for x in auction.leases if (row := self.store.get_lease(x.lease_id))]
        made = [row for row in made if row.state is LeaseState.ACTIVE]
        if not owed and not made:
            return
        log.info(
            "auction %s cancelled: %d releases and %d leases to end",
            auction.order.order_id,
            len(owed),
            len(made),
        )
        task = asyncio.get_running_loop().create_task(self._give_back(owed, made))
        self._abandoning.add(task)
        task.add_done_callback(self._abandoning.discard)
        try:
            await asyncio.shield(task)
        except Exception:  # a bug there must not turn the caller's cancel into it
            log.exception("releasing cancelled auction %s failed", auction.order.order_id)

    async def _give_back(self, owed: list[tuple[str, Release]], made: list[LeaseRow]) -> None:
        async def end(row: LeaseRow) -> None:
            try:
                await self.release(row)
            except MercatoError as e:
                log.warning("lease %s of a cancelled auction not ended: %s", row.lease_id, e)

        try:
            async with asyncio.timeout(self.abandon_timeout_s):
                await asyncio.gather(self._send_releases(owed), *(end(row) for row in made))
        except TimeoutError:
            log.warning(
                "releases of a cancelled auction unfinished after %g s", self.abandon_timeout_s
            )

    async def close(self) -> None:
        """Wait for the releases of cancelled auctions still under way (bounded each)."""
        while self._abandoning:
            done = await asyncio.gather(*self._abandoning, return_exceptions=True)
            for e in done:
                if isinstance(e, Exception):
                    log.error("releasing a cancelled auction failed: %r", e)

    async def _send_while_lost(
        self, peer: Peer, body: Body, tries: int, *, sealed: bytes | None = None
    ) -> bool:
        """Send ``body`` up to ``tries`` times while it goes unanswered; True once answered.

        Only a timeout or a refused connection is tried again, after 0.1 s, 0.2 s, ...
        Any answer ends it, an error too (the peer has it, or will not take it).
        """
        for attempt in range(tries):
            try:
                await self.node.request(peer, body, sealed=sealed)
                return True
            except (PeerTimeoutError, PeerUnavailableError) as e:
                log.info(
                    "%s to %s not delivered (try %d): %s", body.TYPE, peer.address, attempt + 1, e
                )
                if attempt + 1 < tries:
                    await asyncio.sleep(0.1 * 2**attempt)
            except MercatoError as e:
                log.info("%s to %s answered: %s", body.TYPE, peer.address, e)
                return True
        return False

    # --- leases ---------------------------------------------------------------------

    async def heartbeat(self, lease: LeaseRow, seq: int = 0) -> bool:
        """Tell the provider we are alive; False if it no longer holds the lease."""
        self._addresses.setdefault(lease.provider, lease.provider_address)
        try:
            reply = await self.node.request(
                self._peer(lease.provider), Heartbeat(lease_id=lease.lease_id, seq=seq)
            )
        except MercatoError:
            return False
        if reply is not None and isinstance(reply.body, DebitNote):
            await self._settle(lease, reply)
        return True

    async def heartbeat_until_lost(
        self, lease: LeaseRow, interval_ms: int, misses: int = 3
    ) -> None:
        """Heartbeat ``lease`` every ``interval_ms``; return once the provider has not
        answered ``misses`` in a row (a gang or a service replica then counts it lost)."""
        missed, seq = 0, 0
        while missed < misses:
            await asyncio.sleep(interval_ms / 1000)
            seq += 1
            missed = 0 if await self.heartbeat(lease, seq) else missed + 1

    def stop_billing(self, lease: LeaseRow, now_ms: int) -> None:
        """We no longer want this lease's time (e.g. a trial past its trial_timeout).

        No note or receipt for time after ``now_ms`` will be countersigned; a provider
        that keeps the devices busy for us anyway is not paid for it.
        """
        self.meter(lease).stop(now_ms)

    def task_assigned(self, lease: LeaseRow, task_id: str, timeout_ms: int) -> None:
        """A task went to the lease's provider: its result is due by its timeout + grace."""
        deadline = self.clock() + timeout_ms + self.task_grace_ms
        self.meter(lease).task_due(task_id, deadline)

    def task_queued(self, lease: LeaseRow, task_id: str, timeout_ms: int) -> None:
        """The provider queues the task behind others of ours: its deadline moves."""
        allowed = timeout_ms + self.task_grace_ms
        self.meter(lease).task_queued(task_id, allowed, lease.units, self.clock())

    def task_finished(self, lease: LeaseRow, task_id: str) -> None:
        self.meter(lease).task_done(task_id, self.clock())

    async def _settle(self, lease: LeaseRow, reply: Envelope) -> None:
        """Countersign a debit note that our own measurement covers; refuse it otherwise.

        A refused note is kept (evidence) and counted against the provider, with the
        reason; not countersigning it is what ends the lease at the provider.
        """
        note = reply.body
        assert isinstance(note, DebitNote)
        now = self.clock()
        meter = self.meter(lease)
        # The same note again in a fresh envelope: our countersignature was lost on the
        # way. Signing it again books nothing more (the ledger books increments).
        again = (note.seq, note.device_ms, note.amount) == (
            meter.signed_seq,
            meter.signed_device_ms,
            meter.signed_amount,
        )
        problem = (
            None
            if again
            else meter.note_problem(note.seq, note.device_ms, note.price, note.amount, now)
        )
        if reply.sender != lease.provider or note.provider != lease.provider:
            problem = "signed by another node"
        elif note.lease_id != lease.lease_id or note.tenant != self.node_id:
            problem = "names another lease or tenant"
        if problem is not None:
            log.warning("refused debit note %d of lease %s: %s", note.seq, lease.lease_id, problem)
            self.store.record_refusal(lease.provider, now, problem)
            self.refusals[lease.lease_id] = problem
            self.node.metrics.settlement.labels("bill_refused").inc()
            return
        # Checked above: it names this lease, its provider and us.
        self.store.put_receipt(ReceiptRow.signed(note, reply.raw, now))
        countersign = note.model_copy(update={"countersigns": reply.digest})
        raw = self.node.seal(countersign, to=lease.provider)
        increment = max(0, note.amount - self.store.lease_paid(lease.lease_id))
        self.store.countersign_receipt(reply.digest, raw, -increment, lease.provider, now)
        meter.signed(note.seq, note.device_ms, note.amount)
        with contextlib.suppress(MercatoError):  # the next heartbeat brings a newer note
            await self.node.request(self._peer(lease.provider), countersign, sealed=raw)

    async def release(self, lease: LeaseRow) -> ReceiptRow:
        """End a lease; check the provider's receipt, countersign it, book the ledger.

        The lease is ``ended`` only once its receipt checked out; a provider that ends
        it without a receipt, or with one that does not check, leaves it ``lost`` (over,
        unpaid). A request that fails leaves it as it was, for a later release.
        """
        self._addresses.setdefault(lease.provider, lease.provider_address)
        peer = self._peer(lease.provider)
        reply = await self.node.request(
            peer, Release(order_id=lease.order_id, lease_id=lease.lease_id, reason="done")
        )
        now = self.clock()
        self.stop_billing(lease, now)
        if reply is None or not isinstance(reply.body, Receipt):
            self.store.set_lease_state(lease.lease_id, LeaseState.LOST, now)
            raise ReceiptRejected(f"{lease.provider[:8]} ended lease {lease.lease_id} unsigned")
        receipt = reply.body
        try:
            self._check_receipt(lease, receipt, reply.sender, now)
        except ReceiptRejected as e:
            self.store.set_lease_state(lease.lease_id, LeaseState.LOST, now)
            self.store.record_outcome(lease.provider, "rejected")
            self.store.record_refusal(lease.provider, now, e.reason)
            self.refusals[lease.lease_id] = e.reason
            self.node.metrics.settlement.labels("bill_refused").inc()
            raise
        self.store.set_lease_state(lease.lease_id, LeaseState.ENDED, now)
        row = ReceiptRow.signed(receipt, reply.raw, now)  # checked: names this lease and us
        self.store.put_receipt(row)
        countersign = receipt.model_copy(update={"countersigns": reply.digest})
        raw = self.node.seal(countersign, to=lease.provider)
        # Booked before it is sent: we signed it, so we owe it, whether or not the
        # network delivers it. Notes countersigned during the lease booked part of it.
        increment = max(0, receipt.amount - self.store.lease_paid(lease.lease_id))
        self.store.countersign_receipt(reply.digest, raw, -increment, lease.provider, now)
        self.store.record_outcome(lease.provider, "completed")
        await self._deliver_countersignature(peer, countersign, raw, lease)
        return row

    async def _deliver_countersignature(
        self, peer: Peer, countersign: Receipt, raw: bytes, lease: LeaseRow
    ) -> None:
        """Send a final receipt's countersignature, again if the network lost it.

        The same sealed bytes each time, so the provider books it once: if a copy did
        arrive and only the answer was lost, the next copy is refused as a replay, which
        ends the tries. No heartbeat follows a released lease to bring it back, and a
        provider without it is owed money it cannot show was agreed.
        """
        if not await self._send_while_lost(peer, countersign, LOST_MESSAGE_TRIES, sealed=raw):
            log.warning(
                "countersignature of lease %s not delivered after %d tries; kept in the store",
                lease.lease_id,
                LOST_MESSAGE_TRIES,
            )

    def _check_receipt(self, lease: LeaseRow, r: Receipt, sender: str, now: int) -> None:
        """Refuse a receipt that is not for this lease or bills more than we measured.

        The lease's ``start_ms`` on the tenant's side is when the tenant sent the award
        (market.debit): the provider's word on when it started is never the bill's basis.
        """
        problems = []
        if sender != lease.provider or r.provider != lease.provider:
            problems.append("signed by another node")
        if r.lease_id != lease.lease_id or r.tenant != self.node_id:
            problems.append("names another lease or tenant")
        meter = self.meter(lease)
        bill = meter.bill_problem(r.device_ms, r.price, r.amount, now)
        if bill is not None:
            problems.append(bill)
        if problems:
            raise ReceiptRejected("; ".join(problems))

    def meter(self, lease: LeaseRow) -> TenantMeter:
        """The tenant's own measure of a lease (kept across calls: it holds what we signed)."""
        meter = self._meters.get(lease.lease_id)
        if meter is None:
            meter = TenantMeter(len(lease.devices), lease.price, lease.start_ms)
            self._meters[lease.lease_id] = meter
        return meter


def _signed_ms(entry: Entry) -> int:
    """When the provider signed an advert: its envelope's timestamp (verified on entry).

    An envelope that does not read (never for a verified one) counts as signed at the
    end of time, so nothing the tenant released is taken back as free because of it.
    """
    try:
        env = codec.decode(entry.envelope)
    except MercatoError:
        return NEVER_MS
    ts = env.get("ts") if type(env) is dict else None
    return ts if type(ts) is int else NEVER_MS
