"""The provider publishes a lease's service at ``/svc/<lease_id>/...`` (issue 20).

A sandboxed service has no network. It listens on a Unix socket in its work directory
(``$MERCATO_SERVICE_SOCKET``, a name relative to its cwd), and this daemon, outside the
sandbox, forwards HTTP requests to it: no host port is opened per service.

Before anything reaches the service a request must carry a capability token the
lease's tenant signed (protocol.capability) that allows it (market.capability);
everything else is refused (401 no/bad/expired token, 403 another lease, key, method
or path) and counted in ``mercato_rejections_total{code}`` and
``mercato_service_requests_total{outcome}``.

The socket is the tenant's file, in a directory its code controls: it could be
replaced by a symlink to any socket of the host (a container runtime's, another
trial's). So the daemon opens the name with ``O_PATH|O_NOFOLLOW`` under a descriptor
of the work directory, checks the inode is a socket, and connects through
``/proc/self/fd/<fd>``: the inode checked is the inode connected to, and the long
path of the work directory never meets the 108-byte limit of socket addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from market.bidding import LeaseState
from market.capability import authorize
from node.net.node import Node
from node.provider.service import ProviderService
from node.provider.work import Task, WorkService, service_socket
from protocol.capability import decode_token, from_header
from protocol.errors import (
    BusyError,
    MercatoError,
    NotFoundError,
    PeerTimeoutError,
    PeerUnavailableError,
    RequestTimeoutError,
    TooLargeError,
)

log = logging.getLogger("mercato.endpoint")

SVC_PREFIX = "/svc/"
MAX_REQUEST_BYTES = 16 << 20
MAX_RESPONSE_BYTES = 64 << 20
UPSTREAM_TIMEOUT_S = 60.0
#: Connections kept open to one service (aiohttp's pool).
POOL_PER_SERVICE = 32

# Hop-by-hop headers (RFC 9110 section 7.6.1) and what the proxy sets itself.
_DROP_REQUEST = frozenset(
    h.lower()
    for h in (
        "Authorization",
        "Connection",
        "Keep-Alive",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_DROP_RESPONSE = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Content-Encoding",
    )
)


class _Upstream:
    """A pooled HTTP client to one task's socket, pinned to the inode that was checked."""

    def __init__(self, task: Task, work_dir: Path, name: str) -> None:
        self.task = task
        self.fd = _open_socket(work_dir, name)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(
                path=f"/proc/self/fd/{self.fd}", limit=POOL_PER_SERVICE
            ),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.session.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _open_socket(work_dir: Path, name: str) -> int:
    """An O_PATH descriptor of the socket ``name`` in ``work_dir``, never of a link's target."""
    try:
        dir_fd = os.open(work_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise BusyError("the service's work directory is not there (starting or gone)") from e
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        raise BusyError(f"the service is not listening on {name} yet") from e
    finally:
        os.close(dir_fd)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise BusyError(f"{name} in the work directory is not a socket")
    return fd


@dataclass(frozen=True)
class ServiceSnapshot:
    """One lease's service as the operator sees it: requests, failures, latency."""

    lease_id: str
    requests: int
    errors: int  # the service failed or answered 5xx
    refused: int  # no or bad token, not allowed
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    live: bool  # its task still runs here


@dataclass
class ServiceStats:
    """Request counts and latency of one lease's service, for the operator's view."""

    lease_id: str
    requests: int = 0
    errors: int = 0  # the service failed or answered 5xx
    refused: int = 0  # no or bad token, not allowed
    latency_ms: list[float] = field(default_factory=list)  # the last LATENCY_WINDOW

    LATENCY_WINDOW = 512

    def observe(self, ms: float) -> None:
        self.latency_ms.append(ms)
        if len(self.latency_ms) > self.LATENCY_WINDOW:
            del self.latency_ms[: len(self.latency_ms) - self.LATENCY_WINDOW]


class EndpointService:
    """The ``/svc/<lease_id>/...`` routes of a provider daemon."""

    def __init__(
        self,
        node: Node,
        provider: ProviderService,
        work: WorkService,
        work_dir: Callable[[str], Path],
        *,
        body_timeout_s: float = 30.0,
        upstream_timeout_s: float = UPSTREAM_TIMEOUT_S,
    ) -> None:
        self.node = node
        self.provider = provider
        self.work = work
        self.work_dir = work_dir  # a task's run id -> its work directory on this host
        self.body_timeout_s = body_timeout_s
        self.upstream_timeout_s = upstream_timeout_s
        self._upstreams: dict[str, _Upstream] = {}
        self.stats: dict[str, ServiceStats] = {}
        self.requests = node.metrics.counter(
            "mercato_service_requests",
            "Requests to tenants' services by outcome (ok, 5xx, refused codes, unavailable)",
            ["outcome"],
        )
        self.latency = node.metrics.histogram(
            "mercato_service_latency_seconds",
            "Time from a request's arrival to its service's answer head",
        )
        provider.on_lease_end.append(lambda lease: self._forget(lease.lease_id))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", SVC_PREFIX + "{lease_id}/{tail:.*}", self.handle)
        app.on_cleanup.append(lambda _app: self.close())

    async def close(self) -> None:
        for lease_id in list(self._upstreams):
            await self._drop(lease_id)

    def snapshot(self) -> list[ServiceSnapshot]:
        """Per-lease request counts, error rate and latency (the operator's view)."""
        out = []
        for s in self.stats.values():
            lat = sorted(s.latency_ms)
            out.append(
                ServiceSnapshot(
                    lease_id=s.lease_id,
                    requests=s.requests,
                    errors=s.errors,
                    refused=s.refused,
                    error_rate=s.errors / s.requests if s.requests else 0.0,
                    p50_ms=lat[len(lat) // 2] if lat else None,
                    p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                    live=s.lease_id in self._upstreams,
                )
            )
        return out

    # --- one request --------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        lease_id = request.match_info["lease_id"]
        stats = self.stats.get(lease_id)
        started = time.monotonic()
        try:
            task = self._check(request, lease_id)
        except MercatoError as e:
            self.node.metrics.rejections.labels(e.code).inc()
            self.requests.labels(e.code).inc()
            if stats is not None:
                stats.refused += 1
            return _error(e)
        stats = self.stats.setdefault(lease_id, ServiceStats(lease_id))
        stats.requests += 1
        try:
            response = await self._forward(request, lease_id, task)
        except MercatoError as e:
            stats.errors += 1
            self.requests.labels(e.code).inc()
            return _error(e)
        elapsed = time.monotonic() - started
        stats.observe(elapsed * 1000)
        self.latency.observe(elapsed)
        if response.status >= 500:
            stats.errors += 1
            self.requests.labels("5xx").inc()
        else:
            self.requests.labels("ok").inc()
        return response

    def _check(self, request: web.Request, lease_id: str) -> Task:
        """The token first (so a stranger learns nothing of leases), then the lease, the task."""
        cap = decode_token(from_header(request.headers.get("Authorization")))
        lease = self.provider.engine.leases.get(lease_id)
        if lease is None or lease.state is not LeaseState.ACTIVE:
            raise NotFoundError(f"no active lease {lease_id} on this provider")
        authorize(
            cap,
            lease_id=lease_id,
            tenant=lease.tenant,
            method=request.method,
            path=_sub_path(request, lease_id),
            now_ms=self.node.clock(),
        )
        for task in self.work.tasks.values():
            if (
                task.assign.lease_id == lease_id
                and task.tenant == lease.tenant
                and task.state == "running"
                and service_socket(dict(task.assign.env)) is not None
            ):
                return task
        raise BusyError(f"lease {lease_id} runs no service right now (starting or restarting)")

    async def _upstream(self, lease_id: str, task: Task) -> _Upstream:
        up = self._upstreams.get(lease_id)
        if up is not None and up.task is task:
            return up
        if up is not None:  # the service was restarted: a new task, a new socket
            await self._drop(lease_id)
        name = service_socket(dict(task.assign.env))
        assert name is not None
        up = _Upstream(task, self.work_dir(task.run_id), name)
        self._upstreams[lease_id] = up
        return up

    async def _forward(self, request: web.Request, lease_id: str, task: Task) -> web.StreamResponse:
        body = await self._read_body(request)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        for attempt in (1, 2):
            up = await self._upstream(lease_id, task)
            try:
                async with asyncio.timeout(self.upstream_timeout_s):
                    async with up.session.request(
                        request.method,
                        "http://service" + _sub_path(request, lease_id, query=True),
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                    ) as answer:
                        return await self._relay(request, answer)
            except TimeoutError:
                raise PeerTimeoutError(
                    f"the service did not answer within {self.upstream_timeout_s} s"
                ) from None
            except aiohttp.ClientConnectorError as e:
                # Nothing was sent (so retrying is safe whatever the method): a restarted
                # service binds a new inode, so look the socket up once more.
                await self._drop(lease_id)
                if attempt == 2:
                    raise PeerUnavailableError(f"the service refused the connection: {e}") from e
            except aiohttp.ClientError as e:  # sent, then cut: not ours to retry
                await self._drop(lease_id)
                raise PeerUnavailableError(f"the service dropped the request: {e}") from e
        raise AssertionError("unreachable")

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            raise TooLargeError(f"request body over {MAX_REQUEST_BYTES} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while chunk := await request.content.read(64 * 1024):
                    size += len(chunk)
                    if size > MAX_REQUEST_BYTES:
                        raise TooLargeError(f"request body over {MAX_REQUEST_BYTES} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {self.body_timeout_s} s"
            ) from None
        return b"".join(chunks)

    async def _relay(
        self, request: web.Request, answer: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the service's answer back, cut at MAX_RESPONSE_BYTES."""
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        for k, v in answer.headers.items():
            if k.lower() not in _DROP_RESPONSE:
                response.headers.add(k, v)
        if answer.content_length is not None and answer.content_length <= MAX_RESPONSE_BYTES:
            response.content_length = answer.content_length
        await response.prepare(request)
        sent = 0
        async for chunk in answer.content.iter_chunked(64 * 1024):
            sent += len(chunk)
            if sent > MAX_RESPONSE_BYTES:  # the head is out: all we can do is cut it
                log.info("service answer over %d bytes cut", MAX_RESPONSE_BYTES)
                break
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _drop(self, lease_id: str) -> None:
        up = self._upstreams.pop(lease_id, None)
        if up is not None:
            await up.close()

    def _forget(self, lease_id: str) -> None:
        """The lease ended: close its pool (stats stay for the operator's view)."""
        up = self._upstreams.pop(lease_id, None)
        if up is not None:
            self.node.spawn(up.close())


def _sub_path(request: web.Request, lease_id: str, *, query: bool = False) -> str:
    """The raw path under ``/svc/<lease_id>`` (``/`` at least), with the query if asked."""
    raw = request.rel_url.raw_path
    sub = raw[len(SVC_PREFIX) + len(lease_id) :] or "/"
    if query and request.rel_url.raw_query_string:
        sub += "?" + request.rel_url.raw_query_string
    return sub


def _error(error: MercatoError) -> web.Response:
    return web.json_response(
        {"error": {"code": error.code, "reason": error.reason}}, status=error.http_status
    )
