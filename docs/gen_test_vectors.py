"""Write docs/test-vectors.json: sealed envelopes a compatible client must reproduce.

    python docs/gen_test_vectors.py           # rewrite the file
    python docs/gen_test_vectors.py --check   # exit 1 if the file is out of date

Everything is fixed, so the output is byte-for-byte stable: the two keys are the
RFC 8032 section 7.1 TEST 1 and TEST 2 secret keys (so an Ed25519 library can be
checked against the RFC first), timestamps are a fixed base plus one second per
vector, and nonces are the first 16 bytes of SHA-256 over a fixed label. Bodies hold
no byte-string fields, so each vector is plain JSON. Later vectors refer to earlier
ones by envelope hash (accept -> award, receipt -> task_result, the countersigned
receipt -> the provider's receipt), exactly as the live protocol chains them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

from protocol.codec import encode
from protocol.envelope import open_envelope, seal, signed_bytes
from protocol.errors import ERROR_CLASSES, RemoteProtocolError
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES, body_to_wire
from protocol.replay import ReplayGuard

OUT = Path(__file__).with_name("test-vectors.json")
OUT_NEGATIVE = Path(__file__).with_name("test-vectors-negative.json")

# RFC 8032 section 7.1, TEST 1 and TEST 2 secret keys.
PROVIDER_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
TENANT_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
HOUR_MS = 3_600_000


def _nonce(i: int) -> bytes:
    return hashlib.sha256(b"mercato test vector nonce %d" % i).digest()[:16]


def _sorted_deep(value: Any) -> Any:
    # Key order of the JSON file matches the wire order, for readers comparing the two.
    if isinstance(value, dict):
        return {k: _sorted_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_deep(v) for v in value]
    return value


def build() -> list[dict[str, Any]]:
    """Every vector, in order; later bodies hash earlier envelopes."""
    provider = Identity.from_seed(PROVIDER_SEED)
    tenant = Identity.from_seed(TENANT_SEED)
    p, t = provider.node_id, tenant.node_id
    spec_hash = hashlib.sha256(b"sweep.yaml of the worked example").hexdigest()
    workspace_hash = hashlib.sha256(b"workspace archive of the worked example").hexdigest()
    output_hash = hashlib.sha256(b"trial output").hexdigest()
    vectors: list[dict[str, Any]] = []

    def add(name: str, who: Identity, type_: str, body: dict[str, Any], to: str | None) -> str:
        i = len(vectors)
        ts, nonce = T0 + i * 1000, _nonce(i)
        model = MESSAGE_TYPES[type_].model_validate(body)
        wire = _sorted_deep(body_to_wire(model))
        envelope = seal(who, model, now_ms=ts, nonce=nonce, to=to)
        payload = signed_bytes(
            type_=type_, sender_key=who.public_key, recipient=to, ts_ms=ts, nonce=nonce, body=wire
        )
        opened = open_envelope(envelope, now_ms=ts, replay=None, recipient=to)
        assert opened.body == model  # the generator never publishes a vector it cannot open
        vectors.append(
            {
                "name": name,
                "seed": who.seed().hex(),
                "public_key": who.public_key.hex(),
                "node_id": who.node_id,
                "type": type_,
                "body": wire,
                "recipient": to,
                "timestamp_ms": ts,
                "nonce": nonce.hex(),
                "signed_bytes": payload.hex(),
                "signature": who.sign(payload).hex(),
                "envelope": envelope.hex(),
                "envelope_sha256": opened.digest,
            }
        )
        return opened.digest

    add(
        "tenant says hello to a provider (no address: it may sit behind NAT)",
        tenant,
        "hello",
        {"role": "tenant", "address": None, "agent": "mercato/0.1.0"},
        p,
    )
    add(
        "provider advertises one 8-GPU node, to anyone",
        provider,
        "advert",
        {
            "provider": p,
            "address": "http://203.0.113.7:7400",
            "devices": [
                {
                    # NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOP/s dense BF16.
                    "model": "H100-SXM",
                    "kind": "gpu",
                    "ids": [f"gpu{i}" for i in range(8)],
                    "free": ["gpu2", "gpu3", "gpu7"],
                    "memory_bytes": 80_000_000_000,
                    "fp16_flops": 989_000_000_000_000,
                    "memory_bandwidth": 3_350_000_000_000,
                    "price_floor": 2_100_000,
                }
            ],
            # NVLink 4: 900 GB/s total per GPU, 450 GB/s per direction.
            "interconnect": {"kind": "nvlink", "bandwidth": 450_000_000_000, "gang_size": 8},
            "seq": 42,
            "expires_ms": T0 + 300_000,
        },
        None,
    )
    add(
        "provider answers with the peers it knows",
        provider,
        "peer_list",
        {"peers": [{"node_id": p, "address": "http://203.0.113.7:7400", "role": "provider"}]},
        t,
    )
    add(
        "tenant asks for adverts newer than the two it holds (packed digest)",
        tenant,
        "directory_request",
        {
            # 40-byte records sorted by provider: 32 ASCII node-id bytes, seq u64 BE.
            "digest": b"".join(
                n.encode("ascii") + seq.to_bytes(8, "big")
                for n, seq in sorted([(p, 41), ("a" * 32, 1_763_000_000_123)])
            ),
            "limit": 100,
        },
        p,
    )
    add(
        "tenant calls for bids on 3 GPUs for a sweep",
        tenant,
        "order",
        {
            "order_id": "ord-7f3a",
            "tenant": t,
            "job_spec_hash": spec_hash,
            "workload": "sweep",
            "requirement": {"kind": "gpu", "min_memory_bytes": 24_000_000_000},
            "units": 3,
            "max_price": 2_500_000,
            "bid_deadline_ms": T0 + 6000,
            "expected_flop": 3_000_000_000_000_000_000,
            "lease_ms": HOUR_MS,
        },
        p,
    )
    add(
        "provider bids 2.1 credits per device-hour",
        provider,
        "bid",
        {
            "order_id": "ord-7f3a",
            "bid_id": "bid-01",
            "provider": p,
            "units": 3,
            "devices": ["gpu2", "gpu3", "gpu7"],
            "model": "H100-SXM",
            "price": 2_100_000,
            "expires_ms": T0 + 36_000,
        },
        t,
    )
    add(
        "provider declines to bid on another order",
        provider,
        "no_bid",
        {
            "order_id": "ord-80c1",
            "provider": p,
            "reason": "price_below_floor",
            "detail": "floor is 2.1 credits/device-hour — ask again later",
        },
        t,
    )
    award_hash = add(
        "tenant awards the bid",
        tenant,
        "award",
        {
            "order_id": "ord-7f3a",
            "bid_id": "bid-01",
            "lease_id": "lease-9",
            "provider": p,
            "units": 3,
            "price": 2_100_000,
            "heartbeat_interval_ms": 5000,
            "lease_end_ms": T0 + 8000 + HOUR_MS,
        },
        p,
    )
    add(
        "provider accepts: the award and this accept make the lease",
        provider,
        "accept",
        {
            "lease_id": "lease-9",
            "order_id": "ord-7f3a",
            "award_hash": award_hash,
            "start_ms": T0 + 8500,
        },
        t,
    )
    add(
        "provider declines an award whose devices are gone",
        provider,
        "decline",
        {"lease_id": "lease-10", "order_id": "ord-80c2", "reason": "Gerät belegt"},
        t,
    )
    add(
        "tenant releases a losing bid",
        tenant,
        "release",
        {"order_id": "ord-7f3a", "bid_id": "bid-02", "reason": "lost the auction"},
        p,
    )
    add(
        "tenant assigns a trial",
        tenant,
        "task_assign",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0003",
            "job_spec_hash": spec_hash,
            "workspace_hash": workspace_hash,
            "command": ["python", "train.py", "--lr", "0.001"],
            "env": {"WANDB_MODE": "offline"},
            "timeout_ms": HOUR_MS,
        },
        p,
    )
    add(
        "provider reports the trial running",
        provider,
        "task_status",
        {"lease_id": "lease-9", "task_id": "trial-0003", "state": "running"},
        t,
    )
    add(
        "tenant heartbeats the lease",
        tenant,
        "heartbeat",
        {"lease_id": "lease-9", "seq": 12, "running": ["trial-0003"]},
        p,
    )
    result_hash = add(
        "provider returns the result; metrics mix floats and an int",
        provider,
        "task_result",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0003",
            "state": "succeeded",
            "exit_code": 0,
            # 1520.0 is a float with an integral value: it must stay float 64 on the wire.
            "metrics": {"val_loss": 0.2317, "accuracy": 0.1, "throughput": 1520.0, "epochs": 10},
            "usage": {
                "wall_ms": 61_000,
                "cpu_ms": 58_250,
                "device_ms": 183_000,
                "max_rss_bytes": 2_147_483_648,
                "output_bytes": 5120,
            },
            "started_ms": T0 + 9000,
            "finished_ms": T0 + 70_000,
            "output_hash": output_hash,
        },
        t,
    )
    add(
        "provider reports a trial killed by a signal",
        provider,
        "task_result",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0004",
            "state": "failed",
            "exit_code": -9,
            "usage": {"wall_ms": 1500, "cpu_ms": 1200, "device_ms": 4500},
            "started_ms": T0 + 9000,
            "finished_ms": T0 + 10_500,
        },
        t,
    )
    # ceil(183_000 device-ms x 2_100_000 micro-credits/device-hour / 3_600_000 ms/hour)
    amount = -(-183_000 * 2_100_000 // HOUR_MS)
    receipt = {
        "lease_id": "lease-9",
        "task_id": "trial-0003",
        "provider": p,
        "tenant": t,
        "device_ms": 183_000,
        "price": 2_100_000,
        "amount": amount,
        "result_hash": result_hash,
    }
    receipt_hash = add("provider signs the receipt", provider, "receipt", receipt, t)
    add(
        "tenant countersigns the receipt",
        tenant,
        "receipt",
        {**receipt, "countersigns": receipt_hash},
        p,
    )
    add(
        "tenant cancels the rest of the sweep",
        tenant,
        "cancel",
        {"lease_id": "lease-9", "reason": "sweep finished"},
        p,
    )
    add(
        "provider answers a directory_request: one advert, verbatim, and one it wants",
        provider,
        "directory",
        {
            "adverts": [bytes.fromhex(vectors[1]["envelope"])],
            "wanted": ["a" * 32],
            "more": False,
        },
        t,
    )
    workspace = b"the bytes of a (very small) workspace tar archive"
    add(
        "tenant sends the first (and only) chunk of a workspace",
        tenant,
        "workspace_chunk",
        {
            "lease_id": "lease-9",
            "workspace_hash": hashlib.sha256(workspace).hexdigest(),
            "offset": 0,
            "total_size": len(workspace),
            "data": workspace,
        },
        p,
    )
    add(
        "provider holds the whole workspace, hash verified",
        provider,
        "workspace_status",
        {
            "workspace_hash": hashlib.sha256(workspace).hexdigest(),
            "received": len(workspace),
            "complete": True,
        },
        t,
    )
    add(
        "tenant long-polls a trial for up to 10 s, holding 5120 bytes of its log",
        tenant,
        "task_query",
        {"lease_id": "lease-9", "task_id": "trial-0003", "log_offset": 5120, "wait_ms": 10_000},
        p,
    )
    add(
        "operator sets a price floor on its own daemon (signed by the node's own key)",
        provider,
        "price_update",
        {"floors": {"H100-SXM": 2_300_000}, "reset": False},
        p,
    )
    # Pay as you go: the provider's cumulative note answers a heartbeat 20 s into the
    # lease (3 devices x 20 000 ms); the tenant countersigns it by its envelope hash.
    note = {
        "lease_id": "lease-9",
        "provider": p,
        "tenant": t,
        "seq": 1,
        "device_ms": 60_000,
        "price": 2_100_000,
        "amount": -(-60_000 * 2_100_000 // HOUR_MS),
    }
    note_hash = add(
        "provider's cumulative debit note, the reply to a heartbeat",
        provider,
        "debit_note",
        note,
        t,
    )
    add(
        "tenant countersigns the debit note",
        tenant,
        "debit_note",
        {**note, "countersigns": note_hash},
        p,
    )
    # DiLoCo: a worker's pseudo-gradient (a 20-byte header and two fp32 values).
    blob = b"MDL1" + bytes(4) + (2).to_bytes(4, "little") + (3).to_bytes(4, "little")
    blob += bytes(4) + struct.pack("<2f", 0.5, -0.25)
    add(
        "tenant long-polls worker w0 for its pseudo-gradient of outer step 3",
        tenant,
        "sync_query",
        {"lease_id": "lease-9", "task_id": "w0", "seq": 3, "offset": 0, "wait_ms": 10_000},
        p,
    )
    add(
        "provider hands over the worker's whole pseudo-gradient in one chunk",
        provider,
        "sync_chunk",
        {
            "lease_id": "lease-9",
            "task_id": "w0",
            "seq": 3,
            "blob_hash": hashlib.sha256(blob).hexdigest(),
            "offset": 0,
            "total_size": len(blob),
            "data": blob,
        },
        t,
    )
    add(
        "provider holds the new global parameters for w0, hash verified",
        provider,
        "sync_status",
        {"lease_id": "lease-9", "task_id": "w0", "seq": 3, "received": len(blob), "complete": True},
        t,
    )
    return vectors


# --- negative vectors: input bytes -> the error a receiver must answer ----------------

#: The receiving node's clock for every negative vector (ms).
T_NEG = T0 + 1_000_000


def _neg_nonce(i: int) -> bytes:
    return hashlib.sha256(b"mercato negative vector nonce %d" % i).digest()[:16]


def _signed_map(who: Identity, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (any values, without ``sig``) plus a signature over their canonical bytes."""
    unsigned = {k: v for k, v in fields.items() if k != "sig"}
    return {**unsigned, "sig": who.sign(encode(unsigned))}


def _parts(data: bytes) -> list[Any]:
    """``data`` as a list of hex strings and ``{"repeat": hex, "times": n}`` runs."""
    out: list[Any] = []
    literal = bytearray()
    i = 0
    while i < len(data):
        best_unit, best_times = 0, 0
        for unit in (1, 2, 3, 4):
            piece = data[i : i + unit]
            if len(piece) < unit:
                break
            times = 1
            while data[i + times * unit : i + (times + 1) * unit] == piece:
                times += 1
            if times * unit > best_unit * best_times:
                best_unit, best_times = unit, times
        if best_unit * best_times >= 64:
            if literal:
                out.append(literal.hex())
                literal = bytearray()
            out.append({"repeat": data[i : i + best_unit].hex(), "times": best_times})
            i += best_unit * best_times
        else:
            literal.append(data[i])
            i += 1
    if literal:
        out.append(literal.hex())
    return out


def join_parts(parts: list[Any]) -> bytes:
    """The input bytes of a negative vector (the inverse of ``_parts``)."""
    return b"".join(
        bytes.fromhex(p) if isinstance(p, str) else bytes.fromhex(p["repeat"]) * p["times"]
        for p in parts
    )


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def build_negative(vectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One vector per way the wire layer (codec, envelope, replay guard, schema) rejects.

    The receiver is the provider of the positive vectors, its clock at ``T_NEG``; each
    input has exactly one flaw, so the verification order of section 6 decides nothing
    but the code, and every implementation must answer the same one.
    """
    provider = Identity.from_seed(PROVIDER_SEED)
    tenant = Identity.from_seed(TENANT_SEED)
    p, t = provider.node_id, tenant.node_id
    out: list[dict[str, Any]] = []
    hello = {"address": None, "agent": "mercato/0.1.0", "role": "tenant"}

    def fields(
        type_: str = "hello",
        body: Any = None,
        *,
        who: Identity = tenant,
        to: str | None = p,
        ts: int = T_NEG,
    ) -> dict[str, Any]:
        i = len(out)
        unsigned = {
            "body": hello if body is None else body,
            "from": who.public_key,
            "nonce": _neg_nonce(i),
            "to": to,
            "ts": ts,
            "type": type_,
            "v": 1,
        }
        return _signed_map(who, unsigned)

    def env(type_: str = "hello", body: Any = None, **kw: Any) -> bytes:
        return encode(fields(type_, body, **kw))

    def add(name: str, code: str, data: bytes, step: int, before: tuple[bytes, ...] = ()) -> None:
        guard = ReplayGuard()
        for earlier in before:
            open_envelope(earlier, now_ms=T_NEG, replay=guard, recipient=p)
        # Never publish a vector our own code disagrees with.
        try:
            open_envelope(data, now_ms=T_NEG, replay=guard, recipient=p)
        except RemoteProtocolError as e:
            if e.code != code:
                raise AssertionError(f"{name}: {e}, not {code}") from e
        else:
            raise AssertionError(f"{name}: accepted")
        out.append(
            {
                "name": name,
                "code": code,
                "http_status": ERROR_CLASSES[code].http_status,
                "step": step,
                "receiver": p,
                "now_ms": T_NEG,
                "received_before": [b.hex() for b in before],
                "input": _parts(data),
            }
        )

    good = env()
    # step 1
    add("one byte over 1 MiB", "too_large", good + b"\xc0" * ((1 << 20) + 1 - len(good)), 1)
    # step 2
    add("truncated: the last byte missing", "malformed", good[:-1], 2)
    add("a byte after the envelope", "malformed", env() + b"\xc0", 2)
    add("the reserved byte 0xc1", "malformed", b"\xc1", 2)
    add("an empty message", "malformed", b"", 2)
    data = env()
    ts_at = data.index(b"\xa2ts\xcf") + 3
    add(
        "ts as a msgpack timestamp (ext type -1)",
        "malformed",
        data[:ts_at] + b"\xd6\xff" + (T_NEG // 1000).to_bytes(4, "big") + data[ts_at + 9 :],
        2,
    )
    add("an integer map key", "malformed", _replace_once(env(), b"\xa5agent", b"\x05"), 2)
    add(
        "a string that is not UTF-8",
        "malformed",
        _replace_once(env(), b"mercato/0.1.0", b"mercato/0.1.\xff"),
        2,
    )
    # step 3
    deep: Any = "t"
    for _ in range(14):
        deep = [deep]
    add(
        "17 levels: envelope, body, and a list nested 15 deep",
        "too_deep",
        env("heartbeat", {"lease_id": "lease-9", "running": [deep], "seq": 1}),
        3,
    )
    add(
        "an array of 10,001 items",
        "too_long",
        env("heartbeat", {"lease_id": "lease-9", "running": ["t"] * 10_001, "seq": 1}),
        3,
    )
    add(
        "a string of 65,537 bytes",
        "too_long",
        env("hello", {**hello, "agent": "a" * 65_537}),
        3,
    )
    add(
        "a log of 21,846 characters, 65,538 bytes of UTF-8: strings are counted in bytes",
        "too_long",
        env(
            "task_status",
            {"lease_id": "lease-9", "log": "€" * 21_846, "state": "running", "task_id": "t"},
        ),
        3,
    )
    # step 4
    add(
        "envelope keys not sorted",
        "non_canonical",
        msgpack.packb(dict(reversed(fields().items())), use_bin_type=True),
        4,
    )
    add(
        "uint 8 for the fixint 1",
        "non_canonical",
        _replace_once(env(), b"\xa1v\x01", b"\xa1v\xcc\x01"),
        4,
    )
    add(
        "str 8 for a 5-byte string",
        "non_canonical",
        _replace_once(env(), b"\xa5hello", b"\xd9\x05hello"),
        4,
    )
    status = {"lease_id": "lease-9", "metrics": {"loss": 0.5}, "state": "running", "task_id": "t"}
    half = b"\xcb" + struct.pack(">d", 0.5)
    add(
        "float 32 for 0.5",
        "non_canonical",
        _replace_once(env("task_status", status), half, b"\xca" + struct.pack(">f", 0.5)),
        4,
    )
    add(
        "a NaN float 64",
        "non_canonical",
        _replace_once(
            env("task_status", status), half, b"\xcb" + bytes.fromhex("7ff8000000000000")
        ),
        4,
    )
    add(
        "array 16 for a 1-item array",
        "non_canonical",
        _replace_once(
            env("heartbeat", {"lease_id": "lease-9", "running": ["t"], "seq": 1}),
            b"\x91\xa1t",
            b"\xdc\x00\x01\xa1t",
        ),
        4,
    )
    data = env()
    agent = b"\xa5agent\xadmercato/0.1.0"
    add(
        "the body repeats the key agent",
        "duplicate_key",
        _replace_once(data, b"\x83\xa7address\xc0" + agent, b"\x84\xa7address\xc0" + agent + agent),
        4,
    )
    # steps 5-8
    add("an array, not a map", "bad_envelope", encode(["hello"]), 5)
    add(
        "nonce missing",
        "bad_envelope",
        encode({k: v for k, v in fields().items() if k != "nonce"}),
        5,
    )
    add("an extra key", "bad_envelope", encode(_signed_map(tenant, {**fields(), "x": 1})), 5)
    add(
        "v is true, not an int",
        "bad_envelope",
        encode(_signed_map(tenant, {**fields(), "v": True})),
        6,
    )
    add("v is 2", "bad_version", encode(_signed_map(tenant, {**fields(), "v": 2})), 6)
    add("type is an int", "bad_envelope", encode(_signed_map(tenant, {**fields(), "type": 1})), 7)
    add("an unknown type", "unknown_type", env("gossip"), 7)
    for key, value, why in [
        ("from", tenant.public_key[:31], "from of 31 bytes"),
        ("nonce", bytes(15), "nonce of 15 bytes"),
        ("sig", bytes(63), "sig of 63 bytes"),
        ("ts", str(T_NEG), "ts a string"),
        ("ts", float(T_NEG), "ts a float"),
        ("to", p.upper(), "to not a node id (upper case)"),
        ("body", [], "body an array"),
    ]:
        edited = {**fields(), key: value}
        add(why, "bad_envelope", encode(edited if key == "sig" else _signed_map(tenant, edited)), 8)
    # step 9
    add("ts 120,001 ms behind the receiver", "stale", env(ts=T_NEG - 120_001), 9)
    add("ts 30,001 ms ahead of the receiver", "future", env(ts=T_NEG + 30_001), 9)
    # step 10
    f = fields()
    add(
        "one bit of the signature flipped",
        "bad_signature",
        encode({**f, "sig": bytes([f["sig"][0] ^ 1]) + f["sig"][1:]}),
        10,
    )
    add(
        "from names the provider's key, signed by the tenant's",
        "bad_signature",
        encode({**_signed_map(tenant, {**fields(), "from": provider.public_key})}),
        10,
    )
    add(
        "from is the small-order key 01 00..00 with the universal signature 01 00..00"
        " (docs/weak-key-vectors.json has every weak key)",
        "weak_key",
        encode({**fields(), "from": bytes([1]) + bytes(31), "sig": bytes([1]) + bytes(63)}),
        10,
    )
    # step 11
    add("to names another node", "wrong_recipient", env(to="a" * 32), 11)
    # step 12
    again = env()
    add("the same envelope a second time", "replay", again, 12, (again,))
    # step 13
    add("an unknown body field", "unknown_field", env("hello", {**hello, "admin": True}), 13)
    advert = {**vectors[1]["body"], "provider": t}
    advert["devices"] = [{**advert["devices"][0], "colour": "green"}]
    add("an unknown field in a nested record", "unknown_field", env("advert", advert, to=None), 13)
    add(
        "an unknown field and an invalid one: unknown wins",
        "unknown_field",
        env("hello", {**hello, "role": 7, "zzz": 1}),
        13,
    )
    order = vectors[4]["body"]
    for change, why in [
        ({"units": "3"}, "a string for an int"),
        ({"units": 3.0}, "a float for an int"),
        ({"units": True}, "a bool for an int"),
        ({"units": 0}, "below the minimum"),
        ({"units": 100_001}, "above the maximum"),
        ({"max_price": -1}, "negative money"),
        ({"order_id": "ord-7f3a\n"}, "a pattern with a trailing newline"),
        ({"job_spec_hash": order["job_spec_hash"].upper()}, "a hash in upper case"),
        ({"workload": "mining"}, "not one of the allowed values"),
    ]:
        add(f"order: {why}", "invalid_field", env("order", {**order, **change}), 13)
    add(
        "order: a required field missing",
        "invalid_field",
        env("order", {k: v for k, v in order.items() if k != "units"}),
        13,
    )
    for value, why in [(2**63, "2^63"), (2**64 - 1, "2^64 - 1")]:
        add(
            f"a metric int of {why}: metric ints are signed 64-bit",
            "invalid_field",
            env("task_status", {**status, "metrics": {"n": value}}),
            13,
        )
    add(
        "an address with U+00A0 (addresses are ASCII)",
        "invalid_field",
        env("hello", {**hello, "address": "http://a\u00a0b", "role": "provider"}),
        13,
    )
    # step 14
    add(
        "an order signed by the tenant naming the provider as its tenant",
        "sender_mismatch",
        env("order", {**order, "tenant": p}),
        14,
    )
    return out


def render(vectors: list[dict[str, Any]]) -> str:
    """The file's exact text."""
    return json.dumps(vectors, indent=2, ensure_ascii=False, default=_bin) + "\n"


def _bin(value: object) -> dict[str, str]:
    # JSON has no byte strings: a body's bin value is written {"$bin": "<hex>"}.
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    vectors = build()
    files = {OUT: render(vectors), OUT_NEGATIVE: render(build_negative(vectors))}
    if args.check:
        stale = [path for path, text in files.items() if path.read_text("utf-8") != text]
        for path in stale:
            print(f"{path} is out of date: run python {__file__}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
