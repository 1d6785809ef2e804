"""docs/test-vectors.json: our code reproduces it, and so does a client built from the docs.

``TestIndependentClient`` uses only msgpack, cryptography and the standard library,
following docs/protocol.md; protocol/ is used only to compare against. If it passes,
the document is enough to write a compatible client.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.envelope import open_envelope, seal, signed_bytes
from protocol.errors import ERROR_CLASSES, RemoteProtocolError, http_status
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES
from protocol.replay import ReplayGuard

#: Codes only the daemon raises (node/), after the wire layer accepted a message.
NODE_CODES = {
    "rate_limited",
    "too_many_connections",
    "request_timeout",
    "unexpected_message",
    "spec_mismatch",
    "not_found",
    "bad_blob",
    "implausible_advert",  # a relayed advert the receiving node will not keep
}

#: docs/protocol.md section 3: weak keys, by the y of their encoding.
DOC_P = 2**255 - 19
DOC_SMALL_ORDER_Y = {
    0,
    1,
    DOC_P - 1,
    0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
    0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
}

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _from_json(obj: dict[str, Any]) -> Any:
    # docs/protocol.md section 11: a body's byte string is written {"$bin": "<hex>"}.
    return bytes.fromhex(obj["$bin"]) if list(obj) == ["$bin"] else obj


VECTORS: list[dict[str, Any]] = json.loads(
    (DOCS / "test-vectors.json").read_text("utf-8"), object_hook=_from_json
)
IDS = [f"{i}-{v['type']}" for i, v in enumerate(VECTORS)]
NEGATIVE: list[dict[str, Any]] = json.loads((DOCS / "test-vectors-negative.json").read_text())
NEGATIVE_IDS = [f"{i}-{v['code']}" for i, v in enumerate(NEGATIVE)]
#: Every code the wire layer (codec, envelope, replay guard, schemas) raises: section 6.
WIRE_CODES = {
    "too_large",
    "malformed",
    "too_deep",
    "too_long",
    "non_canonical",
    "duplicate_key",
    "bad_envelope",
    "bad_version",
    "unknown_type",
    "stale",
    "future",
    "bad_signature",
    "weak_key",
    "wrong_recipient",
    "replay",
    "unknown_field",
    "invalid_field",
    "sender_mismatch",
}


def negative_input(vector: dict[str, Any]) -> bytes:
    """docs/protocol.md section 11: hex strings and {"repeat": hex, "times": n}, joined."""
    return b"".join(
        bytes.fromhex(p) if isinstance(p, str) else bytes.fromhex(p["repeat"]) * p["times"]
        for p in vector["input"]
    )


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_test_vectors", DOCS / "gen_test_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestVectorFile:
    def test_file_is_what_the_generator_writes(self) -> None:
        gen = load_generator()
        assert (DOCS / "test-vectors.json").read_text("utf-8") == gen.render(gen.build())

    def test_negative_file_is_what_the_generator_writes(self) -> None:
        gen = load_generator()
        text = (DOCS / "test-vectors-negative.json").read_text("utf-8")
        assert text == gen.render(gen.build_negative(gen.build()))

    def test_covers_every_message_type(self) -> None:
        assert {v["type"] for v in VECTORS} == set(MESSAGE_TYPES)

    def test_negative_vectors_cover_every_wire_rejection(self) -> None:
        assert {v["code"] for v in NEGATIVE} == WIRE_CODES
        # The wire layer's codes, as the error tree has them: nothing is left out.
        wire = {
            code
            for code, cls in ERROR_CLASSES.items()
            if issubclass(cls, RemoteProtocolError)
            and cls.__module__ == "protocol.errors"
            and code not in NODE_CODES
        }
        assert wire - {"remote_protocol_error"} == WIRE_CODES

    def test_has_a_float_metric_and_a_broadcast(self) -> None:
        floats = [
            x for v in VECTORS if v["type"] == "task_result" for x in v["body"]["metrics"].values()
        ]
        assert any(type(x) is float for x in floats)
        assert any(v["recipient"] is None for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
class TestOurCode:
    def test_identity_from_seed(self, vector: dict[str, Any]) -> None:
        ident = Identity.from_seed(bytes.fromhex(vector["seed"]))
        assert ident.public_key.hex() == vector["public_key"]
        assert ident.node_id == vector["node_id"]

    def test_seal_reproduces_the_envelope(self, vector: dict[str, Any]) -> None:
        ident = Identity.from_seed(bytes.fromhex(vector["seed"]))
        body = MESSAGE_TYPES[vector["type"]].model_validate(vector["body"])
        data = seal(
            ident,
            body,
            now_ms=vector["timestamp_ms"],
            nonce=bytes.fromhex(vector["nonce"]),
            to=vector["recipient"],
        )
        assert data.hex() == vector["envelope"]
        payload = signed_bytes(
            type_=vector["type"],
            sender_key=ident.public_key,
            recipient=vector["recipient"],
            ts_ms=vector["timestamp_ms"],
            nonce=bytes.fromhex(vector["nonce"]),
            body=vector["body"],
        )
        assert payload.hex() == vector["signed_bytes"]
        assert ident.sign(payload).hex() == vector["signature"]

    def test_open_accepts_the_envelope(self, vector: dict[str, Any]) -> None:
        env = open_envelope(
            bytes.fromhex(vector["envelope"]),
            now_ms=vector["timestamp_ms"],
            replay=ReplayGuard(),
            recipient=vector["recipient"],
        )
        assert env.type == vector["type"]
        assert env.sender == vector["node_id"]
        assert env.body.model_dump(mode="python") == vector["body"]
        assert env.digest == vector["envelope_sha256"]


@pytest.mark.parametrize("vector", NEGATIVE, ids=NEGATIVE_IDS)
class TestOurCodeRejects:
    def test_open_raises_the_vectors_code(self, vector: dict[str, Any]) -> None:
        guard = ReplayGuard()
        for earlier in vector["received_before"]:
            open_envelope(
                bytes.fromhex(earlier),
                now_ms=vector["now_ms"],
                replay=guard,
                recipient=vector["receiver"],
            )
        with pytest.raises(RemoteProtocolError) as info:
            open_envelope(
                negative_input(vector),
                now_ms=vector["now_ms"],
                replay=guard,
                recipient=vector["receiver"],
            )
        assert info.value.code == vector["code"]
        assert http_status(info.value) == vector["http_status"]


# --- an independent client, written from docs/protocol.md alone ----------------------


def doc_canonical(value: Any) -> Any:
    """Sort every map's keys by their UTF-8 bytes; msgpack-python keeps insertion order."""
    if isinstance(value, dict):
        return {k: doc_canonical(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list):
        return [doc_canonical(v) for v in value]
    return value


def doc_pack(value: Any) -> bytes:
    # msgpack-python emits the shortest forms; floats stay float 64; bytes become bin.
    out: bytes = msgpack.packb(doc_canonical(value), use_bin_type=True, use_single_float=False)
    return out


def doc_node_id(public_key: bytes) -> str:
    return base64.b32encode(hashlib.sha256(public_key).digest()[:20]).decode().lower()


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
class TestIndependentClient:
    def test_keys_and_node_id(self, vector: dict[str, Any]) -> None:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["seed"]))
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert public.hex() == vector["public_key"]
        assert doc_node_id(public) == vector["node_id"]

    def test_builds_the_same_bytes(self, vector: dict[str, Any]) -> None:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["seed"]))
        unsigned = {
            "v": 1,
            "type": vector["type"],
            "from": bytes.fromhex(vector["public_key"]),
            "to": vector["recipient"],
            "ts": vector["timestamp_ms"],
            "nonce": bytes.fromhex(vector["nonce"]),
            "body": vector["body"],
        }
        payload = doc_pack(unsigned)
        assert payload.hex() == vector["signed_bytes"]
        signature = key.sign(payload)
        assert signature.hex() == vector["signature"]
        envelope = doc_pack({**unsigned, "sig": signature})
        assert envelope.hex() == vector["envelope"]
        assert hashlib.sha256(envelope).hexdigest() == vector["envelope_sha256"]

    def test_verifies_the_envelope(self, vector: dict[str, Any]) -> None:
        envelope = bytes.fromhex(vector["envelope"])
        fields = msgpack.unpackb(envelope, raw=False)
        assert sorted(fields) == ["body", "from", "nonce", "sig", "to", "ts", "type", "v"]
        assert doc_pack(fields) == envelope  # what "canonical" means: re-packing is identity
        sig = fields.pop("sig")
        public = Ed25519PublicKey.from_public_bytes(fields["from"])
        public.verify(sig, doc_pack(fields))  # raises InvalidSignature on failure
        assert doc_node_id(fields["from"]) == vector["node_id"]
        assert fields["body"] == vector["body"]
        assert fields["to"] == vector["recipient"]


# Section 2 (limits), 4 (envelope), 5 (freshness), 6 (order), 7 (type names).
DOC_MAX_SIZE = 1 << 20
DOC_MAX_DEPTH = 16
DOC_MAX_ITEMS = 10_000
DOC_MAX_STR = 65_536
DOC_MAX_BIN = 1 << 20
DOC_WINDOW_MS = 120_000
DOC_SKEW_MS = 30_000
DOC_TYPES = {
    "hello", "peer_list", "advert", "directory_request", "directory", "order", "bid",
    "no_bid", "award", "accept", "decline", "release", "task_assign", "task_status",
    "task_query", "task_result", "workspace_chunk", "workspace_status", "receipt",
    "heartbeat", "cancel", "price_update", "debit_note", "sync_query", "sync_chunk",
    "sync_status",
}  # fmt: skip
DOC_SIGNER_FIELDS = {
    "advert": "provider",
    "bid": "provider",
    "no_bid": "provider",
    "order": "tenant",
}


class DocReject(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Pairs(list[tuple[Any, Any]]):
    """A map as decoded, before duplicates are ruled out."""


def doc_bounds(value: Any, depth: int) -> Any:
    """Steps 2-4 on a decoded value: allowed types, depth, lengths; returns plain dicts."""
    if isinstance(value, Pairs | list):
        if depth + 1 > DOC_MAX_DEPTH:
            raise DocReject("too_deep")
        if len(value) > DOC_MAX_ITEMS:
            raise DocReject("too_long")
    if isinstance(value, Pairs):
        out: dict[str, Any] = {}
        for k, v in value:
            if type(k) is not str:
                raise DocReject("malformed")
            doc_bounds(k, depth + 1)
            if k in out:
                raise DocReject("duplicate_key")
            out[k] = doc_bounds(v, depth + 1)
        return out
    if isinstance(value, list):
        return [doc_bounds(v, depth + 1) for v in value]
    if isinstance(value, str) and len(value.encode()) > DOC_MAX_STR:
        raise DocReject("too_long")
    if isinstance(value, bytes) and len(value) > DOC_MAX_BIN:
        raise DocReject("too_long")
    if isinstance(value, float) and not math.isfinite(value):
        raise DocReject("non_canonical")
    if isinstance(value, msgpack.ExtType | msgpack.Timestamp):
        raise DocReject("malformed")
    return value


def doc_open(data: bytes, now_ms: int, me: str, seen: set[tuple[bytes, bytes]]) -> dict[str, Any]:
    """Steps 1-12 and 14 of section 6 (step 13, the schemas, is left out)."""
    if len(data) > DOC_MAX_SIZE:
        raise DocReject("too_large")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=Pairs)
    except msgpack.StackError as e:
        raise DocReject("too_deep") from e
    except Exception as e:
        raise DocReject("malformed") from e
    env = doc_bounds(raw, 0)
    if doc_pack(env) != data:
        raise DocReject("non_canonical")
    keys = {"body", "from", "nonce", "sig", "to", "ts", "type", "v"}
    if type(env) is not dict or set(env) != keys:
        raise DocReject("bad_envelope")
    if type(env["v"]) is not int:
        raise DocReject("bad_envelope")
    if env["v"] != 1:
        raise DocReject("bad_version")
    if type(env["type"]) is not str:
        raise DocReject("bad_envelope")
    if env["type"] not in DOC_TYPES:
        raise DocReject("unknown_type")
    sizes = {"from": 32, "nonce": 16, "sig": 64}
    if any(type(env[k]) is not bytes or len(env[k]) != n for k, n in sizes.items()):
        raise DocReject("bad_envelope")
    to = env["to"]
    if type(env["ts"]) is not int or type(env["body"]) is not dict:
        raise DocReject("bad_envelope")
    if to is not None and not (type(to) is str and re.fullmatch(r"[a-z2-7]{32}", to)):
        raise DocReject("bad_envelope")
    if env["ts"] < now_ms - DOC_WINDOW_MS:
        raise DocReject("stale")
    if env["ts"] > now_ms + DOC_SKEW_MS:
        raise DocReject("future")
    unsigned = {k: v for k, v in env.items() if k != "sig"}
    y = int.from_bytes(env["from"], "little") & ((1 << 255) - 1)
    if y >= DOC_P or y in DOC_SMALL_ORDER_Y:
        raise DocReject("weak_key")
    try:
        Ed25519PublicKey.from_public_bytes(env["from"]).verify(env["sig"], doc_pack(unsigned))
    except (InvalidSignature, ValueError) as e:
        raise DocReject("bad_signature") from e
    if to is not None and to != me:
        raise DocReject("wrong_recipient")
    if (env["from"], env["nonce"]) in seen:
        raise DocReject("replay")
    seen.add((env["from"], env["nonce"]))
    field = DOC_SIGNER_FIELDS.get(env["type"])
    if field is not None and env["body"].get(field) != doc_node_id(env["from"]):
        raise DocReject("sender_mismatch")
    return env


@pytest.mark.parametrize("vector", NEGATIVE, ids=NEGATIVE_IDS)
class TestIndependentClientRejects:
    def test_same_code_or_left_to_the_schemas(self, vector: dict[str, Any]) -> None:
        seen: set[tuple[bytes, bytes]] = set()
        now, me = vector["now_ms"], vector["receiver"]
        for earlier in vector["received_before"]:
            doc_open(bytes.fromhex(earlier), now, me, seen)
        if vector["code"] in ("unknown_field", "invalid_field"):
            # Step 13 needs the schemas of section 7: the envelope itself is sound.
            doc_open(negative_input(vector), now, me, seen)
            return
        with pytest.raises(DocReject) as info:
            doc_open(negative_input(vector), now, me, seen)
        assert info.value.code == vector["code"]


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_independent_client_accepts_every_positive_vector(vector: dict[str, Any]) -> None:
    me = vector["recipient"] or "a" * 32
    env = doc_open(bytes.fromhex(vector["envelope"]), vector["timestamp_ms"], me, set())
    assert env["type"] == vector["type"]
