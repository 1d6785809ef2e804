"""One error tree for the whole wire layer.

Every error carries a stable machine-readable ``code`` (part of the protocol,
listed in docs/protocol.md) and a human ``reason``. Remote errors are what a peer
did wrong: the daemon rejects the message, answers 4xx with the code and counts it.
Local errors are what *we* tried to do wrong (seal an invalid body): a bug or a bad
call, never a peer's fault.
"""

from __future__ import annotations

from typing import ClassVar


class MercatoError(Exception):
    """Root of every error raised by Mercato code."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init__(self, reason: str) -> None:
        super().__init__(f"{self.code}: {reason}")
        self.reason = reason


class ProtocolError(MercatoError):
    """Something about a wire message is wrong."""

    code = "protocol_error"
    http_status = 400


class LocalProtocolError(ProtocolError):
    """We were asked to produce a message that would violate the protocol."""

    code = "local_protocol_error"
    http_status = 500


class RemoteProtocolError(ProtocolError):
    """A peer sent a message that violates the protocol; it is rejected and counted."""

    code = "remote_protocol_error"
    http_status = 400


# --- decoding (codec) -----------------------------------------------------------


class MalformedError(RemoteProtocolError):
    """Not valid msgpack, trailing bytes, or a type the protocol does not allow."""

    code = "malformed"


class TooLargeError(RemoteProtocolError):
    """The whole message is larger than the size cap."""

    code = "too_large"
    http_status = 413


class TooDeepError(RemoteProtocolError):
    """Containers nest deeper than the depth limit."""

    code = "too_deep"


class TooLongError(RemoteProtocolError):
    """A string, byte string, array or map is longer than its limit."""

    code = "too_long"


class NonCanonicalError(RemoteProtocolError):
    """Valid msgpack, but not the one canonical encoding of its value."""

    code = "non_canonical"


class DuplicateKeyError(NonCanonicalError):
    """A map repeats a key."""

    code = "duplicate_key"


# --- envelope -------------------------------------------------------------------


class BadEnvelopeError(RemoteProtocolError):
    """The envelope lacks a field, has an extra one, or a field has the wrong type."""

    code = "bad_envelope"


class BadVersionError(RemoteProtocolError):
    """The envelope's protocol version is not one we speak."""

    code = "bad_version"


class UnknownTypeError(RemoteProtocolError):
    """The message type is not in the protocol."""

    code = "unknown_type"


class BadSignatureError(RemoteProtocolError):
    """The Ed25519 signature does not verify against the sender's key."""

    code = "bad_signature"
    http_status = 401


class WeakKeyError(BadSignatureError):
    """The sender's public key is small-order or non-canonical: no signature of it counts."""

    code = "weak_key"


class WrongRecipientError(RemoteProtocolError):
    """The envelope is addressed to another node."""

    code = "wrong_recipient"
    http_status = 421


class StaleError(RemoteProtocolError):
    """The timestamp is older than the replay window allows."""

    code = "stale"


class FutureError(RemoteProtocolError):
    """The timestamp is further in the future than the allowed clock skew."""

    code = "future"


class ReplayError(RemoteProtocolError):
    """This sender already used this nonce inside the replay window."""

    code = "replay"
    http_status = 409


class UnknownFieldError(RemoteProtocolError):
    """The body has a field that its message type does not define."""

    code = "unknown_field"


class InvalidFieldError(RemoteProtocolError):
    """A body field is missing, has the wrong type, or is out of range."""

    code = "invalid_field"


class ImplausibleAdvertError(InvalidFieldError):
    """An advert claims hardware no single host has (market.catalog.check_advert)."""

    code = "implausible_advert"


class SenderMismatchError(RemoteProtocolError):
    """The body names a node (e.g. the provider of an advert) other than the signer."""

    code = "sender_mismatch"
    http_status = 403


# --- transport-level rejections (raised by node/, defined here so codes stay in one tree)


class RateLimitedError(RemoteProtocolError):
    """The peer sends faster than its allowance."""

    code = "rate_limited"
    http_status = 429


class RequestTimeoutError(RemoteProtocolError):
    """The peer did not send its whole request in time (a slow or stalled sender)."""

    code = "request_timeout"
    http_status = 408


class TooManyConnectionsError(RateLimitedError):
    """The peer address holds too many connections to this node (node.net.edge)."""

    code = "too_many_connections"


class UnexpectedMessageError(RemoteProtocolError):
    """A well-formed message that this endpoint does not accept in its current state."""

    code = "unexpected_message"
    http_status = 422


class SpecMismatchError(RemoteProtocolError):
    """Work names a job spec hash other than the one the lease was bid for."""

    code = "spec_mismatch"
    http_status = 409


class BusyError(MercatoError):
    """The provider cannot take this work now (every slot of the lease is busy).

    Not the peer's fault, so not a RemoteProtocolError: try again later.
    """

    code = "busy"
    http_status = 503


class NotFoundError(RemoteProtocolError):
    """The message names a lease, task or workspace this node does not hold."""

    code = "not_found"
    http_status = 404


class BadWorkspaceError(MercatoError):
    """A workspace archive is too large, corrupt or unsafe to unpack (too many entries,
    too large unpacked, a link, device or sparse member, a path that escapes).

    Not a RemoteProtocolError: a tenant raises it too, for its own directory, before
    anything is sent. A provider answers it with 400: the archive is the sender's fault.
    """

    code = "bad_workspace"
    http_status = 400


class BadBlobError(RemoteProtocolError):
    """A DiLoCo outer-step blob fails its hash, or is not a regular file of the worker's."""

    code = "bad_blob"
    http_status = 400


class ForbiddenError(MercatoError):
    """The client's address may not use this endpoint (operator endpoints, ``allow_from``)."""

    code = "forbidden"
    http_status = 403


class PeerTimeoutError(MercatoError, TimeoutError):
    """A peer did not answer in time."""

    code = "peer_timeout"
    http_status = 504


class PeerUnavailableError(MercatoError, ConnectionError):
    """A peer could not be reached at all."""

    code = "peer_unavailable"
    http_status = 502


class AddressRefusedError(PeerUnavailableError):
    """This node will not call the address: outside its allowed ranges (docs/protocol.md).

    Peers' addresses come from adverts and peer lists that anyone can sign, so a node
    that called them all could be pointed at its own LAN or loopback services (SSRF).
    """

    code = "address_refused"


class BadCapabilityError(MercatoError):
    """A service request without a capability token, or with a malformed or forged one.

    docs/protocol.md section 9, "Service endpoints"; HTTP 401.
    """

    code = "bad_capability"
    http_status = 401


class CapabilityExpiredError(BadCapabilityError):
    """The token was valid until its ``exp``, which has passed on the provider's clock."""

    code = "capability_expired"


class CapabilityScopeError(MercatoError):
    """A valid token that does not allow this request: another lease, key, method or path."""

    code = "capability_scope"
    http_status = 403


def _all_subclasses(cls: type[MercatoError]) -> list[type[MercatoError]]:
    out: list[type[MercatoError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


#: Every error code of the tree, mapped to its class; codes are unique by construction.
ERROR_CLASSES: dict[str, type[MercatoError]] = {}
_TREE: list[type[MercatoError]] = [MercatoError, *_all_subclasses(MercatoError)]
for _cls in _TREE:
    ERROR_CLASSES[_cls.code] = _cls


def http_status(error: MercatoError) -> int:
    """The HTTP status an endpoint answers for ``error`` (the one place this is decided)."""
    return error.http_status


def error_from_code(code: str, reason: str) -> MercatoError:
    """Rebuild a typed error from a peer's error answer (unknown codes become remote errors)."""
    cls = ERROR_CLASSES.get(code, RemoteProtocolError)
    return cls(reason)
