"""Capability tokens: the tenant's signed permission to call its service (issue 20).

A service published by a provider (``/svc/<lease_id>/...``) answers only requests
that carry a token the lease's tenant signed. The tenant hands tokens to whoever it
authorises; nobody else, the provider included, can make one. Format (docs/protocol.md,
"Service endpoints")::

    Authorization: Mercato mct1.<base64url(payload)>.<base64url(signature)>

``payload`` is the canonical msgpack of :class:`Capability`; ``signature`` is the
tenant's Ed25519 signature over ``CAPABILITY_DOMAIN + payload`` (the domain keeps a
token from ever passing for an envelope, and the other way round). Base64url has no
padding. This module only builds and checks the bytes and the signature; whether a
valid token allows a request (lease, expiry, method, path) is market.capability's rule.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol.codec import Limits, decode, encode
from protocol.errors import (
    BadCapabilityError,
    BadSignatureError,
    CapabilityExpiredError,
    CapabilityScopeError,
    MercatoError,
)
from protocol.identity import PUBLIC_KEY_SIZE, Identity, verify

CAPABILITY_DOMAIN = b"mercato/capability/v1\n"
TOKEN_PREFIX = "mct1."
#: The longest token a provider reads: a header, not a body.
MAX_TOKEN_CHARS = 2048
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_LIMITS = Limits(max_size=1536, max_depth=4, max_container=64, max_str=512, max_bin=64)

__all__ = [
    "BadCapabilityError",
    "Capability",
    "CapabilityExpiredError",
    "CapabilityScopeError",
    "decode_token",
    "from_header",
    "issue",
]

Method = Annotated[str, StringConstraints(pattern=r"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS)$")]


class Capability(BaseModel):
    """What a token allows: one lease's service, until ``exp``, these methods, this path.

    ``key`` is the signer's raw public key; the provider checks it is the lease's
    tenant. ``path`` is a prefix of the path under ``/svc/<lease>/`` (``/`` allows all);
    ``sub`` is the tenant's own label for the holder (shown in logs, never trusted).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)

    v: Annotated[int, Field(ge=1, le=1)] = 1
    lease: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
    key: Annotated[bytes, Field(min_length=PUBLIC_KEY_SIZE, max_length=PUBLIC_KEY_SIZE)]
    exp: Annotated[int, Field(ge=0, lt=1 << 53)]
    methods: Annotated[list[Method], Field(min_length=1, max_length=len(HTTP_METHODS))]
    path: Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]{0,255}$")] = "/"
    sub: Annotated[str, StringConstraints(max_length=64)] = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if "=" in text:
        raise BadCapabilityError("base64url without padding expected")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise BadCapabilityError("not base64url") from e


def issue(
    identity: Identity,
    lease_id: str,
    expires_ms: int,
    *,
    methods: tuple[str, ...] = ("GET", "HEAD", "POST"),
    path: str = "/",
    sub: str = "",
) -> str:
    """A token for ``lease_id``, signed by ``identity`` (the lease's tenant)."""
    cap = Capability(
        lease=lease_id,
        key=identity.public_key,
        exp=expires_ms,
        methods=sorted(set(methods)),
        path=path,
        sub=sub,
    )
    payload = encode(cap.model_dump())
    return f"{TOKEN_PREFIX}{_b64(payload)}.{_b64(identity.sign(CAPABILITY_DOMAIN + payload))}"


def decode_token(token: str) -> Capability:
    """The capability ``token`` states, once its signature verifies against its ``key``.

    Raises BadCapabilityError (malformed, non-canonical, bad signature). Says nothing
    yet about whether it allows a request: see market.capability.authorize.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise BadCapabilityError(f"token longer than {MAX_TOKEN_CHARS} characters")
    if not token.startswith(TOKEN_PREFIX) or token.count(".") != 2:
        raise BadCapabilityError(f"a token is {TOKEN_PREFIX}<payload>.<signature>")
    body, sig_text = token[len(TOKEN_PREFIX) :].split(".")
    payload, signature = _unb64(body), _unb64(sig_text)
    try:
        raw = decode(payload, _LIMITS)
        if not isinstance(raw, dict) or encode(raw) != payload:
            raise BadCapabilityError("payload is not a canonical msgpack map")
        cap = Capability.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadCapabilityError(f"payload field {where}: {first['msg']}") from e
    except BadCapabilityError:
        raise
    except MercatoError as e:
        raise BadCapabilityError(f"payload: {e.reason}") from e
    try:
        verify(cap.key, signature, CAPABILITY_DOMAIN + payload)
    except BadSignatureError as e:
        raise BadCapabilityError(f"signature: {e.reason}") from e
    return cap


def from_header(value: str | None) -> str:
    """The token of an ``Authorization: Mercato <token>`` header (BadCapabilityError if none)."""
    if not value:
        raise BadCapabilityError("no Authorization header: this service needs a Mercato token")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "mercato" or not token:
        raise BadCapabilityError("Authorization must be 'Mercato <token>'")
    return token.strip()
