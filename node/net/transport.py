"""How envelopes travel: HTTP on real networks, an in-memory bus for tests and simulation.

A transport does one thing: deliver request bytes to an address and bring back the
reply bytes (an envelope, or empty when the peer has nothing to say). Every exchange
is started by the caller, so a tenant behind NAT never needs to be reachable.
Errors are typed: an unreachable peer raises PeerUnavailableError, a slow one
PeerTimeoutError, and a peer's rejection the error class of the code it sent back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from node.net.addresses import AddressPolicy, PolicyResolver
from protocol.errors import (
    AddressRefusedError,
    MercatoError,
    PeerTimeoutError,
    PeerUnavailableError,
    RemoteProtocolError,
    error_from_code,
)

ENVELOPE_CONTENT_TYPE = "application/x-mercato-envelope"
P2P_PATH = "/p2p"

#: Handles one incoming request: returns reply bytes (b"" for none) or raises MercatoError.
Handler = Callable[[bytes, str], Awaitable[bytes]]


class Transport(Protocol):
    """Request/response delivery of envelope bytes."""

    async def request(self, address: str, data: bytes, timeout_s: float = 5.0) -> bytes:
        """Send ``data`` to ``address``; return the reply bytes (possibly empty)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class HttpTransport:
    """Envelopes POSTed to ``{address}/p2p`` over aiohttp, with pooled connections.

    ``policy`` (node.net.addresses) decides which hosts may be called; None calls any host
    (a tenant's CLI, which only calls the peer its user named and the providers of
    verified adverts). Redirects are never followed: a peer's 3xx is an error, not an
    instruction to POST somewhere else.
    """

    #: Idle pooled connections are closed sooner than a daemon's header timeout
    #: (``[http] header_timeout_s``, 10 s by default), so the client never reuses a
    #: connection the server is just closing.
    KEEPALIVE_S = 5.0

    def __init__(self, max_reply_bytes: int = 1 << 20, policy: AddressPolicy | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._max_reply = max_reply_bytes
        self.policy = policy

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = None if self.policy is None else PolicyResolver(self.policy)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=256,
                    limit_per_host=16,
                    keepalive_timeout=self.KEEPALIVE_S,
                    resolver=resolver,
                ),
                headers={"Content-Type": ENVELOPE_CONTENT_TYPE},
            )
        return self._session

    async def request(self, address: str, data: bytes, timeout_s: float = 5.0) -> bytes:
        if self.policy is not None:
            self.policy.check(address)
        session = self._get_session()
        try:
            async with session.post(
                address.rstrip("/") + P2P_PATH,
                data=data,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                body = await _read_reply(resp, self._max_reply, address)
                if resp.status >= 300:
                    raise _error_from_reply(resp.status, body)
                return body
        except TimeoutError as e:
            raise PeerTimeoutError(f"{address} did not answer within {timeout_s} s") from e
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, AddressRefusedError):
                raise e.os_error from None
            raise PeerUnavailableError(f"{address}: {e}") from e
        except aiohttp.ClientError as e:
            raise PeerUnavailableError(f"{address}: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def tenant_transport(peer: str) -> HttpTransport:
    """A tenant's transport: it calls the providers of adverts it got from ``peer``.

    A tenant has no address of its own, so the peer its user named stands in for it: a
    tenant asking a loopback node (the local cluster) may call loopback providers, one
    asking a public IP calls public providers only (node.net.addresses). A peer named by
    host name (a compose or LAN network, as often as a public one) allows private
    ranges: a tenant is a client, not a server relaying strangers' requests.
    """
    policy = AddressPolicy.for_node(peer)
    host = urlsplit(peer).hostname or ""
    if host != "localhost" and not _is_ip(host):
        policy = AddressPolicy(allow_loopback=policy.allow_loopback, allow_private=True)
    return HttpTransport(policy=policy)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _read_reply(resp: aiohttp.ClientResponse, cap: int, address: str) -> bytes:
    """The whole reply body, refused as soon as it passes ``cap``.

    ``content.read(n)`` returns whatever is buffered, not n bytes: one call truncated a
    360 KB directory reply. Read to the end of the body, chunk by chunk.
    """
    if resp.content_length is not None and resp.content_length > cap:
        raise RemoteProtocolError(f"reply from {address} exceeds the size cap of {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(64 * 1024):
        size += len(chunk)
        if size > cap:
            raise RemoteProtocolError(f"reply from {address} exceeds the size cap of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_from_reply(status: int, body: bytes) -> MercatoError:
    try:
        err = json.loads(body)["error"]
        return error_from_code(str(err["code"]), str(err["reason"]))
    except (ValueError, KeyError, TypeError):
        return RemoteProtocolError(f"peer answered HTTP {status}")


class MemoryNetwork:
    """An in-process network: addresses map to handlers; latency and loss injectable.

    For tests about logic and for simulating thousands of nodes in one process. Loss
    and latency are drawn from a seeded random source so a run can be replayed.
    """

    def __init__(self, *, seed: int = 0, loss: float = 0.0, latency_s: float = 0.0) -> None:
        self._handlers: dict[str, Handler] = {}
        self._down: set[str] = set()
        self._partition: dict[str, int] = {}
        self.loss = loss
        self.latency_s = latency_s
        self.random = random.Random(seed)
        self.delivered = 0
        self.dropped = 0

    def attach(self, address: str, handler: Handler) -> None:
        self._handlers[address] = handler
        self._down.discard(address)

    def detach(self, address: str) -> None:
        self._handlers.pop(address, None)

    def set_down(self, address: str, down: bool = True) -> None:
        """Simulate a crash (down) or recovery without removing the handler."""
        if down:
            self._down.add(address)
        else:
            self._down.discard(address)

    def partition(self, groups: list[list[str]]) -> None:
        """Only addresses in the same group can talk; unlisted addresses form group -1."""
        self._partition = {a: i for i, g in enumerate(groups) for a in g}

    def heal(self) -> None:
        self._partition = {}

    def transport(self, source: str) -> MemoryTransport:
        return MemoryTransport(self, source)

    def _reachable(self, source: str, dest: str) -> bool:
        if dest in self._down or source in self._down or dest not in self._handlers:
            return False
        return self._partition.get(source, -1) == self._partition.get(dest, -1)

    async def deliver(self, source: str, dest: str, data: bytes, timeout_s: float) -> bytes:
        if not self._reachable(source, dest):
            self.dropped += 1
            raise PeerUnavailableError(f"{dest} is unreachable from {source}")
        if self.loss and self.random.random() < self.loss:
            self.dropped += 1
            raise PeerTimeoutError(f"message to {dest} was lost")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.delivered += 1
        return await self._handlers[dest](data, source)


class MemoryTransport:
    """One node's view of a MemoryNetwork."""

    def __init__(self, network: MemoryNetwork, source: str) -> None:
        self._network = network
        self._source = source

    async def request(self, address: str, data: bytes, timeout_s: float = 5.0) -> bytes:
        return await self._network.deliver(self._source, address, data, timeout_s)

    async def close(self) -> None:
        return None
