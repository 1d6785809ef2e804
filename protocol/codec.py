"""Canonical, bounded msgpack.

Every value has exactly one encoding, so that a signature over bytes is a
signature over a value:

* nil, bool, int (-2**63 .. 2**64-1), float (finite, always float 64), str (UTF-8),
  bin, array and map are the only types; ext types and float 32 are not allowed;
* integers, strings, binaries, arrays and maps use the shortest msgpack form
  (this is what msgpack's reference packers emit);
* map keys are strings, unique, sorted by their UTF-8 bytes (equal to code point
  order, since UTF-8 preserves it).

Decoding is strict: the input is size-capped before it is parsed, then depth and
every length are checked, then the value is re-encoded and compared byte for byte
with the input, which rejects every non-canonical form (unsorted or duplicate keys,
long integer forms, float 32, str8 for a short string, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import (
    DuplicateKeyError,
    LocalProtocolError,
    MalformedError,
    NonCanonicalError,
    TooDeepError,
    TooLargeError,
    TooLongError,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every decoded message (all inclusive)."""

    max_size: int = 1 << 20  # whole message, bytes
    max_depth: int = 16  # nesting of arrays and maps; a scalar at top level is depth 0
    max_container: int = 10_000  # elements of one array, or pairs of one map
    max_str: int = 64 * 1024  # bytes of one UTF-8 string
    max_bin: int = 1 << 20  # bytes of one byte string


DEFAULT_LIMITS = Limits()

_packer = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)


# Types that pack as they are. Integers outside msgpack's 64 bits are refused by the
# packer itself (OverflowError), which every packing function here turns into a
# LocalProtocolError, so the walk need not compare each integer in Python.
_SCALAR = frozenset({str, bytes, bool, int, type(None)})


def _canon(value: Any, depth: int) -> Any:
    """Return ``value`` with every map rebuilt in sorted key order; refuse foreign types."""
    # Exact type checks first: they are the hot path and exclude bool-as-int surprises.
    # Scalars are handled inline in the loops: a call per scalar would double the cost.
    t = type(value)
    if t in _SCALAR:
        return value
    if t is dict:
        if depth >= 64:
            raise LocalProtocolError("value nests too deeply to encode")
        out = {}
        for k in sorted(value):
            if type(k) is not str:
                raise LocalProtocolError(f"map key {k!r} is not a string")
            v = value[k]
            out[k] = v if type(v) in _SCALAR else _canon(v, depth + 1)
        return out
    if t is list or t is tuple:
        if depth >= 64:
            raise LocalProtocolError("value nests too deeply to encode")
        items = []
        for v in value:
            items.append(v if type(v) in _SCALAR else _canon(v, depth + 1))
        return items
    if t is float:
        if not math.isfinite(value):
            raise LocalProtocolError("NaN and infinities have no canonical encoding")
        return value
    # Subclasses (str enums, IntEnum, bytearray, ...) are normalised to their base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, float):
        return _canon(float(value), depth)
    raise LocalProtocolError(f"type {t.__name__} cannot be encoded")


def canonical(value: Any) -> Any:
    """``value`` in canonical form (maps sorted, subclasses normalised), ready to pack.

    Raises LocalProtocolError for values that have no encoding, except integers outside
    msgpack's 64 bits, which ``pack_canonical`` refuses. Lets a caller that packs the
    same value more than once, or in parts (``seal``), pay for the walk only once.
    """
    try:
        return _canon(value, 0)
    except TypeError as e:  # sorting map keys of mixed types
        raise LocalProtocolError(f"map keys must all be strings ({e})") from e


def pack_canonical(value: Any) -> bytes:
    """Pack a value that is already canonical: the result of ``canonical`` or ``decode``.

    No walk: maps are packed in their own order, so a map whose keys are not sorted
    gives non-canonical bytes. Removing keys from a canonical map keeps it canonical;
    adding keys does not (insertion order). Raises LocalProtocolError for an integer
    outside msgpack's 64 bits (-2**63 .. 2**64-1).
    """
    try:
        data: bytes = _packer.pack(value)
    except OverflowError as e:
        raise LocalProtocolError(f"an integer does not fit msgpack's 64 bits ({e})") from e
    except (ValueError, TypeError) as e:  # not from canonical() or decode()
        raise LocalProtocolError(f"cannot encode: {e}") from e
    return data


def encode(value: Any) -> bytes:
    """Encode ``value`` canonically. Raises LocalProtocolError for unencodable values."""
    return pack_canonical(canonical(value))


def _check_bounds(value: Any, limits: Limits) -> None:
    """Depth, length and float checks on a decoded value, iteratively (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is dict:
            if depth + 1 > limits.max_depth:
                raise TooDeepError(f"nesting deeper than {limits.max_depth}")
            if len(v) > limits.max_container:
                raise TooLongError(f"map with {len(v)} pairs exceeds {limits.max_container}")
            keys = list(v)
            if any(type(k) is not str for k in keys):
                # msgpack's strict_map_key still lets bin keys through.
                raise MalformedError("map keys must be strings")
            if keys != sorted(keys):
                raise NonCanonicalError("map keys are not sorted by their UTF-8 bytes")
            for k, item in v.items():
                if len(k) > limits.max_str:
                    raise TooLongError(f"map key longer than {limits.max_str} characters")
                if type(item) in (dict, list):
                    stack.append((item, depth + 1))
                else:
                    _check_scalar(item, limits)
        elif t is list:
            if depth + 1 > limits.max_depth:
                raise TooDeepError(f"nesting deeper than {limits.max_depth}")
            if len(v) > limits.max_container:
                raise TooLongError(f"array of {len(v)} items exceeds {limits.max_container}")
            for item in v:
                if type(item) in (dict, list):
                    stack.append((item, depth + 1))
                else:
                    _check_scalar(item, limits)
        else:
            _check_scalar(v, limits)


def _check_scalar(v: Any, limits: Limits) -> None:
    t = type(v)
    if t is str:
        # len() counts code points; the limit is on UTF-8 bytes, which are >= code points.
        if len(v) > limits.max_str or len(v.encode()) > limits.max_str:
            raise TooLongError(f"string longer than {limits.max_str} bytes")
    elif t is bytes:
        if len(v) > limits.max_bin:
            raise TooLongError(f"byte string longer than {limits.max_bin} bytes")
    elif t is float:
        if not math.isfinite(v):
            raise NonCanonicalError("NaN and infinities are not allowed")
    elif t is not int and t is not bool and v is not None:
        # A zero-length ext passes max_ext_len=0 and would re-encode identically.
        raise MalformedError(f"type {t.__name__} is not allowed")


_NESTED_OR_FLOAT = frozenset({dict, list, float})

# Beyond this depth limit decode() walks iteratively (_check_bounds): _check_shape
# recurses once per level and must stay far below Python's recursion limit.
_MAX_RECURSIVE_DEPTH = 64


def _check_shape(value: Any, depth: int, max_depth: int) -> None:
    """``_check_bounds`` for a message no longer than any length limit.

    Every byte of a string, byte string or map key lies inside the message, and every
    element of a container takes at least one byte of it, so in such a message no
    length can exceed its limit: only depth, map keys (strings, sorted) and floats
    are left to check. ``value`` is a map or an array at nesting level ``depth``.
    Ext values never get here (``_reject_ext``).
    """
    if depth > max_depth:
        raise TooDeepError(f"nesting deeper than {max_depth}")
    if type(value) is dict:
        prev = ""  # every string sorts at or after ""
        for k, item in value.items():
            if type(k) is not str or k < prev:
                if type(k) is not str:  # msgpack's strict_map_key lets bin keys through
                    raise MalformedError("map keys must be strings")
                raise NonCanonicalError("map keys are not sorted by their UTF-8 bytes")
            prev = k
            if type(item) in _NESTED_OR_FLOAT:
                _check_nested(item, depth, max_depth)
    else:
        for item in value:
            if type(item) in _NESTED_OR_FLOAT:
                _check_nested(item, depth, max_depth)


def _check_nested(item: Any, depth: int, max_depth: int) -> None:
    """A float or a container found inside a container at level ``depth``."""
    if type(item) is float:
        if not math.isfinite(item):
            raise NonCanonicalError("NaN and infinities are not allowed")
    else:
        _check_shape(item, depth + 1, max_depth)


def _reject_ext(code: int, data: bytes) -> Any:
    # max_ext_len=0 still lets a zero-length ext through, which would re-encode as is.
    raise MalformedError(f"ext type {code} is not allowed")


def _reject_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"map repeats the key {k!r}")
        out[k] = v
    return out


def _diagnose(data: bytes) -> None:
    """Slow path, only after a canonical mismatch: name duplicates precisely."""
    try:
        msgpack.unpackb(data, raw=False, object_pairs_hook=_reject_duplicates)
    except DuplicateKeyError:
        raise
    except Exception:  # the mismatch itself is reported by the caller
        return


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one canonical msgpack value, or raise a RemoteProtocolError with a code."""
    if len(data) > limits.max_size:
        raise TooLargeError(f"{len(data)} bytes exceeds the cap of {limits.max_size}")
    try:
        # msgpack's own limits default to len(data), so a forged container header can
        # never make it pre-allocate more than the input could fill.
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except msgpack.ExtraData as e:
        raise MalformedError("trailing bytes after the value") from e
    except msgpack.StackError as e:
        raise TooDeepError("nesting deeper than the decoder's stack") from e
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # UnicodeDecodeError, OutOfData, FormatError, ext or non-string map key.
        raise MalformedError(f"not valid protocol msgpack ({type(e).__name__})") from e
    n = len(data)
    if (
        n <= limits.max_str
        and n <= limits.max_bin
        and n <= limits.max_container
        and limits.max_depth <= _MAX_RECURSIVE_DEPTH
    ):
        if type(value) in _NESTED_OR_FLOAT:
            _check_nested(value, 0, limits.max_depth)
    else:
        _check_bounds(value, limits)
    # Keys are known sorted now; packing the value as decoded reproduces the input only
    # if every integer, string, float and header used its one canonical form and no
    # key was repeated (a repeated key shrinks the dict, so the bytes differ).
    if _packer.pack(value) != data:
        _diagnose(data)
        raise NonCanonicalError("valid msgpack but not the canonical encoding of its value")
    return value
