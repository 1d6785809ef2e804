"""Ed25519 identities and node ids.

A node id is the lowercase RFC 4648 base32 (no padding) of the first 20 bytes of
SHA-256 over the 32-byte raw Ed25519 public key: 32 characters from ``a-z2-7``.
160 bits make accidental collisions impossible in practice and a chosen collision
as hard as a second preimage on truncated SHA-256; the full key travels in every
envelope, so nothing needs to invert the id.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import BadSignatureError, LocalProtocolError

PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64
NODE_ID_RE = re.compile(r"^[a-z2-7]{32}$")


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
    """Raise BadSignatureError unless ``signature`` is ``public_key``'s over ``message``."""
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
        """A fresh random identity."""
        return cls._from_private(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed (RFC 8032 private key)."""
        if len(seed) != SEED_SIZE:
            raise LocalProtocolError(f"seed must be {SEED_SIZE} bytes")
        return cls._from_private(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def _from_private(cls, key: Ed25519PrivateKey) -> Identity:
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private_key=key, public_key=pub, node_id=node_id_from_public_key(pub))

    def seed(self) -> bytes:
        """The 32-byte private seed (keep it secret)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self.private_key.sign(message)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM of the private key, unencrypted: the daemon stores it mode 0600."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        """Load an identity from PKCS#8 PEM; refuses keys that are not Ed25519."""
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LocalProtocolError("key file does not hold an Ed25519 private key")
        return cls._from_private(key)
