"""The wire: identities, canonical msgpack, signed envelopes, replay guard, schemas.

No sockets, no files, no clock reads: every function takes what it needs.
"""

from protocol.codec import DEFAULT_LIMITS, Limits, decode, encode
from protocol.envelope import NONCE_SIZE, Envelope, open_envelope, seal, signed_bytes
from protocol.identity import Identity, node_id_from_public_key
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Body
from protocol.replay import ReplayGuard

__all__ = [
    "DEFAULT_LIMITS",
    "MESSAGE_TYPES",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "Body",
    "Envelope",
    "Identity",
    "Limits",
    "ReplayGuard",
    "decode",
    "encode",
    "node_id_from_public_key",
    "open_envelope",
    "seal",
    "signed_bytes",
]
