"""The provider's bid engine, driven by messages and a stepped clock (``now += 100``).

Pure: no daemon, no store, no signatures. What a provider operator or a tenant would
notice: which orders get bids and why the others do not, that reserved devices are
really withheld (and come back), that awards become leases only when they match the
bid, that leases end when heartbeats stop, and that concurrent orders never sell the
same device twice.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from itertools import count

import pytest

from market.bidding import (
    BidEngine,
    Device,
    FloorPlusUtilisation,
    LeaseState,
    devices_from_groups,
)
from protocol.messages import (
    MAX_ITEMS,
    Accept,
    Award,
    Bid,
    Decline,
    Interconnect,
    NoBid,
    Order,
    Release,
    Requirement,
)

GB = 10**9
TFLOPS = 10**12
T0 = 1_700_000_000_000
PROVIDER = "p" * 32
TENANT = "t" * 32
OTHER_TENANT = "u" * 32
HASH = "ab" * 32
PCIE4 = Interconnect(kind="pcie", bandwidth=32 * GB, gang_size=4)
NVLINK8 = Interconnect(kind="nvlink", bandwidth=450 * GB, gang_size=8)

_order_ids = count(1)
_lease_ids = count(1)


def gpus(
    n: int,
    *,
    model: str = "RTX-4090",
    floor: int = 1_000,
    prefix: str = "gpu",
    kind: str = "gpu",
    memory: int = 24 * GB,
) -> list[Device]:
    return [
        Device(
            id=f"{prefix}{i}",
            model=model,
            kind=kind,
            memory_bytes=memory,
            fp16_flops=165 * TFLOPS,
            memory_bandwidth=1_008 * GB,
            price_floor=floor,
        )
        for i in range(n)
    ]


def engine(
    devices: Sequence[Device] | None = None,
    interconnect: Interconnect = PCIE4,
    **kw: object,
) -> BidEngine:
    return BidEngine(PROVIDER, list(devices or gpus(4)), interconnect, **kw)  # type: ignore[arg-type]


def order(
    units: int = 1,
    *,
    now: int = T0,
    max_price: int = 10_000,
    window: int = 2_000,
    tenant: str = TENANT,
    **req: object,
) -> Order:
    return Order(
        order_id=f"o{next(_order_ids)}",
        tenant=tenant,
        job_spec_hash="0" * 64,
        workload="sweep",
        requirement=Requirement(**req),  # type: ignore[arg-type]
        units=units,
        max_price=max_price,
        bid_deadline_ms=now + window,
        lease_ms=3_600_000,
    )


def award_for(
    bid: Bid,
    *,
    units: int | None = None,
    price: int | None = None,
    order_id: str | None = None,
    lease_id: str | None = None,
    end_ms: int = T0 + 3_600_000,
    heartbeat_ms: int = 1_000,
) -> Award:
    return Award(
        order_id=order_id or bid.order_id,
        bid_id=bid.bid_id,
        lease_id=lease_id or f"L{next(_lease_ids)}",
        provider=bid.provider,
        units=bid.units if units is None else units,
        price=bid.price if price is None else price,
        heartbeat_interval_ms=heartbeat_ms,
        lease_end_ms=end_ms,
    )


def must_bid(reply: Bid | NoBid) -> Bid:
    assert isinstance(reply, Bid), reply
    return reply


def held(e: BidEngine) -> int:
    """Devices reserved for bids or in active leases."""
    reserved = sum(len(r.devices) for r in e.reservations.values())
    leased = sum(len(x.devices) for x in e.leases.values() if x.state is LeaseState.ACTIVE)
    return reserved + leased


class TestBids:
    def test_bids_for_an_order_it_can_serve(self) -> None:
        e = engine(gpus(4, floor=1_000))
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert bid.provider == PROVIDER
        assert bid.units == 2
        assert bid.model == "RTX-4090"
        assert bid.price == 1_000  # idle provider bids its floor
        assert bid.expires_ms > T0
        assert len(bid.devices) == 2
        assert set(bid.devices) <= {d.id for d in gpus(4)}
        assert e.counters.bids == 1

    def test_named_devices_are_no_longer_free_or_advertised(self) -> None:
        e = engine(gpus(4))
        bid = must_bid(e.on_order(order(3), TENANT, T0))
        assert set(bid.devices).isdisjoint(e.free)
        assert len(e.free) == 1
        [g] = e.device_groups()
        assert set(g.free) == e.free
        assert sorted(g.ids) == sorted(d.id for d in gpus(4))

    def test_bids_the_units_it_has_when_the_order_wants_more(self) -> None:
        e = engine(gpus(4))
        bid = must_bid(e.on_order(order(10), TENANT, T0))
        assert bid.units == 4
        assert e.free == set()

    def test_two_orders_get_different_devices(self) -> None:
        e = engine(gpus(4))
        a = must_bid(e.on_order(order(2), TENANT, T0))
        b = must_bid(e.on_order(order(2), OTHER_TENANT, T0 + 1))
        assert set(a.devices).isdisjoint(b.devices)
        assert a.bid_id != b.bid_id

    def test_multi_device_units_reserve_all_their_devices(self) -> None:
        e = engine(gpus(8), NVLINK8)
        bid = must_bid(e.on_order(order(3, devices_per_unit=2), TENANT, T0))
        assert bid.units == 3
        assert len(bid.devices) == 6
        assert len(e.free) == 2

    def test_gang_is_bid_whole(self) -> None:
        e = engine(gpus(8), NVLINK8)
        bid = must_bid(e.on_order(order(4, gang=True, devices_per_unit=2), TENANT, T0))
        assert (bid.units, len(bid.devices)) == (4, 8)

    def test_only_devices_that_meet_the_requirement_are_offered(self) -> None:
        small = gpus(2, model="T4", prefix="t4-", memory=16 * GB)
        big = gpus(2, model="A100-80GB", prefix="a100-", memory=80 * GB)
        e = engine(small + big)
        bid = must_bid(e.on_order(order(4, min_memory_bytes=40 * GB), TENANT, T0))
        assert bid.model == "A100-80GB"
        assert sorted(bid.devices) == ["a100-0", "a100-1"]

    def test_one_model_per_bid_the_one_that_fills_most(self) -> None:
        e = engine(gpus(1, model="T4", prefix="t") + gpus(3, model="L4", prefix="l"))
        bid = must_bid(e.on_order(order(4), TENANT, T0))
        assert bid.model == "L4"
        assert bid.units == 3

    def test_devices_above_the_max_price_are_not_offered(self) -> None:
        cheap = gpus(1, floor=500, prefix="c", model="T4")
        dear = gpus(3, floor=5_000, prefix="d", model="A100-80GB")
        e = engine(cheap + dear)
        bid = must_bid(e.on_order(order(4, max_price=1_000), TENANT, T0))
        assert bid.devices == ["c0"]

    def test_groups_from_an_advert_make_sellable_devices(self) -> None:
        e = engine(gpus(3))
        assert sorted(d.id for d in devices_from_groups(e.device_groups())) == [
            "gpu0",
            "gpu1",
            "gpu2",
        ]

    def test_duplicate_device_ids_are_refused(self) -> None:
        with pytest.raises(ValueError, match="unique"):
            engine(gpus(2) + gpus(1))

    def test_a_bid_names_at_most_10000_devices(self) -> None:
        """A bid's device list must fit the codec's 10,000 items (docs/protocol.md): a
        provider with more free devices bids for what fits, and the rest stay free."""
        e = engine(gpus(10_050))
        bid = must_bid(e.on_order(order(12_000, max_price=10**9), TENANT, T0))
        assert bid.units == len(bid.devices) == MAX_ITEMS
        assert len(e.free) == 50
        per_unit = must_bid(
            engine(gpus(10_050), NVLINK8).on_order(
                order(6_000, max_price=10**9, devices_per_unit=2), TENANT, T0
            )
        )
        assert len(per_unit.devices) == 2 * per_unit.units <= MAX_ITEMS


class TestNoBid:
    def no_bid(self, e: BidEngine, o: Order, now: int = T0) -> NoBid:
        reply = e.on_order(o, TENANT, now)
        assert isinstance(reply, NoBid), reply
        assert reply.provider == PROVIDER
        assert reply.order_id == o.order_id
        assert reply.detail
        return reply

    def test_no_matching_devices(self) -> None:
        e = engine(gpus(4))
        assert self.no_bid(e, order(kind="ipu")).reason == "no_matching_devices"
        assert self.no_bid(e, order(model="H100-SXM")).reason == "no_matching_devices"
        assert self.no_bid(e, order(min_memory_bytes=80 * GB)).reason == "no_matching_devices"

    def test_all_reserved(self) -> None:
        e = engine(gpus(4))
        must_bid(e.on_order(order(4), TENANT, T0))
        nb = self.no_bid(e, order(1))
        assert nb.reason == "all_reserved"
        assert "0 of 4" in nb.detail

    def test_gang_that_does_not_fit_in_what_is_free_is_all_reserved(self) -> None:
        e = engine(gpus(4))
        must_bid(e.on_order(order(1), TENANT, T0))
        assert self.no_bid(e, order(4, gang=True)).reason == "all_reserved"

    def test_price_below_floor(self) -> None:
        e = engine(gpus(4, floor=5_000))
        nb = self.no_bid(e, order(max_price=4_999))
        assert nb.reason == "price_below_floor"
        assert "5000" in nb.detail
        assert e.free == {d.id for d in gpus(4)}  # nothing reserved

    def test_surge_above_the_max_price_is_price_below_floor(self) -> None:
        e = engine(gpus(2, floor=1_000))
        must_bid(e.on_order(order(1), TENANT, T0))  # 50 % busy: next bid is 1250
        assert self.no_bid(e, order(max_price=1_200)).reason == "price_below_floor"

    def test_gang_too_small_for_the_devices(self) -> None:
        e = engine(gpus(4), NVLINK8)
        assert self.no_bid(e, order(6, gang=True)).reason == "gang_too_small"

    def test_gang_too_small_for_the_fabric(self) -> None:
        pairs = Interconnect(kind="pcie", bandwidth=32 * GB, gang_size=2)
        e = engine(gpus(8), pairs)
        nb = self.no_bid(e, order(1, devices_per_unit=4))
        assert nb.reason == "gang_too_small"
        assert "needs 4" in nb.detail

    def test_gang_split_over_models_is_too_small(self) -> None:
        e = engine(gpus(2, model="T4", prefix="t") + gpus(2, model="L4", prefix="l"))
        assert self.no_bid(e, order(4, gang=True)).reason == "gang_too_small"

    def test_interconnect_too_slow(self) -> None:
        e = engine(gpus(4), PCIE4)
        nb = self.no_bid(e, order(1, devices_per_unit=2, min_interconnect=100 * GB))
        assert nb.reason == "interconnect_too_slow"

    @pytest.mark.parametrize("late_by", [0, 1, 60_000])
    def test_deadline_passed(self, late_by: int) -> None:
        e = engine()
        o = order(now=T0, window=2_000)
        assert self.no_bid(e, o, now=T0 + 2_000 + late_by).reason == "deadline_passed"

    def test_draining(self) -> None:
        e = engine()
        e.draining = True
        assert self.no_bid(e, order()).reason == "draining"
        assert len(e.free) == 4

    def test_a_strategy_that_declines_to_price_means_no_bid(self) -> None:
        class Never:
            def price(self, floor: int, utilisation_pct: int, order: Order) -> int | None:
                return None

        e = engine(strategy=Never())
        assert self.no_bid(e, order()).reason == "price_below_floor"
        assert len(e.free) == 4

    def test_no_bids_are_counted_by_reason(self) -> None:
        e = engine(gpus(4, floor=5_000))
        self.no_bid(e, order(max_price=1))
        self.no_bid(e, order(max_price=1))
        self.no_bid(e, order(kind="ipu"))
        assert e.counters.no_bids == {"price_below_floor": 2, "no_matching_devices": 1}
        assert e.counters.bids == 0


class TestReservations:
    def test_reservation_holds_until_the_bid_expires(self) -> None:
        e = engine(gpus(2), bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        now = T0
        while now + 100 < bid.expires_ms:
            now += 100
            assert e.expire(now) == []
            assert e.free == set()
            assert isinstance(e.on_order(order(1, now=now), TENANT, now), NoBid)
        now = bid.expires_ms
        assert e.expire(now) == [bid.bid_id]
        assert e.free == {"gpu0", "gpu1"}
        assert e.counters.expired == 1
        assert must_bid(e.on_order(order(2, now=now), TENANT, now)).units == 2

    def test_a_bid_outlives_the_auction_deadline_by_one_ttl(self) -> None:
        # The tenant awards after its deadline; the reservation must still be there.
        e = engine(bid_ttl_ms=10_000)
        bid = must_bid(e.on_order(order(1, now=T0, window=8_000), TENANT, T0 + 100))
        assert bid.expires_ms == T0 + 8_000 + 10_000
        award = award_for(bid)
        assert isinstance(e.on_award(award, TENANT, HASH, T0 + 8_000 + 9_999), Accept)

    def test_a_far_deadline_holds_devices_for_at_most_two_ttls(self) -> None:
        e = engine(bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(1, now=T0, window=3_600_000), TENANT, T0))
        assert bid.expires_ms == T0 + 2_000
        assert e.expire(T0 + 2_000) == [bid.bid_id]

    def test_an_order_sees_expired_reservations_freed_without_a_timer(self) -> None:
        e = engine(gpus(2), bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        later = bid.expires_ms
        assert must_bid(e.on_order(order(2, now=later), TENANT, later)).units == 2

    def test_release_frees_at_once(self) -> None:
        e = engine(gpus(4))
        bid = must_bid(e.on_order(order(3), TENANT, T0))
        rel = Release(order_id=bid.order_id, bid_id=bid.bid_id, reason="auction lost")
        assert e.on_release(rel, TENANT, T0 + 100)
        assert len(e.free) == 4
        assert e.reservations == {}
        assert not e.on_release(rel, TENANT, T0 + 200)  # nothing left to free
        assert e.counters.released == 1

    def test_only_the_bidding_tenant_may_release(self) -> None:
        e = engine(gpus(4))
        bid = must_bid(e.on_order(order(3), TENANT, T0))
        rel = Release(order_id=bid.order_id, bid_id=bid.bid_id)
        assert not e.on_release(rel, OTHER_TENANT, T0 + 100)
        assert len(e.free) == 1


class TestAwards:
    def test_award_makes_a_lease_on_the_bid_devices(self) -> None:
        e = engine(gpus(4))
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        award = award_for(bid)
        reply = e.on_award(award, TENANT, HASH, T0 + 500)
        assert isinstance(reply, Accept)
        assert reply.award_hash == HASH
        assert reply.lease_id == award.lease_id
        assert reply.start_ms == T0 + 500
        lease = e.leases[award.lease_id]
        assert lease.state is LeaseState.ACTIVE
        assert lease.devices == tuple(bid.devices)
        assert e.held_by(award.lease_id) == tuple(bid.devices)
        assert set(bid.devices).isdisjoint(e.free)
        assert e.reservations == {}
        assert e.counters.accepted == 1

    def test_partial_award_frees_the_rest_immediately(self) -> None:
        e = engine(gpus(8), NVLINK8)
        bid = must_bid(e.on_order(order(4, devices_per_unit=2), TENANT, T0))
        assert len(e.free) == 0
        assert isinstance(e.on_award(award_for(bid, units=1), TENANT, HASH, T0 + 1), Accept)
        assert len(e.free) == 6
        [lease] = e.leases.values()
        assert lease.devices == tuple(bid.devices[:2])
        e.check_invariants()

    def _declined(self, e: BidEngine, award: Award, tenant: str = TENANT, now: int = T0) -> str:
        reply = e.on_award(award, tenant, HASH, now)
        assert isinstance(reply, Decline), reply
        assert reply.lease_id == award.lease_id
        return reply.reason

    def test_award_by_another_tenant_is_declined(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert "another tenant" in self._declined(e, award_for(bid), OTHER_TENANT)
        assert len(e.free) == 2  # the bid is still reserved for its own tenant
        assert isinstance(e.on_award(award_for(bid), TENANT, HASH, T0), Accept)

    def test_award_for_another_order_is_declined(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert "another tenant or order" in self._declined(e, award_for(bid, order_id="o-x"))

    def test_award_at_the_wrong_price_is_declined(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert "price" in self._declined(e, award_for(bid, price=bid.price - 1))
        assert "price" in self._declined(e, award_for(bid, price=bid.price + 1))

    def test_award_of_more_units_than_bid_is_declined(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert "units" in self._declined(e, award_for(bid, units=3))
        assert e.leases == {}

    def test_award_after_the_bid_expired_is_declined(self) -> None:
        e = engine(bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        reason = self._declined(e, award_for(bid), now=bid.expires_ms)
        assert "expired" in reason
        assert len(e.free) == 4
        assert e.counters.declined == 1

    def test_award_of_an_unknown_bid_is_declined(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        stranger = bid.model_copy(update={"bid_id": "nope"})
        assert "no such bid" in self._declined(e, award_for(stranger))

    def test_a_lease_id_cannot_be_reused(self) -> None:
        e = engine()
        a = must_bid(e.on_order(order(1), TENANT, T0))
        b = must_bid(e.on_order(order(1), TENANT, T0))
        assert isinstance(e.on_award(award_for(a, lease_id="L-same"), TENANT, HASH, T0), Accept)
        assert "lease id" in self._declined(e, award_for(b, lease_id="L-same"))

    def test_an_award_is_accepted_once(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert isinstance(e.on_award(award_for(bid), TENANT, HASH, T0), Accept)
        assert isinstance(e.on_award(award_for(bid), TENANT, HASH, T0), Decline)
        assert len(e.leases) == 1


class TestLeases:
    def lease(self, e: BidEngine, *, heartbeat_ms: int = 1_000, end_ms: int = T0 + 10**7) -> str:
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        award = award_for(bid, heartbeat_ms=heartbeat_ms, end_ms=end_ms)
        assert isinstance(e.on_award(award, TENANT, HASH, T0), Accept)
        return award.lease_id

    def test_heartbeats_keep_a_lease(self) -> None:
        e = engine()
        lid = self.lease(e, heartbeat_ms=1_000)
        now = T0
        for _ in range(100):  # 100 intervals, far past 3 missed
            now += 1_000
            assert e.on_heartbeat(lid, TENANT, now)
            assert e.expire(now) == []
        assert e.leases[lid].state is LeaseState.ACTIVE
        assert len(e.free) == 2

    def test_three_missed_heartbeats_lose_the_lease_and_free_devices(self) -> None:
        e = engine()
        lid = self.lease(e, heartbeat_ms=1_000)
        now = T0
        while now < T0 + 3_000:
            now += 100
            assert e.expire(now) == []  # silent for up to 3 intervals: still held
        assert e.leases[lid].state is LeaseState.ACTIVE
        assert e.expire(now + 1) == [lid]
        assert e.leases[lid].state is LeaseState.LOST
        assert len(e.free) == 4
        assert not e.on_heartbeat(lid, TENANT, now + 2)  # too late to revive
        e.check_invariants()

    def test_heartbeats_from_another_tenant_do_not_count(self) -> None:
        e = engine()
        lid = self.lease(e, heartbeat_ms=1_000)
        assert not e.on_heartbeat(lid, OTHER_TENANT, T0 + 2_000)
        assert not e.on_heartbeat("L-unknown", TENANT, T0 + 2_000)
        assert e.expire(T0 + 3_001) == [lid]

    def test_lease_ends_at_its_end_time(self) -> None:
        e = engine()
        lid = self.lease(e, heartbeat_ms=1_000, end_ms=T0 + 5_000)
        now = T0
        while now < T0 + 5_000 - 100:
            now += 100
            e.on_heartbeat(lid, TENANT, now)
            assert e.expire(now) == []
        assert e.expire(T0 + 5_000) == [lid]
        assert e.leases[lid].state is LeaseState.ENDED
        assert len(e.free) == 4

    def test_tenant_release_ends_a_lease_early(self) -> None:
        e = engine()
        lid = self.lease(e)
        other = Release(order_id="o", lease_id=lid)
        assert not e.on_release(other, OTHER_TENANT, T0 + 1)
        assert e.on_release(other, TENANT, T0 + 1)
        assert e.leases[lid].state is LeaseState.ENDED
        assert len(e.free) == 4
        assert not e.on_release(other, TENANT, T0 + 2)  # already ended
        assert e.expire(T0 + 10**8) == []  # an ended lease is not ended again

    def test_a_restarted_engine_holds_a_stored_lease_with_a_fresh_grace(self) -> None:
        before = engine()
        lid = self.lease(before, heartbeat_ms=1_000)
        stored = copy.copy(before.leases[lid])
        after = engine()  # the same devices, nothing in memory: a restart
        restart = T0 + 60_000  # down for a minute, far past three heartbeats
        assert after.restore(stored, restart)
        assert after.held_by(lid) == stored.devices
        assert after.free == {d for d in after.devices if d not in stored.devices}
        assert after.expire(restart + 3_000) == []  # the tenant gets 3 intervals from now
        assert after.on_heartbeat(lid, TENANT, restart + 2_500)
        after.check_invariants()
        # Everything else the 4-GPU engine sells avoids the held devices.
        bid = must_bid(after.on_order(order(2, now=restart), OTHER_TENANT, restart))
        assert not set(after.reservations[bid.bid_id].devices) & set(stored.devices)
        assert isinstance(after.on_order(order(1, now=restart), TENANT, restart), NoBid)

    def test_restore_refuses_what_it_cannot_hold(self) -> None:
        before = engine()
        lid = self.lease(before, end_ms=T0 + 5_000)
        stored = before.leases[lid]
        assert not engine().restore(copy.copy(stored), T0 + 5_000)  # ran past its end
        assert not engine(gpus(1)).restore(copy.copy(stored), T0)  # a device is gone
        e = engine()
        assert e.restore(copy.copy(stored), T0)
        assert not e.restore(copy.copy(stored), T0)  # already held
        taken = engine()
        must_bid(taken.on_order(order(4), OTHER_TENANT, T0))  # every device reserved
        assert not taken.restore(copy.copy(stored), T0)
        for e in (taken, engine()):
            e.check_invariants()


class TestPricing:
    @pytest.mark.parametrize(
        ("floor", "util", "surge", "price"),
        [
            (1_000, 0, 50, 1_000),
            (1_000, 100, 50, 1_500),
            (1_000, 50, 50, 1_250),
            (100, 33, 50, 117),  # 116.5 rounds up: the provider never sells below its rule
            (1, 1, 50, 2),  # 1.005 rounds up
            (350_000, 75, 100, 612_500),
            (1_000, 100, 0, 1_000),
            (0, 100, 50, 0),
        ],
    )
    def test_floor_plus_utilisation(self, floor: int, util: int, surge: int, price: int) -> None:
        got = FloorPlusUtilisation(surge_pct=surge).price(floor, util, order())
        assert got == price
        assert type(got) is int

    def test_price_rises_as_the_provider_fills(self) -> None:
        e = engine(gpus(4, floor=1_000))
        prices = [must_bid(e.on_order(order(1), TENANT, T0)).price for _ in range(4)]
        assert prices == [1_000, 1_125, 1_250, 1_375]
        assert e.utilisation_pct() == 100

    def test_bid_price_is_never_below_the_floor_of_any_device_it_names(self) -> None:
        e = engine(gpus(2, floor=900, prefix="a") + gpus(2, floor=1_000, prefix="b"))
        bid = must_bid(e.on_order(order(4), TENANT, T0))
        assert bid.units == 4
        assert bid.price >= 1_000


def _probe_deadline(e: BidEngine) -> None:
    """``next_deadline`` is exactly the first time ``expire`` would change something."""
    due = e.next_deadline()
    if due is None:
        assert copy.deepcopy(e).expire(T0 + 10**9) == []
        return
    assert copy.deepcopy(e).expire(due - 1) == []
    assert copy.deepcopy(e).expire(due) != []


class TestNextDeadline:
    def test_idle_engine_has_no_timer(self) -> None:
        assert engine().next_deadline() is None

    def test_bid_expiry_is_the_timer(self) -> None:
        e = engine(bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(1), TENANT, T0))
        assert e.next_deadline() == bid.expires_ms
        _probe_deadline(e)

    def test_heartbeat_and_end_timers(self) -> None:
        e = engine()
        bid = must_bid(e.on_order(order(1), TENANT, T0))
        award = award_for(bid, heartbeat_ms=1_000, end_ms=T0 + 10_000)
        e.on_award(award, TENANT, HASH, T0)
        assert e.next_deadline() == T0 + 3_001
        _probe_deadline(e)
        e.on_heartbeat(award.lease_id, TENANT, T0 + 8_000)
        assert e.next_deadline() == T0 + 10_000
        _probe_deadline(e)

    @pytest.mark.parametrize("seed", range(5))
    def test_matches_expire_in_random_states(self, seed: int) -> None:
        rng = random.Random(seed)
        e = engine(gpus(6), NVLINK8, bid_ttl_ms=rng.randrange(500, 3_000))
        now = T0
        bids: list[Bid] = []
        for _ in range(60):
            now += rng.randrange(0, 400)
            roll = rng.random()
            if roll < 0.4:
                reply = e.on_order(order(rng.randint(1, 3), now=now), TENANT, now)
                if isinstance(reply, Bid):
                    bids.append(reply)
            elif roll < 0.7 and bids:
                bid = bids.pop(rng.randrange(len(bids)))
                award = award_for(
                    bid,
                    units=rng.randint(1, bid.units),
                    heartbeat_ms=rng.randrange(100, 1_000),
                    end_ms=now + rng.randrange(0, 5_000),
                )
                e.on_award(award, TENANT, HASH, now)
            else:
                for lid, lease in e.leases.items():
                    if lease.state is LeaseState.ACTIVE and rng.random() < 0.5:
                        e.on_heartbeat(lid, TENANT, now)
            _probe_deadline(e)
            e.expire(now)
            e.check_invariants()


class TestNoOvercommit:
    """Twenty orders from three tenants interleaved at random against one provider."""

    DEVICES = 10
    TENANTS = (TENANT, OTHER_TENANT, "v" * 32)

    @pytest.mark.parametrize("seed", range(8))
    def test_twenty_concurrent_orders_never_overcommit(self, seed: int) -> None:
        rng = random.Random(seed)
        e = engine(
            gpus(6, floor=1_000, prefix="a") + gpus(4, model="L4", floor=700, prefix="l"),
            NVLINK8,
            bid_ttl_ms=1_500,
        )
        now = T0
        waiting = [
            (
                order(
                    rng.randint(1, 6),
                    now=now,
                    window=rng.randrange(1_000, 20_000),
                    tenant=tenant,
                    devices_per_unit=rng.choice([1, 1, 2]),
                    gang=rng.random() < 0.2,
                ),
                tenant,
            )
            for tenant in (rng.choice(self.TENANTS) for _ in range(20))
        ]
        bids: dict[str, tuple[Bid, str]] = {}  # live bids as tenants see them
        leases: dict[str, tuple[str, tuple[str, ...]]] = {}  # lease id -> tenant, devices
        answered = 0
        for _ in range(500):
            roll = rng.random()
            if roll < 0.25 and waiting:
                o, tenant = waiting.pop(rng.randrange(len(waiting)))
                reply = e.on_order(o, tenant, now)
                answered += 1
                if isinstance(reply, Bid):
                    assert set(reply.devices).isdisjoint(
                        d for b, _ in bids.values() if b.expires_ms > now for d in b.devices
                    )
                    bids[reply.bid_id] = (reply, tenant)
            elif roll < 0.45 and bids:
                bid, tenant = bids.pop(rng.choice(sorted(bids)))
                bad = rng.random()
                award = award_for(
                    bid,
                    units=rng.randint(1, bid.units + 1 if bad < 0.1 else bid.units),
                    price=bid.price + 1 if bad > 0.9 else bid.price,
                    end_ms=now + rng.randrange(500, 10_000),
                    heartbeat_ms=rng.randrange(200, 1_000),
                )
                who = rng.choice(self.TENANTS) if rng.random() < 0.1 else tenant
                answer = e.on_award(award, who, HASH, now)
                valid = (
                    who == tenant
                    and award.units <= bid.units
                    and award.price == bid.price
                    and now < bid.expires_ms
                )
                assert isinstance(answer, Accept) == valid, (answer, award, bid)
                if valid:
                    leases[award.lease_id] = (tenant, e.held_by(award.lease_id))
            elif roll < 0.55 and bids:
                bid, tenant = bids.pop(rng.choice(sorted(bids)))
                e.on_release(Release(order_id=bid.order_id, bid_id=bid.bid_id), tenant, now)
            elif roll < 0.62 and leases:
                lid = rng.choice(sorted(leases))
                tenant, _ = leases.pop(lid)
                e.on_release(Release(order_id="o", lease_id=lid), tenant, now)
            elif roll < 0.85:
                for lid, (tenant, _) in leases.items():
                    if rng.random() < 0.8:
                        e.on_heartbeat(lid, tenant, now)
            else:
                now += rng.choice([1, 100, 100, 250, 700])
                e.expire(now)
            e.check_invariants()
            assert held(e) <= self.DEVICES
            assert held(e) + len(e.free) == self.DEVICES
            # What the tenants were told they hold right now never overlaps.
            live = [b.devices for b, _ in bids.values() if now < b.expires_ms]
            live += [
                list(devs)
                for lid, (_, devs) in leases.items()
                if e.leases[lid].state is LeaseState.ACTIVE
            ]
            flat = [d for devs in live for d in devs]
            assert len(flat) == len(set(flat))
            assert len(flat) <= self.DEVICES
        assert answered == 20
        # The walk really contended: orders were turned away and awards became leases.
        assert e.counters.no_bids.get("all_reserved", 0) > 0
        assert e.counters.accepted > 0
        # Eventually everything comes back.
        e.expire(now + 10**8)
        assert len(e.free) == self.DEVICES
        e.check_invariants()


class TestTenantLimit:
    """One identity cannot keep every device reserved with bids it never awards."""

    def test_a_greedy_tenant_holds_at_most_its_share_and_others_still_get_bids(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50)
        now = T0
        replies = []
        for _ in range(20):  # two orders a second for ten seconds, never awarded
            replies.append(e.on_order(order(1, now=now), TENANT, now))
            now += 500
        assert e.reserved_for(TENANT) == 2
        refused = [r for r in replies if isinstance(r, NoBid)]
        assert {r.reason for r in refused} == {"tenant_limit"}
        assert "2 of 4 devices" in refused[0].detail
        honest = e.on_order(order(2, now=now, tenant=OTHER_TENANT), OTHER_TENANT, now)
        assert must_bid(honest).units == 2
        e.check_invariants()

    def test_one_order_of_an_honest_tenant_may_take_every_free_device(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50)
        assert must_bid(e.on_order(order(4), TENANT, T0)).units == 4

    def test_a_tenant_whose_bid_lapses_is_held_to_the_share_for_two_ttls(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50, bid_ttl_ms=1_000)
        first = must_bid(e.on_order(order(4), TENANT, T0))  # never awarded nor released
        now = first.expires_ms
        assert e.expire(now) == [first.bid_id]
        assert e.hoarding(TENANT, now)
        second = must_bid(e.on_order(order(4, now=now), TENANT, now))
        assert second.units == 2
        refused = e.on_order(order(1, now=now), TENANT, now)
        assert isinstance(refused, NoBid)
        assert refused.reason == "tenant_limit"
        other = must_bid(e.on_order(order(4, now=now, tenant=OTHER_TENANT), OTHER_TENANT, now))
        assert other.units == 2
        e.check_invariants()
        # It mends its ways (releases at once); two TTLs on, it may bid big again.
        e.on_release(Release(order_id=second.order_id, bid_id=second.bid_id), TENANT, now + 1)
        e.on_release(Release(order_id=other.order_id, bid_id=other.bid_id), OTHER_TENANT, now + 1)
        later = now + 2_000
        e.expire(later)
        assert not e.hoarding(TENANT, later)
        assert must_bid(e.on_order(order(4, now=later), TENANT, later)).units == 4

    def test_a_release_long_after_the_auction_closed_counts_as_a_lapse(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50, bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(4, window=500), TENANT, T0))
        release = Release(order_id=bid.order_id, bid_id=bid.bid_id)
        assert e.on_release(release, TENANT, T0 + 1_400)  # closed at T0+500, +900 ms
        assert e.hoarding(TENANT, T0 + 1_400)

    def test_a_release_when_the_auction_closes_is_honest(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50, bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(4, window=500), TENANT, T0))
        assert e.on_release(Release(order_id=bid.order_id, bid_id=bid.bid_id), TENANT, T0 + 600)
        assert not e.hoarding(TENANT, T0 + 600)
        assert must_bid(e.on_order(order(4, now=T0 + 600), TENANT, T0 + 600)).units == 4

    def test_leases_do_not_count_against_the_share(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50)
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert isinstance(e.on_award(award_for(bid), TENANT, HASH, T0 + 10), Accept)
        assert must_bid(e.on_order(order(2, now=T0 + 20), TENANT, T0 + 20)).units == 2

    def test_released_and_expired_bids_give_the_allowance_back(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50, bid_ttl_ms=1_000)
        bid = must_bid(e.on_order(order(2), TENANT, T0))
        assert isinstance(e.on_order(order(1), TENANT, T0), NoBid)
        e.on_release(Release(order_id=bid.order_id, bid_id=bid.bid_id), TENANT, T0 + 1)
        bid = must_bid(e.on_order(order(2), TENANT, T0 + 2))
        later = bid.expires_ms
        assert must_bid(e.on_order(order(2, now=later), TENANT, later)).units == 2

    def test_a_gang_larger_than_the_share_sells_to_a_tenant_holding_nothing(self) -> None:
        e = engine(gpus(4), max_reserved_pct=50)
        assert must_bid(e.on_order(order(4, gang=True), TENANT, T0)).units == 4
        reply = e.on_order(order(1), TENANT, T0)
        assert isinstance(reply, NoBid)
        assert reply.reason == "all_reserved"

    def test_the_default_engine_has_no_limit(self) -> None:
        e = engine(gpus(4))
        for _ in range(4):
            must_bid(e.on_order(order(1), TENANT, T0))


class TestHeartbeatBounds:
    """The provider, not the tenant, decides how long a silent lease may hold devices."""

    @pytest.mark.parametrize("interval_ms", [3_600_000, 60_001, 999])
    def test_an_award_outside_the_bounds_is_declined_with_the_reason(
        self, interval_ms: int
    ) -> None:
        e = engine(gpus(2), heartbeat_bounds_ms=(1_000, 60_000))
        bid = must_bid(e.on_order(order(1), TENANT, T0))
        reply = e.on_award(award_for(bid, heartbeat_ms=interval_ms), TENANT, HASH, T0 + 1)
        assert isinstance(reply, Decline)
        assert "1000-60000 ms" in reply.reason
        assert e.leases == {}

    @pytest.mark.parametrize("interval_ms", [1_000, 60_000])
    def test_the_bounds_themselves_are_accepted(self, interval_ms: int) -> None:
        e = engine(gpus(2), heartbeat_bounds_ms=(1_000, 60_000))
        bid = must_bid(e.on_order(order(1), TENANT, T0))
        reply = e.on_award(award_for(bid, heartbeat_ms=interval_ms), TENANT, HASH, T0 + 1)
        assert isinstance(reply, Accept)
