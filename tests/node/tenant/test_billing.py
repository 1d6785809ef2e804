"""The tenant bills from its own clock; a provider's word on time is bounded by it.

Over real HTTP on loopback port 0 with real SQLite files. The dishonest provider is the
daemon's sell-side stack (Node, BidEngine, ProviderService, the daemon's aiohttp app)
with one deliberate change: ``BackdatingProvider`` claims in its Accept, and bills from,
a lease start 30 days before the award arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import pytest

from market.bidding import BidEngine
from market.settlement import amount_owed
from node.net.node import Node
from node.provider.inventory import DeviceDecl
from node.provider.service import ProviderService
from node.store.node_store import Store
from node.tenant.client import ReceiptRejected, Tenant
from node.tenant.taskclient import TaskClient
from protocol.envelope import Envelope
from protocol.errors import MercatoError
from protocol.messages import Accept, Award, Body, Requirement, TaskAssign, TaskQuery, TaskStatus
from tests.node.tenant.sellside import Closers, Server, new_tenant, start_sell_side

JOB = hashlib.sha256(b"test_billing").hexdigest()
# 5 credits per device-hour: 30 days of one device is 3,600 credits.
PRICEY = DeviceDecl(model="RTX-4090", count=1, price_floor=5_000_000, simulated=True)
DAY_MS = 86_400_000


class BackdatingProvider(ProviderService):
    """Says (and bills as if) every lease started 30 days before the award arrived."""

    async def _on_award(self, env: Envelope) -> Body | bytes | None:
        award = env.body
        assert isinstance(award, Award)
        result = self.engine.on_award(award, env.sender, env.digest, self.node.clock())
        if not isinstance(result, Accept):
            return result
        lease = self.engine.leases[award.lease_id]
        lease.start_ms -= 30 * DAY_MS
        backdated = result.model_copy(update={"start_ms": lease.start_ms})
        raw = self.node.seal(backdated, to=env.sender)
        self.store.put_lease(self._row(lease, env.raw, raw, env.digest, self.node.clock()))
        return raw


class StallingProvider(ProviderService):
    """Takes every task and says it is running, forever: no result, the lease held."""

    def __init__(self, node: Node, engine: BidEngine, store: Store) -> None:
        super().__init__(node, engine, store)
        node.handlers[TaskAssign.TYPE] = self._on_assign
        node.handlers[TaskQuery.TYPE] = self._on_query

    async def _on_assign(self, env: Envelope) -> Body | bytes | None:
        return None

    async def _on_query(self, env: Envelope) -> Body | bytes | None:
        q = env.body
        assert isinstance(q, TaskQuery)
        await asyncio.sleep(min(q.wait_ms, 200) / 1000)
        return TaskStatus(lease_id=q.lease_id, task_id=q.task_id, state="running")


async def start_provider(
    store_path: Path, stack: Closers, service: type[ProviderService] = ProviderService
) -> Server:
    """The daemon's wiring with ``service`` as the sell side, selling PRICEY."""
    return await start_sell_side(store_path, stack, PRICEY, service)


@pytest.fixture
async def tenant(tmp_path: Path, closers: Closers) -> Tenant:
    return new_tenant(tmp_path / "tenant.sqlite", closers)


class TestBackdatingProvider:
    async def test_a_backdated_accept_is_refused_and_nothing_is_billed(
        self, tmp_path: Path, tenant: Tenant, closers: Closers
    ) -> None:
        liar = await start_provider(tmp_path / "liar.sqlite", closers, BackdatingProvider)
        await tenant.refresh(liar.address)
        report = await tenant.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
        # Whatever the auction made, the tenant ends it the usual way after 0.2 s of use.
        for lease in report.leases:
            row = tenant.store.get_lease(lease.lease_id)
            assert row is not None
            await asyncio.sleep(0.2)
            with contextlib.suppress(MercatoError):
                await tenant.release(row)

        # No 3,600-credit countersignature: nothing is owed on either side.
        assert [line["amount"] for line in tenant.store.ledger()] == []
        assert liar.store.ledger() == []
        # The tenant refused the accept, says why, released the provider's devices
        # and counts the refusal against the provider.
        assert report.leases == []
        assert report.ignored == {"accept_start_outside_window": 1}
        assert tenant.store.reputation()[liar.node_id]["rejected"] == 1
        assert [row.state for row in liar.store.list_leases()] == ["ended"]


class TestStallingProvider:
    async def test_a_trial_past_its_timeout_stops_the_bill_whatever_the_provider_says(
        self, tmp_path: Path, tenant: Tenant, closers: Closers
    ) -> None:
        staller = await start_provider(tmp_path / "staller.sqlite", closers, StallingProvider)
        tenant.task_grace_ms = 200
        await tenant.refresh(staller.address)
        report = await tenant.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
        [made] = report.leases
        lease = tenant.store.get_lease(made.lease_id)
        assert lease is not None
        client = TaskClient(tenant, lease)
        await client.assign(
            TaskAssign(
                lease_id=lease.lease_id,
                task_id="t1",
                job_spec_hash=JOB,
                workspace_hash=JOB,
                command=["python3", "train.py"],
                timeout_ms=500,
            )
        )
        # The tenant's runner gives up on the trial (node.tenant.sweep cancels it, issue 13)...
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3.0):
                await client.follow("t1", wait_ms=200)
        # ...and the provider bills every millisecond it held the device.
        with pytest.raises(ReceiptRejected, match="billing stopped when t1 was overdue"):
            await tenant.release(lease)
        assert tenant.store.ledger() == []
        assert staller.store.ledger() == []
        signed = staller.store.list_receipts(lease.lease_id)
        assert signed[0].device_ms >= 3_000
        # What the tenant would sign: at most the trial's timeout + grace + tolerance.
        most = amount_owed(500 + 200 + 100 + 10, 5_000_000)
        assert signed[0].amount > most
