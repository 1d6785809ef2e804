"""Ed25519 identities and node ids.

A node id is the lowercase RFC 4648 base32 (no padding) of the first 20 bytes of
SHA-256 over the 32-byte raw Ed25519 public key: 32 characters from ``a-z2-7``.
160 bits make accidental collisions impossible in practice and a chosen collision
as hard as a second preimage on truncated SHA-256; the full key travels in every
envelope, so nothing needs to invert the id.

Public keys are checked before any signature: RFC 8032 verification alone accepts a
small-order key (``01 00..00``, the neutral point, among others) with a signature that
holds for *every* message, so anyone could sign as that key. ``check_public_key``
refuses the eight small-order points in any encoding and every non-canonical
encoding (y >= p), a pure comparison (section 3 of docs/protocol.md).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import BadSignatureError, LocalProtocolError, WeakKeyError

PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64
NODE_ID_RE = re.compile(r"^[a-z2-7]{32}$")

#: The field prime of Curve25519 / edwards25519.
_P = 2**255 - 19
#: y coordinates of the eight points of order dividing 8 (the neutral point y=1, the
#: point of order 2 y=-1, the two of order 4 y=0, the four of order 8): with either
#: sign bit these are every small-order encoding (Bernstein et al., "Taming the many
#: EdDSAs", 2020, and libsodium's blocklist). tests/protocol/test_weak_keys.py
#: recomputes their order on the curve.
SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _P - 1,
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
        0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
    }
)


def check_public_key(public_key: bytes) -> None:
    """Raise WeakKeyError for a small-order or non-canonically encoded Ed25519 key.

    A small-order key lets anyone forge signatures; a non-canonical encoding (y >= p)
    gives one point two byte strings, hence two node ids. Real keys are neither.
    """
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if y >= _P:
        raise WeakKeyError("public key is a non-canonical encoding (y >= p)")
    if y in SMALL_ORDER_Y:
        raise WeakKeyError("public key is a small-order point: it would verify forgeries")


def node_id_from_public_key(public_key: bytes) -> str:
    """Derive the node id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise LocalProtocolError(f"public key must be {PUBLIC_KEY_SIZE} bytes")
    return _node_id(bytes(public_key))


@lru_cache(maxsize=4096)
def _node_id(public_key: bytes) -> str:
    # Every opened envelope derives its sender's id; peers repeat, so cache by key.
    digest = hashlib.sha256(public_key).digest()[:20]
    return base64.b32encode(digest).decode("ascii").lower()


@lru_cache(maxsize=4096)
def _load_public_key(public_key: bytes) -> Ed25519PublicKey:
    # Parsing a point costs about as much as a hash; peers repeat, so cache by bytes.
    return Ed25519PublicKey.from_public_bytes(public_key)


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise BadSignatureError unless ``signature`` is ``public_key``'s over ``message``.

    A weak key (``check_public_key``) raises WeakKeyError, a BadSignatureError.
    """
    check_public_key(public_key)
    try:
        _load_public_key(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as e:
        raise BadSignatureError("signature does not verify against the sender's key") from e


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 key pair. ``node_id`` is derived, never chosen."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: bytes
    node_id: str

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity.

        An Ed25519 private key is 32 uniformly random bytes (RFC 8032, 5.1.5); they come
        from the operating system's CSPRNG (``secrets``), as OpenSSL's own generator
        would seed them, without starting that second generator in a daemon that
        otherwise never needs it (~0.3 MB resident, docs/benchmarks.md).
        """
        return cls.from_seed(secrets.token_bytes(SEED_SIZE))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed (RFC 8032 private key)."""
        if len(seed) != SEED_SIZE:
            raise LocalProtocolError(f"seed must be {SEED_SIZE} bytes")
        return cls._from_private(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def _from_private(cls, key: Ed25519PrivateKey) -> Identity:
        pub = key.public_key().public_bytes_raw()
        return cls(private_key=key, public_key=pub, node_id=node_id_from_public_key(pub))

    def seed(self) -> bytes:
        """The 32-byte private seed (keep it secret)."""
        return self.private_key.private_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self.private_key.sign(message)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM of the private key, unencrypted: the daemon stores it mode 0600."""
        from cryptography.hazmat.primitives import serialization

        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        """Load an identity from PKCS#8 PEM; refuses keys that are not Ed25519."""
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LocalProtocolError("key file does not hold an Ed25519 private key")
        return cls._from_private(key)
