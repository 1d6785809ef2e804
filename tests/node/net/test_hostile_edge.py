"""Hostile peers at the HTTP edge and with identities, against real daemons (issue 12).

Part of the hostile-input suite: every test here drives a real daemon on loopback port
0 with a real lying peer (raw sockets that stall, a peer that redirects, a forged key,
a tenant identity that hoards bids) and asserts what a provider operator or an honest
tenant would notice: the daemon keeps answering, a bound holds, a refusal says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.config import HttpSection, MarketSection, NodeConfig, NodeSection
from node.daemon import Daemon
from node.home import READY_FILE
from node.net.addresses import AddressPolicy
from node.net.transport import ENVELOPE_CONTENT_TYPE, HttpTransport
from node.provider.inventory import DeviceDecl
from protocol import codec
from protocol.envelope import Envelope, open_envelope, seal
from protocol.errors import AddressRefusedError, RemoteProtocolError
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Bid,
    Body,
    Decline,
    DeviceGroup,
    Directory,
    Interconnect,
    NoBid,
    Order,
    Requirement,
)

DaemonFactory = Callable[..., Awaitable[Daemon]]
#: Generous bound for "eventually": a daemon that hangs fails here instead of the suite
#: timing out. Never an assertion about speed.
PATIENCE_S = 30.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Start provider daemons (2 simulated GPUs) with ``http``/``market``/``node`` overrides."""
    running: list[Daemon] = []

    async def start(
        *, http: dict[str, Any] | None = None, market: dict[str, Any] | None = None, **node: Any
    ) -> Daemon:
        home = tmp_path / f"home{len(running)}"
        config = NodeConfig(
            node=NodeSection(listen_port=0, home=home, **node),
            http=HttpSection(**(http or {})),
            market=MarketSection(**(market or {})),
            devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=350_000, simulated=True)],
            detect_gpus=False,
        )
        daemon = await Daemon.start(config)
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        await daemon.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def host_port(daemon: Daemon) -> tuple[str, int]:
    host, port = daemon.address.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def healthz(http: aiohttp.ClientSession, address: str) -> dict[str, Any]:
    async with http.get(address + "/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def counter(http: aiohttp.ClientSession, address: str, name: str, code: str) -> float:
    async with http.get(address + "/metrics") as resp:
        text = await resp.text()
    m = re.search(rf'^mercato_{name}_total\{{code="{code}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m[1]) if m else 0.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not await check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


async def connect_from(
    source: str, daemon: Daemon
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the daemon from another loopback address (another "peer")."""
    host, port = host_port(daemon)
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout=PATIENCE_S)


async def exchange(daemon: Daemon, sender: Identity, body: Body) -> Envelope:
    """POST one sealed request, open the signed reply."""
    raw = seal(sender, body, now_ms=now_ms(), nonce=os.urandom(16), to=daemon.node.node_id)
    transport = HttpTransport()
    try:
        reply = await transport.request(daemon.address, raw)
    finally:
        await transport.close()
    return open_envelope(reply, now_ms=now_ms(), replay=None)


def order(tenant: Identity, units: int = 1, **req: Any) -> Order:
    return Order(
        order_id=f"o{os.urandom(6).hex()}",
        tenant=tenant.node_id,
        job_spec_hash="ab" * 32,
        workload="sweep",
        requirement=Requirement(kind="gpu", **req),
        units=units,
        max_price=10**7,
        bid_deadline_ms=now_ms() + 5_000,
        lease_ms=3_600_000,
    )


# --- slow and idle connections ----------------------------------------------------------


class TestSlowAndIdleConnections:
    async def test_a_request_head_dripped_byte_by_byte_is_cut_off(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon(http={"header_timeout_s": 0.5})
        reader, writer = await connect_from("127.0.0.2", daemon)

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in b"POST /p2p HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        dripping = asyncio.create_task(drip())
        try:
            await closed_by_server(reader)  # closed long before the head could finish
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
            writer.close()
        assert (await healthz(http, daemon.address))["status"] == "ok"

    async def test_a_silent_connection_is_closed(self, start_daemon: DaemonFactory) -> None:
        daemon = await start_daemon(http={"header_timeout_s": 0.5})
        reader, writer = await connect_from("127.0.0.2", daemon)
        assert await closed_by_server(reader) == b""
        writer.close()

    async def test_a_stalled_body_is_answered_408_and_counted(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon(http={"body_timeout_s": 0.5})
        reader, writer = await connect_from("127.0.0.2", daemon)
        writer.write(
            b"POST /p2p HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-mercato-envelope\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"\x88" * 100
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), timeout=PATIENCE_S)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"code": "request_timeout"' in answer
        assert await counter(http, daemon.address, "rejections", "request_timeout") == 1

    async def test_one_address_holds_at_most_its_cap_and_healthz_still_answers(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon(http={"max_connections_per_peer": 8})
        held = [await connect_from("127.0.0.2", daemon) for _ in range(40)]
        try:
            refused = 0
            for reader, _ in held[8:]:
                answer = await closed_by_server(reader)
                assert answer.startswith(b"HTTP/1.1 429 ")
                assert b"too_many_connections" in answer
                refused += 1
            assert refused == 32
            assert daemon.gate.held_by("127.0.0.2") == 8
            # Another address (this test's client, 127.0.0.1) is served meanwhile.
            assert (await healthz(http, daemon.address))["status"] == "ok"
            assert await counter(http, daemon.address, "rejections", "too_many_connections") == 32
        finally:
            for _, writer in held:
                writer.close()

    async def test_when_full_a_newcomer_is_served_and_the_biggest_holder_gives_way(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon(http={"max_connections": 20, "max_connections_per_peer": 64})
        held = [await connect_from("127.0.0.2", daemon) for _ in range(20)]
        try:
            await eventually(
                lambda: _true(daemon.gate.held_by("127.0.0.2") == 20), "attacker fills the gate"
            )
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(3):  # three newcomers, each keeping its connection open
                    fresh = await stack.enter_async_context(aiohttp.ClientSession())
                    assert (await healthz(fresh, daemon.address))["status"] == "ok"
                assert daemon.gate.held_by("127.0.0.2") == 17
            assert await counter(http, daemon.address, "rejections", "connection_evicted") >= 3
        finally:
            for _, writer in held:
                writer.close()

    def test_300_idle_connections_at_a_low_fd_limit_do_not_starve_healthz(
        self, tmp_path: Path
    ) -> None:
        """The reported attack: a real `mercato provider run` with 300 descriptors."""
        home = tmp_path / "home"
        config = tmp_path / "provider.toml"
        config.write_text(
            f"[node]\nlisten_port = 0\nhome = {json.dumps(str(home))}\n\n"
            '[[devices]]\nmodel = "RTX-4090"\ncount = 2\nprice_floor = 350000\n'
            "simulated = true\n"
        )

        def low_fd_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

        log = (tmp_path / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "provider", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, "MERCATO_HOME": str(home)},
            preexec_fn=low_fd_limit,
        )
        try:
            deadline = time.monotonic() + PATIENCE_S
            while not (home / READY_FILE).exists():
                assert proc.poll() is None, "daemon exited early"
                assert time.monotonic() < deadline, "daemon never became ready"
                time.sleep(0.05)
            address = json.loads((home / READY_FILE).read_text())["address"]
            asyncio.run(self._attack(address))
        finally:
            proc.terminate()
            proc.wait(timeout=PATIENCE_S)
            log.close()

    async def _attack(self, address: str) -> None:
        host, port = address.removeprefix("http://").rsplit(":", 1)
        held = []
        try:
            for i in range(300):  # from six addresses, as a small botnet would
                source = f"127.0.0.{2 + i % 6}"
                held.append(await asyncio.open_connection(host, int(port), local_addr=(source, 0)))
            await asyncio.sleep(0.5)  # let the daemon accept (or fail to accept) them all
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    assert (await healthz(http, address))["status"] == "ok"
        finally:
            for _, writer in held:
                writer.close()


async def _true(value: bool) -> bool:
    return value


# --- replies larger than one read -------------------------------------------------------


def big_advert(identity: Identity, address: str = "http://127.0.0.1:9") -> bytes:
    """An advert as large as the catalog bounds let one be (market.catalog.check_advert:
    1,024 CPU slots, the most devices one host may advertise), every id 64 characters,
    all free: three of them make a directory reply of several reads."""
    groups = []
    for g in range(64):
        ids = [f"g{g:02d}-{i:03d}-" + "x" * 56 for i in range(16)]
        groups.append(
            DeviceGroup(
                model="cpu",
                kind="cpu",
                ids=ids,
                free=ids,
                memory_bytes=4 * 10**9,
                fp16_flops=96 * 10**9,
                memory_bandwidth=6_400_000_000,
                price_floor=350_000 + g,
                simulated=True,
            )
        )
    advert = Advert(
        provider=identity.node_id,
        address=address,
        devices=groups,
        interconnect=Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=2),
        seq=now_ms(),
        expires_ms=now_ms() + 600_000,
    )
    return seal(identity, advert, now_ms=now_ms(), nonce=os.urandom(16))


class TestLargeReplies:
    async def test_mercato_market_lists_three_maximum_size_adverts(
        self, start_daemon: DaemonFactory, tmp_path: Path
    ) -> None:
        daemon = await start_daemon()
        adverts = [big_advert(Identity.generate()) for _ in range(3)]
        assert all(len(a) > 120_000 for a in adverts)
        pusher = Identity.generate()
        for raw in adverts:  # one per message: each push fits the daemon's 1 MiB cap
            await exchange_no_reply(daemon, pusher, Directory(adverts=[raw]))
        assert len(daemon.node.directory) == 4
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "node.cli",
            "market",
            "--json",
            "--peer",
            daemon.address,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "MERCATO_HOME": str(tmp_path / "tenant-home")},
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=PATIENCE_S * 2)
        assert proc.returncode == 0, err.decode()
        rows = json.loads(out)
        assert len(rows) == 4
        assert sorted(sum(d["count"] for d in r["devices"]) for r in rows) == [2, 1024, 1024, 1024]


async def exchange_no_reply(daemon: Daemon, sender: Identity, body: Body) -> None:
    raw = seal(sender, body, now_ms=now_ms(), nonce=os.urandom(16), to=daemon.node.node_id)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            daemon.address + "/p2p", data=raw, headers={"Content-Type": ENVELOPE_CONTENT_TYPE}
        ) as resp,
    ):
        assert resp.status == 204, await resp.text()


# --- peer addresses (SSRF) --------------------------------------------------------------


class Victim:
    """A service on this host that no peer should be able to make a daemon call."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def start(self, redirect_to: str | None = None) -> Victim:
        async def any_path(request: web.Request) -> web.StreamResponse:
            self.hits.append(request.path_qs)
            if redirect_to is not None:
                raise web.HTTPTemporaryRedirect(redirect_to)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"http://127.0.0.1:{site.port}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def victims() -> AsyncIterator[Callable[..., Awaitable[Victim]]]:
    made: list[Victim] = []

    async def make(redirect_to: str | None = None) -> Victim:
        v = await Victim().start(redirect_to)
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


def advert_naming(identity: Identity, address: str) -> bytes:
    """An advert whose address is whatever the liar wants (model_copy skips validation)."""
    good = Advert(
        provider=identity.node_id,
        address="http://127.0.0.1:9",
        devices=[DeviceGroup(**_group())],
        interconnect=Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=2),
        seq=now_ms(),
        expires_ms=now_ms() + 600_000,
    )
    liar = good.model_copy(update={"address": address})
    return seal(identity, liar, now_ms=now_ms(), nonce=os.urandom(16))


def _group() -> dict[str, Any]:
    return {
        "model": "RTX-4090",
        "kind": "gpu",
        "ids": ["gpu0"],
        "free": ["gpu0"],
        "memory_bytes": 24 * 10**9,
        "fp16_flops": 165 * 10**12,
        "memory_bandwidth": 1008 * 10**9,
        "price_floor": 350_000,
        "simulated": True,
    }


class TestPeerAddresses:
    @pytest.mark.parametrize(
        "suffix",
        ["/admin/delete?confirm=1#", "/internal", "?x=1", "#frag"],
    )
    async def test_an_advert_pointing_at_a_path_is_refused(
        self,
        start_daemon: DaemonFactory,
        victims: Callable[..., Awaitable[Victim]],
        http: aiohttp.ClientSession,
        suffix: str,
    ) -> None:
        daemon = await start_daemon()
        victim = await victims()
        raw = advert_naming(Identity.generate(), victim.address + suffix)
        body = seal(
            Identity.generate(), Directory(adverts=[raw]), now_ms=now_ms(), nonce=os.urandom(16)
        )
        async with http.post(
            daemon.address + "/p2p", data=body, headers={"Content-Type": ENVELOPE_CONTENT_TYPE}
        ) as resp:
            assert resp.status == 204
        # The relayed advert is dropped (counted), so nothing ever learns that address.
        assert await counter(http, daemon.address, "rejections", "invalid_field") == 1
        assert len(daemon.node.directory) == 1  # only the daemon's own advert
        assert victim.address not in " ".join(daemon.node.peers)
        for _ in range(3):  # the daemon pushes news to its peers; the victim hears nothing
            await daemon.node.advertise()
        assert victim.hits == []

    async def test_a_node_refusing_loopback_never_calls_a_loopback_advert(
        self,
        start_daemon: DaemonFactory,
        victims: Callable[..., Awaitable[Victim]],
        http: aiohttp.ClientSession,
    ) -> None:
        daemon = await start_daemon(allow_loopback_peers=False)
        victim = await victims()
        raw = advert_naming(Identity.generate(), victim.address)
        await exchange_no_reply(daemon, Identity.generate(), Directory(adverts=[raw]))

        async def refused() -> bool:
            return await counter(http, daemon.address, "send_failures", "address_refused") > 0

        await eventually(refused, "the daemon tries the advert's address and refuses it")
        assert victim.hits == []

    async def test_a_redirect_is_not_followed(
        self, victims: Callable[..., Awaitable[Victim]]
    ) -> None:
        victim = await victims()
        liar = await victims(redirect_to=victim.address + "/secret?delete=1")
        transport = HttpTransport()
        try:
            with pytest.raises(RemoteProtocolError):
                await transport.request(liar.address, b"envelope")
        finally:
            await transport.close()
        assert liar.hits == ["/p2p"]
        assert victim.hits == []

    @pytest.mark.parametrize(
        "address",
        [
            "http://169.254.169.254",  # cloud metadata: never
            "http://10.0.0.1:80",
            "http://[fd00::1]:80",
            "http://127.0.0.1:9",
            "http://[::ffff:127.0.0.1]:80",
            "http://localhost:9",
        ],
    )
    def test_a_public_node_refuses_metadata_private_and_loopback_hosts(self, address: str) -> None:
        with pytest.raises(AddressRefusedError):
            AddressPolicy(allow_loopback=False, allow_private=False).check(address)

    async def test_the_transport_checks_before_connecting(self) -> None:
        transport = HttpTransport(policy=AddressPolicy(allow_loopback=False))
        try:
            with pytest.raises(AddressRefusedError):
                await transport.request("http://127.0.0.1:9", b"envelope")
        finally:
            await transport.close()

    def test_auto_allows_the_class_of_the_nodes_own_address(self) -> None:
        assert AddressPolicy.for_node("http://127.0.0.1:7400") == AddressPolicy(True, False)
        assert AddressPolicy.for_node("http://192.168.1.5:7400") == AddressPolicy(False, True)
        assert AddressPolicy.for_node("http://8.8.8.8:7400") == AddressPolicy(False, False)
        assert AddressPolicy.for_node("http://node.example:7400") == AddressPolicy(False, False)
        explicit = AddressPolicy.for_node("http://127.0.0.1:7400", loopback=False, private=True)
        assert explicit == AddressPolicy(False, True)


# --- identities -------------------------------------------------------------------------

NEUTRAL_KEY = bytes([1]) + bytes(31)
UNIVERSAL_SIG = bytes([1]) + bytes(63)


class TestIdentities:
    async def test_an_order_signed_by_a_small_order_key_gets_no_bid(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon()
        forger = Identity.generate()
        neutral_id = _node_id(NEUTRAL_KEY)
        body = order(forger).model_copy(update={"tenant": neutral_id})
        env = codec.decode(
            seal(forger, body, now_ms=now_ms(), nonce=os.urandom(16), to=daemon.node.node_id)
        )
        env["from"], env["sig"] = NEUTRAL_KEY, UNIVERSAL_SIG
        async with http.post(
            daemon.address + "/p2p",
            data=codec.encode(env),
            headers={"Content-Type": ENVELOPE_CONTENT_TYPE},
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "weak_key"
        assert daemon.provider is not None
        assert daemon.provider.engine.reservations == {}
        assert await counter(http, daemon.address, "rejections", "weak_key") == 1

    async def test_a_greedy_tenant_cannot_keep_an_honest_one_from_a_bid(
        self, start_daemon: DaemonFactory
    ) -> None:
        daemon = await start_daemon()  # 2 GPUs, default share: 50 % per tenant
        greedy = Identity.generate()
        replies = [(await exchange(daemon, greedy, order(greedy))).body for _ in range(10)]
        assert isinstance(replies[0], Bid)
        refused = [r for r in replies[1:] if isinstance(r, NoBid)]
        assert len(refused) == 9
        assert {r.reason for r in refused} == {"tenant_limit"}
        assert "unawarded bids" in refused[0].detail
        honest = Identity.generate()
        reply = (await exchange(daemon, honest, order(honest))).body
        assert isinstance(reply, Bid), reply

    async def test_a_tenant_that_lets_a_whole_provider_bid_lapse_gets_half_next_time(
        self, start_daemon: DaemonFactory
    ) -> None:
        daemon = await start_daemon(market={"bid_ttl_s": 0.3})
        assert daemon.provider is not None
        engine = daemon.provider.engine
        greedy = Identity.generate()
        first = (await exchange(daemon, greedy, order(greedy, units=2))).body
        assert isinstance(first, Bid)
        assert first.units == 2  # one order may take the whole provider...

        async def lapsed() -> bool:
            return not engine.reservations

        await eventually(lapsed, "the unawarded bid expires")
        again = (await exchange(daemon, greedy, order(greedy, units=2))).body
        assert isinstance(again, Bid)
        assert again.units == 1  # ...but after letting it lapse, only its share
        honest = Identity.generate()
        reply = (await exchange(daemon, honest, order(honest, units=2))).body
        assert isinstance(reply, Bid), reply
        assert reply.units == 1

    async def test_an_award_with_a_one_hour_heartbeat_is_declined(
        self, start_daemon: DaemonFactory
    ) -> None:
        daemon = await start_daemon()  # default bounds: 1-60 s
        tenant = Identity.generate()
        bid = (await exchange(daemon, tenant, order(tenant))).body
        assert isinstance(bid, Bid)
        award = Award(
            order_id=bid.order_id,
            bid_id=bid.bid_id,
            lease_id=f"L{os.urandom(4).hex()}",
            provider=bid.provider,
            units=bid.units,
            price=bid.price,
            heartbeat_interval_ms=3_600_000,
            lease_end_ms=now_ms() + 3_600_000,
        )
        reply = (await exchange(daemon, tenant, award)).body
        assert isinstance(reply, Decline), reply
        assert "heartbeat interval 3600000 ms" in reply.reason
        assert daemon.provider is not None
        assert daemon.provider.engine.leases == {}
        # The bid still stands: the same award with an interval in bounds makes the lease.
        good = award.model_copy(update={"heartbeat_interval_ms": 2_000})
        assert isinstance((await exchange(daemon, tenant, good)).body, Accept)


def _node_id(public_key: bytes) -> str:
    import base64
    import hashlib

    return base64.b32encode(hashlib.sha256(public_key).digest()[:20]).decode().lower()
