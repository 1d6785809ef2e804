"""The canonical codec: one encoding per value, and strict, bounded decoding."""

from __future__ import annotations

import enum
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from protocol.codec import DEFAULT_LIMITS, Limits, decode, encode
from protocol.errors import LocalProtocolError, RemoteProtocolError

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

ints = st.integers(min_value=INT_MIN, max_value=INT_MAX)
floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(st.characters(codec="utf-8"), max_size=40)
scalars = st.none() | st.booleans() | ints | floats | texts | st.binary(max_size=40)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(texts, inner, max_size=6),
    max_leaves=40,
)


def depth(value: Any) -> int:
    """Container nesting as codec.Limits counts it (a scalar is depth 0)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def assert_identical(a: Any, b: Any) -> None:
    """Equality that also tells True from 1, 1.0 from 1 and -0.0 from 0.0."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b)
    else:
        assert a == b


def sorted_deep(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: sorted_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_deep(v) for v in value]
    return value


class TestRoundTrip:
    @given(values)
    def test_decode_of_encode_is_the_value(self, value: Any) -> None:
        assume(depth(value) <= DEFAULT_LIMITS.max_depth)
        assert_identical(decode(encode(value)), sorted_deep(value))

    @given(values)
    def test_encode_of_decode_is_the_bytes(self, value: Any) -> None:
        assume(depth(value) <= DEFAULT_LIMITS.max_depth)
        data = encode(value)
        assert encode(decode(data)) == data

    @given(st.dictionaries(texts, ints, max_size=8))
    def test_key_insertion_order_does_not_change_bytes(self, d: dict[str, int]) -> None:
        assert encode(d) == encode(dict(reversed(list(d.items()))))

    def test_keys_sort_by_utf8_bytes_not_utf16(self) -> None:
        # U+FFFF sorts before U+10000 in UTF-8 and code points, after it in UTF-16 units.
        assert list(decode(encode({"\U00010000": 1, "\uffff": 2}))) == ["\uffff", "\U00010000"]

    def test_tuples_and_subclasses_encode_as_their_base_type(self) -> None:
        class Colour(enum.StrEnum):
            RED = "red"

        class Level(enum.IntEnum):
            HIGH = 3

        assert encode((1, 2)) == encode([1, 2])
        assert encode(Colour.RED) == encode("red")
        assert encode(Level.HIGH) == encode(3)
        assert encode(bytearray(b"ab")) == encode(b"ab")
        assert encode(True) != encode(1)

    @pytest.mark.parametrize(
        ("value", "header"),
        [
            (0, b"\x00"),
            (127, b"\x7f"),
            (128, b"\xcc"),
            (255, b"\xcc"),
            (256, b"\xcd"),
            (65_536, b"\xce"),
            (2**32, b"\xcf"),
            (INT_MAX, b"\xcf"),
            (-1, b"\xff"),
            (-32, b"\xe0"),
            (-33, b"\xd0"),
            (-129, b"\xd1"),
            (-32_769, b"\xd2"),
            (-(2**31) - 1, b"\xd3"),
            (INT_MIN, b"\xd3"),
            (1.0, b"\xcb"),
            ("a" * 31, b"\xbf"),
            ("a" * 32, b"\xd9"),
            ("a" * 256, b"\xda"),
            (b"", b"\xc4"),
            (b"a" * 256, b"\xc5"),
            ([0] * 15, b"\x9f"),
            ([0] * 16, b"\xdc"),
        ],
    )
    def test_shortest_form_is_used(self, value: Any, header: bytes) -> None:
        data = encode(value)
        assert data.startswith(header)
        assert_identical(decode(data), value)


class TestEncodeRefuses:
    @pytest.mark.parametrize(
        "value",
        [
            math.nan,
            math.inf,
            -math.inf,
            INT_MAX + 1,
            INT_MIN - 1,
            {1: "int key"},
            {b"k": "bytes key"},
            {"a": 1, 2: "mixed keys"},
            {1, 2},
            object(),
            [[[math.nan]]],
        ],
    )
    def test_unencodable_values_raise_local_error(self, value: Any) -> None:
        with pytest.raises(LocalProtocolError):
            encode(value)


def f32(x: float) -> bytes:
    return b"\xca" + struct.pack(">f", x)


# Hand-built byte strings: each is what a buggy or hostile peer could send.
REJECTED: list[tuple[str, bytes, str]] = [
    ("unsorted keys", b"\x82\xa1b\x01\xa1a\x02", "non_canonical"),
    ("duplicate keys", b"\x82\xa1a\x01\xa1a\x02", "duplicate_key"),
    ("uint8 for a fixint", b"\xcc\x05", "non_canonical"),
    ("uint16 for a uint8", b"\xcd\x00\xff", "non_canonical"),
    ("int8 for a positive", b"\xd0\x05", "non_canonical"),
    ("int64 for -1", b"\xd3" + b"\xff" * 8, "non_canonical"),
    ("float32", f32(1.5), "non_canonical"),
    ("float64 NaN", b"\xcb" + struct.pack(">d", math.nan), "non_canonical"),
    ("float64 infinity", b"\xcb" + struct.pack(">d", math.inf), "non_canonical"),
    ("str8 for a short string", b"\xd9\x01a", "non_canonical"),
    ("bin16 for a short bin", b"\xc5\x00\x01a", "non_canonical"),
    ("array16 for a short array", b"\xdc\x00\x01\x01", "non_canonical"),
    ("map16 for a short map", b"\xde\x00\x01\xa1a\x01", "non_canonical"),
    ("trailing bytes", b"\xc0\xc0", "malformed"),
    ("empty input", b"", "malformed"),
    ("truncated array", b"\x92\x01", "malformed"),
    ("reserved byte 0xc1", b"\xc1", "malformed"),
    ("invalid UTF-8", b"\xa1\xff", "malformed"),
    ("fixext1", b"\xd4\x05\x00", "malformed"),
    ("zero-length ext8", b"\xc7\x00\x05", "malformed"),
    ("zero-length ext inside a map", b"\x81\xa1a\xc7\x00\x05", "malformed"),
    ("timestamp ext", msgpack.packb(msgpack.Timestamp(1, 0)), "malformed"),
    ("nil map key", b"\x81\xc0\x01", "malformed"),
    ("int map key", b"\x81\x01\x01", "malformed"),
    ("bin map key", b"\x81\xc4\x01a\x01", "malformed"),
    ("bin and str map keys", b"\x82\xa1a\x01\xc4\x01b\x02", "malformed"),
    ("array header claiming 4G items", b"\xdd\xff\xff\xff\xff\x01", "malformed"),
    ("nested 17 deep", b"\x91" * 17 + b"\xc0", "too_deep"),
    ("nested 100000 deep", b"\x91" * 100_000 + b"\xc0", "too_deep"),
]


class TestDecodeRejects:
    @pytest.mark.parametrize(
        ("data", "code"), [(d, c) for _, d, c in REJECTED], ids=[n for n, _, _ in REJECTED]
    )
    def test_each_flaw_has_its_own_code(self, data: bytes, code: str) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            decode(data)
        assert info.value.code == code

    def test_depth_limit_is_inclusive(self) -> None:
        nested: Any = None
        for _ in range(DEFAULT_LIMITS.max_depth):
            nested = [nested]
        assert decode(encode(nested)) == nested
        with pytest.raises(RemoteProtocolError) as info:
            decode(encode([nested]))
        assert info.value.code == "too_deep"

    def test_size_cap_is_checked_before_parsing(self) -> None:
        data = encode(b"x" * 100)
        assert decode(data, Limits(max_size=len(data))) == b"x" * 100
        with pytest.raises(RemoteProtocolError) as info:
            decode(data, Limits(max_size=len(data) - 1))
        assert info.value.code == "too_large"
        assert info.value.http_status == 413
        with pytest.raises(RemoteProtocolError) as info:
            decode(b"\xc1" * (DEFAULT_LIMITS.max_size + 1))  # garbage, but too large first
        assert info.value.code == "too_large"

    @pytest.mark.parametrize(
        ("value", "limits"),
        [
            ("ab", Limits(max_str=1)),
            ("é", Limits(max_str=1)),  # one code point, two UTF-8 bytes
            ({"ab": 1}, Limits(max_str=1)),
            (b"ab", Limits(max_bin=1)),
            ([1, 2], Limits(max_container=1)),
            ({"a": 1, "b": 2}, Limits(max_container=1)),
        ],
    )
    def test_length_limits(self, value: Any, limits: Limits) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            decode(encode(value), limits)
        assert info.value.code == "too_long"

    def test_default_limits_are_the_documented_ones(self) -> None:
        # docs/protocol.md states these numbers; a change here must change the docs.
        documented = Limits(
            max_size=1_048_576,
            max_depth=16,
            max_container=10_000,
            max_str=65_536,
            max_bin=1_048_576,
        )
        assert documented == DEFAULT_LIMITS


class TestDecodeFuzz:
    @given(st.binary(max_size=64))
    def test_random_bytes_decode_or_raise_a_protocol_error(self, data: bytes) -> None:
        try:
            value = decode(data)
        except RemoteProtocolError:
            return
        assert encode(value) == data

    @given(values, st.data())
    def test_mutated_encodings_decode_canonically_or_raise(self, value: Any, data: Any) -> None:
        raw = bytearray(encode(value))
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        try:
            out = decode(bytes(raw))
        except RemoteProtocolError:
            return
        assert encode(out) == bytes(raw)
