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
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.envelope import open_envelope, seal, signed_bytes
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES
from protocol.replay import ReplayGuard

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _from_json(obj: dict[str, Any]) -> Any:
    # docs/protocol.md section 11: a body's byte string is written {"$bin": "<hex>"}.
    return bytes.fromhex(obj["$bin"]) if list(obj) == ["$bin"] else obj


VECTORS: list[dict[str, Any]] = json.loads(
    (DOCS / "test-vectors.json").read_text("utf-8"), object_hook=_from_json
)
IDS = [f"{i}-{v['type']}" for i, v in enumerate(VECTORS)]


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

    def test_covers_the_main_message_types(self) -> None:
        types = {v["type"] for v in VECTORS}
        wanted = {"advert", "order", "bid", "no_bid", "award", "accept", "task_result"}
        assert wanted | {"receipt", "heartbeat"} <= types
        assert types <= set(MESSAGE_TYPES)

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
