"""Matchmaking against the directory: requirement filters, servable units, ranking by
expected cost to complete, reputation correction, the top-K cut. Pure: adverts are
built in memory, no signatures or sockets are involved.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from market.matching import group_matches, rank, servable_units
from market.reputation import Reputation
from market.settlement import expected_cost
from protocol.messages import Advert, DeviceGroup, Interconnect, Requirement

GB = 10**9
TFLOPS = 10**12
PCIE = Interconnect(kind="pcie", bandwidth=32 * GB, gang_size=8)
NVLINK = Interconnect(kind="nvlink", bandwidth=450 * GB, gang_size=8)


def node(letter: str) -> str:
    """A syntactically valid node id (32 base32 characters)."""
    return letter * 32


def group(
    model: str = "RTX-4090",
    *,
    n: int = 4,
    free: int | None = None,
    kind: str = "gpu",
    memory: int = 24 * GB,
    flops: int = 165 * TFLOPS,
    price: int = 350_000,
    prefix: str = "d",
) -> DeviceGroup:
    ids = [f"{prefix}{i}" for i in range(n)]
    return DeviceGroup(
        model=model,
        kind=kind,  # type: ignore[arg-type]
        ids=ids,
        free=ids[: n if free is None else free],
        memory_bytes=memory,
        fp16_flops=flops,
        memory_bandwidth=1_000 * GB,
        price_floor=price,
    )


def advert(
    provider: str, *groups: DeviceGroup, interconnect: Interconnect = PCIE, seq: int = 1
) -> Advert:
    return Advert(
        provider=provider,
        address=f"http://{provider[:4]}.invalid:9",
        devices=list(groups) or [group()],
        interconnect=interconnect,
        seq=seq,
        expires_ms=10**13,
    )


class TestGroupMatches:
    def test_any_kind_matches_everything(self) -> None:
        assert group_matches(Requirement(), group(kind="ipu", model="Bow-IPU"))

    def test_kind_must_agree(self) -> None:
        assert group_matches(Requirement(kind="gpu"), group())
        assert not group_matches(Requirement(kind="ipu"), group())

    def test_model_is_compared_case_insensitively(self) -> None:
        assert group_matches(Requirement(model="rtx-4090"), group())
        assert not group_matches(Requirement(model="H100-SXM"), group())

    def test_minimum_memory(self) -> None:
        assert group_matches(Requirement(min_memory_bytes=24 * GB), group(memory=24 * GB))
        assert not group_matches(Requirement(min_memory_bytes=24 * GB + 1), group(memory=24 * GB))

    def test_minimum_flops(self) -> None:
        req = Requirement(min_fp16_flops=300 * TFLOPS)
        assert not group_matches(req, group(flops=165 * TFLOPS))
        assert group_matches(req, group(flops=312 * TFLOPS))


class TestServableUnits:
    def test_counts_free_devices_only(self) -> None:
        assert servable_units(Requirement(), advert(node("a"), group(n=4, free=3))) == 3
        assert servable_units(Requirement(), advert(node("a"), group(n=4, free=0))) == 0

    def test_counts_only_matching_groups(self) -> None:
        a = advert(
            node("a"),
            group(n=2, prefix="small", memory=16 * GB),
            group("A100-80GB", n=3, prefix="big", memory=80 * GB, flops=312 * TFLOPS),
        )
        assert servable_units(Requirement(), a) == 5
        assert servable_units(Requirement(min_memory_bytes=40 * GB), a) == 3
        assert servable_units(Requirement(kind="ipu"), a) == 0

    def test_multi_device_units_use_whole_groups_of_devices(self) -> None:
        # 5 free devices give two 2-device units; the fifth device is no unit.
        assert servable_units(Requirement(devices_per_unit=2), advert(node("a"), group(n=5))) == 2

    def test_a_unit_larger_than_the_fabric_cannot_be_served(self) -> None:
        small_fabric = Interconnect(kind="pcie", bandwidth=32 * GB, gang_size=2)
        a = advert(node("a"), group(n=8), interconnect=small_fabric)
        assert servable_units(Requirement(devices_per_unit=2), a) == 4
        assert servable_units(Requirement(devices_per_unit=4), a) == 0

    def test_a_slow_fabric_serves_nothing_when_a_fast_one_is_required(self) -> None:
        need = Requirement(devices_per_unit=2, min_interconnect=100 * GB)
        assert servable_units(need, advert(node("a"), group(n=4), interconnect=PCIE)) == 0
        assert servable_units(need, advert(node("a"), group(n=4), interconnect=NVLINK)) == 2


class TestRankByExpectedCost:
    # Fast: 6x the FLOP/s of slow. At 4x the price it is cheaper per unit of work; at 8x
    # it is dearer. Hourly price alone would always pick the slow one.
    @staticmethod
    def slow() -> DeviceGroup:
        return group("slow", flops=100 * TFLOPS, price=500_000)

    def test_fast_expensive_beats_slow_cheap_when_cheaper_per_flop(self) -> None:
        slow = advert(node("s"), self.slow())
        fast = advert(node("f"), group("fast", flops=600 * TFLOPS, price=2_000_000))
        ranked = rank(Requirement(), 1, 10_000_000, [slow, fast])
        assert [c.provider for c in ranked] == [node("f"), node("s")]
        assert ranked[0].expected_cost < ranked[1].expected_cost
        assert ranked[0].floor > ranked[1].floor  # dearer per hour, still first

    def test_slow_cheap_beats_fast_expensive_when_cheaper_per_flop(self) -> None:
        slow = advert(node("s"), self.slow())
        fast = advert(node("f"), group("fast", flops=600 * TFLOPS, price=4_000_000))
        ranked = rank(Requirement(), 1, 10_000_000, [fast, slow])
        assert [c.provider for c in ranked] == [node("s"), node("f")]

    def test_expected_cost_is_price_times_runtime(self) -> None:
        a = advert(node("a"), group(flops=165 * TFLOPS, price=350_000))
        [c] = rank(Requirement(), 1, 10**6, [a], expected_flop=10**18, utilisation_pct=40)
        # 10^18 FLOP at 40 % of 165 TFLOP/s is 15151.5 s = 4.2088 h; x 0.35 credit/h.
        assert c.expected_cost == expected_cost(350_000, 1, 10**18, 165 * TFLOPS, 40)
        assert c.expected_cost == 1_473_064
        assert c.score == Fraction(2 * 1_473_064)  # a newcomer's success is 1/2

    def test_multi_device_units_cost_all_their_devices(self) -> None:
        a = advert(node("a"), group(n=8, price=350_000))
        [one] = rank(Requirement(), 1, 10**6, [a])
        [four] = rank(Requirement(devices_per_unit=4), 1, 10**6, [a])
        assert four.expected_cost == 4 * one.expected_cost
        assert four.units == 2

    def test_picks_the_providers_best_group_for_the_money(self) -> None:
        a = advert(
            node("a"),
            group("cheap-slow", prefix="x", flops=100 * TFLOPS, price=400_000),
            group("dear-fast", prefix="y", flops=1000 * TFLOPS, price=1_000_000),
        )
        [c] = rank(Requirement(), 1, 10**7, [a])
        assert c.model == "dear-fast"
        assert c.floor == 1_000_000

    def test_groups_above_the_maximum_price_are_not_offered(self) -> None:
        a = advert(
            node("a"),
            group("cheap-slow", prefix="x", flops=100 * TFLOPS, price=400_000),
            group("dear-fast", prefix="y", flops=1000 * TFLOPS, price=1_000_000),
        )
        [c] = rank(Requirement(), 1, 500_000, [a])
        assert c.model == "cheap-slow"
        b = advert(node("b"), group(price=600_000))
        assert rank(Requirement(), 1, 500_000, [b]) == []

    def test_providers_that_serve_nothing_are_left_out(self) -> None:
        busy = advert(node("b"), group(free=0))
        ipu = advert(node("i"), group("Bow-IPU", kind="ipu"))
        ok = advert(node("o"), group())
        ranked = rank(Requirement(kind="gpu"), 1, 10**6, [busy, ipu, ok])
        assert [c.provider for c in ranked] == [node("o")]
        assert ranked[0].address == f"http://{node('o')[:4]}.invalid:9"

    def test_a_partial_provider_is_kept_for_a_sweep_with_its_units(self) -> None:
        two = advert(node("a"), group(n=2))
        [c] = rank(Requirement(), 6, 10**6, [two])
        assert c.units == 2


class TestRankGang:
    def test_gang_needs_every_unit_on_one_provider(self) -> None:
        two = advert(node("a"), group(n=2, price=100_000))
        six = advert(node("b"), group(n=6, price=900_000))
        ranked = rank(Requirement(gang=True), 4, 10**6, [two, six])
        assert [c.provider for c in ranked] == [node("b")]

    def test_gang_needs_a_fabric_that_holds_the_whole_gang(self) -> None:
        # Eight free devices, but only pairs share a fabric: a 4-device gang cannot be
        # placed there, and the provider's bid engine would answer gang_too_small.
        pairs = Interconnect(kind="pcie", bandwidth=32 * GB, gang_size=2)
        split = advert(node("a"), group(n=8, price=100_000), interconnect=pairs)
        whole = advert(node("b"), group(n=8, price=900_000), interconnect=NVLINK)
        ranked = rank(Requirement(gang=True), 4, 10**6, [split, whole])
        assert [c.provider for c in ranked] == [node("b")]

    def test_gang_with_a_fabric_floor(self) -> None:
        need = Requirement(gang=True, devices_per_unit=2, min_interconnect=100 * GB)
        pcie = advert(node("a"), group(n=8, price=100_000), interconnect=PCIE)
        nvl = advert(node("b"), group(n=8, price=900_000), interconnect=NVLINK)
        ranked = rank(need, 2, 10**6, [pcie, nvl])
        assert [c.provider for c in ranked] == [node("b")]


class TestRankReputationTopKAndTies:
    def test_a_bad_record_drops_a_provider_in_rank(self) -> None:
        ads = [advert(node(x), group()) for x in "abc"]
        plain = rank(Requirement(), 1, 10**6, ads)
        assert [c.provider for c in plain] == [node("a"), node("b"), node("c")]
        rep = {node("a"): Reputation(completed=1, failed=4)}
        corrected = rank(Requirement(), 1, 10**6, ads, reputation=rep)
        assert [c.provider for c in corrected] == [node("b"), node("c"), node("a")]
        # Same price and speed: only the score moved.
        assert corrected[-1].expected_cost == corrected[0].expected_cost
        assert corrected[-1].score > corrected[0].score

    def test_a_good_record_is_worth_paying_a_little_more_for(self) -> None:
        proven = advert(node("p"), group(price=400_000))
        newcomer = advert(node("n"), group(price=350_000))
        rep = {node("p"): Reputation(completed=20)}
        ranked = rank(Requirement(), 1, 10**6, [newcomer, proven], reputation=rep)
        assert [c.provider for c in ranked] == [node("p"), node("n")]
        assert [c.provider for c in rank(Requirement(), 1, 10**6, [newcomer, proven])] == [
            node("n"),
            node("p"),
        ]

    def test_top_k_keeps_the_best_k(self) -> None:
        ads = [advert(node(x), group(price=100_000 * (i + 1))) for i, x in enumerate("edcba")]
        ranked = rank(Requirement(), 1, 10**6, ads, k=3)
        assert [c.provider for c in ranked] == [node("e"), node("d"), node("c")]
        assert len(rank(Requirement(), 1, 10**6, ads, k=10)) == 5
        assert rank(Requirement(), 1, 10**6, ads, k=0) == []

    @pytest.mark.parametrize("order", [list("abcdef"), list("fedcba"), list("cafebd")])
    def test_ties_break_by_provider_id_whatever_the_input_order(self, order: list[str]) -> None:
        ads = [advert(node(x), group()) for x in order]
        ranked = rank(Requirement(), 1, 10**6, ads, k=4)
        assert [c.provider for c in ranked] == [node(x) for x in "abcd"]
