"""A tenant's directory lags its own leases: it must not ask itself, nor skip what it freed.

Real provider daemons (node.daemon.Daemon, SQLite, HTTP on loopback port 0), one device
each, and a real ``Tenant``. A tenant pulls the directory from a peer, and a provider's
advert changes only after its hold-down and the gossip: right after the tenant leases or
releases devices, the adverts it holds still show them as they were. Seen in
bench/verify_digits_bench.py --sweeps 3: each sweep after the first began with "no usable
bid: 3 all_reserved" (the sweep's second auction asked the providers its first auction
had just leased, as their adverts still said free) and slept a second before it retried;
and the first auction had leased fewer units than it wanted (providers released by the
previous sweep still looked busy). The tenant knows both facts itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from market.auction import AuctionState
from market.lifecycle import LeaseState
from node.config import NodeConfig, NodeSection
from node.daemon import Daemon
from node.provider.inventory import DeviceDecl
from node.tenant.client import Tenant
from protocol.messages import Requirement
from tests.node.tenant.sellside import Closers, new_tenant

JOB = hashlib.sha256(b"test_own_leases_e2e").hexdigest()
MAX_PRICE = 10_000_000


async def provider(tmp_path: Path, closers: Closers, name: str, floor: int) -> Daemon:
    """A provider daemon selling one simulated GPU at ``floor`` micro-credits/device-hour."""
    config = NodeConfig(
        node=NodeSection(listen_port=0, home=tmp_path / name),
        devices=[DeviceDecl(model="RTX-4090", count=1, price_floor=floor, simulated=True)],
        detect_gpus=False,
    )
    daemon = await Daemon.start(config)
    closers.append(daemon.close)
    return daemon


async def refresh(tenant: Tenant, daemons: list[Daemon]) -> None:
    for d in daemons:
        await tenant.refresh(d.address)


async def advertised_busy(tenant: Tenant, daemons: list[Daemon]) -> None:
    """Refresh until every provider's advert shows its device taken (bounded by the test
    timeout): the tenant's directory then holds adverts signed while it held the leases."""
    while True:
        await refresh(tenant, daemons)
        if all(a.free_units == 0 for a in tenant.adverts()):
            return
        await asyncio.sleep(0.1)


class TestOwnLeases:
    async def test_a_tenant_does_not_ask_a_provider_whose_devices_it_just_leased(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        cheap = await provider(tmp_path, closers, "cheap", 3_600_000)
        dear = await provider(tmp_path, closers, "dear", 7_200_000)
        tenant = new_tenant(tmp_path / "tenant.sqlite", closers)
        for d in (cheap, dear):  # both proven: the one question goes to the cheapest
            tenant.store.record_outcome(d.node.node_id, "completed")
        await refresh(tenant, [cheap, dear])
        first = await tenant.auction(Requirement(kind="gpu"), 1, MAX_PRICE, job_spec_hash=JOB, k=1)
        assert [x.provider for x in first.leases] == [cheap.node.node_id], first.failure
        # The directory still shows the cheap provider free: its advert predates our lease.
        # The tenant wants one more unit and asks one provider (k=1).
        second = await tenant.auction(Requirement(kind="gpu"), 1, MAX_PRICE, job_spec_hash=JOB, k=1)
        assert [c.provider for c in second.asked] == [dear.node.node_id]
        assert [x.provider for x in second.leases] == [dear.node.node_id], second.failure
        assert cheap.provider.engine.counters.no_bids.get("all_reserved", 0) == 0

    async def test_devices_the_tenant_released_are_asked_for_at_once(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemons = [
            await provider(tmp_path, closers, "a", 3_600_000),
            await provider(tmp_path, closers, "b", 3_600_000),
        ]
        tenant = new_tenant(tmp_path / "tenant.sqlite", closers)
        await refresh(tenant, daemons)
        first = await tenant.auction(Requirement(kind="gpu"), 2, MAX_PRICE, job_spec_hash=JOB)
        assert first.units == 2, first.failure
        await advertised_busy(tenant, daemons)
        # The previous sweep ends: every lease released, receipts countersigned.
        for row in tenant.store.list_leases(LeaseState.ACTIVE):
            await tenant.release(row)
        assert all(d.provider.engine.free for d in daemons)
        # The next sweep's first auction, on the directory the tenant holds (a peer's
        # directory lags the same way: the providers re-advertise after a hold-down).
        again = await tenant.auction(Requirement(kind="gpu"), 2, MAX_PRICE, job_spec_hash=JOB)
        assert again.state is AuctionState.LEASED, again.failure
        assert again.units == 2
