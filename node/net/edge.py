"""The daemon's HTTP edge: how many connections a peer may hold, and for how long.

Without bounds, a peer that opens connections and sends nothing (or half a request)
holds a file descriptor each, forever: 300 idle connections once starved ``/healthz``
at the descriptor limit. Three bounds keep one peer from hurting the others:

* **per peer address**: at most ``max_per_peer`` open connections from one IP; more
  are answered 503 and closed at once;
* **in total**: at most ``max_total`` open connections. When a new peer arrives and the
  total is reached, the oldest connection of the peer holding the most is closed to
  make room, so a newcomer (an honest tenant, a liveness probe) is still served while
  an attacker holds many; a new connection from that top holder itself is refused;
* **time**: a request's head must arrive within ``header_timeout_s`` of the connection
  opening or going idle (aiohttp's keep-alive timer, which also runs before the first
  request), and its body within ``body_timeout_s`` (node.daemon).

The gate wraps the aiohttp protocol of each accepted socket; it never parses HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import TooManyConnectionsError

log = logging.getLogger("mercato.edge")


@dataclass(frozen=True)
class EdgeLimits:
    """Connection bounds of one daemon (``[http]`` in the config)."""

    max_total: int = 512
    max_per_peer: int = 64


def _refusal(code: str, reason: str) -> bytes:
    body = json.dumps({"error": {"code": code, "reason": reason}}).encode()
    head = (
        f"HTTP/1.1 {TooManyConnectionsError.http_status} Too Many Requests\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGate:
    """Admits, counts and evicts connections; one per listening daemon, on the loop."""

    def __init__(self, limits: EdgeLimits, on_event: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self._on_event = on_event or (lambda _code: None)
        self._by_peer: dict[str, list[_GatedProtocol]] = {}
        self.open = 0

    def protocol_factory(
        self, inner: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls per accepted socket."""
        return lambda: _GatedProtocol(self, inner)

    def held_by(self, peer: str) -> int:
        return len(self._by_peer.get(peer, ()))

    def _admit(self, conn: _GatedProtocol) -> str | None:
        """Register ``conn``; or return why it is refused (an error code)."""
        mine = self._by_peer.get(conn.peer, [])
        if len(mine) >= self.limits.max_per_peer:
            return TooManyConnectionsError.code
        if self.open >= self.limits.max_total:
            top = max(self._by_peer, key=lambda p: len(self._by_peer[p]))
            if len(self._by_peer[top]) <= len(mine) + 1:
                return TooManyConnectionsError.code  # the newcomer is (one of) the top holders
            self._by_peer[top][0].evict()
        self._by_peer.setdefault(conn.peer, []).append(conn)
        self.open += 1
        return None

    def _release(self, conn: _GatedProtocol) -> None:
        mine = self._by_peer.get(conn.peer)
        if mine is None or conn not in mine:
            return
        mine.remove(conn)
        self.open -= 1
        if not mine:
            del self._by_peer[conn.peer]


class _GatedProtocol(asyncio.Protocol):
    """Forwards to aiohttp's protocol once the gate admits the connection."""

    def __init__(self, gate: ConnectionGate, inner: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        refused = self._gate._admit(self)
        if refused is not None:
            self._gate._on_event(refused)
            reason = f"{self.peer} holds too many connections to this node"
            transport.write(_refusal(refused, reason))
            transport.close()
            return
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def evict(self) -> None:
        """Close this connection now to make room for another peer's."""
        self._gate._on_event("connection_evicted")
        self._gate._release(self)
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate._release(self)
        if self._inner is not None:
            self._inner.connection_lost(exc)
