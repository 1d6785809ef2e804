"""A tenant's auction cancelled mid-way leaves no bid reserved and no lease unknown.

Real provider sell sides (node.daemon's wiring: Node, BidEngine, aiohttp on loopback
port 0, SQLite) and a real ``Tenant``. One provider answers slowly, so the test can
cancel the auction at a chosen step, as a sweep whose TaskGroup aborts (a trial task
failed) or Ctrl-C of ``mercato order`` cancels it. Without care the bids it received
stay reserved until they expire (the same tenant's next auction gets ``all_reserved``),
and a lease whose award was in flight, or already accepted but not yet handed back,
is held at its provider for a tenant that never heartbeats nor pays it: it lapses
unpaid, and the provider then refuses that tenant (``unpaid_notes``).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from market.auction import Auction, AuctionState
from market.bidding import BidEngine
from market.lifecycle import LeaseState
from node.net.node import Node
from node.provider.inventory import DeviceDecl
from node.provider.service import ProviderService
from node.store.node_store import Store
from node.tenant.client import Tenant
from protocol.envelope import Envelope
from protocol.messages import Award, Body, Order, Requirement
from tests.node.tenant.sellside import Closers, Server, new_tenant, start_sell_side

JOB = hashlib.sha256(b"test_auction_cancel_e2e").hexdigest()
MAX_PRICE = 10_000_000


class Gate:
    """Holds the first message of one kind at a provider until opened; says when it came."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.open = asyncio.Event()

    async def hold(self) -> None:
        if not self.arrived.is_set():
            self.arrived.set()
            await self.open.wait()


def slow_award(gate: Gate) -> type[ProviderService]:
    class SlowAward(ProviderService):
        """Makes the lease, then holds its accept: the answer the tenant waits for."""

        async def _on_award(self, env: Envelope) -> Body | bytes | None:
            reply = await super()._on_award(env)
            await gate.hold()
            return reply

    return SlowAward


def slow_order(gate: Gate) -> type[ProviderService]:
    class SlowOrder(ProviderService):
        """Holds its answer to the first order."""

        async def _on_order(self, env: Envelope) -> Body | bytes | None:
            await gate.hold()
            return await super()._on_order(env)

    return SlowOrder


class Observed(Tenant):
    """A real tenant that says when an answer to its order came back, and when it
    holds a lease (an accept came back and was stored)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.answered = asyncio.Event()
        self.leased = asyncio.Event()

    async def _collect(self, auction: Auction, provider: str, order: Order, wait_s: float) -> None:
        await super()._collect(auction, provider, order, wait_s)
        self.answered.set()

    async def _award(self, auction: Auction, award: Award) -> list[Award]:
        fallback = await super()._award(auction, award)
        if self.store.get_lease(award.lease_id) is not None:
            self.leased.set()
        return fallback


def slow_release_after_award(award_gate: Gate, release_gate: Gate) -> type[ProviderService]:
    class SlowBoth(ProviderService):
        """Holds its accept (as SlowAward), then holds the release that ends the lease."""

        async def _on_award(self, env: Envelope) -> Body | bytes | None:
            reply = await super()._on_award(env)
            await award_gate.hold()
            return reply

        async def _on_release(self, env: Envelope) -> Body | bytes | None:
            await release_gate.hold()
            return await super()._on_release(env)

    return SlowBoth


@pytest.fixture
def gate() -> Gate:
    return Gate()


async def sell(
    tmp_path: Path,
    closers: Closers,
    name: str,
    floor: int,
    service: type[ProviderService] = ProviderService,
) -> Server:
    devices = DeviceDecl(model="RTX-4090", count=1, price_floor=floor, simulated=True)

    def build(node: Node, engine: BidEngine, store: Store) -> ProviderService:
        return service(node, engine, store)

    return await start_sell_side(tmp_path / f"{name}.sqlite", closers, devices, build)


async def cancelled(task: asyncio.Task[object]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def active(server: Server) -> list[str]:
    return [x.lease_id for x in server.store.list_leases(LeaseState.ACTIVE)]


class TestCancelledAuction:
    async def test_an_award_in_flight_and_a_lease_made_are_ended_and_the_loser_freed(
        self, tmp_path: Path, closers: Closers, gate: Gate
    ) -> None:
        # Two units wanted: `cheap` accepts at once, `slow` makes the lease and holds its
        # accept, `dear` loses. The sweep is cancelled while it waits for `slow`.
        cheap = await sell(tmp_path, closers, "cheap", 3_600_000)
        slow = await sell(tmp_path, closers, "slow", 5_000_000, slow_award(gate))
        dear = await sell(tmp_path, closers, "dear", 7_200_000)
        tenant = new_tenant(tmp_path / "tenant.sqlite", closers, Observed)
        assert isinstance(tenant, Observed)
        try:
            for s in (cheap, slow, dear):
                await tenant.refresh(s.address)
            task = asyncio.create_task(
                tenant.auction(Requirement(kind="gpu"), 2, MAX_PRICE, job_spec_hash=JOB)
            )
            await gate.arrived.wait()
            await tenant.leased.wait()  # `cheap`'s accept is in: a lease the tenant holds
            assert active(cheap)  # both leases exist at their providers
            assert active(slow)
            await cancelled(task)
            # Once the cancel returns: no lease is left that nobody heartbeats or pays,
            # and the lease that was made is settled (its receipt countersigned).
            assert active(cheap) == []
            assert active(slow) == []
            assert active(dear) == []
            assert tenant.store.list_leases(LeaseState.ACTIVE) == []
            assert [x.state for x in tenant.store.list_leases()] == [LeaseState.ENDED]
            assert tenant.store.ledger_balance() < 0  # the held seconds paid, nothing more
        finally:
            gate.open.set()
        # Every device is free again: the same tenant's next auction gets all three bids.
        again = await tenant.auction(Requirement(kind="gpu"), 3, MAX_PRICE, job_spec_hash=JOB)
        assert again.state is AuctionState.LEASED, again.failure
        assert again.units == 3

    async def test_bids_received_are_released_when_the_auction_is_cancelled_collecting(
        self, tmp_path: Path, closers: Closers, gate: Gate
    ) -> None:
        quick = await sell(tmp_path, closers, "quick", 3_600_000)
        slow = await sell(tmp_path, closers, "slow", 3_600_000, slow_order(gate))
        tenant = new_tenant(tmp_path / "tenant.sqlite", closers, Observed)
        assert isinstance(tenant, Observed)
        try:
            for s in (quick, slow):
                await tenant.refresh(s.address)
            task = asyncio.create_task(
                tenant.auction(Requirement(kind="gpu"), 2, MAX_PRICE, job_spec_hash=JOB)
            )
            await gate.arrived.wait()  # `slow` holds its answer
            await tenant.answered.wait()  # `quick`'s bid is in
            await cancelled(task)
            # The same tenant asks again at once (not the slow one, whose late bid for
            # the cancelled order the tenant never saw: it expires on its own).
            again = await tenant.auction(
                Requirement(kind="gpu"), 1, MAX_PRICE, job_spec_hash=JOB, exclude=[slow.node_id]
            )
            assert again.state is AuctionState.LEASED, again.failure
        finally:
            gate.open.set()

    async def test_a_second_cancel_leaves_the_releases_to_the_tenant_which_close_awaits(
        self, tmp_path: Path, closers: Closers, gate: Gate
    ) -> None:
        # The caller is cancelled again while the releases are under way (a TaskGroup
        # torn down twice, a second Ctrl-C): it stops waiting, the releases do not.
        releasing = Gate()
        slow = await sell(
            tmp_path, closers, "slow", 3_600_000, slow_release_after_award(gate, releasing)
        )
        tenant = new_tenant(tmp_path / "tenant.sqlite", closers)
        try:
            await tenant.refresh(slow.address)
            task = asyncio.create_task(
                tenant.auction(Requirement(kind="gpu"), 1, MAX_PRICE, job_spec_hash=JOB)
            )
            await gate.arrived.wait()  # the lease is made, its accept held
            task.cancel()
            await releasing.arrived.wait()  # the release is at the provider, held
            await cancelled(task)  # the second cancel: the caller is free at once
            assert active(slow)  # the release has not been applied yet
            releasing.open.set()
            await tenant.close()
            assert active(slow) == []
        finally:
            gate.open.set()
            releasing.open.set()
