"""The node: opens every incoming envelope, dispatches it through a typed table, and runs
discovery (advert publishing, rumor push, anti-entropy pull, peer exchange, expiry).

The node is transport-agnostic: the same code runs behind aiohttp in the daemon and on
the in-memory network in tests and simulations. Its clock and random source are passed
in. One TaskGroup owns every background task; ``close()`` cancels them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from market.catalog import check_advert
from market.directory import Directory, Entry, Offer
from node.net.metrics import NodeMetrics
from node.net.ratelimit import RateLimiter
from node.net.transport import Transport
from protocol import codec
from protocol.envelope import RESENT_VERBATIM, Envelope, open_envelope, seal
from protocol.errors import (
    MercatoError,
    RateLimitedError,
    RemoteProtocolError,
    TooLargeError,
    UnexpectedMessageError,
    WrongRecipientError,
)
from protocol.identity import Identity
from protocol.messages import (
    MAX_ITEMS,
    Advert,
    Body,
    DeviceGroup,
    DirectoryRequest,
    Hello,
    Interconnect,
    PeerInfo,
    PeerList,
)
from protocol.messages import (
    Directory as DirectoryMsg,
)
from protocol.replay import ReplayGuard

log = logging.getLogger("mercato.node")

Role = Literal["provider", "bootstrap", "tenant"]
#: What a provider sells right now: device groups (with their free ids) and fabric.
CapacityFn = Callable[[], tuple[list[DeviceGroup], Interconnect]]
#: A handler returns a body to seal as the reply, pre-sealed reply bytes, or None.
MessageHandler = Callable[[Envelope], Awaitable[Body | bytes | None]]
AGENT = "mercato/0.1"
#: Bytes of a directory answer besides its adverts and wanted ids: the envelope's fixed
#: fields and signature (about 200 bytes), the list headers and ``more``, with room to spare.
DIRECTORY_OVERHEAD = 1024
#: Least time between two capacity-triggered adverts (a burst coalesces into one).
ADVERT_HOLD_DOWN_S = 1.0


def wall_clock_ms() -> int:
    """The real clock in ms; nodes take a clock function so simulations can replace it."""
    return time.time_ns() // 1_000_000


@dataclass
class NodeSettings:
    """Everything a Node needs to know besides its collaborators (see node.config)."""

    role: Role
    address: str | None  # None for tenants, which are never called
    bootstrap: list[str] = field(default_factory=list)
    gossip_interval_s: float = 2.0
    fanout: int = 3
    #: Relayed news is batched: at most one push to ``fanout`` peers per this many
    #: seconds (None: a quarter of the gossip interval). See docs/simulation.md.
    push_interval_s: float | None = None
    request_timeout_s: float = 3.0
    max_peer_failures: int = 3
    max_peers: int = 1000
    advert_ttl_s: float = 60.0
    advert_refresh_fraction: float = 0.4
    max_message_bytes: int = 1 << 20
    rate_per_s: float = 200.0
    burst: int = 400
    replay_window_ms: int = 120_000
    clock_skew_ms: int = 30_000
    directory_page: int = 500


class VerifiedAdverts:
    """A bounded memo of advert envelopes already opened and verified: exact bytes -> Envelope.

    A node hears each advert several times (from each peer that pushes it, and again in
    anti-entropy); a byte-identical copy opens to the same result, so the memo skips the
    decode and the signature check. Opening a relayed advert takes no clock, replay guard
    or recipient (expiry is the directory's business), so the result depends only on the
    bytes and the size limits: nodes with the same limits may share one memo, as the
    nodes of a simulation do (each advert is still verified once, for real).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._opened: OrderedDict[bytes, Envelope] = OrderedDict()
        # Keys of _opened whose advert also passed check_advert (a pure function of it).
        self._bounded: set[bytes] = set()
        self.hits = 0
        self.misses = 0

    def open(self, raw: bytes, now_ms: int, limits: codec.Limits) -> Envelope:
        """The opened envelope of ``raw``; raises like ``open_envelope`` (errors are not kept)."""
        env = self._opened.get(raw)
        if env is not None:
            self.hits += 1
            self._opened.move_to_end(raw)
            return env
        self.misses += 1
        env = open_envelope(raw, now_ms=now_ms, replay=None, limits=limits)
        self._opened[env.raw] = env
        if len(self._opened) > self.max_entries:
            old, _ = self._opened.popitem(last=False)
            self._bounded.discard(old)
        return env

    def open_advert(self, raw: bytes, now_ms: int, limits: codec.Limits) -> Envelope:
        """``open`` and the advert's catalog bounds (``check_advert``), memoised together.

        Both depend only on the bytes, so a copy that passed once passes again: a node
        hears each advert from several peers, and the bounds check cost as much as the
        rest of a duplicate's handling. Raises UnexpectedMessageError for an envelope
        that is not an advert, ImplausibleAdvertError past the bounds (never kept).
        """
        env = self._opened.get(raw)
        if env is not None and raw in self._bounded:
            # The common case, once per copy a node hears: one lookup, no further call.
            self.hits += 1
            self._opened.move_to_end(raw)
            return env
        env = self.open(raw, now_ms, limits)
        if env.raw in self._bounded:
            return env
        if not isinstance(env.body, Advert):
            raise UnexpectedMessageError(f"directory holds adverts, not {env.type}")
        check_advert(env.body)  # 10,000 H100 at 2^63-1 FLOP/s is not a thing
        if env.raw in self._opened:
            self._bounded.add(env.raw)
        return env


@dataclass
class Peer:
    """A node we can call. Keyed by address: bootstrap peers are known before their id."""

    address: str
    node_id: str | None = None
    role: Role = "provider"
    last_seen_ms: int = 0
    failures: int = 0


class Node:
    """One Mercato node (provider, bootstrap or tenant client)."""

    def __init__(
        self,
        identity: Identity,
        settings: NodeSettings,
        transport: Transport,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        rng: random.Random | None = None,
        capacity: CapacityFn | None = None,
        metrics: NodeMetrics | None = None,
        on_advert: Callable[[Entry], None] | None = None,
        on_peer: Callable[[Peer], None] | None = None,
        nonce: Callable[[], bytes] | None = None,
        verified: VerifiedAdverts | None = None,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.settings = settings
        self.transport = transport
        self.clock = clock
        self.rng = rng or random.Random()
        #: Envelope nonces: random by default; a simulation passes a seeded source.
        self.nonce: Callable[[], bytes] = nonce or (lambda: os.urandom(16))
        self.verified = verified if verified is not None else VerifiedAdverts()
        self.capacity = capacity
        self.metrics = metrics or NodeMetrics()
        self._in: dict[str, Any] = {}  # message type -> its messages_in child counter
        self._out: dict[str, Any] = {}  # ... messages_out
        self.directory = Directory()
        self.peers: dict[str, Peer] = {}
        # Derived from peers, rebuilt after _peers_changed(): gossip samples peers and
        # looks up senders many times a second, far more often than the table changes.
        self._peer_list: list[Peer] | None = None
        self._address_by_id: dict[str, str] = {}
        self._peer_infos: dict[tuple[str, str, Role], PeerInfo] = {}
        self.guard = ReplayGuard(settings.replay_window_ms, settings.clock_skew_ms)
        self.limiter = RateLimiter(settings.rate_per_s, settings.burst)
        self.limits = codec.Limits(max_size=settings.max_message_bytes)
        self._on_advert = on_advert
        self._on_peer = on_peer
        self._advert_seq = 0
        self._own_advert: bytes | None = None
        self._capacity_changed = asyncio.Event()
        self._news: dict[str, bytes] = {}  # provider -> newest advert waiting to be relayed
        self._news_from: set[str] = set()  # peers it came from (not pushed back to them)
        self._news_ready = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        #: Extra long-running coroutines (role services) run in the node's TaskGroup.
        self.services: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.handlers: dict[str, MessageHandler] = {
            Hello.TYPE: self._on_hello,
            DirectoryRequest.TYPE: self._on_directory_request,
            DirectoryMsg.TYPE: self._on_directory_push,
        }
        for address in settings.bootstrap:
            if address != settings.address:
                self.peers[address] = Peer(address=address, role="bootstrap")

    # --- incoming ---------------------------------------------------------------

    async def handle(self, data: bytes, remote: str = "") -> bytes:
        """Open, check and dispatch one request; return the sealed reply or b"".

        Raises a MercatoError (with its code) for every rejection, after counting it.
        """
        try:
            if len(data) > self.limits.max_size:
                raise TooLargeError(f"{len(data)} bytes exceeds {self.limits.max_size}")
            env = open_envelope(
                data,
                now_ms=self.clock(),
                replay=self.guard,
                recipient=self.node_id,
                limits=self.limits,
            )
            if not self.limiter.allow(env.sender, self.clock() / 1000):
                raise RateLimitedError(f"{env.sender} exceeds {self.settings.rate_per_s}/s")
            handler = self.handlers.get(env.type)
            if handler is None:
                raise UnexpectedMessageError(f"this node does not accept {env.type} messages")
            self._count(self._in, self.metrics.messages_in, env.type)
            reply = await handler(env)
        except MercatoError as e:
            self.metrics.rejections.labels(e.code).inc()
            log.debug("rejected message from %s: %s", remote or "?", e)
            raise
        if reply is None:
            return b""
        if isinstance(reply, bytes):
            return reply
        return self.seal(reply, to=env.sender)

    @staticmethod
    def _count(children: dict[str, Any], counter: Any, message_type: str) -> None:
        # labels() takes a lock and builds its key on every call; a message type's child
        # counter never changes, so it is looked up once (two counts per message).
        child = children.get(message_type)
        if child is None:
            child = children[message_type] = counter.labels(message_type)
        child.inc()

    def seal(self, body: Body, to: str | None = None) -> bytes:
        return seal(self.identity, body, now_ms=self.clock(), nonce=self.nonce(), to=to)

    # --- outgoing ---------------------------------------------------------------

    async def request(
        self, peer: Peer, body: Body, *, sealed: bytes | None = None, timeout_s: float | None = None
    ) -> Envelope | None:
        """Send ``body`` to ``peer``; return its opened reply, if any. Updates peer health.

        ``sealed`` sends those envelope bytes instead of sealing ``body`` afresh (when
        the caller must keep the exact bytes, e.g. an award whose hash the accept names).
        """
        self._count(self._out, self.metrics.messages_out, body.TYPE)
        data = sealed if sealed is not None else self.seal(body, to=peer.node_id)
        try:
            raw = await self.transport.request(
                peer.address, data, timeout_s or self.settings.request_timeout_s
            )
            reply = None
            if raw:
                reply = open_envelope(
                    raw,
                    now_ms=self.clock(),
                    replay=self.guard,
                    recipient=self.node_id,
                    limits=self.limits,
                    verbatim=RESENT_VERBATIM,  # the caller checks it answers its question
                )
                if peer.node_id is not None and reply.sender != peer.node_id:
                    raise RemoteProtocolError("reply signed by another node than the peer")
                if reply.type in RESENT_VERBATIM and reply.recipient != self.node_id:
                    # Exempt from freshness, so it must at least be ours (section 5).
                    raise WrongRecipientError(f"a {reply.type} must name its requester")
        except MercatoError as e:
            self.metrics.send_failures.labels(e.code).inc()
            self._peer_failed(peer)
            raise
        peer.failures = 0
        peer.last_seen_ms = self.clock()
        if reply is not None and peer.node_id is None:
            peer.node_id = reply.sender
            self._peers_changed()
        return reply

    def _peer_failed(self, peer: Peer) -> None:
        peer.failures += 1
        if peer.failures >= self.settings.max_peer_failures and peer.role != "bootstrap":
            if self.peers.pop(peer.address, None) is not None:
                self._peers_changed()
                log.info("dropped dead peer %s after %d failures", peer.address, peer.failures)
            self.metrics.peers.set(len(self.peers))

    # --- peers ------------------------------------------------------------------

    def learn_peer(self, address: str, node_id: str | None, role: Role) -> None:
        if self._learn(address, node_id, role):
            self.metrics.peers.set(len(self.peers))

    def _learn(self, address: str, node_id: str | None, role: Role) -> bool:
        """``learn_peer`` without setting the ``peers`` gauge; True when the peer is new (a
        peer list names 50 peers: the gauge, which takes a lock, is set once for all)."""
        if address == self.settings.address or node_id == self.node_id:
            return False
        added = False
        peer = self.peers.get(address)
        if peer is None:
            if len(self.peers) >= self.settings.max_peers:
                return False
            peer = self.peers[address] = Peer(address=address, node_id=node_id, role=role)
            self._peer_added(peer)
            added = True
            if self._on_peer is not None:
                self._on_peer(peer)
        elif node_id is not None and peer.node_id is None:
            peer.node_id = node_id
            self._peers_changed()
        if peer.role != "bootstrap":
            peer.role = role
        return added

    def _peers_changed(self) -> None:
        self._peer_list = None

    def _peer_added(self, peer: Peer) -> None:
        """Keep the index after ``peer`` became the newest key of ``peers``: it goes last in
        the dict, so a rebuild would only append it (and map its id unless one already is).
        Peers are learned all the time (adverts, peer lists); rebuilding the index of a
        thousand peers for each one was most of ``_peer_index``'s cost."""
        if self._peer_list is not None:
            self._peer_list.append(peer)
            if peer.node_id is not None:
                self._address_by_id.setdefault(peer.node_id, peer.address)

    def _peer_index(self) -> list[Peer]:
        if self._peer_list is None:
            self._peer_list = list(self.peers.values())
            self._address_by_id = {}
            for p in self._peer_list:
                if p.node_id is not None:
                    self._address_by_id.setdefault(p.node_id, p.address)
        return self._peer_list

    def sample_peers(
        self, k: int, exclude: Iterable[str] = (), *, spare_bootstrap: bool = False
    ) -> list[Peer]:
        """``k`` random peers. ``spare_bootstrap``: leave bootstrap nodes out while at least
        ``k`` others are known; every node knows them, so routine gossip would make them
        hotspots whose load grows with the network."""
        skip = set(exclude)
        peers = self._peer_index()
        # Draw random indices until k fit: O(k) for the usual few of many peers, where
        # filtering the whole table first would cost O(peers) on every call.
        picked: list[Peer] = []
        spared: list[Peer] = []
        tried: set[int] = set()
        while len(picked) < k and len(tried) < len(peers):
            i = self.rng.randrange(len(peers))
            if i in tried:
                continue
            tried.add(i)
            peer = peers[i]
            if peer.address in skip:
                continue
            if spare_bootstrap and peer.role == "bootstrap":
                spared.append(peer)
                continue
            picked.append(peer)
        return picked + spared[: k - len(picked)]

    async def _on_hello(self, env: Envelope) -> Body | bytes | None:
        hello = env.body
        assert isinstance(hello, Hello)
        if hello.address is not None and hello.role != "tenant":
            self.learn_peer(hello.address, env.sender, hello.role)
        known = [
            self._peer_info(p.node_id, p.address, p.role)
            for p in self.sample_peers(50, exclude=[hello.address or ""])
            if p.node_id is not None
        ]
        return PeerList(peers=known)

    def _peer_info(self, node_id: str, address: str, role: Role) -> PeerInfo:
        """A peer as a peer list names it; built (validated) once per peer, not once per
        hello: each answer lists 50 peers, most of them listed before."""
        key = (node_id, address, role)
        info = self._peer_infos.get(key)
        if info is None:
            if len(self._peer_infos) >= 2 * self.settings.max_peers:
                self._peer_infos.clear()  # peers come and go: never more than a table's worth
            info = self._peer_infos[key] = PeerInfo(node_id=node_id, address=address, role=role)
        return info

    async def exchange_peers(self, peer: Peer) -> None:
        """Hello to ``peer``; learn the peers it knows."""
        hello = Hello(
            role=self.settings.role,
            address=self.settings.address if self.settings.role != "tenant" else None,
            agent=AGENT,
        )
        reply = await self.request(peer, hello)
        if reply is not None and isinstance(reply.body, PeerList):
            added = False
            for info in reply.body.peers:
                added = self._learn(info.address, info.node_id, info.role) or added
            if added:
                self.metrics.peers.set(len(self.peers))

    # --- directory --------------------------------------------------------------

    def ingest_advert(self, raw: bytes) -> Offer | None:
        """Verify a relayed advert envelope and offer it to the directory.

        Relayed adverts keep their provider's original signature and timestamp, so the
        replay window does not apply (freshness is the advert's own ``expires_ms``, and a
        replayed advert can never win because it never carries a higher ``seq``).
        Returns None when the advert is rejected (counted by code).
        """
        offered = self._offer(raw)
        return None if offered is None else offered[0]

    def _offer(self, raw: bytes) -> tuple[Offer, Advert] | None:
        """``ingest_advert``, also returning the advert (None when it was rejected)."""
        now = self.clock()
        try:
            env = self.verified.open_advert(raw, now, self.limits)
        except MercatoError as e:
            self._advert_rejected(e)
            return None
        advert = env.body
        assert isinstance(advert, Advert)  # open_advert let nothing else through
        return self._offer_opened(env, advert, now), advert

    def _advert_rejected(self, e: MercatoError) -> None:
        self.metrics.rejections.labels(e.code).inc()
        log.debug("dropped relayed advert: %s", e)

    def _offer_opened(self, env: Envelope, advert: Advert, now: int) -> Offer:
        """Offer an opened advert (``env.body``) to the directory and act on the outcome."""
        # env.raw: the memo's copy, so identical adverts share one bytes object.
        result = self.directory.offer(advert, env.raw, now)
        if result is Offer.EXPIRED:
            self.metrics.rejections.labels("expired_advert").inc()
        if result.accepted:
            if result is Offer.NEW:  # a newer advert replaces one: the count stays
                self.metrics.adverts.set(len(self.directory))
            if advert.provider != self.node_id:
                self.learn_peer(advert.address, advert.provider, "provider")
            entry = self.directory.get(advert.provider)
            if entry is not None and self._on_advert is not None:
                self._on_advert(entry)
        return result

    def _ingest_batch(self, raws: list[bytes]) -> list[Entry]:
        """Ingest relayed adverts in order; the directory entries of those that were news.

        Most of what a node hears is a copy of an advert it already holds, or an older
        one: every advert reaches every node, from several peers and again in
        anti-entropy (in the simulator, quadratic in the number of nodes). The memo
        (``VerifiedAdverts``) opens such a copy with one lookup, and one comparison with
        the advert held settles it here: the directory's ``offer`` would call a live
        advert no newer than the one held a duplicate or older, which changes nothing
        and is not counted. Anything else (new, newer, expired) takes the full path.
        """
        fresh: list[Entry] = []
        if not raws:
            return fresh
        now = self.clock()
        open_advert = self.verified.open_advert
        held_entry = self.directory.get
        limits = self.limits
        for raw in raws:
            try:
                env = open_advert(raw, now, limits)
            except MercatoError as e:
                self._advert_rejected(e)
                continue
            advert: Advert = env.body  # type: ignore[assignment]  # open_advert checked it
            held = held_entry(advert.provider)
            if held is not None and advert.seq <= held.advert.seq and advert.expires_ms > now:
                continue  # Offer.DUPLICATE or Offer.OLDER
            result = self._offer_opened(env, advert, now)
            if result is Offer.NEW or result is Offer.NEWER:
                entry = held_entry(advert.provider)
                if entry is not None:
                    fresh.append(entry)
        return fresh

    async def _on_directory_request(self, env: Envelope) -> Body | bytes | None:
        req = env.body
        assert isinstance(req, DirectoryRequest)
        missing, wanted, more = self.directory.diff_packed(
            req.digest,
            self.clock(),
            min(req.limit, self.settings.directory_page),
        )
        # A digest may name 20,000 providers, a list holds 10,000 (the codec's limit): ask
        # for part of what the requester holds newer now, the rest in a later round.
        wanted = wanted[:MAX_ITEMS]
        # The whole answer must fit the message limit every receiver applies (1 MiB
        # unless both sides raised it): adverts go in while they fit, the rest in the
        # next page. One too large for any answer is never sent (no receiver takes it).
        budget = min(self.limits.max_size, codec.DEFAULT_LIMITS.max_size) - DIRECTORY_OVERHEAD
        budget -= sum(len(w) + 2 for w in wanted)
        room = budget
        adverts: list[bytes] = []
        for e in missing:
            cost = len(e.envelope) + 5  # bin 32 header
            if cost > budget:
                continue
            if cost > room:
                more = True
                break
            adverts.append(e.envelope)
            room -= cost
        return DirectoryMsg(adverts=adverts, wanted=wanted, more=more)

    def advert_batches(self, adverts: list[bytes]) -> list[list[bytes]]:
        """``adverts`` in batches whose ``directory`` message fits every receiver's limit.

        Large adverts (hundreds of KB each) in one push would make a message no peer
        takes (``too_large``), and the news would never spread.
        """
        budget = min(self.limits.max_size, codec.DEFAULT_LIMITS.max_size) - DIRECTORY_OVERHEAD
        batches: list[list[bytes]] = []
        room = 0
        for raw in adverts:
            cost = len(raw) + 5  # bin 32 header
            if cost > budget:
                continue  # no receiver takes it in any message
            if not batches or cost > room:
                batches.append([])
                room = budget
            batches[-1].append(raw)
            room -= cost
        return batches

    async def _on_directory_push(self, env: Envelope) -> Body | bytes | None:
        msg = env.body
        assert isinstance(msg, DirectoryMsg)
        fresh = self._ingest_batch(msg.adverts)
        if fresh:
            # Rumor mongering: relay the news, batched (see _push_loop).
            for entry in fresh:
                self._news[entry.provider] = entry.envelope
            self._news_from.add(self._address_of(env.sender))
            self._news_ready.set()
        return None

    def _address_of(self, node_id: str) -> str:
        self._peer_index()
        return self._address_by_id.get(node_id, "")

    async def _push(self, adverts: list[bytes], exclude: Iterable[str] = ()) -> None:
        """Rumor mongering: push news to ``fanout`` random peers (not back to its source)."""
        targets = self.sample_peers(self.settings.fanout, exclude=exclude, spare_bootstrap=True)
        msg = DirectoryMsg(adverts=adverts)
        await asyncio.gather(*(self._try_request(p, msg) for p in targets))

    async def _try_request(self, peer: Peer, body: Body) -> None:
        # The request coroutine is made inside the gathered task, so a task cancelled
        # before it starts (at close) leaves no never-awaited coroutine behind.
        with contextlib.suppress(MercatoError):
            await self.request(peer, body)

    async def anti_entropy(self, peer: Peer) -> int:
        """Pull what ``peer`` has that we lack, push what it lacks. Returns adverts learned."""
        learned = 0
        for _ in range(100):  # pages; bounded so a lying peer cannot keep us here
            digest = self.directory.packed_digest(self.clock())
            limit = self.settings.directory_page
            reply = await self.request(peer, DirectoryRequest(digest=digest, limit=limit))
            if reply is None or not isinstance(reply.body, DirectoryMsg):
                return learned
            page = reply.body
            fresh = self._ingest_batch(page.adverts)
            learned += len(fresh)
            if page.wanted:
                theirs = [
                    self.directory.get(p) for p in page.wanted[: self.settings.directory_page]
                ]
                push = [e.envelope for e in theirs if e is not None]
                for batch in self.advert_batches(push):
                    await self.request(peer, DirectoryMsg(adverts=batch))
            if not page.more or not fresh:
                return learned
        return learned

    async def fetch_directory(self, peer: Peer) -> list[Entry]:
        """Pull the whole live directory from ``peer`` (what a tenant does)."""
        await self.anti_entropy(peer)
        return list(self.directory.live(self.clock()))

    # --- provider: adverts --------------------------------------------------------

    def capacity_changed(self) -> None:
        """Call when free units change: the provider re-advertises promptly."""
        self._capacity_changed.set()

    def make_advert(self) -> bytes:
        """Seal a fresh advert. ``seq`` is ms-clock based so it grows across restarts."""
        assert self.capacity is not None, "only providers advertise"
        assert self.settings.address is not None, "a provider needs an address"
        devices, interconnect = self.capacity()
        now = self.clock()
        self._advert_seq = max(self._advert_seq + 1, now)
        advert = Advert(
            provider=self.node_id,
            address=self.settings.address,
            devices=devices,
            interconnect=interconnect,
            seq=self._advert_seq,
            expires_ms=now + int(self.settings.advert_ttl_s * 1000),
        )
        self.metrics.free_units.set(advert.free_units)
        return self.seal(advert)

    async def advertise(self) -> None:
        """Publish a new advert: keep it ourselves and push it to ``fanout`` peers."""
        raw = self.make_advert()
        self._own_advert = raw
        self.ingest_advert(raw)
        await self._push([raw])

    # --- service ----------------------------------------------------------------

    async def _quiet(self, coro: Awaitable[object]) -> None:
        """Run a best-effort exchange; failures are already counted and logged."""
        with contextlib.suppress(MercatoError):
            await coro

    def spawn(self, coro: Awaitable[object]) -> None:
        """Run ``coro`` in the node's TaskGroup (closed with the node); errors are logged."""
        self._start_task(self._guarded(coro), coro)

    async def _guarded(self, coro: Awaitable[object]) -> None:
        try:
            await coro
        except MercatoError as e:
            log.info("background exchange failed: %s", e)
        except Exception:  # a bug in a handler's follow-up must not take the node down
            log.exception("background task failed")

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._start_task(self._quiet(coro), coro)

    def _start_task(self, wrapper: Coroutine[Any, Any, None], coro: Awaitable[object]) -> None:
        """Start ``wrapper`` in the TaskGroup, or drop it (and ``coro``) unrun when the node
        is not running or is stopping: a handler must never raise into the caller then."""
        if self._tasks is not None:
            try:
                task = self._tasks.create_task(wrapper)
            except RuntimeError:  # the group is shutting down (close() or a failed loop)
                pass
            else:
                if asyncio.iscoroutine(coro):
                    # A task cancelled before its first step never awaits ``coro``; closing
                    # it then avoids "never awaited" warnings (a no-op once it has run).
                    task.add_done_callback(lambda _: coro.close())
                return
        wrapper.close()
        if asyncio.iscoroutine(coro):
            coro.close()

    async def start(self) -> None:
        """Start the background loops and return once the node is bootstrapped."""
        self._runner = asyncio.create_task(self._run(), name=f"node-{self.node_id[:8]}")
        await self._started.wait()

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                await self._join()
                if self.capacity is not None:
                    await self._quiet(self.advertise())
                    tg.create_task(self._advert_loop())
                tg.create_task(self._gossip_loop())
                tg.create_task(self._push_loop())
                tg.create_task(self._expiry_loop())
                for service in self.services:
                    tg.create_task(service())
                self._started.set()
        finally:
            self._tasks = None
            self._started.set()

    async def _join(self) -> None:
        """Greet the bootstrap peers and ``fanout`` other known peers, at once, and pull
        their directories.

        A restarted daemon knows hundreds of peers from its store, some of them gone:
        greeting each in turn cost a request timeout per dead one before the node
        advertised (bench/simulate.py found restarted providers invisible for 50 s).
        Gossip reaches the rest of the table afterwards.
        """
        boot = [p for p in self.peers.values() if p.role == "bootstrap"]
        others = self.sample_peers(self.settings.fanout, exclude=[p.address for p in boot])

        async def greet(peer: Peer) -> None:
            with contextlib.suppress(MercatoError):
                await self.exchange_peers(peer)
                await self.anti_entropy(peer)

        await asyncio.gather(*(greet(p) for p in boot + others))

    async def _advert_loop(self) -> None:
        period = self.settings.advert_ttl_s * self.settings.advert_refresh_fraction
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._capacity_changed.wait(), timeout=period)
            self._capacity_changed.clear()
            await self._quiet(self.advertise())
            # Hold-down: a burst of capacity changes (leases made and ended in quick
            # succession) becomes one advert, not one flood of gossip per change.
            await asyncio.sleep(ADVERT_HOLD_DOWN_S)

    async def _push_loop(self) -> None:
        """Relay queued news at most once per push interval, in one message per peer.

        Pushing each advert on arrival costs every node ``fanout`` messages per advert
        anywhere in the network, so per-node load would grow with the number of
        providers; one batch per interval bounds it at ``fanout`` messages per interval
        (the bytes still grow with the news). A newer advert replaces a queued older one.
        """
        interval = self.settings.push_interval_s
        if interval is None:
            interval = self.settings.gossip_interval_s / 4
        page = self.settings.directory_page
        while True:
            await self._news_ready.wait()
            await asyncio.sleep(interval)
            self._news_ready.clear()
            now = self.clock()
            # The directory's entry: it may be newer still (learned by anti-entropy).
            news = [e.envelope for p in self._news if _live(e := self.directory.get(p), now)]
            sources, self._news, self._news_from = self._news_from, {}, set()
            for i in range(0, len(news), page):
                for batch in self.advert_batches(news[i : i + page]):
                    self._spawn(self._push(batch, exclude=sources))

    async def _gossip_loop(self) -> None:
        rounds = 0
        while True:
            # Jitter avoids every node of a cluster gossiping in lock-step.
            await asyncio.sleep(self.settings.gossip_interval_s * self.rng.uniform(0.75, 1.25))
            rounds += 1
            for peer in self.sample_peers(1, spare_bootstrap=True):
                await self._quiet(self.anti_entropy(peer))
                if rounds % 5 == 0 or len(self.peers) < self.settings.fanout:
                    await self._quiet(self.exchange_peers(peer))
            if not self.peers:
                for address in self.settings.bootstrap:
                    if address != self.settings.address:
                        self.peers[address] = Peer(address=address, role="bootstrap")
                self._peers_changed()

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.gossip_interval_s))
            gone = self.directory.expire(self.clock())
            if gone:
                self.metrics.adverts.set(len(self.directory))
                log.info("adverts expired: %s", ", ".join(p[:8] for p in gone))

    async def close(self) -> None:
        """Stop every background task (idempotent)."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    async def wait_closed(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner


def _live(entry: Entry | None, now_ms: int) -> TypeGuard[Entry]:
    return entry is not None and entry.advert.expires_ms > now_ms
