"""Pay as you go over real daemons: debit notes during the lease, lapses stop the work.

A real provider daemon (node.daemon.Daemon, bubblewrap sandbox, SQLite) agrees 1 s
debit notes with a 1 s payment timeout. The tenants are real ``node.tenant.client.Tenant``
clients over HTTP on loopback port 0; the dishonest ones stop paying in two ways: one
takes its trial's result and goes silent, one keeps heartbeating but never countersigns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pytest

from node.config import NodeConfig, NodeSection, SettlementSection
from node.daemon import Daemon
from node.provider.inventory import DeviceDecl
from node.store.node_store import LeaseRow
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from node.workspace import pack
from protocol.envelope import Envelope
from protocol.errors import PeerTimeoutError
from protocol.messages import Award, DebitNote, Receipt, Release, Requirement, TaskAssign
from tests.node.tenant.sellside import Closers, new_tenant

JOB = hashlib.sha256(b"test_settlement_e2e").hexdigest()
INTERVAL_MS = 1_000
TIMEOUT_MS = 1_000


class NeverCountersigns(Tenant):
    """Heartbeats like an honest tenant, and ignores every debit note it is sent."""

    async def _settle(self, lease: LeaseRow, reply: Envelope) -> None:
        return None


async def provider(tmp_path: Path, closers: Closers, max_unpaid: int = 0) -> Daemon:
    config = NodeConfig(
        node=NodeSection(listen_port=0, home=tmp_path / "provider"),
        devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=3_600_000, simulated=True)],
        settlement=SettlementSection(min_debit_interval_s=0.5, max_unpaid_per_tenant=max_unpaid),
        detect_gpus=False,
    )
    daemon = await Daemon.start(config)
    closers.append(daemon.close)
    return daemon


async def tenant_of(
    tmp_path: Path, closers: Closers, cls: type[Tenant] = Tenant, name: str = "tenant"
) -> Tenant:
    return new_tenant(
        tmp_path / f"{name}.sqlite",
        closers,
        cls,
        debit_interval_ms=INTERVAL_MS,
        payment_timeout_ms=TIMEOUT_MS,
    )


async def lease_of(tenant: Tenant, daemon: Daemon) -> LeaseRow:
    await tenant.refresh(daemon.address)
    report = await tenant.auction(
        Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB, heartbeat_interval_ms=1_000
    )
    assert [x.units for x in report.leases] == [1], report.failure
    row = tenant.store.get_lease(report.leases[0].lease_id)
    assert row is not None
    return row


async def heartbeats(tenant: Tenant, lease: LeaseRow) -> None:
    """The tenant's usual heartbeat loop (node.tenant.sweep drives the same calls)."""
    seq = 0
    while True:
        await tenant.heartbeat(lease, seq)
        seq += 1
        await asyncio.sleep(0.3)


async def ended(daemon: Daemon, lease_id: str) -> LeaseRow:
    """Wait (bounded by the test timeout) until the provider no longer holds the lease."""
    while True:
        row = daemon.store.get_lease(lease_id)
        assert row is not None
        if row.state != "active":
            return row
        await asyncio.sleep(0.1)


def assert_stopped_within_one_interval_plus_timeout(daemon: Daemon, row: LeaseRow) -> None:
    """The provider's own records: work past the last paid note is bounded."""
    notes = daemon.store.list_receipts(row.lease_id, kind="debit_note")
    paid = [n for n in notes if n.countersign is not None]
    last_paid_ms = max((n.created_ms for n in paid), default=row.start_ms)
    # Timer slack: the provider's timer wakes at the lapse time; allow a loaded loop 1 s.
    assert row.updated_ms - last_paid_ms <= INTERVAL_MS + TIMEOUT_MS + 1_000
    assert "not countersigned" in row.end_reason


class TestSilentTenant:
    async def test_a_tenant_that_takes_a_result_and_goes_silent_is_stopped_and_has_paid(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers)
        lease = await lease_of(tenant, daemon)
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "train.sh").write_text("sleep 2.5; echo loss 0.1\n")
        ws = pack(tmp_path / "ws")
        client = TaskClient(tenant, lease)
        beat = asyncio.create_task(heartbeats(tenant, lease))
        try:
            await client.upload(ws.data, ws.sha256)
            await client.assign(
                TaskAssign(
                    lease_id=lease.lease_id,
                    task_id="t1",
                    job_spec_hash=JOB,
                    workspace_hash=ws.sha256,
                    command=["sh", "train.sh"],
                    timeout_ms=60_000,
                )
            )
            result = await client.follow("t1", wait_ms=1_000)
            assert result.state == "succeeded"
        finally:
            beat.cancel()  # the tenant has its result and vanishes: no heartbeat, no release
            with contextlib.suppress(asyncio.CancelledError):
                await beat

        row = await ended(daemon, lease.lease_id)
        assert_stopped_within_one_interval_plus_timeout(daemon, row)
        # The notes countersigned while the trial ran are the provider's evidence of debt.
        booked = [line for line in daemon.store.ledger() if line["lease_id"] == lease.lease_id]
        assert len(booked) >= 2
        assert sum(line["amount"] for line in booked) > 0
        assert sum(line["amount"] for line in tenant.store.ledger()) == -sum(
            line["amount"] for line in booked
        )
        # And the tenant's next order is refused with a reason it can read.
        await tenant.refresh(daemon.address)
        report = await tenant.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
        assert report.leases == []
        assert "unpaid_notes" in report.explanation


class TestNeverCountersigns:
    async def test_a_tenant_that_never_countersigns_loses_its_lease_and_pays_nothing(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers, NeverCountersigns)
        lease = await lease_of(tenant, daemon)
        (tmp_path / "ws").mkdir()
        (tmp_path / "ws" / "train.sh").write_text("sleep 120\n")
        ws = pack(tmp_path / "ws")
        client = TaskClient(tenant, lease)
        await client.upload(ws.data, ws.sha256)
        await client.assign(
            TaskAssign(
                lease_id=lease.lease_id,
                task_id="long",
                job_spec_hash=JOB,
                workspace_hash=ws.sha256,
                command=["sh", "train.sh"],
                timeout_ms=600_000,
            )
        )
        beat = asyncio.create_task(heartbeats(tenant, lease))
        try:
            row = await ended(daemon, lease.lease_id)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        assert_stopped_within_one_interval_plus_timeout(daemon, row)
        # The unpaid work stops: the sandboxed trial (2 minutes of sleep) is killed.
        work = daemon.node.handlers[TaskAssign.TYPE].__self__  # type: ignore[attr-defined]
        for _ in range(300):  # bounded: 30 s, far below the trial's 120 s
            if "long" not in work.executor._running:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the trial still runs after its lease lapsed")
        assert daemon.store.ledger() == []
        assert daemon.store.counterparty(tenant.node_id) is not None
        assert b'mercato_settlement_events_total{event="note_lapsed"} 1.0' in (
            daemon.node.metrics.render()
        )
        # The provider no longer answers this lease's heartbeats: the tenant sees it end.
        assert not await tenant.heartbeat(lease, 99)


class TestHonestTenant:
    async def test_notes_are_countersigned_and_the_receipt_books_only_the_rest(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers)
        lease = await lease_of(tenant, daemon)
        seq = 0
        while len(tenant.store.list_receipts(lease.lease_id, kind="debit_note")) < 2:
            assert await tenant.heartbeat(lease, seq)
            seq += 1
            await asyncio.sleep(0.3)
        receipt = await tenant.release(lease)
        # Both sides booked the same total: the final receipt's cumulative amount.
        assert tenant.store.ledger_balance() == -receipt.amount
        assert daemon.store.ledger_balance() == receipt.amount
        assert len(daemon.store.ledger()) == len(tenant.store.ledger()) >= 3
        row = daemon.store.get_lease(lease.lease_id)
        assert row is not None
        assert (row.state, row.end_reason) == ("ended", "")


class TestExposureLimit:
    async def test_a_tenant_over_its_unpaid_limit_gets_no_bid_with_the_reason(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        # 1 credit per device-hour: 100 micro-credits is 360 ms of one device, unpaid
        # until the first note (1 s) is countersigned.
        daemon = await provider(tmp_path, closers, max_unpaid=100)
        tenant = await tenant_of(tmp_path, closers)
        await lease_of(tenant, daemon)
        await asyncio.sleep(0.5)
        other = await tenant_of(tmp_path, closers, name="other")
        await other.refresh(daemon.address)
        fine = await other.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
        assert [x.units for x in fine.leases] == [1]  # the limit is per tenant

        again = await tenant.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
        assert again.leases == []
        assert "unpaid_notes" in again.explanation
        assert daemon.provider is not None
        assert daemon.provider.engine.counters.no_bids == {"unpaid_notes": 1}


def drop_first_countersignature(tenant: Tenant, kind: type[DebitNote | Receipt]) -> list[str]:
    """The network drops the tenant's first countersignature of a ``kind``; the list
    returned gets the hash of the bill it countersigned."""
    send = tenant.node.request
    lost: list[str] = []

    async def lossy(peer: Any, body: Any, **kw: Any) -> Any:
        if isinstance(body, kind) and body.countersigns and not lost:
            lost.append(body.countersigns)
            raise PeerTimeoutError("countersignature lost")
        return await send(peer, body, **kw)

    tenant.node.request = lossy  # type: ignore[method-assign]
    return lost


class TestLostCountersignature:
    async def test_a_lost_countersignature_is_made_good_on_the_next_heartbeat(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers)
        lease = await lease_of(tenant, daemon)
        lost = drop_first_countersignature(tenant, DebitNote)
        seq = 0
        while not daemon.store.ledger():
            # Every heartbeat is answered while the note is unpaid (a fresh envelope each
            # time, which the tenant's replay guard accepts).
            assert await tenant.heartbeat(lease, seq)
            seq += 1
            await asyncio.sleep(0.3)
        assert lost
        [line] = daemon.store.ledger()
        assert line["receipt_hash"] != lost[0]  # it paid the re-sent envelope
        assert tenant.store.lease_paid(lease.lease_id) == line["amount"]
        assert tenant.refusals == {}
        row = daemon.store.get_lease(lease.lease_id)
        assert row is not None
        assert row.state == "active"

    async def test_a_lost_countersignature_of_the_final_receipt_is_sent_again_and_booked(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers)
        lease = await lease_of(tenant, daemon)
        lost = drop_first_countersignature(tenant, Receipt)
        receipt = await tenant.release(lease)
        assert lost
        # Both sides booked the receipt once: the tenant what it owes, the provider what
        # it is owed, though the first countersignature never arrived.
        assert tenant.store.ledger_balance() == -receipt.amount
        assert daemon.store.ledger_balance() == receipt.amount
        row = tenant.store.get_lease(lease.lease_id)
        assert row is not None
        assert row.state == "ended"


class TestOrphanLease:
    async def test_a_lease_whose_accept_and_first_release_were_lost_is_ended_not_lapsed(
        self, tmp_path: Path, closers: Closers
    ) -> None:
        # The provider accepts the award but its answer is lost: the tenant falls back
        # and releases that lease by its id; the first release is lost too. Given up
        # there, the lease would run unpaid until it lapsed and the provider refused this
        # tenant's orders for a day.
        daemon = await provider(tmp_path, closers)
        tenant = await tenant_of(tmp_path, closers)
        await tenant.refresh(daemon.address)
        send = tenant.node.request
        lost: list[str] = []

        async def lossy(peer: Any, body: Any, **kw: Any) -> Any:
            if isinstance(body, Award):
                await send(peer, body, **kw)  # delivered and accepted ...
                lost.append("accept")
                raise PeerTimeoutError("accept lost")  # ... the answer lost
            if isinstance(body, Release) and body.lease_id and lost == ["accept"]:
                lost.append("release")
                raise PeerTimeoutError("release lost")
            return await send(peer, body, **kw)

        tenant.node.request = lossy  # type: ignore[method-assign]
        report = await tenant.auction(
            Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB, heartbeat_interval_ms=1_000
        )
        assert report.leases == []
        assert lost == ["accept", "release"]
        [held] = daemon.store.list_leases()
        # Ended when the auction returned, by the tenant's release: nothing runs unpaid
        # until it lapses, so the provider will not refuse this tenant.
        assert held.state == "ended"
        assert held.end_reason == ""
