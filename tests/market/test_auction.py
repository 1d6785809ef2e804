"""The tenant's reverse auction as a state machine, stepped by messages and ``now``.

Pure and in-process: bids are built by hand or come from real ``BidEngine``s called
directly; the award hash is a SHA-256 over the award's JSON instead of a sealed
envelope, which is all the state machine compares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import count

import pytest

from market.auction import Auction, AuctionState, TenantLease
from market.bidding import BidEngine, Device
from market.matching import rank
from market.reputation import Reputation
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Bid,
    Decline,
    Interconnect,
    NoBid,
    Order,
    Release,
    Requirement,
)

T0 = 1_700_000_000_000
TENANT = "t" * 32
A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
TFLOPS = 10**12
GB = 10**9
NVLINK = Interconnect(kind="nvlink", bandwidth=450 * GB, gang_size=8)

_bid_ids = count(1)


def order(
    units: int = 1,
    *,
    max_price: int = 10_000_000,
    deadline: int = T0 + 2_000,
    order_id: str = "ord-1",
    **req: object,
) -> Order:
    return Order(
        order_id=order_id,
        tenant=TENANT,
        job_spec_hash="0" * 64,
        workload="sweep",
        requirement=Requirement(**req),  # type: ignore[arg-type]
        units=units,
        max_price=max_price,
        bid_deadline_ms=deadline,
        lease_ms=3_600_000,
    )


def bid(
    provider: str,
    units: int = 1,
    *,
    price: int = 1_000_000,
    model: str = "gpu",
    per_unit: int = 1,
    order_id: str = "ord-1",
    expires_ms: int = T0 + 12_000,
    devices: Sequence[str] | None = None,
) -> Bid:
    return Bid(
        order_id=order_id,
        bid_id=f"{provider[:4]}.b{next(_bid_ids)}",
        provider=provider,
        units=units,
        devices=list(devices)
        if devices is not None
        else [f"d{i}" for i in range(units * per_unit)],
        model=model,
        price=price,
        expires_ms=expires_ms,
    )


def auction(
    o: Order,
    asked: Sequence[str] = (A, B, C),
    *,
    flops: dict[tuple[str, str], int] | None = None,
    reputation: dict[str, Reputation] | None = None,
) -> Auction:
    au = Auction(
        o,
        asked,
        flops=flops if flops is not None else {(p, "gpu"): 100 * TFLOPS for p in asked},
        reputation=reputation,
    )
    au.start()
    return au


def award_hash(award: Award) -> str:
    return hashlib.sha256(award.model_dump_json().encode()).hexdigest()


def accept(au: Auction, award: Award, now: int = T0 + 2_100) -> TenantLease:
    """Send ``award`` (record its hash) and feed the provider's Accept back."""
    h = award_hash(award)
    au.award_sent(award.lease_id, h, now - 100)
    lease = au.on_accept(
        award.provider,
        Accept(lease_id=award.lease_id, order_id=award.order_id, award_hash=h, start_ms=now),
        now,
    )
    assert lease is not None
    return lease


def decline(au: Auction, award: Award, now: int = T0 + 2_100) -> list[Award]:
    au.award_sent(award.lease_id, award_hash(award), now - 100)
    return au.on_decline(
        award.provider,
        Decline(lease_id=award.lease_id, order_id=award.order_id, reason="busy"),
        now,
    )


def state(au: Auction) -> AuctionState:
    """The state read through a call, so mypy does not narrow it across steps."""
    return au.state


def no_bid(provider: str, reason: str, order_id: str = "ord-1") -> NoBid:
    return NoBid(order_id=order_id, provider=provider, reason=reason)  # type: ignore[arg-type]


class TestStates:
    def test_open_collecting_awarding_leased(self) -> None:
        au = Auction(order(2), [A], flops={(A, "gpu"): 100 * TFLOPS})
        assert au.state is AuctionState.OPEN
        au.start()
        assert state(au) is AuctionState.COLLECTING
        assert au.on_bid(A, bid(A, 2), T0 + 100)
        [award] = au.close(T0 + 200)
        assert state(au) is AuctionState.AWARDING
        assert not au.done
        lease = accept(au, award)
        assert state(au) is AuctionState.LEASED
        assert au.done
        assert lease.units == 2
        assert lease.provider == A
        assert au.units_leased == 2
        assert au.failure is None

    def test_start_twice_and_close_twice_are_programming_errors(self) -> None:
        au = auction(order())
        with pytest.raises(RuntimeError, match="already collecting"):
            au.start()
        au.on_bid(A, bid(A), T0)
        au.close(T0 + 1)
        with pytest.raises(RuntimeError, match="awarding"):
            au.close(T0 + 2)

    def test_close_before_start_is_refused(self) -> None:
        au = Auction(order(), [A], flops={})
        with pytest.raises(RuntimeError, match="open"):
            au.close(T0)

    def test_waits_for_the_deadline_while_someone_has_not_answered(self) -> None:
        au = auction(order(deadline=T0 + 2_000))
        au.on_bid(A, bid(A), T0 + 10)
        au.on_no_bid(B, no_bid(B, "all_reserved"))
        now = T0
        while now < T0 + 2_000:
            assert not au.ready(now)
            now += 100
        assert au.ready(now)
        assert au.next_deadline() == T0 + 2_000

    def test_closes_early_once_every_asked_provider_answered(self) -> None:
        au = auction(order(deadline=T0 + 60_000))
        au.on_bid(A, bid(A), T0 + 10)
        assert not au.ready(T0 + 10)
        au.on_no_bid(B, no_bid(B, "all_reserved"))
        assert not au.ready(T0 + 20)
        au.on_unreachable(C)
        assert au.ready(T0 + 30)
        assert au.outcome.no_bids["unreachable"] == 1

    def test_no_timer_once_collecting_is_over(self) -> None:
        au = auction(order())
        au.on_bid(A, bid(A), T0)
        au.close(T0 + 1)
        assert au.next_deadline() is None
        assert not au.ready(T0 + 10**6)


class TestAllocation:
    def test_units_are_split_over_providers_by_score(self) -> None:
        au = auction(order(6))
        au.on_bid(A, bid(A, 4, price=3_000_000), T0)
        au.on_bid(B, bid(B, 4, price=1_000_000), T0)
        au.on_bid(C, bid(C, 4, price=2_000_000), T0)
        awards = au.close(T0 + 2_000)
        assert [(a.provider, a.units, a.price) for a in awards] == [
            (B, 4, 1_000_000),
            (C, 2, 2_000_000),
        ]
        for a in awards:
            accept(au, a)
        assert au.state is AuctionState.LEASED
        assert au.units_leased == 6
        lease_c = next(x for x in au.leases if x.provider == C)
        assert len(lease_c.devices) == 2  # only the awarded units' devices

    def test_ranked_by_cost_to_complete_not_hourly_price(self) -> None:
        # A is 3x dearer per hour but 10x faster: it completes the work cheaper.
        flops = {(A, "h100"): 1_000 * TFLOPS, (B, "t4"): 100 * TFLOPS}
        au = auction(order(1), [A, B], flops=flops)
        au.on_bid(A, bid(A, price=3_000_000, model="h100"), T0)
        au.on_bid(B, bid(B, price=1_000_000, model="t4"), T0)
        [award] = au.close(T0 + 2_000)
        assert award.provider == A
        assert [b.provider for b in au.ranked()] == [A, B]

    def test_a_provider_with_a_bad_record_loses_to_an_equal_bid(self) -> None:
        rep = {A: Reputation(failed=3)}
        au = auction(order(1), [A, B], reputation=rep)
        au.on_bid(A, bid(A, price=1_000_000), T0)
        au.on_bid(B, bid(B, price=1_000_000), T0)
        [award] = au.close(T0 + 2_000)
        assert award.provider == B

    def test_fewer_units_than_wanted_are_still_leased_for_a_sweep(self) -> None:
        au = auction(order(6), [A])
        au.on_bid(A, bid(A, 2), T0)
        [award] = au.close(T0 + 2_000)
        assert award.units == 2
        accept(au, award)
        assert au.state is AuctionState.LEASED
        assert au.units_leased == 2

    def test_lease_ends_after_the_orders_lease_time(self) -> None:
        au = auction(order(1), [A])
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 500)
        assert award.lease_end_ms == T0 + 500 + 3_600_000
        assert award.heartbeat_interval_ms == au.heartbeat_interval_ms

    def test_bids_that_expired_before_the_close_are_not_awarded(self) -> None:
        au = auction(order(1), [A, B])
        au.on_bid(A, bid(A, price=1_000, expires_ms=T0 + 1_000), T0)
        au.on_bid(B, bid(B, price=9_000, expires_ms=T0 + 10_000), T0)
        [award] = au.close(T0 + 2_000)
        assert award.provider == B

    def test_gang_never_splits_even_when_parts_are_cheaper(self) -> None:
        au = auction(order(4, gang=True), [A, B, C])
        assert not au.on_bid(A, bid(A, 2, price=100_000), T0)  # cheap but partial
        assert not au.on_bid(B, bid(B, 2, price=100_000), T0)
        assert au.on_bid(C, bid(C, 4, price=5_000_000), T0)
        [award] = au.close(T0 + 2_000)
        assert (award.provider, award.units) == (C, 4)
        assert au.outcome.ignored["partial_gang"] == 2

    def test_gang_without_a_whole_bid_fails(self) -> None:
        au = auction(order(4, gang=True), [A, B])
        au.on_bid(A, bid(A, 2), T0)
        au.on_bid(B, bid(B, 3), T0)
        assert au.close(T0 + 2_000) == []
        assert au.state is AuctionState.FAILED
        assert au.failure is not None
        assert "no usable bid" in au.failure
        assert "2 ignored (partial_gang)" in au.failure


class TestInvalidBids:
    @pytest.fixture
    def au(self) -> Auction:
        return auction(order(2, max_price=2_000_000, devices_per_unit=2))

    def _ignored(self, au: Auction, sender: str, b: Bid, reason: str, now: int = T0) -> None:
        assert not au.on_bid(sender, b, now)
        assert au.outcome.ignored[reason] == 1
        assert au.bids == {} or all(v is not b for v in au.bids.values())

    def test_over_max_price(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, per_unit=2, price=2_000_001), "over_max_price")

    def test_not_asked(self, au: Auction) -> None:
        self._ignored(au, D, bid(D, 2, per_unit=2), "not_asked")

    def test_bid_in_someone_elses_name_is_not_asked(self, au: Auction) -> None:
        self._ignored(au, A, bid(B, 2, per_unit=2), "not_asked")

    def test_wrong_order(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, per_unit=2, order_id="ord-2"), "wrong_order")

    def test_duplicate(self, au: Auction) -> None:
        assert au.on_bid(A, bid(A, 2, per_unit=2, price=1_000_000), T0)
        self._ignored(au, A, bid(A, 2, per_unit=2, price=10), "duplicate")
        assert [b.price for b in au.bids.values()] == [1_000_000]  # the first one stands

    def test_bid_after_a_no_bid_is_a_duplicate(self, au: Auction) -> None:
        au.on_no_bid(A, no_bid(A, "all_reserved"))
        self._ignored(au, A, bid(A, 2, per_unit=2), "duplicate")

    def test_late(self, au: Auction) -> None:
        au.on_bid(B, bid(B, 2, per_unit=2), T0)
        au.close(T0 + 2_000)
        self._ignored(au, A, bid(A, 2, per_unit=2), "late", now=T0 + 2_001)

    def test_bad_devices_wrong_count(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, per_unit=1), "bad_devices")

    def test_bad_devices_repeated(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, devices=["x", "x", "y", "z"]), "bad_devices")

    def test_expired(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, per_unit=2, expires_ms=T0 + 50), "expired", now=T0 + 50)

    def test_too_many_units(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 3, per_unit=2), "too_many_units")

    def test_unknown_model(self, au: Auction) -> None:
        self._ignored(au, A, bid(A, 2, per_unit=2, model="mystery"), "unknown_model")

    def test_partial_gang(self) -> None:
        au = auction(order(2, gang=True))
        self._ignored(au, A, bid(A, 1), "partial_gang")

    def test_stray_no_bids_are_counted_not_trusted(self) -> None:
        au = auction(order(1))
        au.on_no_bid(D, no_bid(D, "draining"))  # not asked
        au.on_no_bid(A, no_bid(A, "draining", order_id="ord-9"))  # another order
        au.on_no_bid(B, no_bid(B, "all_reserved"))
        au.on_no_bid(B, no_bid(B, "all_reserved"))  # twice
        assert au.outcome.ignored["stray_no_bid"] == 3
        assert au.outcome.no_bids == {"all_reserved": 1}
        assert not au.ready(T0)  # A and C still owe an answer

    def test_the_reasons_reach_the_failure_text(self) -> None:
        au = auction(order(1, max_price=100), [A, B])
        au.on_bid(A, bid(A, price=101), T0)
        au.on_bid(B, bid(B, price=102), T0)
        au.close(T0 + 2_000)
        assert au.failure is not None
        assert "2 ignored (over_max_price)" in au.failure


class TestAwarding:
    def test_decline_falls_back_to_the_next_bid(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A, price=1_000_000), T0)
        au.on_bid(B, bid(B, price=2_000_000), T0)
        au.on_bid(C, bid(C, price=3_000_000), T0)
        [first] = au.close(T0 + 2_000)
        assert first.provider == A
        [second] = decline(au, first)
        assert second.provider == B
        assert second.lease_id != first.lease_id
        assert au.state is AuctionState.AWARDING
        accept(au, second)
        assert state(au) is AuctionState.LEASED
        assert [x.provider for x in au.leases] == [B]
        assert au.outcome.declined == 1

    def test_undeliverable_award_falls_back_like_a_decline(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A, price=1_000_000), T0)
        au.on_bid(B, bid(B, price=2_000_000), T0)
        [first] = au.close(T0 + 2_000)
        [second] = au.on_award_failed(first.lease_id, T0 + 2_500)
        assert second.provider == B
        assert au.on_award_failed(first.lease_id, T0 + 2_600) == []  # already handled

    def test_an_unanswered_award_is_released_by_its_lease_id(self) -> None:
        # The award may have reached the provider and only its accept been lost: the
        # provider then holds a lease the tenant never uses nor pays, which lapses and
        # makes the provider refuse the tenant's orders for a day (market.debit). Freeing
        # the bid is not enough (the provider turned its reservation into the lease).
        au = auction(order(1))
        au.on_bid(A, bid(A, price=1_000_000), T0)
        au.on_bid(B, bid(B, price=2_000_000), T0)
        [first] = au.close(T0 + 2_000)
        [second] = au.on_award_failed(first.lease_id, T0 + 2_500)
        accept(au, second)
        assert state(au) is AuctionState.LEASED
        by_lease = [(p, r.lease_id, r.reason) for p, r in au.releases() if r.lease_id]
        assert by_lease == [(A, first.lease_id, "award unanswered")]

    def test_declined_units_go_to_the_next_bids_of_a_split_order(self) -> None:
        au = auction(order(5))
        au.on_bid(A, bid(A, 3, price=1_000_000), T0)
        au.on_bid(B, bid(B, 2, price=2_000_000), T0)
        au.on_bid(C, bid(C, 4, price=3_000_000), T0)
        a, b = au.close(T0 + 2_000)
        accept(au, b)
        [c] = decline(au, a)
        assert (c.provider, c.units) == (C, 3)
        accept(au, c)
        assert au.state is AuctionState.LEASED
        assert au.units_leased == 5

    def test_every_award_declined_fails_with_the_reasons(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A, price=1_000_000), T0)
        au.on_bid(B, bid(B, price=2_000_000), T0)
        au.on_no_bid(C, no_bid(C, "price_below_floor"))
        [first] = au.close(T0 + 2_000)
        [second] = decline(au, first)
        assert decline(au, second) == []
        assert au.state is AuctionState.FAILED
        assert au.failure is not None
        assert "every award was declined" in au.failure
        assert "2 declined after award" in au.failure
        assert "1 price_below_floor" in au.failure
        assert au.outcome.explain() in au.failure

    def test_no_bids_at_all_fail_with_the_counted_reasons(self) -> None:
        au = auction(order(1))
        au.on_no_bid(A, no_bid(A, "price_below_floor"))
        au.on_no_bid(B, no_bid(B, "price_below_floor"))
        au.on_no_bid(C, no_bid(C, "all_reserved"))
        assert au.ready(T0)
        assert au.close(T0) == []
        assert au.state is AuctionState.FAILED
        assert au.failure is not None
        assert "2 price_below_floor" in au.failure
        assert "1 all_reserved" in au.failure
        assert au.releases() == []

    def test_accept_with_the_wrong_award_hash_is_ignored(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 2_000)
        au.award_sent(award.lease_id, award_hash(award), T0 + 2_000)
        forged = Accept(
            lease_id=award.lease_id, order_id=award.order_id, award_hash="f" * 64, start_ms=T0
        )
        assert au.on_accept(A, forged, T0 + 2_100) is None
        assert au.state is AuctionState.AWARDING
        assert au.leases == []
        assert au.outcome.ignored["bad_accept"] == 1
        accept(au, award)  # the real one still works
        assert state(au) is AuctionState.LEASED

    def test_accept_from_the_wrong_provider_is_ignored(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 2_000)
        h = award_hash(award)
        au.award_sent(award.lease_id, h, T0 + 2_000)
        ok = Accept(lease_id=award.lease_id, order_id=award.order_id, award_hash=h, start_ms=T0)
        assert au.on_accept(B, ok, T0 + 2_100) is None
        assert au.leases == []
        assert au.on_accept(A, ok, T0 + 2_100) is not None

    def test_a_backdated_accept_is_refused_with_the_reason_and_released(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 2_000)
        h = award_hash(award)
        au.award_sent(award.lease_id, h, T0 + 2_000)
        month = 30 * 86_400_000
        backdated = Accept(
            lease_id=award.lease_id, order_id=award.order_id, award_hash=h, start_ms=T0 - month
        )
        assert au.on_accept(A, backdated, T0 + 2_100) is None
        assert au.outcome.ignored["accept_start_outside_window"] == 1
        assert "before the award was sent" in au.refused[award.lease_id]
        assert au.on_award_failed(award.lease_id, T0 + 2_100) == []
        assert [(p, r.lease_id) for p, r in au.releases() if r.lease_id is not None] == [
            (A, award.lease_id)
        ]

    def test_the_lease_starts_when_the_tenant_sent_the_award(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 2_000)
        h = award_hash(award)
        au.award_sent(award.lease_id, h, T0 + 2_000)
        # 20 s early is inside the skew: accepted, but the tenant's start is its own.
        early = Accept(
            lease_id=award.lease_id, order_id=award.order_id, award_hash=h, start_ms=T0 - 18_000
        )
        lease = au.on_accept(A, early, T0 + 2_100)
        assert lease is not None
        assert lease.start_ms == T0 + 2_000

    def test_accept_before_the_award_was_sent_is_ignored(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        [award] = au.close(T0 + 2_000)
        early = Accept(
            lease_id=award.lease_id,
            order_id=award.order_id,
            award_hash=award_hash(award),
            start_ms=T0,
        )
        assert au.on_accept(A, early, T0 + 2_100) is None

    def test_decline_from_the_wrong_provider_is_ignored(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        au.on_bid(B, bid(B, price=2_000_000), T0)
        [award] = au.close(T0 + 2_000)
        fake = Decline(lease_id=award.lease_id, order_id=award.order_id, reason="x")
        assert au.on_decline(B, fake, T0 + 2_100) == []
        assert au.outcome.ignored["stray_decline"] == 1
        assert au.outcome.declined == 0
        accept(au, award)
        assert [x.provider for x in au.leases] == [A]

    def test_releases_list_every_bid_that_did_not_become_a_lease(self) -> None:
        au = auction(order(2), [A, B, C, D])
        b_a = bid(A, 1, price=1_000_000)
        b_b = bid(B, 1, price=2_000_000)
        b_c = bid(C, 1, price=3_000_000)
        b_d = bid(D, 1, price=4_000_000)
        for b in (b_a, b_b, b_c, b_d):
            au.on_bid(b.provider, b, T0)
        first, second = au.close(T0 + 2_000)
        assert au.releases() == []  # not done: awards are in flight
        accept(au, first)
        [third] = decline(au, second)  # B declines; C takes its unit
        accept(au, third)
        assert au.done
        released = {(p, r.bid_id) for p, r in au.releases()}
        assert released == {(B, b_b.bid_id), (D, b_d.bid_id)}  # the decliner and the loser
        for _, r in au.releases():
            assert r.order_id == "ord-1"
            assert r.lease_id is None

    def test_failed_auction_releases_every_bid(self) -> None:
        au = auction(order(1), [A])
        b = bid(A)
        au.on_bid(A, b, T0)
        [award] = au.close(T0 + 2_000)
        decline(au, award)
        assert au.state is AuctionState.FAILED
        assert [(p, r.bid_id) for p, r in au.releases()] == [(A, b.bid_id)]


class TestAbandon:
    """The driver is cancelled mid-way: the auction says every release it owes."""

    def test_bids_received_while_collecting_are_released(self) -> None:
        au = auction(order(2))
        b_a, b_b = bid(A), bid(B)
        au.on_bid(A, b_a, T0)
        au.on_bid(B, b_b, T0)  # C has not answered: collecting
        owed = au.abandon(T0 + 500)
        assert {(p, r.bid_id, r.lease_id) for p, r in owed} == {
            (A, b_a.bid_id, None),
            (B, b_b.bid_id, None),
        }
        assert {r.reason for _, r in owed} == {"auction abandoned"}
        assert state(au) is AuctionState.ABANDONED
        assert au.failure is not None
        assert au.failure.startswith("abandoned")

    def test_an_asked_providers_unusable_bid_is_released_too(self) -> None:
        au = auction(order(1, max_price=1_000_000))
        over = bid(A, price=2_000_000)  # its devices are held all the same
        au.on_bid(A, over, T0)
        assert [(p, r.bid_id) for p, r in au.abandon(T0 + 500)] == [(A, over.bid_id)]

    def test_an_expired_bid_is_not_released(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A, expires_ms=T0 + 1_000), T0)
        assert au.abandon(T0 + 1_000) == []  # its provider freed it already

    def test_an_award_in_flight_is_released_by_its_lease_and_its_bid(self) -> None:
        # The award may not have arrived (the bid is still a reservation) or may have
        # made a lease whose accept nobody reads: one release frees either.
        au = auction(order(1))
        b_a, b_b = bid(A, price=1_000_000), bid(B, price=2_000_000)
        au.on_bid(A, b_a, T0)
        au.on_bid(B, b_b, T0)
        [award] = au.close(T0 + 2_000)
        au.award_sent(award.lease_id, award_hash(award), T0 + 2_000)
        owed = {(p, r.bid_id, r.lease_id) for p, r in au.abandon(T0 + 2_100)}
        assert owed == {(A, b_a.bid_id, award.lease_id), (B, b_b.bid_id, None)}
        # The accept that comes back after all is not a lease of this auction.
        h = award_hash(award)
        late = Accept(lease_id=award.lease_id, order_id="ord-1", award_hash=h, start_ms=T0)
        assert au.on_accept(A, late, T0 + 2_200) is None
        assert au.leases == []

    def test_leases_made_are_left_to_the_driver_and_the_rest_released(self) -> None:
        # Ending a lease is settling it (a receipt to check and countersign): the
        # driver does it for ``leases``; the auction owes the others.
        au = auction(order(2))
        b_a, b_b, b_c = bid(A, price=1_000_000), bid(B, price=2_000_000), bid(C, price=3_000_000)
        for b in (b_a, b_b, b_c):
            au.on_bid(b.provider, b, T0)
        first, second = au.close(T0 + 2_000)
        accept(au, first)
        au.award_sent(second.lease_id, award_hash(second), T0 + 2_000)
        owed = {(p, r.bid_id, r.lease_id) for p, r in au.abandon(T0 + 2_200)}
        assert owed == {(B, b_b.bid_id, second.lease_id), (C, b_c.bid_id, None)}
        assert [x.provider for x in au.leases] == [A]

    def test_unanswered_and_refused_awards_are_released_by_lease_id(self) -> None:
        au = auction(order(2), [A, B, C, D])
        for p, price in ((A, 1), (B, 2), (C, 3), (D, 4)):
            au.on_bid(p, bid(p, price=price * 1_000_000), T0)
        first, second = au.close(T0 + 2_000)
        au.award_sent(first.lease_id, award_hash(first), T0 + 2_000)
        [third] = au.on_award_failed(first.lease_id, T0 + 2_500)  # A: no answer
        owed = {(p, r.lease_id) for p, r in au.abandon(T0 + 2_600) if r.lease_id}
        assert owed == {(A, first.lease_id), (B, second.lease_id), (C, third.lease_id)}

    def test_an_ended_auction_owes_what_releases_would_have_sent(self) -> None:
        # Cancelled after it ended, while its losers were being released.
        au = auction(order(1))
        b_a, b_b = bid(A, price=1_000_000), bid(B, price=2_000_000)
        au.on_bid(A, b_a, T0)
        au.on_bid(B, b_b, T0)
        [award] = au.close(T0 + 2_000)
        accept(au, award)
        assert au.done
        assert [(p, r.bid_id) for p, r in au.abandon(T0 + 2_200)] == [(B, b_b.bid_id)]

    def test_abandon_twice_owes_nothing_more_and_releases_says_nothing(self) -> None:
        au = auction(order(1))
        au.on_bid(A, bid(A), T0)
        assert len(au.abandon(T0 + 100)) == 1
        assert au.abandon(T0 + 200) == []
        assert au.releases() == []
        assert not au.done
        assert au.on_bid(B, bid(B), T0 + 300) is False  # late: it takes nothing more
        assert au.outcome.ignored["late"] == 1


# --- a full round trip with real bid engines ----------------------------------------


def _devices(prefix: str, model: str, floor: int, flops: int, n: int = 4) -> list[Device]:
    return [
        Device(
            id=f"{prefix}{i}",
            model=model,
            kind="gpu",
            memory_bytes=80 * GB,
            fp16_flops=flops,
            memory_bandwidth=2_000 * GB,
            price_floor=floor,
        )
        for i in range(n)
    ]


class TestRoundTripWithBidEngines:
    """Three providers' BidEngines and one Auction, called directly in one process."""

    def engines(self) -> dict[str, BidEngine]:
        # Per unit of work (price / FLOP/s): A 2.5e6/1000 = 2500, B 0.5e6/100 = 5000,
        # C 1.2e6/300 = 4000. Hourly price alone would rank B first, then C, then A.
        return {
            A: BidEngine(A, _devices("a", "fast", 2_500_000, 1_000 * TFLOPS), NVLINK),
            B: BidEngine(B, _devices("b", "slow", 500_000, 100 * TFLOPS), NVLINK),
            C: BidEngine(C, _devices("c", "mid", 1_200_000, 300 * TFLOPS), NVLINK),
        }

    def adverts(self, engines: dict[str, BidEngine]) -> list[Advert]:
        return [
            Advert(
                provider=p,
                address=f"http://{p[:4]}.invalid:9",
                devices=e.device_groups(),
                interconnect=e.interconnect,
                seq=1,
                expires_ms=T0 + 60_000,
            )
            for p, e in engines.items()
        ]

    def test_six_units_go_to_the_cheapest_cost_to_complete(self) -> None:
        engines = self.engines()
        adverts = self.adverts(engines)
        o = order(6, max_price=3_000_000, deadline=T0 + 2_000)
        candidates = rank(o.requirement, o.units, o.max_price, adverts, k=3)
        assert [c.provider for c in candidates] == [A, C, B]
        flops = {(c.provider, c.model): c.fp16_flops for c in candidates}
        au = Auction(o, [c.provider for c in candidates], flops=flops)
        au.start()

        now = T0
        for c in candidates:
            now += 100
            reply = engines[c.provider].on_order(o, TENANT, now)
            assert isinstance(reply, Bid)
            assert reply.units == 4
            assert au.on_bid(c.provider, reply, now)
        assert au.ready(now)  # everyone answered before the deadline

        awards = au.close(now)
        assert [(a.provider, a.units) for a in awards] == [(A, 4), (C, 2)]
        for award in awards:
            now += 50
            h = award_hash(award)
            au.award_sent(award.lease_id, h, now)
            answer = engines[award.provider].on_award(award, TENANT, h, now)
            assert isinstance(answer, Accept)
            assert au.on_accept(award.provider, answer, now + 5) is not None
        assert au.state is AuctionState.LEASED
        assert au.units_leased == 6

        for provider, release in au.releases():
            assert isinstance(release, Release)
            engines[provider].on_release(release, TENANT, now)

        for e in engines.values():
            e.check_invariants()
        assert engines[A].free == set()  # 4 units leased
        assert len(engines[C].free) == 2  # partial award: the other 2 came back at once
        assert len(engines[B].free) == 4  # the loser was released, not left to expire
        assert engines[B].reservations == {}
        # What the tenant holds is what the providers leased.
        for lease in au.leases:
            assert engines[lease.provider].held_by(lease.lease_id) == lease.devices

        # Heartbeats keep the leases; when the tenant stops, the providers take them back.
        for lease in au.leases:
            assert engines[lease.provider].on_heartbeat(lease.lease_id, TENANT, now + 1_000)
        later = now + 1_000 + 3 * au.heartbeat_interval_ms + 1
        for e in engines.values():
            e.expire(later)
            e.check_invariants()
            assert len(e.free) == 4

    def test_bids_survive_a_silent_provider_until_the_deadline(self) -> None:
        # The bid window (15 s) is longer than the providers' bid TTL (10 s) and C never
        # answers: the auction closes at the deadline, and A's bid must still be good.
        engines = self.engines()
        engines[A].bid_ttl_ms = 10_000
        o = order(2, max_price=3_000_000, deadline=T0 + 15_000)
        au = Auction(o, [A, C], flops={(A, "fast"): 1_000 * TFLOPS, (C, "mid"): 300 * TFLOPS})
        au.start()
        reply = engines[A].on_order(o, TENANT, T0 + 50)
        assert isinstance(reply, Bid)
        assert au.on_bid(A, reply, T0 + 50)
        assert not au.ready(T0 + 14_999)
        [award] = au.close(T0 + 15_000)
        h = award_hash(award)
        au.award_sent(award.lease_id, h, T0 + 15_100)
        answer = engines[A].on_award(award, TENANT, h, T0 + 15_200)
        assert isinstance(answer, Accept)
        assert au.on_accept(A, answer, T0 + 15_300) is not None
        assert au.state is AuctionState.LEASED

    def test_engines_no_bids_explain_a_failed_auction(self) -> None:
        engines = self.engines()
        o = order(2, max_price=100_000)  # below every floor
        au = Auction(o, list(engines), flops={})
        au.start()
        for p, e in engines.items():
            reply = e.on_order(o, TENANT, T0)
            assert isinstance(reply, NoBid)
            au.on_no_bid(p, reply)
        assert au.close(T0) == []
        assert au.failure is not None
        assert "3 price_below_floor" in au.failure
        for e in engines.values():
            assert len(e.free) == 4
