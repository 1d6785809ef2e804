"""The daemon over real HTTP on loopback port 0: replies, rejections, metrics, restarts,
and a clean shutdown of ``mercato provider run`` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from market.lifecycle import LeaseState
from node.config import LimitsSection, NodeConfig, NodeSection
from node.daemon import Daemon
from node.home import READY_FILE, NodeHome
from node.net.transport import ENVELOPE_CONTENT_TYPE, HttpTransport
from node.provider.inventory import DeviceDecl
from node.store.node_store import Store
from node.tenant.client import Tenant
from protocol import codec
from protocol.envelope import open_envelope, seal
from protocol.errors import MercatoError
from protocol.identity import Identity
from protocol.messages import Body, Directory, Hello, PeerList, Requirement

AdvertSealer = Callable[..., bytes]
DaemonFactory = Callable[..., Awaitable[Daemon]]
MAX_BYTES = 64 * 1024  # a small cap keeps the oversized bodies small


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_config(home: Path, **limits: Any) -> NodeConfig:
    return NodeConfig(
        node=NodeSection(listen_port=0, home=home),
        limits=LimitsSection(max_message_bytes=MAX_BYTES, **limits),
        devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=350_000, simulated=True)],
        detect_gpus=False,
    )


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Start daemons (home in tmp_path unless given); every one is closed at teardown."""
    running: list[Daemon] = []

    async def start(home: Path | None = None, **limits: Any) -> Daemon:
        daemon = await Daemon.start(make_config(home or tmp_path / "home", **limits))
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        await daemon.close()


@pytest.fixture
async def daemon(start_daemon: DaemonFactory) -> Daemon:
    return await start_daemon()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sealed(body: Body, sender: Identity, to: str | None, ts: int | None = None) -> bytes:
    return seal(sender, body, now_ms=now_ms() if ts is None else ts, nonce=os.urandom(16), to=to)


def hello() -> Hello:
    return Hello(role="tenant", address=None, agent="test/1")


async def post(http: aiohttp.ClientSession, daemon: Daemon, data: Any) -> tuple[int, bytes]:
    async with http.post(
        daemon.address + "/p2p", data=data, headers={"Content-Type": ENVELOPE_CONTENT_TYPE}
    ) as resp:
        return resp.status, await resp.read()


async def rejections(http: aiohttp.ClientSession, daemon: Daemon) -> dict[str, float]:
    """``mercato_rejections_total`` by code, as a Prometheus scraper sees it."""
    async with http.get(daemon.address + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    pattern = r'^mercato_rejections_total\{code="([a-z_]+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


async def healthz(http: aiohttp.ClientSession, daemon: Daemon) -> dict[str, Any]:
    async with http.get(daemon.address + "/healthz") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


def flip_signature(raw: bytes) -> bytes:
    env = codec.decode(raw)
    env["sig"] = bytes([env["sig"][0] ^ 1]) + env["sig"][1:]
    return codec.encode(env)


def unknown_type(_: Daemon) -> bytes:
    return codec.encode(
        {
            "body": {},
            "from": Identity.generate().public_key,
            "nonce": os.urandom(16),
            "sig": bytes(64),
            "to": None,
            "ts": now_ms(),
            "type": "gossip_v9",
            "v": 1,
        }
    )


async def chunks(total: int) -> AsyncIterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length to check first)."""
    sent = 0
    while sent < total:
        piece = min(16 * 1024, total - sent)
        sent += piece
        yield b"\x00" * piece


# case -> (request body for this daemon, HTTP status, error code)
REJECTIONS: dict[str, tuple[Callable[[Daemon], Any], int, str]] = {
    "oversized": (lambda d: b"\x00" * (MAX_BYTES + 1), 413, "too_large"),
    "oversized_chunked": (lambda d: chunks(4 * MAX_BYTES), 413, "too_large"),
    "garbage": (lambda d: b"GET / HTTP/1.1\r\n\r\n", 400, "malformed"),
    "empty": (lambda d: b"", 400, "malformed"),
    "bad_signature": (
        lambda d: flip_signature(sealed(hello(), Identity.generate(), d.node.node_id)),
        401,
        "bad_signature",
    ),
    "stale": (
        lambda d: sealed(hello(), Identity.generate(), d.node.node_id, ts=now_ms() - 600_000),
        400,
        "stale",
    ),
    "future": (
        lambda d: sealed(hello(), Identity.generate(), d.node.node_id, ts=now_ms() + 600_000),
        400,
        "future",
    ),
    "wrong_recipient": (
        lambda d: sealed(hello(), Identity.generate(), Identity.generate().node_id),
        421,
        "wrong_recipient",
    ),
    "unknown_type": (unknown_type, 400, "unknown_type"),
    "unexpected_message": (
        lambda d: sealed(PeerList(peers=[]), Identity.generate(), d.node.node_id),
        422,
        "unexpected_message",
    ),
}


class TestP2P:
    async def test_hello_gets_a_sealed_peer_list(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        tenant = Identity.generate()
        status, body = await post(http, daemon, sealed(hello(), tenant, daemon.node.node_id))
        assert status == 200
        reply = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id)
        assert reply.sender == daemon.node.node_id
        assert reply.recipient == tenant.node_id
        assert isinstance(reply.body, PeerList)

    async def test_a_hello_to_nobody_in_particular_is_answered(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        """A tenant dialling a bootstrap URL does not know the node id yet."""
        status, body = await post(http, daemon, sealed(hello(), Identity.generate(), None))
        assert status == 200
        assert open_envelope(body, now_ms=now_ms(), replay=None).sender == daemon.node.node_id

    @pytest.mark.parametrize("case", list(REJECTIONS))
    async def test_each_rejection_is_typed_counted_and_survived(
        self, daemon: Daemon, http: aiohttp.ClientSession, case: str
    ) -> None:
        build, want_status, want_code = REJECTIONS[case]
        status, body = await post(http, daemon, build(daemon))
        assert status == want_status
        error = json.loads(body)["error"]
        assert error["code"] == want_code
        assert isinstance(error["reason"], str)
        assert error["reason"]
        assert (await rejections(http, daemon)).get(want_code) == 1
        # The daemon keeps serving: health and a valid exchange still work.
        assert (await healthz(http, daemon))["status"] == "ok"
        status, _ = await post(http, daemon, sealed(hello(), Identity.generate(), None))
        assert status == 200

    async def test_a_replayed_envelope_is_refused(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        raw = sealed(hello(), Identity.generate(), daemon.node.node_id)
        assert (await post(http, daemon, raw))[0] == 200
        status, body = await post(http, daemon, raw)
        assert status == 409
        assert json.loads(body)["error"]["code"] == "replay"
        assert (await rejections(http, daemon)) == {"replay": 1}

    async def test_a_flooding_sender_is_rate_limited_and_others_are_not(
        self, start_daemon: DaemonFactory, http: aiohttp.ClientSession
    ) -> None:
        daemon = await start_daemon(rate_per_s=0.001, burst=2)
        flooder = Identity.generate()
        statuses = [(await post(http, daemon, sealed(hello(), flooder, None)))[0] for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        _, body = await post(http, daemon, sealed(hello(), flooder, None))
        assert json.loads(body)["error"]["code"] == "rate_limited"
        assert (await rejections(http, daemon)) == {"rate_limited": 3}
        assert (await post(http, daemon, sealed(hello(), Identity.generate(), None)))[0] == 200

    async def test_many_bad_requests_in_a_row_leave_it_serving(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        for build, want_status, _ in REJECTIONS.values():
            for _ in range(3):
                assert (await post(http, daemon, build(daemon)))[0] == want_status
        counts = await rejections(http, daemon)
        expected = Counter(code for _, _, code in REJECTIONS.values())
        assert counts == {code: 3 * n for code, n in expected.items()}
        assert (await healthz(http, daemon))["status"] == "ok"


class TestHealthAndHome:
    async def test_healthz_says_who_and_what(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        info = await healthz(http, daemon)
        assert info["node_id"] == daemon.node.node_id
        assert info["role"] == "provider"
        assert info["address"] == daemon.address
        assert info["address"].startswith("http://127.0.0.1:")
        assert not info["address"].endswith(":0")
        assert info["devices"] == [{"model": "RTX-4090", "kind": "gpu", "count": 2, "free": 2}]
        assert info["adverts"] == 1  # its own
        assert info["pid"] == os.getpid()

    async def test_the_ready_file_matches_healthz(
        self, daemon: Daemon, http: aiohttp.ClientSession
    ) -> None:
        ready = json.loads((daemon.home.path / READY_FILE).read_text())
        info = await healthz(http, daemon)
        assert ready["address"] == info["address"]
        assert ready["node_id"] == info["node_id"]

    async def test_the_identity_key_is_private(self, daemon: Daemon) -> None:
        key = daemon.home.key_path
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    async def test_a_restart_keeps_the_node_id_and_the_stored_adverts(
        self,
        tmp_path: Path,
        http: aiohttp.ClientSession,
        sealed_advert: AdvertSealer,
    ) -> None:
        home = tmp_path / "home"
        first = await Daemon.start(make_config(home))
        try:
            node_id = first.node.node_id
            # A foreign advert arrives by push; it must survive the restart.
            other = Identity.generate()
            advert = sealed_advert(other, seq=7, expires_ms=now_ms() + 600_000, now_ms=now_ms())
            push = sealed(Directory(adverts=[advert]), Identity.generate(), node_id)
            assert (await post(http, first, push))[0] == 204
            assert other.node_id in first.node.directory
        finally:
            await first.close()
        assert not (home / READY_FILE).exists()

        second = await Daemon.start(make_config(home))
        try:
            assert second.node.node_id == node_id
            assert NodeHome(home).load_or_create_identity().node_id == node_id
            entry = second.node.directory.get(other.node_id)
            assert entry is not None
            assert entry.seq == 7
            assert entry.envelope == advert
            async with http.get(second.address + "/directory.json") as resp:
                providers = (await resp.json())["providers"]
            assert sorted(providers) == sorted([node_id, other.node_id])
        finally:
            await second.close()

    async def test_a_restart_with_many_unresponsive_stored_peers_advertises_promptly(
        self, tmp_path: Path
    ) -> None:
        """Stored peers that accept a connection and never answer each cost a request
        timeout (3 s); the daemon must not wait those out in turn before it advertises."""
        home = tmp_path / "home"
        first = await Daemon.start(make_config(home))
        node_id = first.node.node_id
        await first.close()
        silent = []
        for _ in range(20):  # listening, never accepting: requests hang until timeout
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            silent.append(sock)
        try:
            with Store(home / "node.sqlite") as store:
                for i, sock in enumerate(silent):
                    address = f"http://127.0.0.1:{sock.getsockname()[1]}"
                    store.upsert_peer(f"{i:a>32}", address, "provider", now_ms=now_ms())
            started = time.monotonic()
            second = await Daemon.start(make_config(home))
            try:
                took = time.monotonic() - started
                own = second.node.directory.get(node_id)
                assert own is not None
                assert own.advert.expires_ms > now_ms()
                assert len(second.node.peers) == 20
            finally:
                await second.close()
        finally:
            for sock in silent:
                sock.close()
        # Before: 20 x 3 s in turn. Now a few peers at once: one timeout, plus start-up.
        assert took < 2 * 3.0 + 2.0, f"start took {took:.1f} s"

    async def test_a_restart_holds_the_leases_it_had_sold(self, tmp_path: Path) -> None:
        """A provider that restarts must not sell a leased device a second time."""
        home = tmp_path / "home"
        transport = HttpTransport()
        store = Store(tmp_path / "tenant.sqlite")
        buyer = Tenant(Identity.generate(), store, transport)
        other = Tenant(Identity.generate(), Store(tmp_path / "other.sqlite"), transport)
        want = Requirement(kind="gpu")
        try:
            first = await Daemon.start(make_config(home))
            try:
                await buyer.refresh(first.address)
                report = await buyer.auction(want, 1, 1_000_000, job_spec_hash="ab" * 32)
                assert [x.units for x in report.leases] == [1], report.failure
            finally:
                await first.close()
            lease = store.list_leases(LeaseState.ACTIVE)[0]

            second = await Daemon.start(make_config(home))
            try:
                engine = second.provider.engine if second.provider else None
                assert engine is not None
                assert engine.held_by(lease.lease_id) == lease.devices
                assert len(engine.free) == 1  # of 2 RTX-4090
                # The one free device can be sold; the leased one cannot, a second time.
                await other.refresh(second.address)
                free = [g.free for a in other.adverts() for g in a.devices]
                assert free == [[d for d in ("gpu0", "gpu1") if d not in lease.devices]]
                report = await other.auction(want, 2, 1_000_000, job_spec_hash="cd" * 32)
                assert [x.units for x in report.leases] == [1]  # a partial fill: 1 of 2
                sold = other.store.list_leases(LeaseState.ACTIVE)[0].devices
                assert not set(sold) & set(lease.devices), "sold a leased device twice"
                assert engine.free == set()
                # The first tenant's lease still works: heartbeats, then a billed release
                # (port 0 gave the daemon a new port; its advert tells the tenant).
                await buyer.refresh(second.address)
                assert await buyer.heartbeat(lease)
                receipt = await buyer.release(lease)
                assert receipt.amount > 0
                assert engine.free == set(lease.devices)
            finally:
                await second.close()
        finally:
            await transport.close()
            store.close()


def provider_toml(home: Path) -> str:
    return f"""
detect_gpus = false

[node]
listen_port = 0
home = {json.dumps(str(home))}

[[devices]]
model = "Bow-IPU"
count = 4
price_floor = 900000
simulated = true
"""


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


class TestProviderRunProcess:
    def test_sigterm_shuts_down_cleanly(self, tmp_path: Path) -> None:
        home = tmp_path / "home"
        config = tmp_path / "provider.toml"
        config.write_text(provider_toml(home))
        stderr = (tmp_path / "stderr.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "provider", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, "MERCATO_HOME": str(home)},
        )
        try:
            wait_for_file(home / READY_FILE, proc, timeout_s=30)
            info = json.loads((home / READY_FILE).read_text())
            with urllib.request.urlopen(info["address"] + "/healthz", timeout=5) as resp:
                health = json.loads(resp.read())
            assert health["status"] == "ok"
            assert health["devices"] == [{"model": "Bow-IPU", "kind": "ipu", "count": 4, "free": 4}]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr.close()
        log = (tmp_path / "stderr.log").read_text()
        assert "Traceback" not in log
        assert "shutting down" in log
        assert not (home / READY_FILE).exists()
        # Nothing holds the store: another writer gets the lock at once.
        conn = sqlite3.connect(home / "node.sqlite", timeout=0)
        try:
            conn.execute("CREATE TABLE probe (x INTEGER)")
            conn.execute("INSERT INTO probe VALUES (1)")
            conn.commit()
            stored = conn.execute("SELECT count(*) FROM adverts").fetchone()[0]
        finally:
            conn.close()
        assert stored == 1  # its own advert was persisted


async def test_close_is_idempotent_and_frees_the_port(start_daemon: DaemonFactory) -> None:
    daemon = await start_daemon()
    address = daemon.address
    await daemon.close()
    await daemon.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(address + "/healthz") as resp:
            await resp.read()
    await asyncio.sleep(0)


def _open_files(path: Path) -> int:
    """How many of this process's descriptors are open on ``path`` (or its -wal/-shm)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(str(path)):
                count += 1
    return count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestStartCannotLeak:
    """A start that fails late undoes every earlier step: port free, store closed."""

    async def test_a_failed_ready_file_frees_the_port_and_closes_the_store(
        self, tmp_path: Path
    ) -> None:
        home = tmp_path / "home"
        home.mkdir()
        # The very last step fails for real: the ready file's temporary name is taken
        # by a directory (root ignores file modes, so a read-only home would not do).
        (home / (READY_FILE + ".tmp")).mkdir()
        port = _free_port()
        config = NodeConfig(
            node=NodeSection(listen_host="127.0.0.1", listen_port=port, home=home),
            devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=350_000, simulated=True)],
            detect_gpus=False,
        )
        with pytest.raises(MercatoError, match=r"daemon\.json"):
            await Daemon.start(config)
        store_path = NodeHome(home).store_path
        assert _open_files(store_path) == 0, "the store stayed open"
        with socket.socket() as s:  # the port is free again (SO_REUSEADDR, as the daemon)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        # And a second daemon on the same home and port starts and serves.
        (home / (READY_FILE + ".tmp")).rmdir()
        daemon = await Daemon.start(config)
        try:
            async with aiohttp.ClientSession() as s, s.get(daemon.address + "/healthz") as r:
                assert r.status == 200
            assert (home / READY_FILE).exists()
        finally:
            await daemon.close()
        assert not (home / READY_FILE).exists()
        assert _open_files(store_path) == 0
