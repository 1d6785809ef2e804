"""What every HTTP handler of the daemon shares: the error answer and the capped read.

One place maps a MercatoError to an HTTP answer (its class's status, from
protocol.errors.http_status) and one reads a request body under a cap, so the p2p
endpoint (node.daemon) and the operator's endpoints (node.operator) refuse alike.
"""

from __future__ import annotations

from aiohttp import web

from protocol.errors import MercatoError, TooLargeError, http_status

#: How much of a body is read per step while it is checked against its cap.
READ_CHUNK = 64 * 1024


def error_response(error: MercatoError) -> web.Response:
    """The one place a MercatoError becomes an HTTP answer: ``{"error": {code, reason}}``."""
    return web.json_response(
        {"error": {"code": error.code, "reason": error.reason}}, status=http_status(error)
    )


async def read_capped(request: web.Request, cap: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``cap`` (before buffering more)."""
    if request.content_length is not None and request.content_length > cap:
        raise TooLargeError(f"Content-Length {request.content_length} exceeds {cap}")
    data = bytearray()
    while chunk := await request.content.read(READ_CHUNK):
        data += chunk
        if len(data) > cap:
            raise TooLargeError(f"body exceeds {cap} bytes")
    return bytes(data)
