"""A provider publishes a lease's service at /svc/<lease>/ to the tenant's token only.

A real provider daemon on loopback port 0, real tenants leasing over HTTP, the service
a real process in the bwrap sandbox listening on a Unix socket in its work directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from node.config import NodeConfig, NodeSection
from node.daemon import Daemon
from node.net.transport import HttpTransport
from node.provider.inventory import DeviceDecl
from node.provider.sandbox import probe_bwrap
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from node.workspace import pack
from protocol.capability import issue
from protocol.errors import InvalidFieldError, MercatoError
from protocol.identity import Identity
from protocol.messages import Requirement, TaskAssign

pytestmark = pytest.mark.skipif(not probe_bwrap().ok, reason="needs bubblewrap")

SPEC = "cd" * 32
SERVICE = """
import os
from aiohttp import web
async def hello(request):
    auth = request.headers.get("Authorization")
    return web.json_response({"path": request.path_qs, "auth": auth})
app = web.Application()
app.router.add_route("*", "/{tail:.*}", hello)
web.run_app(app, path=os.environ["MERCATO_SERVICE_SOCKET"], print=None)
"""


@dataclass
class Served:
    daemon: Daemon
    tenant: Tenant
    lease: LeaseRow
    client: TaskClient
    tmp: Path

    @property
    def url(self) -> str:
        return f"{self.daemon.address}/svc/{self.lease.lease_id}"

    def token(self, **kw: object) -> str:
        exp = self.tenant.clock() + 600_000
        return issue(self.tenant.identity, self.lease.lease_id, exp, **kw)  # type: ignore[arg-type]

    async def start(self, code: str, socket_name: str = "svc.sock") -> None:
        root = self.tmp / f"ws-{time.monotonic_ns()}"
        root.mkdir()
        (root / "README").write_text("service\n")
        ws = pack(root)
        await self.client.upload(ws.data, ws.sha256)
        await self.client.assign(
            TaskAssign(
                lease_id=self.lease.lease_id,
                task_id="svc",
                job_spec_hash=SPEC,
                workspace_hash=ws.sha256,
                command=[sys.executable, "-c", code],
                env={"MERCATO_SERVICE_SOCKET": socket_name},
                timeout_ms=120_000,
            )
        )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    config = NodeConfig(
        node=NodeSection(listen_port=0, home=tmp_path / "provider"),
        devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=350_000, simulated=True)],
        detect_gpus=False,
    )
    daemon = await Daemon.start(config)
    transport = HttpTransport()
    store = Store(tmp_path / "tenant.sqlite")
    tenant = Tenant(Identity.generate(), store, transport)
    await tenant.refresh(daemon.address)
    report = await tenant.auction(Requirement(kind="gpu"), 1, 1_000_000, job_spec_hash=SPEC)
    (lease,) = store.list_leases("active")
    assert report.leases

    async def beat() -> None:
        seq = 0
        while True:
            await asyncio.sleep(1.0)
            seq += 1
            with contextlib.suppress(MercatoError):
                await tenant.heartbeat(lease, seq)

    beats = asyncio.create_task(beat())
    try:
        yield Served(daemon, tenant, lease, TaskClient(tenant, lease), tmp_path)
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
        await transport.close()
        await daemon.close()
        store.close()


async def call(
    url: str, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, object]]:
    headers = {} if token is None else {"Authorization": f"Mercato {token}"}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def until_up(served: Served, path: str = "/") -> None:
    token = served.token()
    for _ in range(300):
        status, _ = await call(served.url + path, token)
        if status != 503:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the service never listened")


def rejections(daemon: Daemon) -> dict[str, int]:
    return daemon.node.metrics.rejection_counts()


class TestServiceEndpoint:
    async def test_only_the_tenants_token_reaches_the_service(self, served: Served) -> None:
        await served.start(SERVICE)
        await until_up(served)
        status, body = await call(served.url + "/v1/x?q=1", served.token())
        assert status == 200
        assert body["path"] == "/v1/x?q=1"
        assert body["auth"] is None  # the token is the provider's business, not the service's
        assert (await call(served.url + "/v1/x"))[0] == 401
        stranger = Identity.generate()
        exp = served.tenant.clock() + 600_000
        assert (await call(served.url + "/", issue(stranger, served.lease.lease_id, exp)))[0] == 403
        expired = issue(served.tenant.identity, served.lease.lease_id, served.tenant.clock() - 1)
        assert (await call(served.url + "/", expired))[0] == 401
        get_only = served.token(methods=("GET",), path="/v1")
        assert (await call(served.url + "/v1/y", get_only, "POST"))[0] == 403
        assert (await call(served.url + "/v2", get_only))[0] == 403
        assert (await call(served.url + "/v1/../v2", get_only))[0] == 403
        counts = rejections(served.daemon)
        assert counts["bad_capability"] == 1
        assert counts["capability_expired"] == 1
        assert counts["capability_scope"] == 4
        snapshot = served.daemon.endpoint.snapshot() if served.daemon.endpoint else []
        assert snapshot[0].lease_id == served.lease.lease_id
        assert snapshot[0].refused == 6
        # The operator sees the same on the status page and in /status.json.
        async with aiohttp.ClientSession() as s:
            async with s.get(served.daemon.address + "/status.json") as r:
                services = (await r.json())["services"]
            async with s.get(served.daemon.address + "/") as r:
                page = await r.text()
        (row,) = [x for x in services if x["lease_id"] == served.lease.lease_id]
        assert (row["refused"], row["live"]) == (6, True)
        assert row["requests"] >= 2
        assert row["p50_ms"] is not None
        assert 'id="services"' in page
        assert served.lease.lease_id in page

    async def test_a_socket_swapped_for_a_link_to_a_host_socket_is_not_followed(
        self, served: Served, tmp_path: Path
    ) -> None:
        """The service's file is a link to a socket of the host: the provider never connects."""
        host_sock = tmp_path / "h.sock"  # short: a socket path has at most 107 bytes
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(host_sock))
        listener.listen(8)
        listener.setblocking(False)
        code = (
            "import os, time\n"
            f"os.symlink({str(host_sock)!r}, 'svc.sock')\n"
            "print('linked', flush=True)\n"
            "time.sleep(120)\n"
        )
        await served.start(code)
        try:
            for _ in range(50):
                status, body = await call(served.url + "/", served.token())
                await asyncio.sleep(0.1)
            assert status == 503, body
            assert "not a socket" in str(body["error"])
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody ever connected to the host's socket
        finally:
            listener.close()

    async def test_a_socket_name_outside_the_work_dir_is_refused_at_assign(
        self, served: Served
    ) -> None:
        with pytest.raises(InvalidFieldError, match="plain file name"):
            await served.start(SERVICE, socket_name="../../h.sock")
