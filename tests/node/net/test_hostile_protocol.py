"""Hostile protocol input against a real provider daemon (a subprocess, loopback port 0).

Every class of malformed or hostile envelope is answered with its documented 4xx code
and counted in ``/metrics``; a seeded fuzz run of 20,000 mutated envelopes gets no 5xx,
no request goes unanswered, and afterwards the daemon still answers ``/healthz`` and a
valid request with its memory (RSS, read from ``/proc``) flat.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from node.home import READY_FILE
from node.net.node import Node, NodeSettings
from node.net.transport import ENVELOPE_CONTENT_TYPE, MemoryNetwork
from protocol import codec
from protocol.envelope import open_envelope, seal, signed_bytes
from protocol.identity import Identity
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Bid,
    Body,
    Cancel,
    DeviceGroup,
    Directory,
    DirectoryRequest,
    Heartbeat,
    Hello,
    Interconnect,
    Order,
    PeerList,
    Receipt,
    Release,
    Requirement,
    TaskAssign,
    TaskQuery,
    WorkspaceChunk,
    body_to_wire,
    pack_digest,
)

pytestmark = pytest.mark.cluster

SHA = hashlib.sha256(b"hostile").hexdigest()
MAX_BYTES = 1 << 20
FUZZ_CASES = 20_000
FUZZ_SEED = 20261130
CONCURRENCY = 4
#: Longest any one answer may take; a request left hanging fails the run.
ANSWER_WITHIN_S = 15.0
RSS_GROWTH_LIMIT = 20 << 20


def _from_json(obj: dict[str, Any]) -> Any:
    return bytes.fromhex(obj["$bin"]) if list(obj) == ["$bin"] else obj


#: The published vectors: one valid body of every message type.
VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[3] / "docs" / "test-vectors.json").read_text("utf-8"),
    object_hook=_from_json,
)
#: Types that are only ever replies (docs/protocol.md 7.1), and adverts (inside directory).
REPLY_ONLY = [
    "peer_list",
    "advert",
    "bid",
    "no_bid",
    "accept",
    "decline",
    "task_status",
    "task_result",
    "workspace_status",
    "price_update",
]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class RunningDaemon:
    address: str
    node_id: str
    pid: int
    home: Path

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024


CONFIG = """
detect_gpus = false

[node]
listen_port = 0
home = {home}

[limits]
# The fuzzer signs many envelopes with a few keys: let them reach the handlers.
rate_per_s = 1000000.0
burst = 1000000

[[devices]]
model = "RTX-4090"
count = 2
price_floor = 350000
simulated = true
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """One provider daemon process for the module (``mercato provider run``)."""
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    config = root / "provider.toml"
    config.write_text(CONFIG.format(home=json.dumps(str(home))))
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "provider", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env={**os.environ, "MERCATO_HOME": str(home)},
    )
    try:
        deadline = time.monotonic() + 60
        while not (home / READY_FILE).exists():
            assert proc.poll() is None, f"daemon exited with {proc.returncode}"
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        info = json.loads((home / READY_FILE).read_text())
        yield RunningDaemon(info["address"], info["node_id"], proc.pid, home)
        assert proc.poll() is None, "the daemon died during the tests"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    text = (root / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=ANSWER_WITHIN_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def post(http: aiohttp.ClientSession, d: RunningDaemon, data: Any) -> tuple[int, bytes]:
    if isinstance(data, bytes) and len(data) > 256 * 1024:
        data = io.BytesIO(data)  # aiohttp warns that large raw bytes may block its loop
    async with http.post(
        d.address + "/p2p", data=data, headers={"Content-Type": ENVELOPE_CONTENT_TYPE}
    ) as resp:
        return resp.status, await resp.read()


async def rejections(http: aiohttp.ClientSession, d: RunningDaemon) -> Counter[str]:
    """``mercato_rejections_total`` by code, as a Prometheus scraper reads it."""
    async with http.get(d.address + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    pattern = r'^mercato_rejections_total\{code="([a-z_]+)"\} ([0-9.e+]+)$'
    return Counter({m[1]: int(float(m[2])) for m in re.finditer(pattern, text, re.MULTILINE)})


async def still_serving(http: aiohttp.ClientSession, d: RunningDaemon) -> None:
    async with http.get(d.address + "/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    tenant = Identity.generate()
    status, body = await post(http, d, sealed(tenant, hello(), d.node_id))
    assert status == 200
    reply = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id)
    assert isinstance(reply.body, PeerList)


# --- building hostile envelopes -------------------------------------------------------


def hello() -> Hello:
    return Hello(role="tenant", address=None, agent="hostile/1")


def sealed(who: Identity, body: Body, to: str | None, ts: int | None = None) -> bytes:
    return seal(who, body, now_ms=now_ms() if ts is None else ts, nonce=os.urandom(16), to=to)


def raw_envelope(
    who: Identity,
    type_: str,
    body: Any,
    to: str | None,
    *,
    ts: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Sign any body, valid or not, as a peer with its own encoder would."""
    ts = now_ms() if ts is None else ts
    nonce = os.urandom(16) if nonce is None else nonce
    fields = {"body": body, "from": who.public_key, "nonce": nonce, "to": to, "ts": ts}
    fields |= {"type": type_, "v": 1}
    payload = signed_bytes(
        type_=type_, sender_key=who.public_key, recipient=to, ts_ms=ts, nonce=nonce, body=body
    )
    return codec.encode({**fields, "sig": who.sign(payload)})


def resign(fields: dict[str, Any], who: Identity) -> bytes:
    """Re-sign an edited envelope map, so only the edit is wrong."""
    unsigned = {k: v for k, v in fields.items() if k != "sig"}
    return codec.encode({**unsigned, "sig": who.sign(codec.encode(unsigned))})


def order(tenant: Identity, **changes: Any) -> dict[str, Any]:
    body = Order(
        order_id="ord-1",
        tenant=tenant.node_id,
        job_spec_hash=SHA,
        workload="sweep",
        requirement=Requirement(kind="gpu"),
        units=1,
        max_price=1_000_000,
        bid_deadline_ms=now_ms() + 5000,
        lease_ms=60_000,
    )
    return {**body_to_wire(body), **changes}


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def hostile_cases(d: RunningDaemon) -> dict[str, tuple[Any, int, str]]:
    """name -> (request body, HTTP status, error code), one per class of hostile input."""
    me = Identity.generate()
    good = sealed(me, hello(), d.node_id)
    fields = codec.decode(good)
    stranger = Identity.generate()
    unknown = raw_envelope(me, "gossip_v9", {}, d.node_id)
    long_int = good.replace(b"\xa1v\x01", b"\xa1v\xcc\x01")  # uint 8 for a fixint
    assert long_int != good
    return {
        # truncated: every prefix is not a whole msgpack value
        "truncated_header": (good[:1], 400, "malformed"),
        "truncated_in_body": (good[:40], 400, "malformed"),
        "truncated_last_byte": (good[:-1], 400, "malformed"),
        "empty": (b"", 400, "malformed"),
        "trailing_bytes": (good + b"\xc0", 400, "malformed"),
        "not_msgpack": (b"\xc1" + good[1:], 400, "malformed"),
        "ext_type": (b"\xd4\x01\x00", 400, "malformed"),
        "bin_map_key": (b"\x81\xc4\x01a\x01", 400, "malformed"),
        # oversized
        "oversized": (b"\x00" * (MAX_BYTES + 1), 413, "too_large"),
        "oversized_length_field": (b"\xdb\xff\xff\xff\xff" + b"a" * 64, 400, "malformed"),
        "long_string": (
            raw_envelope(me, "hello", {**body_to_wire(hello()), "agent": "a" * 65_537}, d.node_id),
            400,
            "too_long",
        ),
        "long_array": (
            raw_envelope(
                me, "heartbeat", {"lease_id": "l", "seq": 1, "running": [0] * 10_001}, d.node_id
            ),
            400,
            "too_long",
        ),
        # deep
        "deep_body": (
            raw_envelope(me, "heartbeat", {"lease_id": "l", "seq": 1, "running": nested(15)}, None),
            400,
            "too_deep",
        ),
        "deep_bytes": (b"\x91" * 100_000 + b"\xc0", 400, "too_deep"),
        # wrong types and shapes
        "top_level_array": (codec.encode([1, 2, 3]), 400, "bad_envelope"),
        "missing_field": (
            codec.encode({k: v for k, v in fields.items() if k != "nonce"}),
            400,
            "bad_envelope",
        ),
        "ts_as_string": (resign({**fields, "ts": str(fields["ts"])}, me), 400, "bad_envelope"),
        "bool_version": (resign({**fields, "v": True}, me), 400, "bad_envelope"),
        "short_key": (resign({**fields, "from": me.public_key[:31]}, me), 400, "bad_envelope"),
        "version_2": (resign({**fields, "v": 2}, me), 400, "bad_version"),
        "body_field_type": (
            raw_envelope(me, "hello", {"role": "tenant", "address": None, "agent": 5}, d.node_id),
            400,
            "invalid_field",
        ),
        "body_unknown_field": (
            raw_envelope(me, "hello", {**body_to_wire(hello()), "admin": True}, d.node_id),
            400,
            "unknown_field",
        ),
        "unknown_and_invalid": (
            raw_envelope(me, "hello", {"role": 7, "address": None, "agent": "x", "z": 1}, None),
            400,
            "unknown_field",
        ),
        "address_with_nbsp": (
            raw_envelope(
                me,
                "hello",
                {"role": "provider", "address": "http://a\u00a0b", "agent": "x"},
                None,
            ),
            400,
            "invalid_field",
        ),
        # forged
        "forged_signature": (
            resign({**fields, "from": stranger.public_key}, me),
            401,
            "bad_signature",
        ),
        "flipped_signature": (
            codec.encode({**fields, "sig": bytes([fields["sig"][0] ^ 1]) + fields["sig"][1:]}),
            401,
            "bad_signature",
        ),
        "order_in_anothers_name": (
            raw_envelope(me, "order", order(stranger), d.node_id),
            403,
            "sender_mismatch",
        ),
        "wrong_recipient": (sealed(me, hello(), stranger.node_id), 421, "wrong_recipient"),
        # time
        "stale": (sealed(me, hello(), d.node_id, ts=now_ms() - 600_000), 400, "stale"),
        "future": (sealed(me, hello(), d.node_id, ts=now_ms() + 600_000), 400, "future"),
        "ancient": (sealed(me, hello(), d.node_id, ts=0), 400, "stale"),
        # types
        "unknown_type": (unknown, 400, "unknown_type"),
        "reply_type_as_request": (
            sealed(me, PeerList(peers=[]), d.node_id),
            422,
            "unexpected_message",
        ),
        "operator_type_on_p2p": (
            raw_envelope(me, "price_update", {"floors": {}, "reset": True}, d.node_id),
            422,
            "unexpected_message",
        ),
        # non-canonical
        "unsorted_keys": (
            msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True),
            400,
            "non_canonical",
        ),
        "long_int_form": (long_int, 400, "non_canonical"),
        "float32": (b"\xca\x3f\x80\x00\x00", 400, "non_canonical"),
        "duplicate_key": (b"\x82\xa1a\x01\xa1a\x02", 400, "duplicate_key"),
        # names nothing this provider holds
        "query_unknown_task": (
            sealed(me, TaskQuery(lease_id="lease-x", task_id="t-1"), d.node_id),
            404,
            "not_found",
        ),
        "heartbeat_unknown_lease": (
            sealed(me, Heartbeat(lease_id="lease-x", seq=1), d.node_id),
            422,
            "unexpected_message",
        ),
    }


def case_names() -> list[str]:
    fake = RunningDaemon("http://127.0.0.1:9", Identity.generate().node_id, 0, Path())
    return list(hostile_cases(fake))


class TestHostileInput:
    @pytest.mark.parametrize("case", case_names())
    async def test_each_class_is_answered_with_its_code_and_counted(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession, case: str
    ) -> None:
        data, want_status, want_code = hostile_cases(daemon)[case]
        before = await rejections(http, daemon)
        status, body = await post(http, daemon, data)
        assert (status, json.loads(body)["error"]["code"]) == (want_status, want_code)
        assert json.loads(body)["error"]["reason"]
        after = await rejections(http, daemon)
        assert after - before == Counter({want_code: 1})
        await still_serving(http, daemon)

    @pytest.mark.parametrize("type_", REPLY_ONLY)
    async def test_a_reply_type_sent_as_a_request_is_unexpected(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession, type_: str
    ) -> None:
        """docs/protocol.md 7.1: replies (and adverts) are never requests."""
        me = Identity.generate()
        body = dict(next(v["body"] for v in VECTORS if v["type"] == type_))
        for field in ("provider", "tenant"):  # the signer rules of section 6, step 14
            if field in body and type_ in ("advert", "bid", "no_bid"):
                body[field] = me.node_id
        before = await rejections(http, daemon)
        status, reply = await post(http, daemon, raw_envelope(me, type_, body, daemon.node_id))
        assert (status, json.loads(reply)["error"]["code"]) == (422, "unexpected_message")
        assert (await rejections(http, daemon)) - before == Counter({"unexpected_message": 1})

    async def test_a_replayed_envelope_is_refused_and_counted(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession
    ) -> None:
        raw = sealed(Identity.generate(), hello(), daemon.node_id)
        assert (await post(http, daemon, raw))[0] == 200
        before = await rejections(http, daemon)
        for _ in range(3):
            status, body = await post(http, daemon, raw)
            assert (status, json.loads(body)["error"]["code"]) == (409, "replay")
        assert (await rejections(http, daemon)) - before == Counter({"replay": 3})

    async def test_a_directory_request_naming_more_providers_than_a_list_holds(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession
    ) -> None:
        """12,000 providers the daemon has never heard of: it wants all of them, but one
        ``directory`` holds at most 10,000 (the codec's limit), so it asks for a part."""
        held = {f"{i:0>32}".translate(str.maketrans("0189", "abcd")): 1 for i in range(12_000)}
        tenant = Identity.generate()
        request = DirectoryRequest(digest=pack_digest(held), limit=10)
        status, body = await post(http, daemon, sealed(tenant, request, daemon.node_id))
        assert status == 200, body[:200]
        reply = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id)
        wanted = reply.body.wanted  # type: ignore[attr-defined]
        assert 0 < len(wanted) <= 10_000
        assert set(wanted) <= set(held)


async def lease(http: aiohttp.ClientSession, d: RunningDaemon, tenant: Identity) -> str:
    """Buy one device by the book (order, bid, award, accept); returns the lease id."""
    status, body = await post(http, d, raw_envelope(tenant, "order", order(tenant), d.node_id))
    assert status == 200, body
    bid = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id).body
    assert isinstance(bid, Bid), bid
    lease_id = f"lease-{tenant.node_id[:8]}"
    award = Award(
        order_id=bid.order_id,
        bid_id=bid.bid_id,
        lease_id=lease_id,
        provider=d.node_id,
        units=1,
        price=bid.price,
        heartbeat_interval_ms=10_000,
        lease_end_ms=now_ms() + 60_000,
    )
    status, body = await post(http, d, sealed(tenant, award, d.node_id))
    assert status == 200, body
    accept = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id).body
    assert isinstance(accept, Accept), accept
    return lease_id


def big_advert(who: Identity, groups: int = 64) -> bytes:
    """A valid advert of about 140 KB, as large as the catalog bounds let one be
    (market.catalog.check_advert): 1,024 CPU slots with 64-character ids, all free."""
    devices = []
    for g in range(groups):
        ids = [f"g{g:02d}-{i:0>60}" for i in range(1024 // groups)]
        devices.append(
            DeviceGroup(
                model="cpu",
                kind="cpu",
                ids=ids,
                free=ids,
                memory_bytes=4 * 10**9,
                fp16_flops=96 * 10**9,
                memory_bandwidth=6_400_000_000,
                price_floor=10**6,
                simulated=True,
            )
        )
    advert = Advert(
        provider=who.node_id,
        address="http://127.0.0.1:9",
        devices=devices,
        interconnect=Interconnect(kind="none", bandwidth=0, gang_size=1),
        seq=now_ms(),
        expires_ms=now_ms() + 120_000,
    )
    return sealed(who, advert, None)


class TestLargeAdverts:
    async def test_a_directory_of_large_adverts_is_paged_within_the_size_limit(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession
    ) -> None:
        """Twelve adverts of 140 KB each: a directory answer holding all of them would be
        1.7 MB, which no receiver takes (too_large). The daemon answers in pages that
        fit, and a tenant gets every advert by asking again."""
        pusher = Identity.generate()
        adverts = [big_advert(Identity.generate()) for _ in range(12)]
        assert all(120_000 < len(a) < 300_000 for a in adverts)
        for i in range(0, 12, 4):
            push = Directory(adverts=adverts[i : i + 4])
            status, _ = await post(http, daemon, sealed(pusher, push, daemon.node_id))
            assert status == 204
        tenant = Identity.generate()
        held: dict[str, int] = {}
        for _ in range(10):
            request = DirectoryRequest(digest=pack_digest(held), limit=2000)
            status, body = await post(http, daemon, sealed(tenant, request, daemon.node_id))
            assert status == 200, body[:300]
            assert len(body) <= MAX_BYTES
            page = open_envelope(body, now_ms=now_ms(), replay=None, recipient=tenant.node_id)
            assert isinstance(page.body, Directory)
            for raw in page.body.adverts:
                advert = open_envelope(raw, now_ms=now_ms(), replay=None).body
                assert isinstance(advert, Advert)
                held[advert.provider] = advert.seq
            if not page.body.more:
                break
        providers = {open_envelope(a, now_ms=now_ms(), replay=None).sender for a in adverts}
        assert providers <= set(held)


class TestAdvertBatches:
    def test_pushes_of_large_adverts_fit_the_message_limit(self) -> None:
        """Relayed news goes out in ``directory`` messages each receiver can take."""
        node = Node(
            Identity.generate(),
            NodeSettings(role="bootstrap", address="http://127.0.0.1:9"),
            MemoryNetwork().transport("http://127.0.0.1:9"),
        )
        adverts = [bytes([i]) * 200_000 for i in range(8)] + [b"x" * (2 << 20), b"small"]
        batches = node.advert_batches(adverts)
        for batch in batches:
            message = Directory(adverts=batch)
            assert len(sealed(node.identity, message, None)) <= MAX_BYTES
        assert [a for batch in batches for a in batch] == [*adverts[:8], b"small"]


class TestHostileWork:
    async def test_a_workspace_that_is_not_a_tar_is_refused_with_a_4xx(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession
    ) -> None:
        tenant = Identity.generate()
        lease_id = await lease(http, daemon, tenant)
        data = b"this is not a tar archive" * 100
        chunk = WorkspaceChunk(
            lease_id=lease_id,
            workspace_hash=hashlib.sha256(data).hexdigest(),
            offset=0,
            total_size=len(data),
            data=data,
        )
        before = await rejections(http, daemon)
        status, body = await post(http, daemon, sealed(tenant, chunk, daemon.node_id))
        assert (status, json.loads(body)["error"]["code"]) == (400, "bad_workspace")
        assert (await rejections(http, daemon)) - before == Counter({"bad_workspace": 1})
        release = Release(order_id="ord-1", lease_id=lease_id)
        assert (await post(http, daemon, sealed(tenant, release, daemon.node_id)))[0] == 200
        await still_serving(http, daemon)


# --- fuzzing ---------------------------------------------------------------------------


def headers(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every msgpack length field in ``data`` (size 0: a fix-type byte)."""
    out: list[tuple[int, int]] = []
    i = 0
    pending = 1
    while pending and i < len(data):
        pending -= 1
        b = data[i]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            i += 1
        elif b <= 0x8F:
            out.append((i, 0))
            pending += 2 * (b & 0x0F)
            i += 1
        elif b <= 0x9F:
            out.append((i, 0))
            pending += b & 0x0F
            i += 1
        elif b <= 0xBF:
            out.append((i, 0))
            i += 1 + (b & 0x1F)
        elif b in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            size = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
            out.append((i + 1, size))
            i += 1 + size + int.from_bytes(data[i + 1 : i + 1 + size], "big")
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            size = 2 if b in (0xDC, 0xDE) else 4
            out.append((i + 1, size))
            n = int.from_bytes(data[i + 1 : i + 1 + size], "big")
            pending += 2 * n if b >= 0xDE else n
            i += 1 + size
        elif b in (0xCA, 0xCB):
            i += 5 if b == 0xCA else 9
        elif 0xCC <= b <= 0xD3:
            i += 1 + (1 << ((b - 0xCC) % 4))
        else:
            break
    return out


RANDOM_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    2**64 - 1,
    -(2**63),
    1.5,
    "",
    "x" * 300,
    "\u00a0",
    b"\x00" * 33,
    [],
    [1, "a"],
    {},
    {"a": 1},
    "lease-1",
    SHA,
]


class Fuzzer:
    """Seeded mutations of valid envelopes: every run sends the same inputs."""

    def __init__(self, d: RunningDaemon, seed: int) -> None:
        self.rng = random.Random(seed)
        self.d = d
        self.keys = [Identity.from_seed(hashlib.sha256(b"fuzz %d" % i).digest()) for i in range(4)]
        self.sent: list[bytes] = []

    def corpus(self) -> list[bytes]:
        """Valid envelopes of the types a provider accepts, signed just now."""
        t = self.rng.choice(self.keys)
        to = self.d.node_id
        bodies: list[Body] = [
            hello(),
            DirectoryRequest(digest=pack_digest({t.node_id: 5}), limit=20),
            Order.model_validate(order(t)),
            Award(
                order_id="ord-1",
                bid_id="bid-1",
                lease_id="lease-1",
                provider=to,
                units=1,
                price=400_000,
                heartbeat_interval_ms=5000,
                lease_end_ms=now_ms() + 60_000,
            ),
            Release(order_id="ord-1", bid_id="bid-1"),
            Heartbeat(lease_id="lease-1", seq=3, running=["t-1"]),
            TaskAssign(
                lease_id="lease-1",
                task_id="t-1",
                job_spec_hash=SHA,
                workspace_hash=SHA,
                command=["python", "-c", "print(1)"],
                timeout_ms=1000,
                files={"params.json": "{}"},
            ),
            TaskQuery(lease_id="lease-1", task_id="t-1", wait_ms=0),
            WorkspaceChunk(
                lease_id="lease-1", workspace_hash=SHA, offset=0, total_size=3, data=b"abc"
            ),
            Cancel(lease_id="lease-1"),
            Receipt(
                lease_id="lease-1",
                provider=to,
                tenant=t.node_id,
                device_ms=1000,
                price=400_000,
                amount=112,
                countersigns=SHA,
            ),
        ]
        return [sealed(t, b, to) for b in bodies]

    def mutate(self, base: list[bytes]) -> bytes:
        rng = self.rng
        data = rng.choice(base)
        kind = rng.randrange(8)
        if kind == 0:  # bit flips
            buf = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            return bytes(buf)
        if kind == 1:  # truncation
            return data[: rng.randrange(len(data))]
        if kind == 2:  # splice two envelopes
            other = rng.choice(base)
            return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]
        if kind == 3:  # a corrupt length field
            offset, size = rng.choice(headers(data))
            buf = bytearray(data)
            if size == 0:
                buf[offset] = (buf[offset] & 0xE0) | rng.randrange(32)
            else:
                value = rng.choice([0, 1, (1 << (8 * size)) - 1, rng.getrandbits(8 * size)])
                buf[offset : offset + size] = value.to_bytes(size, "big")
            return bytes(buf)
        if kind == 4:  # random bytes
            return rng.randbytes(rng.randrange(0, 2000))
        if kind == 5:  # replay of an earlier input
            return rng.choice(self.sent) if self.sent else data
        # 6, 7: a body field changed and the envelope signed again: reaches the handlers
        fields = codec.decode(data)
        body = dict(fields["body"])
        key = rng.choice([*body, "extra"])
        body[key] = rng.choice(RANDOM_VALUES)
        if kind == 7 and rng.random() < 0.5:
            body.pop(rng.choice(list(body)))
        who = rng.choice(self.keys)
        return raw_envelope(who, fields["type"], body, fields["to"])

    def inputs(self, n: int) -> Iterator[bytes]:
        base = self.corpus()
        for i in range(n):
            if i % 2000 == 0:  # fresh timestamps, so valid ones stay inside the window
                base = self.corpus()
            data = self.mutate(base)
            if len(self.sent) < 500:
                self.sent.append(data)
            yield data


class TestFuzz:
    async def test_20000_mutated_envelopes_no_5xx_no_hang_flat_memory(
        self, daemon: RunningDaemon, http: aiohttp.ClientSession
    ) -> None:
        fuzzer = Fuzzer(daemon, FUZZ_SEED)
        inputs = fuzzer.inputs(FUZZ_CASES)
        statuses: Counter[int] = Counter()
        server_errors: list[tuple[int, bytes, bytes]] = []
        rss: list[int] = []

        async def worker() -> None:
            for data in inputs:  # one shared generator: each input is sent once
                status, body = await asyncio.wait_for(
                    post(http, daemon, data), timeout=ANSWER_WITHIN_S
                )
                statuses[status] += 1
                if status >= 500:
                    server_errors.append((status, data, body[:300]))
                if sum(statuses.values()) == 2000:
                    rss.append(daemon.rss_bytes())  # after warm-up: caches and pools filled

        async with asyncio.TaskGroup() as tg:
            for _ in range(CONCURRENCY):
                tg.create_task(worker())
        assert sum(statuses.values()) == FUZZ_CASES
        assert not server_errors, server_errors[:3]
        assert set(statuses) <= {200, 204} | set(range(400, 500)), statuses
        await still_serving(http, daemon)
        growth = daemon.rss_bytes() - rss[0]
        assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
