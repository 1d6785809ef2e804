"""Small-order and non-canonical Ed25519 public keys are refused before any signature check.

RFC 8032 verification alone accepts ``01 00..00`` (the neutral point) with the signature
``01 00..00 | 00..00`` for every message: anyone could sign as that key. The refusal is
checked against the curve itself (pure-Python point arithmetic, slow but obviously right)
and against the negative vectors in docs/negative-vectors.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import codec
from protocol.envelope import open_envelope, seal
from protocol.errors import ERROR_CLASSES, BadSignatureError, WeakKeyError
from protocol.identity import SMALL_ORDER_Y, Identity, check_public_key, verify
from protocol.messages import Hello

P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P
DOCS = Path(__file__).resolve().parents[2] / "docs"
NEGATIVE = DOCS / "weak-key-vectors.json"
NEUTRAL_KEY = bytes([1]) + bytes(31)
#: R = the neutral point, S = 0: verifies under any small-order key, for any message.
UNIVERSAL_SIG = bytes([1]) + bytes(63)


def _x_of(y: int, sign: int) -> int | None:
    """Recover x from y (RFC 8032 section 5.1.3); None when y is not on the curve."""
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == (-u) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    if v * x * x % P != u % P:
        return None
    if x == 0 and sign:
        return None
    return P - x if (x & 1) != sign else x


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return (
        (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P,
        (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P,
    )


def _order_divides_8(y: int, sign: int) -> bool:
    x = _x_of(y, sign)
    assert x is not None
    pt = (x, y)
    for _ in range(3):
        pt = _add(pt, pt)
    return pt == (0, 1)


def _encode(y: int, sign: int) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


class TestTheAttack:
    def test_the_library_alone_accepts_a_universal_signature(self) -> None:
        # Why the check exists: OpenSSL verifies this forgery for any message.
        key = Ed25519PublicKey.from_public_bytes(NEUTRAL_KEY)
        key.verify(UNIVERSAL_SIG, os.urandom(40))  # no exception

    def test_verify_refuses_the_neutral_key_with_weak_key(self) -> None:
        with pytest.raises(WeakKeyError):
            verify(NEUTRAL_KEY, UNIVERSAL_SIG, b"pay me")

    def test_weak_key_is_a_bad_signature_for_older_clients(self) -> None:
        assert issubclass(WeakKeyError, BadSignatureError)
        assert ERROR_CLASSES["weak_key"] is WeakKeyError

    def test_an_envelope_from_the_neutral_key_is_refused(self) -> None:
        honest = Identity.generate()
        raw = seal(honest, Hello(role="tenant", address=None, agent="x"), now_ms=1, nonce=bytes(16))
        env = codec.decode(raw)
        env["from"], env["sig"] = NEUTRAL_KEY, UNIVERSAL_SIG
        with pytest.raises(WeakKeyError):
            open_envelope(codec.encode(env), now_ms=1, replay=None)


class TestTheRule:
    def test_the_blocked_y_values_are_exactly_the_small_order_points(self) -> None:
        # Every encoding whose point has order dividing 8 is blocked, and nothing else
        # among the y values listed: the list is checked against the curve, not copied.
        points = [(y, s) for y in SMALL_ORDER_Y for s in (0, 1) if _x_of(y, s) is not None]
        assert len(points) == 8
        assert all(_order_divides_8(y, s) for y, s in points)

    @pytest.mark.parametrize("y", sorted(SMALL_ORDER_Y))
    @pytest.mark.parametrize("sign", [0, 1])
    def test_every_small_order_encoding_is_refused(self, y: int, sign: int) -> None:
        with pytest.raises(WeakKeyError, match="small-order"):
            check_public_key(_encode(y, sign))

    @pytest.mark.parametrize("y", range(P, 2**255))
    def test_every_y_at_or_above_p_is_refused_as_non_canonical(self, y: int) -> None:
        for sign in (0, 1):
            with pytest.raises(WeakKeyError, match="non-canonical"):
                check_public_key(_encode(y, sign))

    def test_real_keys_pass(self) -> None:
        for _ in range(50):
            check_public_key(Identity.generate().public_key)


class TestNegativeVectors:
    VECTORS = json.loads(NEGATIVE.read_text("utf-8"))

    def test_the_file_is_up_to_date(self) -> None:
        gen = subprocess.run(
            [sys.executable, str(DOCS / "gen_weak_key_vectors.py"), "--check"], check=False
        )
        assert gen.returncode == 0

    def test_the_file_covers_small_order_and_non_canonical_keys(self) -> None:
        names = " ".join(v["name"] for v in self.VECTORS)
        assert "neutral point" in names
        assert "non-canonical" in names

    @pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
    def test_each_vector_is_refused_with_its_code(self, vector: dict[str, str]) -> None:
        with pytest.raises(ERROR_CLASSES[vector["error"]]) as info:
            open_envelope(bytes.fromhex(vector["envelope"]), now_ms=vector["now_ms"], replay=None)
        assert info.value.code == vector["error"]
