"""The reverse auction end to end over real daemons of the local cluster.

One cluster (a bootstrap node and six providers, real subprocesses on loopback port 0)
serves the whole module; each test gets a fresh tenant with its own SQLite file talking
HTTP, and waits until the market is idle again (every device free in the directory)
before it starts, so tests do not depend on each other's leases.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from market.auction import Auction, AuctionState
from market.catalog import CATALOG
from market.lifecycle import LeaseState
from node.cli import localcluster as cluster
from node.net.transport import HttpTransport
from node.store.node_store import LeaseRow, Store
from node.tenant.client import AuctionReport, Tenant
from protocol.identity import Identity
from protocol.messages import Advert, Award, Requirement

pytestmark = [
    pytest.mark.cluster,
    # node.cli.localcluster.up drops its Popen handles of the detached daemons on return; their
    # __del__ warns that the (deliberately) running process is still running.
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]

PROVIDERS = 6  # RTX-4090, A100-80GB, Bow-IPU, H100-SXM, L4, T4 (node.cli.localcluster.TEMPLATES)
JOB = hashlib.sha256(b"test_auction_e2e").hexdigest()
FIVE_CREDITS = 5_000_000  # per device-hour: above every floor of the fleet
IDLE_TIMEOUT_S = 20.0


@dataclass
class Fleet:
    """The running cluster as the tests see it."""

    home: Path
    bootstrap: str
    providers: dict[str, cluster.NodeRecord]  # node id ->
    templates: dict[str, cluster.Template]  # node id ->

    def by_model(self, model: str) -> str:
        return next(p for p, t in self.templates.items() if t.model == model)

    def store(self, provider: str) -> Store:
        """The provider's own store (WAL: safe to read while its daemon writes)."""
        return Store(Path(self.providers[provider].home) / "node.sqlite")

    def healthz(self, provider: str) -> dict[str, Any]:
        return cluster.http_json(self.providers[provider].address + "/healthz")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("auction-cluster")
    nodes = cluster.up(PROVIDERS, home=home, ttl_s=10.0)
    try:
        providers = [n for n in nodes if n.role == "provider"]
        yield Fleet(
            home=home,
            bootstrap=next(n.address for n in nodes if n.role == "bootstrap"),
            providers={n.node_id: n for n in providers},
            templates={n.node_id: cluster.TEMPLATES[i] for i, n in enumerate(providers)},
        )
    finally:
        cluster.down(home=home)


async def wait_idle(tenant: Tenant, fleet: Fleet) -> list[Advert]:
    """Refresh until every provider's advert shows every device free."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        adverts = await tenant.refresh(fleet.bootstrap)
        idle = {a.provider for a in adverts if all(len(g.free) == len(g.ids) for g in a.devices)}
        if idle >= set(fleet.providers):
            return adverts
        if time.monotonic() > deadline:
            raise AssertionError(f"market not idle: {len(idle)} of {PROVIDERS} providers free")
        await asyncio.sleep(0.1)


async def release_all(tenant: Tenant) -> None:
    for row in tenant.store.list_leases(LeaseState.ACTIVE):
        await tenant.release(row)


@pytest.fixture
async def make_tenant(tmp_path: Path, fleet: Fleet) -> AsyncIterator[Any]:
    """Tenants with their own identity and store file; leases left open are released."""
    made: list[tuple[Tenant, HttpTransport, Store]] = []

    async def make(name: str = "tenant", cls: type[Tenant] = Tenant, **kw: Any) -> Tenant:
        transport = HttpTransport()
        store = Store(tmp_path / f"{name}.sqlite")
        tenant = cls(Identity.generate(), store, transport, **kw)
        made.append((tenant, transport, store))
        await wait_idle(tenant, fleet)
        return tenant

    yield make
    for tenant, transport, store in made:
        try:
            await release_all(tenant)
        finally:
            await transport.close()
            store.close()


@pytest.fixture
async def tenant(make_tenant: Any) -> Tenant:
    t: Tenant = await make_tenant()
    return t


def cost_per_flop(floor: int, fp16_flops: int) -> Fraction:
    """Expected cost to complete is proportional to price / FLOP/s (market.settlement)."""
    return Fraction(floor, fp16_flops)


def expected_winners(adverts: list[Advert], kind: str, units: int) -> dict[str, int]:
    """Cheapest work first, idle providers bid their floor: provider -> units leased."""
    offers = sorted(
        (cost_per_flop(g.price_floor, g.fp16_flops), a.provider, len(g.free))
        for a in adverts
        for g in a.devices
        if g.kind == kind and g.free
    )
    winners: dict[str, int] = {}
    for _, provider, free in offers:
        if units <= 0:
            break
        take = min(free, units)
        winners[provider] = take
        units -= take
    return winners


def lease_rows(tenant: Tenant, report: AuctionReport) -> list[LeaseRow]:
    rows = [tenant.store.get_lease(x.lease_id) for x in report.leases]
    assert all(r is not None for r in rows)
    return [r for r in rows if r is not None]


class TestCheapestExpectedCost:
    async def test_six_gpu_units_go_to_the_cheapest_work_not_the_cheapest_hour(
        self, tenant: Tenant, fleet: Fleet
    ) -> None:
        adverts = tenant.adverts()
        want = expected_winners(adverts, "gpu", 6)
        report = await tenant.auction(
            Requirement(kind="gpu"), 6, FIVE_CREDITS, job_spec_hash=JOB, k=PROVIDERS
        )
        try:
            assert report.state is AuctionState.LEASED, report.failure
            assert report.units == 6
            got: dict[str, int] = {}
            for lease in report.leases:
                got[lease.provider] = got.get(lease.provider, 0) + lease.units
                # An idle provider bids its floor (FloorPlusUtilisation at 0 %).
                assert lease.price == fleet.templates[lease.provider].price_floor
                assert lease.model == fleet.templates[lease.provider].model
            assert got == want

            # Ranking property: no asked provider that was left out had cheaper work.
            leased_costs = [
                cost_per_flop(c.floor, c.fp16_flops) for c in report.asked if c.provider in got
            ]
            for c in report.asked:
                if c.provider not in got:
                    assert cost_per_flop(c.floor, c.fp16_flops) >= max(leased_costs)

            # The H100 costs 6x the L4 per hour but less per FLOP (catalog figures), so
            # it wins and the L4 loses; the A100 (half the H100's hourly price) loses too.
            h100, l4, a100 = (fleet.by_model(m) for m in ("H100-SXM", "L4", "A100-80GB"))
            floors = {p: fleet.templates[p].price_floor for p in (h100, l4, a100)}
            assert floors[h100] > floors[a100] > floors[l4]
            assert cost_per_flop(floors[h100], CATALOG["H100-SXM"].fp16_flops) < cost_per_flop(
                floors[l4], CATALOG["L4"].fp16_flops
            )
            assert h100 in got
            assert l4 not in got
            assert a100 not in got
        finally:
            await release_all(tenant)


class TestBothSidesAgree:
    async def test_every_lease_receipt_and_ledger_line_matches_on_both_sides(
        self, tenant: Tenant, fleet: Fleet
    ) -> None:
        report = await tenant.auction(
            Requirement(kind="gpu"), 6, FIVE_CREDITS, job_spec_hash=JOB, k=PROVIDERS
        )
        assert report.state is AuctionState.LEASED, report.failure
        rows = lease_rows(tenant, report)
        for seq in range(3):
            for row in rows:
                assert await tenant.heartbeat(row, seq)
            await asyncio.sleep(0.1)  # some usage to bill
        receipts = {row.lease_id: await tenant.release(row) for row in rows}
        # A released lease takes no more heartbeats.
        assert not await tenant.heartbeat(rows[0], 99)

        tenant_ledger = {line["receipt_hash"]: line for line in tenant.store.ledger()}
        for mine in rows:
            with fleet.store(mine.provider) as store:
                theirs = store.get_lease(mine.lease_id)
                assert theirs is not None, f"provider has no lease {mine.lease_id}"
                their_receipts = store.list_receipts(mine.lease_id)
                provider_ledger = {line["receipt_hash"]: line for line in store.ledger()}
            assert (theirs.side, mine.side) == ("provider", "tenant")
            for f in ("lease_id", "order_id", "tenant", "provider", "devices", "price"):
                assert getattr(theirs, f) == getattr(mine, f), f
            assert theirs.award_hash == mine.award_hash
            assert theirs.award == mine.award  # the very bytes the tenant signed
            assert theirs.accept == mine.accept
            ended = tenant.store.get_lease(mine.lease_id)
            assert ended is not None
            assert theirs.state == ended.state == "ended"

            ours = tenant.store.list_receipts(mine.lease_id)
            assert len(ours) == len(their_receipts) == 1
            r, p = ours[0], their_receipts[0]
            assert r.receipt_hash == p.receipt_hash == receipts[mine.lease_id].receipt_hash
            assert (r.device_ms, r.amount, r.price) == (p.device_ms, p.amount, p.price)
            assert r.device_ms > 0
            assert r.amount == -(-r.device_ms * mine.price // 3_600_000)
            assert r.countersign is not None
            assert p.countersign == r.countersign  # the tenant's signature, on both sides
            assert r.receipt == p.receipt
            assert provider_ledger[r.receipt_hash]["amount"] == r.amount
            assert tenant_ledger[r.receipt_hash]["amount"] == -r.amount
            assert tenant_ledger[r.receipt_hash]["counterparty"] == mine.provider
            assert provider_ledger[r.receipt_hash]["counterparty"] == tenant.node_id
        assert tenant.store.ledger_balance() == -sum(x.amount for x in receipts.values())
        assert tenant.store.reputation() == {
            p: {"completed": n, "failed": 0, "declined": 0, "rejected": 0}
            for p, n in Counter(r.provider for r in rows).items()
        }


class TestNoBid:
    async def test_a_price_below_every_floor_is_refused_locally_naming_the_requirement(
        self, tenant: Tenant
    ) -> None:
        report = await tenant.auction(
            Requirement(model="H100-SXM"), 1, 1_000_000, job_spec_hash=JOB
        )
        assert report.state is AuctionState.FAILED
        assert report.asked == []
        assert report.failure is not None
        assert "H100-SXM" in report.failure
        assert "at or below 1 credits per device-hour" in report.failure

    async def test_a_gang_bigger_than_any_provider_is_refused_locally(self, tenant: Tenant) -> None:
        report = await tenant.auction(
            Requirement(kind="gpu", gang=True), 9, FIVE_CREDITS, job_spec_hash=JOB
        )
        assert report.state is AuctionState.FAILED
        assert report.asked == []
        assert report.failure is not None
        assert "9 units" in report.failure
        assert "all units on one provider" in report.failure

    async def test_devices_reserved_by_a_concurrent_order_give_all_reserved_not_a_timeout(
        self, make_tenant: Any, fleet: Fleet
    ) -> None:
        late: Tenant = await make_tenant("late")  # its directory: all 8 H100s free
        first: Tenant = await make_tenant("first")
        h100 = fleet.by_model("H100-SXM")
        taken = await first.auction(
            Requirement(model="H100-SXM"), 8, FIVE_CREDITS, job_spec_hash=JOB
        )
        assert taken.state is AuctionState.LEASED
        report = await late.auction(
            Requirement(model="H100-SXM"), 1, FIVE_CREDITS, job_spec_hash=JOB
        )
        assert [c.provider for c in report.asked] == [h100]
        assert report.state is AuctionState.FAILED
        assert report.failure is not None
        assert "1 all_reserved" in report.failure
        assert "unreachable" not in report.failure
        await release_all(first)

    async def test_a_busy_providers_surge_price_above_max_gives_price_below_floor(
        self, make_tenant: Any, fleet: Fleet
    ) -> None:
        buyer: Tenant = await make_tenant("buyer")
        busy: Tenant = await make_tenant("busy")
        half = await busy.auction(Requirement(model="H100-SXM"), 4, FIVE_CREDITS, job_spec_hash=JOB)
        assert half.state is AuctionState.LEASED
        # At 50 % utilisation the H100 box bids floor x 1.25 = 3.125 credits (surge 50 %);
        # 3 credits clears its advertised floor, so matching asks it, and it says no.
        report = await buyer.auction(Requirement(model="H100-SXM"), 1, 3_000_000, job_spec_hash=JOB)
        assert [c.provider for c in report.asked] == [fleet.by_model("H100-SXM")]
        assert report.state is AuctionState.FAILED
        assert report.failure is not None
        assert "1 price_below_floor" in report.failure
        # At the surge price it sells.
        report = await buyer.auction(Requirement(model="H100-SXM"), 1, 3_125_000, job_spec_hash=JOB)
        assert report.state is AuctionState.LEASED
        assert [x.price for x in report.leases] == [3_125_000]
        await release_all(buyer)
        await release_all(busy)


class PriceTamperingTenant(Tenant):
    """A deliberately misbehaving tenant: it awards ``victim`` one micro-credit below its bid."""

    victim = ""

    async def _award(self, auction: Auction, award: Award) -> list[Award]:
        if award.provider == self.victim:
            award = award.model_copy(update={"price": award.price - 1})
        return await super()._award(auction, award)


class TestDecline:
    async def test_a_declined_award_falls_back_to_the_next_bid(
        self, make_tenant: Any, fleet: Fleet
    ) -> None:
        tenant: Tenant = await make_tenant("tamper", PriceTamperingTenant)
        rtx, t4 = fleet.by_model("RTX-4090"), fleet.by_model("T4")
        PriceTamperingTenant.victim = rtx  # the cheapest work for 2 gpu units
        try:
            report = await tenant.auction(
                Requirement(kind="gpu"), 2, FIVE_CREDITS, job_spec_hash=JOB, k=PROVIDERS
            )
        finally:
            PriceTamperingTenant.victim = ""
        assert report.state is AuctionState.LEASED, report.failure
        assert [(x.provider, x.units) for x in report.leases] == [(t4, 2)]
        assert "1 declined after award" in report.explanation
        assert tenant.store.reputation()[rtx]["declined"] == 1
        with fleet.store(rtx) as store:
            assert [x for x in store.list_leases() if x.order_id == report.order.order_id] == []
        # The decliner's reservation was released as the auction ended, not left to expire.
        health = await asyncio.to_thread(fleet.healthz, rtx)
        rtx_free = sum(d["free"] for d in health["devices"])
        assert rtx_free == 2
        await release_all(tenant)


def mercato(home: Path, *args: str) -> Any:
    """Run the real CLI as a subprocess with MERCATO_HOME=home; parse its JSON output."""
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env={**os.environ, "MERCATO_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


class TestCli:
    async def test_order_and_leases_show_the_same_leases_on_both_sides(
        self, tenant: Tenant, fleet: Fleet
    ) -> None:
        # ``tenant`` only waits for an idle market; the CLI uses its own home.
        order = await asyncio.to_thread(mercato, fleet.home, "order", "--units", "2", "--json")
        assert order["state"] == "leased", order
        assert order["units"] == 2
        ids = {x["lease_id"] for x in order["leases"]}
        assert ids == {r["lease_id"] for r in order["receipts"]}

        mine = await asyncio.to_thread(mercato, fleet.home, "leases", "--json")
        assert {x["lease_id"] for x in mine["leases"]} == ids
        paid = sum(r["amount_micro_credits"] for x in mine["leases"] for r in x["receipts"])
        assert mine["balance_micro_credits"] == -paid
        tenant_id = mine["leases"][0]["tenant"]
        for lease in mine["leases"]:
            home = fleet.providers[lease["provider"]].home
            theirs = await asyncio.to_thread(
                mercato, fleet.home, "leases", "--json", "--home", home
            )
            same = [x for x in theirs["leases"] if x["tenant"] == tenant_id]
            assert {x["lease_id"] for x in same} == {
                x["lease_id"] for x in mine["leases"] if x["provider"] == lease["provider"]
            }
            match = next(x for x in same if x["lease_id"] == lease["lease_id"])
            assert match["side"] == "provider"
            for f in ("order_id", "devices", "price_micro_credits_per_device_hour", "award_hash"):
                assert match[f] == lease[f], f
            assert match["receipts"] == lease["receipts"]
            assert all(r["countersigned"] for r in match["receipts"])

    async def test_an_order_that_leases_fewer_units_than_asked_fails_and_says_so(
        self, tenant: Tenant, fleet: Fleet
    ) -> None:
        # Every advert fresh and every device free first: under load a provider's
        # re-advert can lag its 10 s TTL, and an earlier test's leases may still be
        # ending, and the order then found "no provider in the directory".
        await wait_idle(tenant, fleet)
        # More gpu units than the whole fleet has: the auction leases what there is.
        args = ("order", "--units", "64", "--kind", "gpu", "--json")
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "node.cli", *args],
            env={**os.environ, "MERCATO_HOME": str(fleet.home)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert 0 < out["units"] < 64
        assert f"leased {out['units']} of the 64 units" in out["short"]
        # Asking for what there is, or saying fewer will do, succeeds.
        enough = await asyncio.to_thread(
            mercato, fleet.home, *args[:2], "64", "--min-units", "1", *args[3:]
        )
        assert enough["units"] >= 1
        assert enough["short"] == ""
