"""A finished task's ``task_result`` is one signed document, re-sent as identical bytes to
every later ``task_query`` (docs/protocol.md, section 5, "Documents re-sent verbatim").

The tenant must take it again: a tenant whose first answer was lost in flight, or which
resumes a sweep after a restart, asks again and gets the very same envelope (so the
result's envelope hash stays one value). Before, its replay guard refused the second
copy as ``replay``, and any copy older than the replay window as ``stale``: a tenant
could never learn a result it had missed for two minutes.

A real daemon (in process, loopback port 0, the real sandbox) and a real tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.config import NodeConfig, NodeSection
from node.daemon import Daemon
from node.net.transport import HttpTransport
from node.provider.inventory import DeviceDecl
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from node.workspace import pack
from protocol.identity import Identity
from protocol.messages import Requirement, TaskAssign, TaskQuery, TaskResult
from protocol.replay import ReplayGuard

JOB = hashlib.sha256(b"test_task_retransmit").hexdigest()
RTX = DeviceDecl(model="RTX-4090", count=1, price_floor=350_000, simulated=True)


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[Daemon]:
    config = NodeConfig(
        node=NodeSection(listen_port=0, home=tmp_path / "provider"),
        devices=[RTX],
        detect_gpus=False,
    )
    daemon = await Daemon.start(config)
    yield daemon
    await daemon.close()


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Tenant]:
    transport = HttpTransport()
    store = Store(tmp_path / "tenant.sqlite")
    yield Tenant(Identity.generate(), store, transport)
    await transport.close()
    store.close()


async def run_task(tenant: Tenant, provider: Daemon, tmp_path: Path) -> tuple[LeaseRow, str]:
    """Lease a device, upload a workspace, run one task to its result."""
    await tenant.refresh(provider.address)
    report = await tenant.auction(Requirement(kind="gpu"), 1, 1_000_000, job_spec_hash=JOB)
    assert report.leases, report.failure
    lease = tenant.store.get_lease(report.leases[0].lease_id)
    assert lease is not None
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "trial.py").write_text("print('{\"loss\": 0.25}')\n")
    ws = pack(tmp_path / "ws")
    client = TaskClient(tenant, lease)
    await client.upload(ws.data, ws.sha256)
    await client.assign(
        TaskAssign(
            lease_id=lease.lease_id,
            task_id="t-1",
            job_spec_hash=JOB,
            workspace_hash=ws.sha256,
            command=[sys.executable, "trial.py"],
            timeout_ms=60_000,
        )
    )
    result = await client.follow("t-1")
    assert result.state == "succeeded", result
    return lease, "t-1"


async def query_raw(tenant: Tenant, lease: LeaseRow, task_id: str) -> bytes:
    # log_offset past the end: the tenant holds the whole log, so the answer is the result.
    query = TaskQuery(lease_id=lease.lease_id, task_id=task_id, log_offset=1 << 30)
    reply = await tenant.node.request(tenant.peer_of(lease), query)
    assert reply is not None
    assert isinstance(reply.body, TaskResult)
    return reply.raw


class TestResultResent:
    async def test_asking_again_gets_the_same_bytes_and_the_tenant_takes_them(
        self, tenant: Tenant, provider: Daemon, tmp_path: Path
    ) -> None:
        lease, task_id = await run_task(tenant, provider, tmp_path)
        first = await query_raw(tenant, lease, task_id)
        second = await query_raw(tenant, lease, task_id)
        assert first == second
        again = await TaskClient(tenant, lease).follow(task_id)
        assert again.metrics == {"loss": 0.25}

    async def test_a_result_older_than_the_replay_window_is_still_taken(
        self, tenant: Tenant, provider: Daemon, tmp_path: Path
    ) -> None:
        lease, task_id = await run_task(tenant, provider, tmp_path)
        tenant.node.guard = ReplayGuard(window_ms=300)
        await asyncio.sleep(0.5)  # the result's timestamp leaves the tenant's window
        result = await TaskClient(tenant, lease).follow(task_id)
        assert result.task_id == task_id
