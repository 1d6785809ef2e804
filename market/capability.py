"""Whether a verified capability token allows one request to one lease's service.

Pure: the provider passes the lease's tenant, the request and ``now_ms`` (its own
clock; the token's ``exp`` is the tenant's word and bounds only how long the token
lives, never the provider's time). Token bytes and signatures are protocol.capability's.
"""

from __future__ import annotations

from protocol.capability import Capability, CapabilityExpiredError, CapabilityScopeError
from protocol.identity import node_id_from_public_key


def authorize(
    cap: Capability, *, lease_id: str, tenant: str, method: str, path: str, now_ms: int
) -> None:
    """Raise unless ``cap`` lets ``method path`` reach ``lease_id``'s service at ``now_ms``.

    ``path`` is the path under ``/svc/<lease_id>``, starting with ``/``. Checked in
    order: the lease, the signer (the lease's tenant, or nobody could stop anyone from
    minting tokens for it), expiry, method, path prefix. HEAD is allowed where GET is.
    ``path`` is the raw path as forwarded: one with ``..`` (or ``%2e``, ``%2f``) is
    refused, so a prefix can never be climbed out of by the service's own decoding.
    """
    if cap.lease != lease_id:
        raise CapabilityScopeError(f"the token is for lease {cap.lease}, not {lease_id}")
    if node_id_from_public_key(cap.key) != tenant:
        raise CapabilityScopeError("the token is not signed by this lease's tenant")
    if now_ms >= cap.exp:
        raise CapabilityExpiredError(f"the token expired {now_ms - cap.exp} ms ago")
    allowed = set(cap.methods) | ({"HEAD"} if "GET" in cap.methods else set())
    if method not in allowed:
        raise CapabilityScopeError(f"the token does not allow {method}")
    segments = path.split("/")
    if any(s in (".", "..") for s in segments) or "%2e" in path.lower() or "%2f" in path.lower():
        raise CapabilityScopeError("the path has dot segments or encoded dots or slashes")
    if not _under(path, cap.path):
        raise CapabilityScopeError(f"the token allows only paths under {cap.path}")


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, by whole segments (``/a`` does not cover ``/ab``)."""
    if prefix == "/" or path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")
