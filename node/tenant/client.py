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
from market.matching import Candidate, describe, rank
from market.reputation import Reputation
from market.settlement import amount_owed, format_credits
from market.verification import measured_flops, slowness
from node.net.node import Node, NodeSettings, Peer, wall_clock_ms
from node.net.transport import Transport
from node.store.node_store import LeaseRow, ReceiptRow, Store
from node.store.verify_store import VerifyStore
from protocol.errors import MercatoError
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Bid,
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
    ) -> None:
        self.identity = identity
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
        self._order_seq = 0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    # --- directory ------------------------------------------------------------------

    async def refresh(self, peer_address: str) -> list[Advert]:
        """Pull (and verify) the live directory from any peer."""
        entries = await self.node.fetch_directory(Peer(address=peer_address, role="bootstrap"))
        adverts = [e.advert for e in entries]
        for a in adverts:
            self._addresses[a.provider] = a.address
        return adverts

    def adverts(self) -> list[Advert]:
        return [e.advert for e in self.node.directory.live(self.clock())]

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
        auction.award_sent(award.lease_id, award_hash)
        try:
            reply = await self.node.request(peer, award, sealed=raw)
        except MercatoError as e:
            log.info("award to %s failed: %s", award.provider[:8], e)
            return auction.on_award_failed(award.lease_id, self.clock())
        if reply is not None and isinstance(reply.body, Accept):
            lease = auction.on_accept(reply.sender, reply.body)
            if lease is not None:
                self.store.put_lease(self._row(auction.order, lease, raw, reply.raw))
            return []
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
            state="active",
            award_hash=lease.award_hash,
            award=award,
            accept=accept,
            updated_ms=self.clock(),
        )

    async def _release_losers(self, auction: Auction) -> None:
        async def one(provider: str, release: Release) -> None:
            with contextlib.suppress(MercatoError):
                await self.node.request(self._peer(provider), release)

        await asyncio.gather(*(one(p, r) for p, r in auction.releases()))

    # --- leases ---------------------------------------------------------------------

    async def heartbeat(self, lease: LeaseRow, seq: int = 0) -> bool:
        """Tell the provider we are alive; False if it no longer holds the lease."""
        self._addresses.setdefault(lease.provider, lease.provider_address)
        try:
            await self.node.request(
                self._peer(lease.provider), Heartbeat(lease_id=lease.lease_id, seq=seq)
            )
        except MercatoError:
            return False
        return True

    async def release(self, lease: LeaseRow) -> ReceiptRow:
        """End a lease; check the provider's receipt, countersign it, book the ledger."""
        self._addresses.setdefault(lease.provider, lease.provider_address)
        peer = self._peer(lease.provider)
        reply = await self.node.request(
            peer, Release(order_id=lease.order_id, lease_id=lease.lease_id, reason="done")
        )
        now = self.clock()
        self.store.set_lease_state(lease.lease_id, "ended", now)
        if reply is None or not isinstance(reply.body, Receipt):
            raise ReceiptRejected(f"{lease.provider[:8]} ended lease {lease.lease_id} unsigned")
        receipt = reply.body
        try:
            self._check_receipt(lease, receipt, reply.sender, now)
        except ReceiptRejected:
            self.store.record_outcome(lease.provider, "rejected")
            raise
        row = ReceiptRow(
            receipt_hash=reply.digest,
            lease_id=lease.lease_id,
            task_id=receipt.task_id,
            provider=lease.provider,
            tenant=self.node_id,
            device_ms=receipt.device_ms,
            price=receipt.price,
            amount=receipt.amount,
            receipt=reply.raw,
            countersign=None,
            created_ms=now,
        )
        self.store.put_receipt(row)
        countersign = receipt.model_copy(update={"countersigns": reply.digest})
        raw = self.node.seal(countersign, to=lease.provider)
        await self.node.request(peer, countersign, sealed=raw)
        self.store.countersign_receipt(reply.digest, raw, -receipt.amount, lease.provider, now)
        self.store.record_outcome(lease.provider, "completed")
        return row

    def _check_receipt(self, lease: LeaseRow, r: Receipt, sender: str, now: int) -> None:
        problems = []
        if sender != lease.provider or r.provider != lease.provider:
            problems.append("signed by another node")
        if r.lease_id != lease.lease_id or r.tenant != self.node_id:
            problems.append("names another lease or tenant")
        if r.price != lease.price:
            problems.append(f"price {r.price} is not the leased {lease.price}")
        if r.amount != amount_owed(r.device_ms, r.price):
            problems.append(f"amount {r.amount} is not ceil(device_ms x price / 1 h)")
        # Usage can't exceed devices x the time we held the lease (plus 1 s of skew).
        ceiling = len(lease.devices) * (max(0, now - lease.start_ms) + 1_000)
        if r.device_ms > ceiling:
            problems.append(f"usage {r.device_ms} device-ms exceeds the {ceiling} held")
        if problems:
            raise ReceiptRejected("; ".join(problems))
