"""The tenant's reverse auction for one order: a state machine driven by messages and ``now``.

::

    OPEN --start--> COLLECTING --all answered | deadline--> AWARDING --all accepted--> LEASED
                                      |                          |   (decline: next bid)
                                      +--no usable bid--> FAILED <+--bids exhausted

Bids are ranked by **expected cost to complete** one unit: price x expected runtime on
the bid's hardware (from its FLOP/s), divided by the provider's success probability in
this tenant's reputation record. Cheapest per delivered work wins, not cheapest per
hour. Units are split over several providers unless the order is a gang (then one bid
must cover every unit). Bids that are above the maximum price, from providers that
were not asked, for another order, duplicated, late or malformed are ignored and
counted. As soon as the auction ends (leased or failed), every bid that did not become
a lease is to be released, so providers get their devices back at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction

from market.catalog import DEFAULT_UTILISATION_PCT
from market.debit import (
    DEFAULT_DEBIT_INTERVAL_MS,
    DEFAULT_PAYMENT_TIMEOUT_MS,
    accept_start_problem,
)
from market.matching import REFERENCE_FLOP
from market.reputation import NEUTRAL, Reputation
from market.settlement import expected_cost
from protocol.messages import Accept, Award, Bid, Decline, NoBid, Order, Release

#: The reason of every release an abandoned auction sends.
ABANDON_REASON = "auction abandoned"


class AuctionState(Enum):
    OPEN = "open"
    COLLECTING = "collecting"
    AWARDING = "awarding"
    LEASED = "leased"
    FAILED = "failed"
    ABANDONED = "abandoned"  # its driver stopped (cancelled) before it ended


@dataclass(frozen=True, slots=True)
class TenantLease:
    """A lease as the tenant holds it: both signatures exist (award sent, accept received)."""

    lease_id: str
    order_id: str
    provider: str
    units: int
    devices: tuple[str, ...]
    model: str
    price: int
    start_ms: int
    end_ms: int
    heartbeat_interval_ms: int
    award_hash: str


@dataclass
class _Pending:
    award: Award
    bid: Bid
    award_hash: str | None = None
    sent_ms: int = 0


@dataclass
class AuctionOutcome:
    """Counters a tenant sees when an auction ends: what came back and why."""

    bids: int = 0
    no_bids: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)  # invalid bids by reason
    declined: int = 0

    def explain(self) -> str:
        """One line for people: 'no bids: 2 price_below_floor, 1 all_reserved'."""
        parts = [f"{self.bids} bid{'s' if self.bids != 1 else ''}"] if self.bids else []
        parts += [f"{n} {r}" for r, n in self.no_bids.most_common()]
        parts += [f"{n} ignored ({r})" for r, n in self.ignored.most_common()]
        if self.declined:
            parts.append(f"{self.declined} declined after award")
        return ", ".join(parts) or "no answers"


class Auction:
    """One order's auction. Feed it messages and ``now``; it says what to send."""

    def __init__(
        self,
        order: Order,
        asked: Sequence[str],
        *,
        flops: Mapping[tuple[str, str], int],
        reputation: Mapping[str, Reputation] | None = None,
        heartbeat_interval_ms: int = 2_000,
        utilisation_pct: int = DEFAULT_UTILISATION_PCT,
        debit_interval_ms: int = DEFAULT_DEBIT_INTERVAL_MS,
        payment_timeout_ms: int = DEFAULT_PAYMENT_TIMEOUT_MS,
    ) -> None:
        """``flops`` maps (provider, model) to the advertised FP16 FLOP/s per device.

        ``debit_interval_ms`` and ``payment_timeout_ms`` are the settlement terms every
        award proposes (market.debit); a provider declines terms outside its bounds.
        """
        self.order = order
        self.asked = frozenset(asked)
        self.flops = flops
        self.reputation = reputation or {}
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.utilisation_pct = utilisation_pct
        self.debit_interval_ms = debit_interval_ms
        self.payment_timeout_ms = payment_timeout_ms
        self.state = AuctionState.OPEN
        self.outcome = AuctionOutcome()
        # Keyed by (provider, bid_id): a provider cannot shadow another provider's bid.
        self.bids: dict[tuple[str, str], Bid] = {}
        self._answered: set[str] = set()
        self._pending: dict[str, _Pending] = {}  # lease_id ->
        self._used: set[tuple[str, str]] = set()  # bids awarded (pending or leased)
        self._leased_bids: set[tuple[str, str]] = set()
        #: lease_id -> why its accept was refused (the provider holds a lease we released).
        self.refused: dict[str, str] = {}
        self._refused_leases: dict[str, str] = {}  # lease_id -> provider
        #: lease_id -> provider of awards that got no answer (perhaps accepted all the same).
        self._unanswered: dict[str, str] = {}
        self._unusable: dict[tuple[str, str], Bid] = {}  # asked providers' invalid bids
        self.leases: list[TenantLease] = []
        self._lease_seq = 0
        self.failure: str | None = None
        #: The awards ``close`` produced, for a driver that closes from several places.
        self.last_awards: list[Award] = []

    # --- collecting -------------------------------------------------------------

    def start(self) -> None:
        if self.state is not AuctionState.OPEN:
            raise RuntimeError(f"auction already {self.state.value}")
        self.state = AuctionState.COLLECTING

    def on_bid(self, sender: str, bid: Bid, now_ms: int) -> bool:
        """Record a bid if valid; otherwise count why it was ignored. True if recorded."""
        reason = self._invalid(sender, bid, now_ms)
        if reason is not None:
            self.outcome.ignored[reason] += 1
            if (
                self.state is AuctionState.COLLECTING
                and sender in self.asked
                and bid.provider == sender
                and bid.order_id == self.order.order_id
                and sender not in self._answered
            ):
                # An asked provider's own unusable bid still answers the order (so the
                # auction can close early) and must be released (its devices are held).
                self._answered.add(sender)
                self._unusable[(sender, bid.bid_id)] = bid
            return False
        self.bids[(sender, bid.bid_id)] = bid
        self._answered.add(sender)
        self.outcome.bids += 1
        return True

    def _invalid(self, sender: str, bid: Bid, now_ms: int) -> str | None:
        if self.state is not AuctionState.COLLECTING:
            return "late"
        if bid.order_id != self.order.order_id:
            return "wrong_order"
        if sender not in self.asked or bid.provider != sender:
            return "not_asked"
        if sender in self._answered:
            return "duplicate"
        if bid.price > self.order.max_price:
            return "over_max_price"
        if bid.units > self.order.units:
            return "too_many_units"
        per_unit = self.order.requirement.devices_per_unit
        if len(bid.devices) != bid.units * per_unit or len(set(bid.devices)) != len(bid.devices):
            return "bad_devices"
        if bid.expires_ms <= now_ms:
            return "expired"
        if (sender, bid.model) not in self.flops:
            return "unknown_model"
        if self.order.requirement.gang and bid.units < self.order.units:
            return "partial_gang"
        return None

    def on_no_bid(self, sender: str, no_bid: NoBid) -> None:
        if (
            self.state is AuctionState.COLLECTING
            and sender in self.asked
            and sender not in self._answered
            and no_bid.order_id == self.order.order_id
        ):
            self._answered.add(sender)
            self.outcome.no_bids[no_bid.reason] += 1
        else:
            self.outcome.ignored["stray_no_bid"] += 1

    def on_unreachable(self, provider: str) -> None:
        """The order could not be delivered, or its answer did not come back."""
        if self.state is AuctionState.COLLECTING and provider not in self._answered:
            self._answered.add(provider)
            self.outcome.no_bids["unreachable"] += 1

    def ready(self, now_ms: int) -> bool:
        """Close now? Yes at the deadline, or early once every asked provider answered."""
        return self.state is AuctionState.COLLECTING and (
            now_ms >= self.order.bid_deadline_ms or self._answered >= self.asked
        )

    def next_deadline(self) -> int | None:
        return self.order.bid_deadline_ms if self.state is AuctionState.COLLECTING else None

    # --- ranking and awarding ---------------------------------------------------

    def score(self, bid: Bid) -> Fraction:
        """Expected cost to complete one unit, corrected by reputation (lower wins)."""
        flop = self.order.expected_flop or REFERENCE_FLOP
        per_unit = self.order.requirement.devices_per_unit
        device_flops = self.flops[(bid.provider, bid.model)]
        cost = expected_cost(bid.price, per_unit, flop, device_flops, self.utilisation_pct)
        success = self.reputation.get(bid.provider, NEUTRAL).success()
        return Fraction(cost * per_unit) / success

    def ranked(self) -> list[Bid]:
        return sorted(self.bids.values(), key=lambda b: (self.score(b), b.price, b.bid_id))

    def close(self, now_ms: int) -> list[Award]:
        """End collection; return the awards to send (empty and FAILED if nothing fits)."""
        if self.state is not AuctionState.COLLECTING:
            raise RuntimeError(f"cannot close an auction that is {self.state.value}")
        self.state = AuctionState.AWARDING
        awards = self._allocate(self.order.units, now_ms)
        if not awards:
            self._fail("no usable bid")
        self.last_awards = awards
        return awards

    def _allocate(self, units: int, now_ms: int) -> list[Award]:
        awards: list[Award] = []
        for bid in self.ranked():
            if units <= 0:
                break
            if (bid.provider, bid.bid_id) in self._used or bid.expires_ms <= now_ms:
                continue
            if self.order.requirement.gang and bid.units < units:
                continue
            take = min(units, bid.units)
            self._lease_seq += 1
            award = Award(
                order_id=self.order.order_id,
                bid_id=bid.bid_id,
                lease_id=f"{self.order.order_id[:50]}.L{self._lease_seq}",
                provider=bid.provider,
                units=take,
                price=bid.price,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                lease_end_ms=now_ms + self.order.lease_ms,
                debit_interval_ms=self.debit_interval_ms,
                payment_timeout_ms=self.payment_timeout_ms,
            )
            self._used.add((bid.provider, bid.bid_id))
            self._pending[award.lease_id] = _Pending(award, bid)
            awards.append(award)
            units -= take
        return awards

    def award_sent(self, lease_id: str, award_hash: str, now_ms: int) -> None:
        """The node sealed the award at ``now_ms``; Accept must name its envelope hash.

        ``now_ms`` starts the lease for the tenant's bill (market.debit.TenantMeter).
        """
        self._pending[lease_id].award_hash = award_hash
        self._pending[lease_id].sent_ms = now_ms

    def on_accept(self, sender: str, accept: Accept, now_ms: int) -> TenantLease | None:
        """Both signatures exist: the lease is made. None if the accept does not match.

        An accept whose ``start_ms`` falls outside the award's round trip (plus
        ``market.debit.ACCEPT_SKEW_MS``) is refused: its reason is in ``refused`` and the
        lease goes into ``releases()``, so the provider's devices come back. The lease's
        ``start_ms`` is when the tenant sent the award, never the provider's claim.
        """
        pending = self._pending.get(accept.lease_id)
        if (
            pending is None
            or sender != pending.award.provider
            or accept.order_id != self.order.order_id
            or pending.award_hash is None
            or accept.award_hash != pending.award_hash
        ):
            self.outcome.ignored["bad_accept"] += 1
            return None
        problem = accept_start_problem(accept.start_ms, pending.sent_ms, now_ms)
        if problem is not None:
            self.outcome.ignored["accept_start_outside_window"] += 1
            self.refused[accept.lease_id] = problem
            self._refused_leases[accept.lease_id] = pending.award.provider
            return None
        del self._pending[accept.lease_id]
        a, per_unit = pending.award, self.order.requirement.devices_per_unit
        lease = TenantLease(
            lease_id=a.lease_id,
            order_id=a.order_id,
            provider=a.provider,
            units=a.units,
            devices=tuple(pending.bid.devices[: a.units * per_unit]),
            model=pending.bid.model,
            price=a.price,
            start_ms=pending.sent_ms,
            end_ms=a.lease_end_ms,
            heartbeat_interval_ms=a.heartbeat_interval_ms,
            award_hash=pending.award_hash,
        )
        self.leases.append(lease)
        self._leased_bids.add((pending.bid.provider, pending.bid.bid_id))
        self._settle_if_done()
        return lease

    def on_decline(self, sender: str, decline: Decline, now_ms: int) -> list[Award]:
        """Fall back to the next-best unused bids for the declined units."""
        pending = self._pending.get(decline.lease_id)
        if pending is None or sender != pending.award.provider:
            self.outcome.ignored["stray_decline"] += 1
            return []
        return self._fallback(pending, now_ms)

    def on_award_failed(self, lease_id: str, now_ms: int) -> list[Award]:
        """The award could not be delivered: treat it as a decline.

        It may have been delivered and accepted, only the answer lost: the provider then
        holds a lease nobody uses or pays, which lapses and has its provider refuse this
        tenant's orders (market.debit.SettlementPolicy). So ``releases()`` ends the lease
        by its id too; a provider that holds none ignores that.
        """
        pending = self._pending.get(lease_id)
        if pending is None:
            return []
        if lease_id not in self._refused_leases:
            self._unanswered[lease_id] = pending.award.provider
        return self._fallback(pending, now_ms)

    def _fallback(self, pending: _Pending, now_ms: int) -> list[Award]:
        del self._pending[pending.award.lease_id]
        self.outcome.declined += 1
        awards = self._allocate(pending.award.units, now_ms)
        self._settle_if_done()
        return awards

    def _settle_if_done(self) -> None:
        if self._pending or self.state is not AuctionState.AWARDING:
            return
        leased = sum(lease.units for lease in self.leases)
        if leased >= self.order.units or (leased > 0 and not self.order.requirement.gang):
            self.state = AuctionState.LEASED
        elif leased == 0:
            self._fail("every award was declined")

    def _fail(self, why: str) -> None:
        self.state = AuctionState.FAILED
        self.failure = f"{why}: {self.outcome.explain()}"

    @property
    def units_leased(self) -> int:
        return sum(lease.units for lease in self.leases)

    @property
    def done(self) -> bool:
        return self.state in (AuctionState.LEASED, AuctionState.FAILED)

    def abandon(self, now_ms: int) -> list[tuple[str, Release]]:
        """The driver stops here (it was cancelled): (provider, Release) for all it owes.

        Every bid received and not awarded is released, unless it has expired by
        ``now_ms`` (its provider freed it already). Every award in flight is released
        by its ``lease_id`` and its ``bid_id`` in one message: the provider frees the
        reservation if the award has not arrived, and ends the lease if it has (and
        the accept is on its way to nobody). Awards that got no answer and refused
        accepts are released by ``lease_id``, as ``releases()`` does.

        Not in the list: the leases already made (``leases``). Ending one is settling
        it, a receipt to check and countersign, so that is the driver's part; it must
        end them all, since the caller never gets them and a lease nobody heartbeats
        or pays lapses unpaid (its provider then refuses this tenant's orders). After
        this the auction is ``ABANDONED``: it takes no more messages, and a second call
        (or ``releases()``) returns nothing.
        """
        if self.state is AuctionState.ABANDONED:
            return []
        owed: list[tuple[str, Release]] = []
        if not self.done:
            in_flight = {(p.bid.provider, p.bid.bid_id) for p in self._pending.values()}
            owed = [
                (
                    key[0],
                    Release(order_id=self.order.order_id, bid_id=b.bid_id, reason=ABANDON_REASON),
                )
                for key, b in {**self.bids, **self._unusable}.items()
                if key not in self._leased_bids and key not in in_flight and b.expires_ms > now_ms
            ]
            owed += [
                (
                    p.award.provider,
                    Release(
                        order_id=self.order.order_id,
                        bid_id=p.bid.bid_id,
                        lease_id=lease_id,
                        reason=ABANDON_REASON,
                    ),
                )
                for lease_id, p in self._pending.items()
            ]
            owed += [
                (provider, Release(order_id=self.order.order_id, lease_id=i, reason=ABANDON_REASON))
                for i, provider in {**self._refused_leases, **self._unanswered}.items()
            ]
        else:
            owed = self.releases()  # ended, but the driver stopped before it sent them
        self._pending.clear()
        self.state = AuctionState.ABANDONED
        self.failure = f"abandoned: {self.outcome.explain()}"
        return owed

    def releases(self) -> list[tuple[str, Release]]:
        """Once done: (provider, Release) for every bid that did not become a lease, and
        for every lease a provider may hold that we do not (a refused accept, an award
        that got no answer)."""
        if not self.done:
            return []
        lost = [
            (key[0], Release(order_id=self.order.order_id, bid_id=b.bid_id, reason="auction lost"))
            for key, b in {**self.bids, **self._unusable}.items()
            if key not in self._leased_bids
        ]
        refused = [
            (
                provider,
                Release(
                    order_id=self.order.order_id,
                    lease_id=lease_id,
                    reason=f"accept refused: {self.refused[lease_id]}"[:1024],
                ),
            )
            for lease_id, provider in self._refused_leases.items()
        ]
        unanswered = [
            (
                provider,
                Release(order_id=self.order.order_id, lease_id=lease_id, reason="award unanswered"),
            )
            for lease_id, provider in self._unanswered.items()
        ]
        return lost + refused + unanswered
