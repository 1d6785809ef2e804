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
from typing import Any, NoReturn

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

# Byte-level pieces of the canonical envelope: fixmap headers of 7 and 8 entries, and
# the "sig" entry up to its value (key, then the bin 8 header of 64 bytes).
_MAP7 = b"\x87"
_MAP8 = b"\x88"
_SIG_ENTRY_HEAD = codec.encode("sig") + b"\xc4" + bytes([SIGNATURE_SIZE])
_SIG_ENTRY_SIZE = len(_SIG_ENTRY_HEAD) + SIGNATURE_SIZE

#: Replies a sender signs once and re-sends as the same bytes whenever it is asked again
#: (docs/protocol.md, section 5): a finished task's result, whose envelope hash must stay
#: one value. A receiver opening a reply of these types skips the freshness and replay
#: checks; it checks instead that the document answers what it asked.
RESENT_VERBATIM: frozenset[str] = frozenset({"task_result"})

#: Body fields that name a node and must equal the signer's node id.
_SIGNER_FIELDS: dict[str, str] = {
    "advert": "provider",
    "bid": "provider",
    "no_bid": "provider",
    "order": "tenant",
}


@dataclass(frozen=True)
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
    if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    if to is not None and not NODE_ID_RE.match(to):
        raise LocalProtocolError(f"recipient {to!r} is not a node id")
    if type(now_ms) is not int:
        raise LocalProtocolError("now_ms must be an int (ms since the Unix epoch)")
    if not body.TYPE:
        raise LocalProtocolError(f"{type(body).__name__} is not a message type")
    # The envelope is one map whose keys sort as body, from, nonce | sig | to, ts, type,
    # v, so it is packed as two runs of entries with "sig" in between: the body is
    # canonicalised and packed once for both the signed bytes and the envelope. Only
    # the body needs canonicalising; the other values were checked just above.
    # (__pydantic_serializer__.to_python is model_dump() minus its argument handling,
    # which costs as much as the dump itself.)
    wire_body = codec.canonical(body.__pydantic_serializer__.to_python(body))
    head = codec.pack_canonical({"body": wire_body, "from": identity.public_key, "nonce": nonce})
    tail = codec.pack_canonical({"to": to, "ts": now_ms, "type": body.TYPE, "v": PROTOCOL_VERSION})
    head, tail = head[1:], tail[1:]  # drop the one-byte fixmap headers (3 and 4 entries)
    sig = identity.sign(b"".join((_MAP7, head, tail)))
    return b"".join((_MAP8, head, _SIG_ENTRY_HEAD, sig, tail))


def signed_part(data: bytes, env: dict[str, Any]) -> bytes:
    """The bytes ``env["sig"]`` signs, cut out of ``data``: the envelope without its "sig"
    entry. ``env`` is ``data`` decoded by ``codec.decode``, which proved it canonical, so
    it is laid out as ``seal`` packs it (the entries after "sig": to, ts, type, v)."""
    tail = codec.pack_canonical(
        {"to": env["to"], "ts": env["ts"], "type": env["type"], "v": env["v"]}
    )
    sig_end = len(data) - len(tail) + 1
    return b"".join((_MAP7, data[1 : sig_end - _SIG_ENTRY_SIZE], data[sig_end:]))


def _field(env: dict[str, Any], key: str, typ: type, size: int | None = None) -> None:
    value: Any = env[key]
    if type(value) is not typ:
        raise BadEnvelopeError(f"envelope field {key!r} must be {typ.__name__}")
    if size is not None and len(env[key]) != size:
        raise BadEnvelopeError(f"envelope field {key!r} must be {size} bytes")


def _reject_fields(env: dict[str, Any]) -> NoReturn:
    """Raise the error for the first bad field, in the order the checks are documented."""
    _field(env, "type", str)
    if env["type"] not in MESSAGE_TYPES:
        raise UnknownTypeError(f"unknown message type {env['type'][:64]!r}")
    _field(env, "from", bytes, PUBLIC_KEY_SIZE)
    _field(env, "nonce", bytes, NONCE_SIZE)
    _field(env, "sig", bytes, SIGNATURE_SIZE)
    _field(env, "ts", int)
    raise AssertionError("called with good fields")  # pragma: no cover


def open_envelope(
    data: bytes,
    *,
    now_ms: int,
    replay: ReplayGuard | None,
    recipient: str | None = None,
    limits: codec.Limits = codec.DEFAULT_LIMITS,
    verbatim: frozenset[str] = frozenset(),
) -> Envelope:
    """Decode, verify and validate an envelope; raise a RemoteProtocolError otherwise.

    Order of checks: size cap and bounded decode, envelope shape, version, type,
    timestamp window (cheap, before the signature), signature, recipient, nonce
    (recorded only once the signature is good, so forgeries cannot burn nonces),
    then the body schema. ``recipient`` is this node's id: an envelope addressed
    to another node is rejected; one addressed to nobody (``to`` nil) is accepted.
    ``replay=None`` skips timestamp and nonce checks: only for re-verifying stored or
    relayed adverts, whose freshness is governed by their ``expires_ms``. So do the
    types in ``verbatim``: a requester passes ``RESENT_VERBATIM`` for a reply.
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
    type_ = env["type"]
    sender_key = env["from"]
    nonce = env["nonce"]
    sig = env["sig"]
    ts = env["ts"]
    model = MESSAGE_TYPES.get(type_) if type(type_) is str else None
    if model is None or not (
        type(sender_key) is bytes
        and len(sender_key) == PUBLIC_KEY_SIZE
        and type(nonce) is bytes
        and len(nonce) == NONCE_SIZE
        and type(sig) is bytes
        and len(sig) == SIGNATURE_SIZE
        and type(ts) is int
    ):
        _reject_fields(env)
    to = env["to"]
    if to is not None and (type(to) is not str or not NODE_ID_RE.match(to)):
        raise BadEnvelopeError("envelope field 'to' must be a node id or nil")
    body = env["body"]
    if type(body) is not dict:
        raise BadEnvelopeError("envelope field 'body' must be a map")

    if type_ in verbatim:
        replay = None
    if replay is not None:
        replay.check_time(ts, now_ms)
    verify(sender_key, sig, signed_part(data, env))
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
    # A frozen dataclass's __init__ pays one object.__setattr__ per field; setting the
    # instance dict in one go builds the same object for a third of the cost.
    opened = object.__new__(Envelope)
    object.__setattr__(
        opened,
        "__dict__",
        {
            "type": type_,
            "sender_key": sender_key,
            "sender": sender,
            "recipient": to,
            "ts_ms": ts,
            "nonce": nonce,
            "body": parsed,
            "raw": data,
        },
    )
    return opened


def _validation_error(type_: str, e: ValidationError) -> InvalidFieldError | UnknownFieldError:
    """One code per body, by a documented rule (docs/protocol.md, section 6, step 13):
    an unknown field anywhere in the body wins over any missing, mistyped or out-of-range
    one, whatever order the validator found them in."""
    errors = e.errors(include_url=False)
    unknown = [err for err in errors if err["type"] == "extra_forbidden"]
    first = unknown[0] if unknown else errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(body)"
    if unknown:
        return UnknownFieldError(f"{type_} has no field {where!r}")
    return InvalidFieldError(f"{type_}.{where}: {first['msg']}")
