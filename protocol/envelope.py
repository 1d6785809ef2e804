"""The signed envelope: ``seal`` and ``open_envelope`` are pure functions.

Wire form: one canonical msgpack map with exactly these keys (sorted order)::

    body   map     the message body (schema chosen by ``type``)
    from   bin 32  sender's raw Ed25519 public key
    nonce  bin 16  random, unique per sender inside the replay window
    sig    bin 64  Ed25519 signature over the signed bytes
    to     str|nil recipient node id, or nil for messages to anyone (adverts)
    ts     int     sender's clock, ms since the Unix epoch
    type   str     message type
    v      int     protocol version (1)

The signed bytes are the canonical encoding of the same map without ``sig``
(seven keys), so the signature covers every other field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from protocol import codec
from protocol.errors import (
    BadEnvelopeError,
    BadVersionError,
    InvalidFieldError,
    LocalProtocolError,
    SenderMismatchError,
    UnknownFieldError,
    UnknownTypeError,
    WrongRecipientError,
)
from protocol.identity import (
    NODE_ID_RE,
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    node_id_from_public_key,
    verify,
)
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Body
from protocol.replay import ReplayGuard

NONCE_SIZE = 16
_KEYS = frozenset({"v", "type", "from", "to", "ts", "nonce", "body", "sig"})

#: Body fields that name a node and must equal the signer's node id.
_SIGNER_FIELDS: dict[str, str] = {
    "advert": "provider",
    "bid": "provider",
    "no_bid": "provider",
    "order": "tenant",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope."""

    type: str
    sender_key: bytes
    sender: str  # node id derived from sender_key
    recipient: str | None
    ts_ms: int
    nonce: bytes
    body: Body
    raw: bytes  # exactly the bytes that were received (re-sendable as is)

    @property
    def digest(self) -> str:
        """SHA-256 hex of the whole envelope: how other messages refer to this one."""
        return hashlib.sha256(self.raw).hexdigest()


def signed_bytes(
    *, type_: str, sender_key: bytes, recipient: str | None, ts_ms: int, nonce: bytes, body: Any
) -> bytes:
    """The exact bytes the signature covers."""
    return codec.encode(
        {
            "body": body,
            "from": sender_key,
            "nonce": nonce,
            "to": recipient,
            "ts": ts_ms,
            "type": type_,
            "v": PROTOCOL_VERSION,
        }
    )


def seal(
    identity: Identity, body: Body, *, now_ms: int, nonce: bytes, to: str | None = None
) -> bytes:
    """Sign ``body`` as ``identity`` and return the envelope bytes.

    ``nonce`` must be 16 random bytes (``os.urandom(16)``); it is a parameter so that
    this function stays pure and test vectors are reproducible.
    """
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    if to is not None and not NODE_ID_RE.match(to):
        raise LocalProtocolError(f"recipient {to!r} is not a node id")
    if not body.TYPE:
        raise LocalProtocolError(f"{type(body).__name__} is not a message type")
    signed = codec.canonical(
        {
            # model_dump() minus its argument handling, which costs as much as the dump.
            "body": body.__pydantic_serializer__.to_python(body),
            "from": identity.public_key,
            "nonce": nonce,
            "to": to,
            "ts": now_ms,
            "type": body.TYPE,
            "v": PROTOCOL_VERSION,
        }
    )
    # The same map plus "sig", which sorts between "nonce" and "to". Maps pack in
    # insertion order, so the map is rebuilt rather than extended; the values are
    # canonical already and are not walked again.
    sealed = {
        "body": signed["body"],
        "from": signed["from"],
        "nonce": signed["nonce"],
        "sig": identity.sign(codec.pack_canonical(signed)),
        "to": signed["to"],
        "ts": signed["ts"],
        "type": signed["type"],
        "v": signed["v"],
    }
    return codec.pack_canonical(sealed)


def _field(env: dict[str, Any], key: str, typ: type, size: int | None = None) -> Any:
    value: Any = env[key]
    if type(value) is not typ:
        raise BadEnvelopeError(f"envelope field {key!r} must be {typ.__name__}")
    if size is not None and len(env[key]) != size:
        raise BadEnvelopeError(f"envelope field {key!r} must be {size} bytes")
    return value


def open_envelope(
    data: bytes,
    *,
    now_ms: int,
    replay: ReplayGuard | None,
    recipient: str | None = None,
    limits: codec.Limits = codec.DEFAULT_LIMITS,
) -> Envelope:
    """Decode, verify and validate an envelope; raise a RemoteProtocolError otherwise.

    Order of checks: size cap and bounded decode, envelope shape, version, type,
    timestamp window (cheap, before the signature), signature, recipient, nonce
    (recorded only once the signature is good, so forgeries cannot burn nonces),
    then the body schema. ``recipient`` is this node's id: an envelope addressed
    to another node is rejected; one addressed to nobody (``to`` nil) is accepted.
    ``replay=None`` skips timestamp and nonce checks: only for re-verifying stored or
    relayed adverts, whose freshness is governed by their ``expires_ms``.
    """
    env = codec.decode(data, limits)
    if type(env) is not dict:
        raise BadEnvelopeError("envelope must be a map")
    if env.keys() != _KEYS:
        missing = sorted(_KEYS - env.keys())
        extra = sorted(env.keys() - _KEYS)
        raise BadEnvelopeError(f"envelope fields wrong: missing {missing}, unknown {extra}")
    version = env["v"]
    if type(version) is not int:
        raise BadEnvelopeError("envelope field 'v' must be int")
    if version != PROTOCOL_VERSION:
        raise BadVersionError(f"version {version} is not supported (this node speaks 1)")
    type_ = _field(env, "type", str)
    model = MESSAGE_TYPES.get(type_)
    if model is None:
        raise UnknownTypeError(f"unknown message type {type_[:64]!r}")
    sender_key = _field(env, "from", bytes, PUBLIC_KEY_SIZE)
    nonce = _field(env, "nonce", bytes, NONCE_SIZE)
    sig = _field(env, "sig", bytes, SIGNATURE_SIZE)
    ts = _field(env, "ts", int)
    to = env["to"]
    if to is not None and (type(to) is not str or not NODE_ID_RE.match(to)):
        raise BadEnvelopeError("envelope field 'to' must be a node id or nil")
    body = env["body"]
    if type(body) is not dict:
        raise BadEnvelopeError("envelope field 'body' must be a map")

    if replay is not None:
        replay.check_time(ts, now_ms)
    del env["sig"]
    # A decoded map is canonical and stays so without "sig": pack it as it is.
    verify(sender_key, sig, codec.pack_canonical(env))
    if recipient is not None and to is not None and to != recipient:
        raise WrongRecipientError(f"envelope is addressed to {to}, not to this node")
    if replay is not None:
        replay.admit(sender_key, nonce, ts, now_ms)

    try:
        # model_validate() minus its argument handling: the same validator, strict.
        parsed: Body = model.__pydantic_validator__.validate_python(body)
    except ValidationError as e:
        raise _validation_error(type_, e) from e
    sender = node_id_from_public_key(sender_key)
    signer_field = _SIGNER_FIELDS.get(type_)
    if signer_field is not None and getattr(parsed, signer_field) != sender:
        raise SenderMismatchError(f"{type_}.{signer_field} names another node than the signer")
    return Envelope(
        type=type_,
        sender_key=sender_key,
        sender=sender,
        recipient=to,
        ts_ms=ts,
        nonce=nonce,
        body=parsed,
        raw=data,
    )


def _validation_error(type_: str, e: ValidationError) -> InvalidFieldError | UnknownFieldError:
    first = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(body)"
    if first["type"] == "extra_forbidden":
        return UnknownFieldError(f"{type_} has no field {where!r}")
    return InvalidFieldError(f"{type_}.{where}: {first['msg']}")
