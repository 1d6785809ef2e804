"""The tenant's receipt checks, over real HTTP on loopback port 0 with real SQLite files.

An honest provider is a real daemon (``node.daemon.Daemon``). The dishonest ones are the
same sell-side stack (Node, BidEngine, ProviderService, the daemon's aiohttp app) with
one deliberate change, ``LyingProvider``: it signs receipts that overstate what is owed.
The tenant must refuse each one, count it against the provider's reputation, and never
countersign, so no money moves on either side.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from market.bidding import BidEngine, ProviderLease
from market.lifecycle import LeaseState
from market.settlement import amount_owed
from node.config import NodeConfig, NodeSection
from node.daemon import Daemon
from node.net.node import Node
from node.provider.inventory import DeviceDecl
from node.provider.service import ProviderService
from node.store.node_store import LeaseRow, ReceiptRow, Store
from node.tenant.client import ReceiptRejected, Tenant
from protocol.messages import Receipt, Requirement
from tests.node.tenant.sellside import Closers, Server, new_tenant, start_sell_side

JOB = hashlib.sha256(b"test_tenant").hexdigest()
RTX = DeviceDecl(model="RTX-4090", count=2, price_floor=350_000, simulated=True)
HOUR_MS = 3_600_000

Lie = Callable[[Receipt], Receipt]


class LyingProvider(ProviderService):
    """A deliberately misbehaving provider: ``lie`` rewrites each receipt before it signs."""

    def __init__(self, node: Node, engine: BidEngine, store: Store, lie: Lie) -> None:
        super().__init__(node, engine, store)
        self.lie = lie

    def _receipt(self, lease: ProviderLease, now: int) -> bytes:
        device_ms = len(lease.devices) * max(0, now - lease.start_ms)
        true = Receipt(
            lease_id=lease.lease_id,
            provider=self.node.node_id,
            tenant=lease.tenant,
            device_ms=device_ms,
            price=lease.price,
            amount=amount_owed(device_ms, lease.price),
        )
        receipt = self.lie(true)
        raw = self.node.seal(receipt, to=lease.tenant)
        self.store.put_receipt(
            ReceiptRow(
                receipt_hash=hashlib.sha256(raw).hexdigest(),
                lease_id=lease.lease_id,
                task_id=None,
                provider=self.node.node_id,
                tenant=lease.tenant,
                device_ms=receipt.device_ms,
                price=receipt.price,
                amount=receipt.amount,
                receipt=raw,
                countersign=None,
                created_ms=now,
            )
        )
        return raw


def honest(r: Receipt) -> Receipt:
    return r


async def start_provider(store_path: Path, stack: Closers, lie: Lie = honest) -> Server:
    """The daemon's wiring with LyingProvider as the sell side, selling RTX."""
    return await start_sell_side(
        store_path, stack, RTX, lambda node, engine, store: LyingProvider(node, engine, store, lie)
    )


@pytest.fixture
async def tenant(tmp_path: Path, closers: Closers) -> Tenant:
    return new_tenant(tmp_path / "tenant.sqlite", closers)


async def lease_from(tenant: Tenant, address: str) -> LeaseRow:
    await tenant.refresh(address)
    report = await tenant.auction(Requirement(kind="gpu"), 1, 1_000_000, job_spec_hash=JOB)
    assert [x.units for x in report.leases] == [1], report.failure
    row = tenant.store.get_lease(report.leases[0].lease_id)
    assert row is not None
    await asyncio.sleep(0.05)  # some usage to bill
    return row


class TestHonestReceipt:
    async def test_a_real_daemons_receipt_is_countersigned_and_booked(
        self, tmp_path: Path, tenant: Tenant, closers: Closers
    ) -> None:
        config = NodeConfig(
            node=NodeSection(listen_port=0, home=tmp_path / "daemon"),
            devices=[RTX],
            detect_gpus=False,
        )
        daemon = await Daemon.start(config)
        closers.append(daemon.close)
        lease = await lease_from(tenant, daemon.address)
        receipt = await tenant.release(lease)
        assert receipt.amount == amount_owed(receipt.device_ms, lease.price) > 0
        assert tenant.store.ledger_balance() == -receipt.amount
        assert daemon.store.ledger_balance() == receipt.amount
        assert tenant.store.reputation()[daemon.node.node_id]["completed"] == 1


CASES: dict[str, tuple[Lie, str]] = {
    "wrong_amount": (
        lambda r: r.model_copy(update={"amount": r.amount + 1_000}),
        "amount .* is not ceil",
    ),
    "wrong_price": (
        lambda r: r.model_copy(
            update={"price": r.price * 2, "amount": amount_owed(r.device_ms, r.price * 2)}
        ),
        "price 700000 is not the leased 350000",
    ),
    "usage_above_held_time": (
        lambda r: r.model_copy(
            update={
                "device_ms": r.device_ms + 10 * HOUR_MS,
                "amount": amount_owed(r.device_ms + 10 * HOUR_MS, r.price),
            }
        ),
        "usage .* exceeds",
    ),
}


class TestLyingProvider:
    @pytest.mark.parametrize("case", list(CASES))
    async def test_a_lying_receipt_is_rejected_counted_and_never_countersigned(
        self,
        case: str,
        tmp_path: Path,
        tenant: Tenant,
        closers: Closers,
    ) -> None:
        lie, why = CASES[case]
        liar = await start_provider(tmp_path / "liar.sqlite", closers, lie)
        lease = await lease_from(tenant, liar.address)

        with pytest.raises(ReceiptRejected, match=why):
            await tenant.release(lease)

        assert tenant.store.reputation()[liar.node_id] == {
            "completed": 0,
            "failed": 0,
            "declined": 0,
            "rejected": 1,
        }
        # The tenant kept no receipt and booked nothing; the lease is over, unpaid: lost,
        # never "ended" (that word means its receipt checked out).
        assert tenant.store.list_receipts(lease.lease_id) == []
        assert tenant.store.ledger() == []
        over = tenant.store.get_lease(lease.lease_id)
        assert over is not None
        assert over.state == "lost"
        # A sweep settling the lease after this records it lost again: a legal non-move.
        assert tenant.store.set_lease_state(lease.lease_id, LeaseState.LOST, 0)
        # The provider signed its lie but got no countersignature, so it earned nothing.
        signed = liar.store.list_receipts(lease.lease_id)
        assert len(signed) == 1
        assert signed[0].countersign is None
        assert liar.store.ledger() == []

    async def test_a_rejected_provider_ranks_below_an_equal_honest_one(
        self, tmp_path: Path, tenant: Tenant, closers: Closers
    ) -> None:
        """Reputation is what the rejection is for: the next auction prefers the other."""
        lie = CASES["wrong_amount"][0]
        liar = await start_provider(tmp_path / "liar.sqlite", closers, lie)
        fair = await start_provider(tmp_path / "fair.sqlite", closers)
        lease = await lease_from(tenant, liar.address)
        with pytest.raises(ReceiptRejected):
            await tenant.release(lease)

        await tenant.refresh(fair.address)
        report = await tenant.auction(Requirement(kind="gpu"), 1, 1_000_000, job_spec_hash=JOB)
        assert [c.provider for c in report.asked] == [fair.node_id, liar.node_id]
        assert [x.provider for x in report.leases] == [fair.node_id]
        await tenant.release(tenant.store.list_leases(LeaseState.ACTIVE)[0])
