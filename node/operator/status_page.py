"""The operator endpoints over HTTP: the status page, ``/status.json``, price control.

The daemon serves three operator endpoints on its listen address (docs/operators.md):

* ``GET /``: a read-only HTML page (node.operator.page) of the status document
  (node.operator.document).
* ``GET /status.json``: the same document as JSON, for ``mercato provider status``.
* ``POST /control/prices``: a ``price_update`` sealed with the node's own key
  (node.operator.prices).

All three answer 403 ``forbidden`` to clients outside ``[status] allow_from``
(loopback by default): the page shows tenants' commands, parameters and metrics, which
are theirs, not the public's. The control endpoint also needs the node's signature,
so an address in ``allow_from`` alone cannot change prices.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from node.net.http import error_response as _error
from node.net.http import read_capped as _read_capped
from node.operator.prices import MAX_CONTROL_BYTES, PRICES_PATH, apply_price_update
from node.operator.source import STATUS_PATH, StatusSource
from protocol.errors import ForbiddenError, MercatoError, http_status

if TYPE_CHECKING:
    from node.operator.document import StatusDocument

log = logging.getLogger("mercato.status")

# No script, no external resource of any kind: the page is text and inline SVG.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATUS_KEY: web.AppKey[StatusSource] = web.AppKey("status", StatusSource)


def _check_allowed(source: StatusSource, request: web.Request) -> None:
    try:
        ip = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        raise ForbiddenError("unknown client address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not any(ip in net for net in source.allow_from):
        raise ForbiddenError(
            f"{ip} is not in [status] allow_from of this node's config (see docs/operators.md)"
        )


def _render(doc: StatusDocument, refresh_s: int) -> str:
    """The HTML page of ``doc``.

    The page module (Jinja2, its templates, the plots) loads on the first request, in
    this worker thread: a daemon nobody looks at never holds it (~2.5 MB resident,
    docs/benchmarks.md, "Idle provider RSS"), and the first look does not stall the
    event loop on the import.
    """
    from node.operator.page import render_page

    return render_page(doc, refresh_s=refresh_s)


def _collect(source: StatusSource) -> StatusDocument:
    """The status document of ``source``.

    node.operator.document (its models, built on first use) is imported by the first
    request that asks for it: a daemon nobody looks at never holds it.
    """
    from node.operator.document import collect

    return collect(source)


async def handle_page(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    try:
        _check_allowed(source, request)
    except ForbiddenError as e:
        return web.Response(status=http_status(e), text=e.reason + "\n")
    # Drawing a page of a thousand trials takes a while: not on the event loop.
    # The document is collected here, on the loop that owns the state it reads.
    body = await asyncio.to_thread(_render, _collect(source), source.refresh_s)
    return web.Response(
        text=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def handle_status_json(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    try:
        _check_allowed(source, request)
    except ForbiddenError as e:
        return _error(e)
    return web.json_response(_collect(source).json_body(), headers={"Cache-Control": "no-store"})


async def handle_prices(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    node = source.node
    try:
        _check_allowed(source, request)
        data = await _read_capped(request, MAX_CONTROL_BYTES)
        answer = apply_price_update(node, source.floors, data)
    except MercatoError as e:
        node.metrics.rejections.labels(e.code).inc()
        log.info("price update refused: %s", e)
        return _error(e)
    return web.json_response(answer.model_dump(mode="json"))


def add_routes(app: web.Application, source: StatusSource) -> None:
    """Serve the operator endpoints of ``source`` on ``app``."""
    app[STATUS_KEY] = source
    app.router.add_get("/", handle_page)
    app.router.add_get(STATUS_PATH, handle_status_json)
    app.router.add_post(PRICES_PATH, handle_prices)
