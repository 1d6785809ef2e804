"""The schemas never promise more than the codec delivers (docs/protocol.md, section 7).

A list the schema allows 100,000 items but the codec refuses past 10,000, or a string
of 65,536 characters the codec refuses past 65,536 bytes, makes a valid message
impossible to receive: the sender builds it, the receiver answers ``too_long``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from protocol import messages as m
from protocol.codec import DEFAULT_LIMITS
from protocol.envelope import open_envelope, seal
from protocol.errors import InvalidFieldError
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES

NOW = 1_700_000_000_000
PROVIDER = Identity.from_seed(bytes(range(32)))
TENANT = Identity.from_seed(bytes(range(1, 33)))
# A character takes at most 4 bytes of UTF-8 (RFC 3629).
MAX_UTF8_PER_CHAR = 4


def _walk(schema: Any, path: str, defs: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(path, keyword, limit) of every length limit in a JSON schema ("maxBytes" for bin)."""
    out: list[tuple[str, str, int]] = []
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            return _walk(defs[name], f"{path}<{name}>", {**defs, name: {}})
        for key in ("maxItems", "maxProperties", "maxLength"):
            if key in schema:
                binary = key == "maxLength" and schema.get("format") == "binary"
                out.append((path, "maxBytes" if binary else key, schema[key]))
        for key, sub in schema.items():
            if key != "$defs":
                out += _walk(sub, f"{path}.{key}", defs)
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            out += _walk(sub, f"{path}[{i}]", defs)
    return out


def limits_of(type_: str) -> list[tuple[str, str, int]]:
    schema = MESSAGE_TYPES[type_].model_json_schema()
    return _walk(schema, type_, schema.get("$defs", {}))


@pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
class TestSchemaWithinCodec:
    def test_no_list_or_map_limit_exceeds_the_codec(self, type_: str) -> None:
        for where, key, limit in limits_of(type_):
            if key in ("maxItems", "maxProperties"):
                assert limit <= DEFAULT_LIMITS.max_container, where

    def test_no_string_limit_in_characters_can_exceed_the_codec_in_bytes(self, type_: str) -> None:
        for where, key, limit in limits_of(type_):
            if key == "maxLength":
                assert limit * MAX_UTF8_PER_CHAR <= DEFAULT_LIMITS.max_str, where
            if key == "maxBytes":
                assert limit <= DEFAULT_LIMITS.max_bin, where


def status(log: str) -> m.TaskStatus:
    return m.TaskStatus(lease_id="lease-9", task_id="t1", state="running", log=log)


class TestByteLimitedStrings:
    """``task_status.log`` and ``task_assign.files`` values: 65,536 bytes of UTF-8."""

    def test_the_largest_log_opens(self) -> None:
        body = status("€" * (DEFAULT_LIMITS.max_str // 3) + "x")  # 65,536 bytes
        raw = seal(PROVIDER, body, now_ms=NOW, nonce=bytes(16), to=TENANT.node_id)
        assert open_envelope(raw, now_ms=NOW, replay=None).body == body

    @pytest.mark.parametrize("text", ["€" * 21_846, "\ufffd" * 60_000, "x" * 65_537])
    def test_a_log_over_65536_bytes_is_refused_when_built(self, text: str) -> None:
        with pytest.raises(ValueError, match="bytes"):
            status(text)

    def test_a_file_over_65536_bytes_is_refused_when_built(self) -> None:
        with pytest.raises(ValueError, match="bytes"):
            m.TaskAssign(
                lease_id="l",
                task_id="t",
                job_spec_hash=hashlib.sha256(b"").hexdigest(),
                workspace_hash=hashlib.sha256(b"").hexdigest(),
                command=["true"],
                timeout_ms=1000,
                files={"params.json": "ü" * 40_000},
            )


class TestMetricInts:
    """Metric ints are signed 64-bit: what every language's int64 holds."""

    @pytest.mark.parametrize("value", [-(2**63), 2**63 - 1, 0, -1])
    def test_signed_64_bit_values_are_accepted(self, value: int) -> None:
        assert m.TaskStatus(
            lease_id="l", task_id="t", state="running", metrics={"n": value}
        ).metrics == {"n": value}

    @pytest.mark.parametrize("value", [2**63, 2**64 - 1, -(2**63) - 1])
    def test_values_outside_int64_are_invalid(self, value: int) -> None:
        with pytest.raises(ValueError, match="signed 64 bits"):
            m.TaskStatus(lease_id="l", task_id="t", state="running", metrics={"n": value})

    def test_a_received_uint64_metric_is_an_invalid_field(self) -> None:
        body = m.TaskResult.model_construct(
            lease_id="l",
            task_id="t",
            state="succeeded",
            exit_code=0,
            metrics={"n": 2**64 - 1},
            usage=m.Usage(wall_ms=1, cpu_ms=1, device_ms=1),
            started_ms=NOW,
            finished_ms=NOW,
            output_hash=None,
            output_truncated=False,
        )
        raw = seal(PROVIDER, body, now_ms=NOW, nonce=bytes(16), to=TENANT.node_id)
        with pytest.raises(InvalidFieldError):
            open_envelope(raw, now_ms=NOW, replay=None)


#: docs/protocol.md section 7: an ``Address`` host is ASCII letters, digits, ``-`` and ``.``
#: (DNS labels or IPv4), or a bracketed IPv6 literal: no other code point, whitespace of
#: any kind included, can appear in one.
HOST_CHARACTERS = {
    ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."
}


class TestAddressCharacters:
    def test_exactly_the_documented_code_points_are_accepted(self) -> None:
        accepted = set()
        for c in [*range(0x3100), 0xFEFF, 0x10FFFF]:
            if 0xD800 <= c <= 0xDFFF:
                continue
            try:
                m.PeerInfo(node_id="a" * 32, address=f"http://a{chr(c)}b", role="provider")
            except ValueError:
                continue
            accepted.add(c)
        assert accepted == HOST_CHARACTERS

    def test_a_trailing_newline_fails(self) -> None:
        with pytest.raises(ValueError, match="pattern"):
            m.PeerInfo(node_id="a" * 32, address="http://a\n", role="provider")
