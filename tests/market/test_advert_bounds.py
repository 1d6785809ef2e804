"""Advert claims bounded by the device catalog, and Sybil-resistant asking (issue 16)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from conftest import PCIE, rtx_group

from market.asking import choose_asked, host_key, one_per_host
from market.catalog import check_advert
from market.matching import Candidate
from market.reputation import Reputation
from protocol.errors import ImplausibleAdvertError, InvalidFieldError
from protocol.messages import Advert, DeviceGroup


def advert(*groups: DeviceGroup) -> Advert:
    return Advert(
        provider="a" * 32,
        address="http://203.0.113.7:7000",
        devices=list(groups),
        interconnect=PCIE,
        seq=1,
        expires_ms=10**12,
    )


def h100s(n: int, prefix: str = "g", flops: int = 989 * 10**12) -> DeviceGroup:
    ids = [f"{prefix}{i}" for i in range(n)]
    return DeviceGroup(
        model="H100-SXM",
        kind="gpu",
        ids=ids,
        free=ids,
        memory_bytes=80 * 10**9,
        fp16_flops=flops,
        memory_bandwidth=3_350 * 10**9,
        price_floor=1,
    )


class TestAdvertBounds:
    def test_an_honest_machine_passes(self) -> None:
        check_advert(advert(rtx_group()))
        check_advert(advert(h100s(8)))

    def test_ten_thousand_h100_on_one_host_is_refused(self) -> None:
        groups = [h100s(1000, prefix=f"b{b}-") for b in range(10)]
        with pytest.raises(ImplausibleAdvertError, match="one host holds at most 16"):
            check_advert(advert(*groups))

    def test_int64_max_flops_is_refused(self) -> None:
        with pytest.raises(ImplausibleAdvertError, match="fp16_flops") as e:
            check_advert(advert(h100s(8, flops=2**63 - 1)))
        assert isinstance(e.value, InvalidFieldError)  # a bad field, counted as such

    def test_unknown_model_and_wrong_kind_are_refused(self) -> None:
        g = rtx_group().model_copy(update={"model": "Quantum-9000"})
        with pytest.raises(ImplausibleAdvertError, match="not in the catalog"):
            check_advert(advert(g))
        g = rtx_group().model_copy(update={"kind": "ipu"})
        with pytest.raises(ImplausibleAdvertError, match="is a gpu"):
            check_advert(advert(g))


def candidate(provider: str, address: str, cost: int) -> Candidate:
    return Candidate(
        provider=provider,
        address=address,
        model="RTX-4090",
        units=1,
        floor=cost,
        fp16_flops=165 * 10**12,
        expected_cost=cost,
        score=Fraction(cost),
    )


class TestSybilResistantAsking:
    def test_identities_behind_one_address_count_as_one(self) -> None:
        sybils = [candidate(f"s{i:02d}", f"http://198.51.100.9:{7000 + i}", 1) for i in range(50)]
        honest = [candidate(f"h{i}", f"http://203.0.113.{i}:7000", 100 + i) for i in range(3)]
        asked = choose_asked(sybils + honest, 8, reputation={}, key="o1")
        assert [c.provider for c in asked] == ["s00", "h0", "h1", "h2"]

    def test_proven_providers_keep_most_questions_newcomers_get_room(self) -> None:
        # 40 cheap newcomers on 40 hosts against 10 providers with a record.
        new = [candidate(f"n{i:02d}", f"http://198.51.100.{i}", 1) for i in range(40)]
        proven = [candidate(f"p{i}", f"http://203.0.113.{i}", 500 + i) for i in range(10)]
        rep = {c.provider: Reputation(completed=3) for c in proven}
        asked = choose_asked(new + proven, 8, reputation=rep, key="o2")
        assert len(asked) == 8
        assert sum(c.provider.startswith("n") for c in asked) == 2
        assert {c.provider for c in asked} >= {f"p{i}" for i in range(6)}
        # Which newcomers get the room changes with the order, not with their price.
        other = choose_asked(new + proven, 8, reputation=rep, key="o3")
        assert {c.provider for c in asked if c.provider[0] == "n"} != {
            c.provider for c in other if c.provider[0] == "n"
        }

    def test_a_market_of_newcomers_still_gets_k_questions(self) -> None:
        new = [candidate(f"n{i:02d}", f"http://198.51.100.{i}", i) for i in range(20)]
        assert len(choose_asked(new, 8, reputation={}, key="o4")) == 8

    def test_loopback_keeps_the_port_a_public_host_does_not(self) -> None:
        assert host_key("http://127.0.0.1:7001") != host_key("http://127.0.0.1:7002")
        assert host_key("http://Example.org:1") == host_key("http://example.org:2")
        pool = [candidate("a", "http://127.0.0.1:1", 1), candidate("b", "http://127.0.0.1:2", 2)]
        assert len(one_per_host(pool)) == 2
