"""Deterministic simulation of thousands of Mercato nodes in one process.

Every node runs the real code: ``node.net.node.Node`` (adverts, rumor push, anti-entropy
pull, peer exchange, expiry), providers a real ``ProviderService`` with its
``BidEngine`` and a ``Store(':memory:')``, tenants a real ``Tenant`` running reverse
auctions; every message is a sealed, signed envelope that the receiver opens and
verifies. What is simulated is only the world around them:

* time: a virtual-time event loop (``node.net.simloop``) whose clock jumps to the next timer,
  so a simulated minute of 10,000 nodes takes as long as the CPU work it contains;
* the network: ``node.net.transport.MemoryNetwork`` with seeded latency (uniform 0.5-1.5 x
  the given one-way latency, each way), seeded loss of requests and replies (the sender
  waits its full request timeout, as over a real network), partitions that heal, and
  nodes that crash (cut off, tasks cancelled) and restart (same key and store, fresh
  memory, peers and adverts restored as ``node.daemon`` restores them from its store);
* randomness: identities from seeds, a seeded random source and nonce source per node.
  Ed25519 signatures are deterministic, so one seed gives byte-identical runs (the
  trace digest printed at the end is the same in any process, any PYTHONHASHSEED).

What the nodes share to save the simulator's time, none of it a shortcut of a check:
one ``VerifiedAdverts`` memo (an advert's bytes are opened, signature-checked and
bounds-checked once for all nodes; each node still offers it to its own directory, whose
verdict depends on what that node holds) and the process-wide memo of directory-request
digests that passed their checks (``protocol.messages``, a pure function of the bytes,
the same in the daemon). Every request and reply envelope is sealed by its sender and
opened, signature-checked and validated by its receiver (``SignatureOracle`` checks
the signatures ahead on a second core; a receiver's check passes only on its proof for
exactly those bytes, and runs ``verify`` itself otherwise). Python's garbage collector
is off during a run (``run_once`` says why).

Population: one bootstrap node, ``--providers`` providers that advertise and sell
(default N/50, so the directory grows with the network), and relays for the rest:
daemons that keep, serve and gossip the directory but sell nothing. A full directory
of N adverts at every one of N nodes is N^2 entries (10^8 at N = 10,000): more memory
and signature checks than one process holds, which is why most nodes are relays.

Timeline of one run (rounds are gossip intervals): nodes join at random times during
the first ``join`` seconds; cold-start convergence is timed until every node holds a
live advert from every provider; then 5 providers publish fresh adverts and the time
for each to reach 99 % and 100 % of the nodes is measured (news spread) while a window
of ``steady`` seconds counts messages and auctions; then (``--partition S``) the
network splits into two halves for S seconds, and (``--crash F``) a fraction F of the
nodes crash during the partition and restart before it heals; after the heal the run
waits until every live node holds every live provider's advert as of the heal.

With ``--fabricators F`` the tenants run sweeps instead of bare leases: each lease
holds one run of a trial, and results are spot-checked by the rule of
market.verification (see ``Sweeps``); a fraction F of the providers make results up.
Sweeping tenants settle as real ones do: they heartbeat their leases, countersign the
debit notes the replies carry and try a release again when it got no answer. The run
then also reports verification's extra spend (overall, in each tenant's first sweep, in
later ones by sweep number, in the last 10, with why each check was drawn), when each
fabricator was caught, whether any sweep's best came from one, and leases that lapsed
unpaid (an honest tenant has none; ``--lease-hold`` and ``--tenant-period`` compress
a sweep's time).

Invariants, checked on every run (exit code 1 when one breaks): after every order,
award and release a provider handles, and twice a second for all providers, its
BidEngine's device accounting holds and its actively leased devices never exceed its
devices; every lease row (tenant and provider side) carries an award signed by the
tenant and an accept signed by the provider whose ``award_hash`` is the SHA-256 of that
award envelope; every provider a tenant ordered from had an unexpired advert at the
order time; after the heal every live node's directory converges; no node task dies.

Usage::

    python bench/simulate.py                 # the table: N = 1000, 2000, 5000, 10000
    python bench/simulate.py --nodes 2000 --seed 3 --loss 0.05 --latency-ms 80
    python bench/simulate.py --quick         # N = 200, 500, 1000, shorter phases
    python bench/simulate.py --nodes 500 --providers 50 --steady 300 --fabricators 0.1
                                             # tenants run spot-checked sweeps (issue 16)
    python bench/simulate.py --nodes 11 --providers 10 --tenants 2 --steady 7500 \
        --lease-hold 2 --tenant-period 0.5 --fabricators 0 --partition 0 --crash 0
                                             # ~200 sweeps a tenant: the steady state

The last line printed is ``converge_rounds=<r> msgs_per_node_s=<m>`` for the largest N
(10,000 in the full table). docs/simulation.md has the figures and how they scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import functools
import gc
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import msgpack

import protocol.envelope as envelope_module
from market.bidding import BidEngine, Device, LeaseState
from market.verification import (
    FLOOR_RATE,
    MAX_VOTES,
    UNKNOWN_RATE,
    Tolerance,
    Verdict,
    best_needs_check,
    liars,
    may_take_trial,
    proven,
    should_check,
    verdict_of,
)
from node.net.node import Node, NodeSettings, VerifiedAdverts
from node.net.simloop import VirtualTimeLoop
from node.net.transport import MemoryNetwork
from node.provider.service import ProviderService
from node.store.node_store import LeaseRow, ReceiptRow, Store
from node.store.verify_store import VerifyStore
from node.tenant.client import AuctionReport, ReceiptRejected, Tenant
from protocol import codec
from protocol.envelope import Envelope, open_envelope, signed_part
from protocol.errors import MercatoError, PeerTimeoutError, PeerUnavailableError
from protocol.identity import Identity
from protocol.identity import verify as verify_signature
from protocol.messages import (
    Accept,
    Advert,
    Award,
    Interconnect,
    Order,
    Release,
    Requirement,
    remember_checked_digests,
)

#: Virtual epoch of every run (2026-01-01T00:00:00Z): clocks read BASE_MS + loop time.
BASE_MS = 1_767_225_600_000
NEWS_PROBES = 5
BID_WINDOW_MS = 1_000
TABLE_SIZES = (1000, 2000, 5000, 10_000)
QUICK_SIZES = (200, 500, 1000)

#: (model, memory bytes, dense FP16 FLOP/s, memory bandwidth B/s, floor micro-credits/h).
#: Figures from the vendors' data sheets as in market.catalog; floors are made up.
MODELS = (
    ("L4", 24 * 10**9, 121 * 10**12, 300 * 10**9, 400_000),
    ("A100-80GB", 80 * 10**9, 312 * 10**12, 2_039 * 10**9, 1_200_000),
    ("H100-SXM", 80 * 10**9, 989 * 10**12, 3_350 * 10**9, 2_400_000),
)

Kind = Literal["bootstrap", "provider", "relay"]


class InvariantError(Exception):
    """A simulation invariant broke: the run fails with exit code 1."""


@dataclass
class Params:
    """One run's knobs (see --help)."""

    nodes: int = 1000
    providers: int = 0  # 0: nodes // 50, at least 10
    tenants: int = 8
    seed: int = 1
    loss: float = 0.01
    latency_ms: float = 50.0
    partition_s: float = 40.0
    crash: float = 0.02
    interval_s: float = 2.0
    push_interval_s: float = 0.0  # 0: one relay batch per gossip interval
    fanout: int = 3
    ttl_s: float = 60.0
    request_timeout_s: float = 3.0
    max_peers: int = 1000
    join_s: float = 10.0
    steady_s: float = 20.0
    restart_after_s: float = 15.0
    budget_rounds: int = 60
    lease_hold_s: float = 10.0
    tenant_period_s: float = 2.0
    #: Fraction of providers that fabricate results; None: tenants only lease (no trials,
    #: no verification), as before issue 16. 0.0: an honest market with verification.
    fabricators: float | None = None
    sweep_trials: int = 24  # trials per sweep (the digits sweep's 24)
    #: A sweeping tenant heartbeats each lease it holds this often and countersigns the
    #: debit notes the replies carry (node/tenant/sweep.py beats every 1 s; any interval
    #: below the debit interval, 10 s, gets every note countersigned in time).
    heartbeat_s: float = 5.0
    #: How long a sweeping tenant keeps trying a release nobody answered (heartbeating
    #: meanwhile) before it gives the lease up, as node/tenant/sweep.py tries again.
    release_patience_s: float = 60.0
    #: Check signatures ahead in a second process (SignatureOracle): same results, less
    #: of this process's time. Off when runs already share the cores (--jobs).
    checker: bool = False

    @property
    def n_providers(self) -> int:
        return self.providers or max(10, self.nodes // 50)


@dataclass
class Result:
    """The figures of one run."""

    nodes: int
    providers: int
    seed: int
    converge_s: float = math.nan  # cold start: since the last join, 99 % hold every advert
    converge_rounds: float = math.nan
    converge_all_rounds: float = math.nan  # ... 100 %
    news_rounds_99: float = math.nan  # a fresh advert reaches 99 % (mean of the probes)
    news_rounds_all: float = math.nan
    msgs_per_node_s: float = 0.0  # envelopes sent (requests and replies), steady state
    bytes_per_node_s: float = 0.0
    msgs_per_node_s_by_kind: dict[str, float] = field(default_factory=dict)
    max_node_msgs_s: float = 0.0  # the busiest node: sent + received
    max_node_kind: str = ""
    requests_by_type: dict[str, float] = field(default_factory=dict)  # per node per s
    auctions_per_s: float = 0.0
    leases_per_s: float = 0.0
    auctions: int = 0
    leases: int = 0
    releases_failed: int = 0
    heal_rounds_99: float = math.nan
    heal_rounds_all: float = math.nan
    crashed: int = 0
    delivered: int = 0
    dropped: int = 0
    verify_hits: int = 0
    verify_misses: int = 0
    checker_hits: int = 0  # envelope signatures the second process had checked ahead
    checker_misses: int = 0  # ... that receivers checked themselves
    checker_cpu_s: float = 0.0  # the second process's CPU (cpu_s is this process's)
    sim_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    trace: str = ""
    verification: dict[str, Any] = field(default_factory=dict)  # with --fabricators


# --- signatures checked on the second core ------------------------------------------


#: Envelopes sent to the checker in one write (fewer system calls; a receiver opens an
#: envelope at least one simulated latency after it was sent, hundreds of messages later).
ORACLE_BATCH = 8
#: Proofs kept at most: an envelope never opened (lost, refused before its signature)
#: leaves its proof behind, and past this many they are dropped (those receivers, if
#: any, check the signature themselves).
ORACLE_MAX_PROOFS = 200_000
_PROOF = 64 + 32  # signature, SHA-256 of (public key, signed bytes)


def _proof_of(data: bytes) -> bytes:
    """The proof that ``data``'s signature verifies, or b"": its signature and the SHA-256
    of the key and the signed bytes, made only once the real ``verify`` passed on them."""
    try:
        env = codec.decode(data, codec.DEFAULT_LIMITS)
        key, sig = env["from"], env["sig"]
        message = signed_part(data, env)
        if type(key) is not bytes or type(sig) is not bytes:
            return b""
        verify_signature(key, sig, message)
    except (MercatoError, KeyError, TypeError, IndexError):
        return b""  # the receiver finds out why, itself
    return sig + hashlib.sha256(key + message).digest()


def _checker(requests: Connection, proofs: Connection, unused: list[Connection]) -> None:
    """The second process: verify every envelope the simulation sends, in order."""
    for conn in unused:  # without this, the parent's exit would not end our reads
        conn.close()
    with contextlib.suppress(EOFError, OSError, KeyboardInterrupt):
        while True:
            batch = msgpack.unpackb(requests.recv_bytes())
            proofs.send_bytes(b"".join([_proof_of(data) for data in batch]))


class SignatureOracle:
    """Ed25519 checks of the simulation's envelopes, done ahead on the second core.

    Every envelope the simulated network carries is also sent to a checker process as
    it leaves its sender; the checker opens it as far as the signature, runs the real
    ``protocol.identity.verify`` and answers a proof: the signature and the SHA-256 of
    (public key, signed bytes). While installed, ``protocol.envelope``'s ``verify`` is
    ``check``: a receiver's check passes on a proof for exactly its key, signature and
    signed bytes (SHA-256 binds them; a collision is not a thing), and otherwise runs
    the real ``verify`` itself, which decides every rejection. The node code and its
    order of checks are unchanged, and so is every result: only which core spends the
    ~60 us of a verification moves (a quarter of a 10,000-node run's CPU).
    """

    def __init__(self) -> None:
        self._children_cpu0 = _children_cpu_s()
        ctx = multiprocessing.get_context("fork")
        requests_r, self._requests = ctx.Pipe(duplex=False)
        self._proofs, proofs_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_checker,
            args=(requests_r, proofs_w, [self._requests, self._proofs]),
            name="signature-checker",
            daemon=True,
        )
        for conn in (self._requests, self._proofs):
            # 1 MiB pipes (Linux's default limit): a checker a few batches behind, or
            # descheduled for a moment, does not make the simulation wait on a write.
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        self._process.start()
        requests_r.close()
        proofs_w.close()
        self._batch: list[bytes] = []
        self._known: dict[bytes, bytes] = {}  # signature -> SHA-256(key + signed bytes)
        self.hits = 0
        self.misses = 0
        self.cpu_s = 0.0
        self._real = envelope_module.verify

    def submit(self, data: bytes) -> None:
        """Send ``data`` (an envelope on its way) to the checker."""
        batch = self._batch
        batch.append(data)
        if len(batch) >= ORACLE_BATCH:
            # Take the answers waiting first: a checker blocked on a full answer pipe
            # while this write blocks on a full request pipe would be a deadlock.
            self._collect()
            self._requests.send_bytes(msgpack.packb(batch))
            batch.clear()

    def _collect(self) -> None:
        known = self._known
        if len(known) > ORACLE_MAX_PROOFS:
            known.clear()
        while self._proofs.poll():
            answer = self._proofs.recv_bytes()
            for i in range(0, len(answer), _PROOF):
                known[answer[i : i + 64]] = answer[i + 64 : i + _PROOF]

    def check(self, public_key: bytes, signature: bytes, message: bytes) -> None:
        """``protocol.identity.verify``, answered by a proof when the checker made one."""
        proof = self._known.pop(signature, None)
        if proof is None:
            self._collect()
            proof = self._known.pop(signature, None)
        if proof is not None and proof == hashlib.sha256(public_key + message).digest():
            self.hits += 1
            return
        self.misses += 1
        self._real(public_key, signature, message)

    def __enter__(self) -> SignatureOracle:
        envelope_module.verify = self.check
        return self

    def __exit__(self, *exc: object) -> None:
        envelope_module.verify = self._real
        self._requests.close()
        self._proofs.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
        self.cpu_s = _children_cpu_s() - self._children_cpu0


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- network ----------------------------------------------------------------------


class SimNetwork(MemoryNetwork):
    """MemoryNetwork with per-direction seeded latency and loss, and per-node counters.

    A lost request or reply costs the sender its whole timeout (nobody tells it), and a
    lost reply means the handler did run: both are what a real network does.
    """

    def __init__(self, *, seed: int, loss: float, latency_s: float) -> None:
        super().__init__(seed=seed, loss=loss, latency_s=latency_s)
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        #: Checks the envelopes' signatures ahead, on the second core (None: receivers only).
        self.oracle: SignatureOracle | None = None

    async def deliver(self, source: str, dest: str, data: bytes, timeout_s: float) -> bytes:
        self.sent[source] += 1
        self.bytes_sent[source] += len(data)
        rnd = self.random
        if not self._reachable(source, dest):
            self.dropped += 1
            raise PeerUnavailableError(f"{dest} is unreachable from {source}")
        if self.loss and rnd.random() < self.loss:
            self.dropped += 1
            await asyncio.sleep(timeout_s)
            raise PeerTimeoutError(f"request to {dest} was lost")
        one_way = self.latency_s * rnd.uniform(0.5, 1.5)
        if self.oracle is not None:
            self.oracle.submit(data)
        if one_way:
            await asyncio.sleep(one_way)
        if not self._reachable(source, dest):  # it crashed or was cut off meanwhile
            self.dropped += 1
            await asyncio.sleep(max(0.0, timeout_s - one_way))
            raise PeerTimeoutError(f"{dest} did not answer")
        self.delivered += 1
        self.received[dest] += 1
        reply = await self._handlers[dest](data, source)
        if reply:
            self.sent[dest] += 1
            self.received[source] += 1
            self.bytes_sent[dest] += len(reply)
        if self.loss and rnd.random() < self.loss:
            self.dropped += 1
            await asyncio.sleep(max(0.0, timeout_s - one_way))
            raise PeerTimeoutError(f"reply from {dest} was lost")
        if reply and self.oracle is not None:
            self.oracle.submit(reply)
        if one_way:
            await asyncio.sleep(one_way)
        return reply


# --- members ----------------------------------------------------------------------


@dataclass
class Member:
    """One simulated daemon: its identity survives crashes, its Node does not."""

    index: int
    kind: Kind
    address: str
    identity: Identity
    devices: list[Device]
    store: Store | None = None
    node: Node | None = None
    engine: BidEngine | None = None
    alive: bool = False
    incarnation: int = 0
    saved_peers: list[tuple[str, str | None, str]] = field(default_factory=list)
    saved_adverts: list[bytes] = field(default_factory=list)


class SimTenant(Tenant):
    """A real Tenant that remembers which adverts its last auction ranked (to check them)."""

    seen: dict[str, Advert]
    seen_ms: int = 0

    def adverts(self) -> list[Advert]:
        got = super().adverts()
        self.seen = {a.provider: a for a in got}
        self.seen_ms = self.clock()
        return got


def seeded(seed: int, *parts: object) -> random.Random:
    # A str seed is hashed with SHA-512 by random.seed: independent of PYTHONHASHSEED.
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def seeded_secret(seed: int, tenant: int) -> bytes:
    """Tenant ``tenant``'s draw key (VerifyStore.draw_secret is random; here it follows
    the run's seed, so a run replays exactly)."""
    return hashlib.sha256(f"{seed}:draw-secret:{tenant}".encode()).digest()


class Simulation:
    """One run: builds the network, drives the timeline, checks invariants, measures."""

    def __init__(self, params: Params) -> None:
        self.p = params
        self.rng = seeded(params.seed, "sim")
        self.net = SimNetwork(
            seed=self.rng.getrandbits(64), loss=params.loss, latency_s=params.latency_ms / 1000
        )
        self.verified = VerifiedAdverts(max_entries=4 * params.n_providers * 16)
        self.fabricators: set[int] = set()  # member indices (drawn in _population)
        self.loop = asyncio.get_running_loop()
        self.trace = hashlib.sha256()
        self.result = Result(nodes=params.nodes, providers=params.n_providers, seed=params.seed)
        self.members = self._population()
        self.boot = self.members[0]
        self.tenants: list[SimTenant] = []
        self.tenant_groups: list[int] = []
        self.auctions = 0
        self.leases = 0
        self.release_failures = 0
        self.failures: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # --- building ---------------------------------------------------------------------

    def now_ms(self) -> int:
        return BASE_MS + int(self.loop.time() * 1000)

    def _population(self) -> list[Member]:
        p = self.p
        kinds: list[Kind] = ["bootstrap"]
        # Providers spread evenly through the indices, so every join wave has some.
        step = (p.nodes - 1) / p.n_providers
        provider_at = {1 + int(i * step) for i in range(p.n_providers)}
        kinds += ["provider" if i in provider_at else "relay" for i in range(1, p.nodes)]
        providers = [i for i, k in enumerate(kinds) if k == "provider"]
        if p.fabricators:
            chosen = seeded(p.seed, "fabricators").sample(
                providers, round(p.fabricators * len(providers))
            )
            self.fabricators = set(chosen)
        members = []
        for i, kind in enumerate(kinds):
            seed = hashlib.sha256(f"mercato-sim:{p.seed}:{i}".encode()).digest()
            devices: list[Device] = []
            if kind == "provider":
                r = seeded(p.seed, "devices", i)
                model, mem, flops, bw, floor = MODELS[r.randrange(len(MODELS))]
                price = floor * r.randint(80, 130) // 100
                devices = [
                    Device(f"gpu{j}", model, "gpu", mem, flops, bw, price, simulated=True)
                    for j in range(r.randint(1, 4))
                ]
            members.append(Member(i, kind, f"http://n{i}.sim", Identity.from_seed(seed), devices))
        return members

    def _event(self, *parts: object) -> None:
        self.trace.update(("|".join(str(x) for x in (self.now_ms(), *parts)) + "\n").encode())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except InvariantError as e:
                self.failures.append(str(e))
            except Exception as e:
                self.failures.append(f"simulation task failed: {e!r}")
                logging.getLogger("sim").exception("task failed")

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_node(self, m: Member) -> Node:
        p = self.p
        rng = seeded(p.seed, "node", m.index, m.incarnation)
        nonces = seeded(p.seed, "nonce", m.index, m.incarnation)
        settings = NodeSettings(
            role="bootstrap" if m.kind == "bootstrap" else "provider",
            address=m.address,
            bootstrap=[] if m.kind == "bootstrap" else [self.boot.address],
            gossip_interval_s=p.interval_s,
            fanout=p.fanout,
            push_interval_s=p.push_interval_s or p.interval_s,
            request_timeout_s=p.request_timeout_s,
            max_peers=p.max_peers,
            advert_ttl_s=p.ttl_s,
        )
        node = Node(
            m.identity,
            settings,
            self.net.transport(m.address),
            clock=self.now_ms,
            rng=rng,
            nonce=lambda: nonces.randbytes(16),
            verified=self.verified,
        )
        if m.kind == "provider":
            if m.store is None:
                m.store = Store(":memory:")
            engine = BidEngine(
                m.identity.node_id,
                m.devices,
                Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=len(m.devices)),
            )
            ProviderService(node, engine, m.store).start()
            m.engine = engine
            for t in (Order.TYPE, Award.TYPE, Release.TYPE):
                node.handlers[t] = self._checked(m, node.handlers[t])
        # What node.daemon._restore reloads from the store after a restart.
        for address, node_id, role in m.saved_peers:
            node.learn_peer(address, node_id, role)  # type: ignore[arg-type]
        for raw in m.saved_adverts:
            node.ingest_advert(raw)
        m.saved_peers, m.saved_adverts = [], []
        return node

    def _checked(
        self, m: Member, handler: Callable[[Envelope], Awaitable[Any]]
    ) -> Callable[[Envelope], Awaitable[Any]]:
        async def run(env: Envelope) -> Any:
            try:
                return await handler(env)
            finally:
                self.check_provider(m)

        return run

    async def start_member(self, m: Member, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - self.loop.time()))
        if self._stopping:
            return
        node = m.node = self._make_node(m)
        self.net.attach(m.address, node.handle)
        m.alive = True
        self._event("start", m.index, m.incarnation)
        await node.start()

    async def crash(self, m: Member) -> None:
        node = m.node
        assert node is not None
        now = self.now_ms()
        m.saved_peers = [(p.address, p.node_id, p.role) for p in node.peers.values()]
        m.saved_adverts = [e.envelope for e in node.directory.live(now)]
        m.alive = False
        self.net.set_down(m.address)
        await node.close()
        m.node, m.engine = None, None
        m.incarnation += 1
        self._event("crash", m.index)

    # --- tenants ----------------------------------------------------------------------

    def _make_tenants(self) -> None:
        for t in range(self.p.tenants):
            seed = hashlib.sha256(f"mercato-sim-tenant:{self.p.seed}:{t}".encode()).digest()
            nonces = seeded(self.p.seed, "tenant-nonce", t)
            tenant = SimTenant(
                Identity.from_seed(seed),
                Store(":memory:"),
                self.net.transport(f"http://tenant{t}.sim"),
                clock=self.now_ms,
                request_timeout_s=self.p.request_timeout_s,
                nonce=lambda n=nonces: n.randbytes(16),  # type: ignore[misc]
            )
            tenant.node.rng = seeded(self.p.seed, "tenant-rng", t)
            tenant.seen = {}
            self.tenants.append(tenant)
            self.tenant_groups.append(t % 2)

    async def tenant_loop(self, t: int) -> None:
        tenant = self.tenants[t]
        rng = seeded(self.p.seed, "tenant-loop", t)
        while not self._stopping:
            await asyncio.sleep(self.p.tenant_period_s * rng.uniform(0.5, 1.5))
            entry = self.members[rng.randrange(len(self.members))]
            try:
                await tenant.refresh(entry.address)
            except MercatoError:
                continue
            units = rng.randint(1, 2)
            report = await tenant.auction(
                Requirement(kind="gpu", min_memory_bytes=20 * 10**9),
                units,
                3_000_000,
                job_spec_hash=hashlib.sha256(f"job:{t}:{self.auctions}".encode()).hexdigest(),
                k=4,
                bid_window_ms=BID_WINDOW_MS,
                lease_ms=60_000,
                heartbeat_interval_ms=60_000,
            )
            self.check_candidates(tenant, report)
            self.auctions += 1
            self.leases += len(report.leases)
            self._event(
                "auction",
                t,
                report.order.order_id,
                report.state.value,
                ",".join(f"{x.provider[:8]}:{x.units}:{x.price}" for x in report.leases),
            )
            for lease in report.leases:
                self._spawn(self.hold_and_release(tenant, lease.lease_id))

    async def hold_and_release(self, tenant: SimTenant, lease_id: str) -> None:
        await asyncio.sleep(self.p.lease_hold_s)
        row = tenant.store.get_lease(lease_id)
        if row is None:
            raise InvariantError(f"tenant lost its lease row {lease_id}")
        try:
            await tenant.release(row)
        except MercatoError as e:  # the provider crashed, restarted or is cut off
            self.release_failures += 1
            self._event("release-failed", lease_id, e.code)

    # --- invariants ---------------------------------------------------------------------

    def check_provider(self, m: Member) -> None:
        if m.engine is not None:
            check_engine(m.engine, f"provider {m.index}")
        if m.store is not None:
            # What it signed, not what it remembers: this is what a crash used to break.
            check_signed_leases(
                m.store.list_leases(LeaseState.ACTIVE),
                m.devices,
                self.now_ms(),
                f"provider {m.index}",
            )

    def check_candidates(self, tenant: SimTenant, report: AuctionReport) -> None:
        order_ms = report.order.bid_deadline_ms - BID_WINDOW_MS
        if tenant.seen_ms != order_ms:
            raise InvariantError("the auction's adverts were not read at its order time")
        check_candidates(report.order, order_ms, [c.provider for c in report.asked], tenant.seen)

    def check_leases(self) -> int:
        rows: list[LeaseRow] = []
        for tenant in self.tenants:
            rows += tenant.store.list_leases()
        for m in self.members:
            if m.store is not None:
                rows += m.store.list_leases()
        check_lease_rows(rows)
        return len(rows)

    async def invariant_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for m in self.members:
                if m.alive:
                    self.check_provider(m)
                    runner = m.node._runner if m.node is not None else None
                    if runner is not None and runner.done():
                        raise InvariantError(f"node {m.index}'s tasks stopped by themselves")

    # --- measuring ----------------------------------------------------------------------

    def live_nodes(self) -> list[Node]:
        return [m.node for m in self.members if m.alive and m.node is not None]

    def own_seqs(self) -> dict[str, int]:
        """provider -> seq of its current own advert, for every live provider."""
        out = {}
        for m in self.members:
            if m.kind == "provider" and m.alive and m.node is not None:
                entry = m.node.directory.get(m.node.node_id)
                if entry is not None:
                    out[m.node.node_id] = entry.seq
        return out

    async def converge(
        self, want: Callable[[], dict[str, int]], since: float, budget_s: float
    ) -> tuple[float, float]:
        """Seconds from ``since`` until 99 % and 100 % of live nodes hold ``want()`` (or
        newer, unexpired). Polls every eighth of a round; NaN when not reached in budget."""
        t99 = t100 = math.nan
        step = self.p.interval_s / 8
        deadline = since + budget_s
        # node -> (want, directory version, holds, valid until): a directory that did not
        # change since the last poll still holds (or lacks) the same adverts until the
        # first of them expires. Checking every node against every provider on every
        # poll was O(N x providers), the simulation's own largest cost at 10,000 nodes.
        known: dict[Node, tuple[dict[str, int], int, bool, int]] = {}
        while self.loop.time() <= deadline:
            wanted = want()
            nodes = self.live_nodes()
            now = self.now_ms()
            holding = 0
            for n in nodes:
                seen = known.get(n)
                version = n.directory.version
                if seen is None or seen[0] is not wanted or seen[1] != version or now >= seen[3]:
                    until = _holds_until(n, wanted, now)
                    seen = known[n] = (
                        wanted,
                        version,
                        until > now,
                        until if until > now else _NEVER,
                    )
                holding += seen[2]
            elapsed = self.loop.time() - since
            if math.isnan(t99) and holding >= 0.99 * len(nodes):
                t99 = elapsed
            if holding == len(nodes):
                t100 = elapsed
                break
            await asyncio.sleep(step)
        return t99, t100

    async def news_probe(self, m: Member) -> tuple[float, float]:
        node = m.node
        assert node is not None
        start = self.loop.time()
        await node.advertise()  # what its advert loop does when capacity changes
        entry = node.directory.get(node.node_id)
        assert entry is not None
        target = {node.node_id: entry.seq}
        return await self.converge(lambda: target, start, 40 * self.p.interval_s)

    def _snapshot(self) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str]]:
        by_type: Counter[str] = Counter()
        for node in self.live_nodes():
            for metric in node.metrics.messages_out.collect():
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        by_type[s.labels["type"]] += int(s.value)
        return (
            Counter(self.net.sent),
            Counter(self.net.received),
            Counter(self.net.bytes_sent),
            by_type,
        )

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> Result:
        p, res = self.p, self.result
        rounds = p.interval_s
        res_t0 = time.monotonic()
        self._make_tenants()
        self._spawn(self.start_member(self.boot, 0.0))
        for m in self.members[1:]:
            self._spawn(self.start_member(m, self.rng.uniform(0.0, p.join_s)))
        self._spawn(self.invariant_loop())
        await asyncio.sleep(p.join_s)
        if p.fabricators is not None:
            self.sweeps = Sweeps(self)
            for t in range(len(self.tenants)):
                self._spawn(self.sweeps.tenant_loop(t))
        else:
            for t in range(len(self.tenants)):
                self._spawn(self.tenant_loop(t))
        providers = [m for m in self.members if m.kind == "provider"]

        # Cold start: every provider's advert (any seq) at 99 % / 100 % of the nodes.
        first = {m.identity.node_id: 0 for m in providers}
        t99, t100 = await self.converge(lambda: first, p.join_s, p.budget_rounds * rounds)
        res.converge_s = t99
        res.converge_rounds = t99 / rounds
        res.converge_all_rounds = t100 / rounds
        self._event("converged", t99, t100)
        self._fail_if_any()

        # Steady state: news spread probes, messages and auctions over a window.
        start = self.loop.time()
        before = self._snapshot()
        auctions0, leases0 = self.auctions, self.leases
        probes = [providers[i * len(providers) // NEWS_PROBES] for i in range(NEWS_PROBES)]

        async def probe(m: Member, delay: float) -> tuple[float, float]:
            await asyncio.sleep(delay)
            return await self.news_probe(m)

        probing = asyncio.gather(
            *(probe(m, i * p.steady_s / NEWS_PROBES / 2) for i, m in enumerate(probes))
        )
        await asyncio.sleep(p.steady_s)
        elapsed = self.loop.time() - start
        after = self._snapshot()
        self._measure(before, after, elapsed)
        res.auctions_per_s = (self.auctions - auctions0) / elapsed
        res.leases_per_s = (self.leases - leases0) / elapsed
        spreads = await probing
        res.news_rounds_99 = sum(s[0] for s in spreads) / len(spreads) / rounds
        res.news_rounds_all = sum(s[1] for s in spreads) / len(spreads) / rounds
        self._event("steady", res.msgs_per_node_s, res.auctions_per_s, spreads)
        self._fail_if_any()

        # Faults: a partition into two halves, with crashes and restarts inside it.
        if p.partition_s > 0 or p.crash > 0:
            await self.faults()
        self._fail_if_any()

        # Wind down: let the last leases be released, then stop everything.
        await asyncio.sleep(p.lease_hold_s + 2 * rounds)
        self._stopping = True
        leases = self.check_leases()
        self._event("leases", leases)
        res.sim_s = self.loop.time()
        res.auctions, res.leases = self.auctions, self.leases
        res.releases_failed = self.release_failures
        res.delivered, res.dropped = self.net.delivered, self.net.dropped
        res.verify_hits, res.verify_misses = self.verified.hits, self.verified.misses
        if p.fabricators is not None:
            res.verification = self.sweeps.figures()
            self._event("verification", json.dumps(res.verification, sort_keys=True))
        self._event("final", self._directories_digest(), res.delivered, res.dropped)
        await self.close()
        self._fail_if_any()
        res.trace = self.trace.hexdigest()
        res.wall_s = time.monotonic() - res_t0
        return res

    async def faults(self) -> None:
        p, res = self.p, self.result
        rounds = p.interval_s
        others = [m for m in self.members[1:]]
        split = self.rng.sample(range(len(self.members)), len(self.members) // 2)
        side_b = set(split) - {0}
        if p.partition_s > 0:
            groups: list[list[str]] = [[], []]
            for m in self.members:
                groups[1 if m.index in side_b else 0].append(m.address)
            for t, g in enumerate(self.tenant_groups):
                groups[g].append(f"http://tenant{t}.sim")
            self.net.partition(groups)
            self._event("partition", len(groups[0]), len(groups[1]))
        crash_at = p.partition_s / 4
        await asyncio.sleep(crash_at)
        victims = self.rng.sample(others, round(p.crash * len(others)))
        for m in victims:
            if m.alive:
                await self.crash(m)
        res.crashed = len(victims)
        for m in victims:
            self._spawn(self.start_member(m, self.loop.time() + p.restart_after_s))
        await asyncio.sleep(max(p.restart_after_s + rounds, p.partition_s - crash_at))
        self.net.heal()
        healed = self.loop.time()
        self._event("heal")
        want = self.own_seqs()  # every live provider's advert as of the heal (or newer)
        t99, t100 = await self.converge(lambda: want, healed, p.budget_rounds * rounds)
        res.heal_rounds_99, res.heal_rounds_all = t99 / rounds, t100 / rounds
        self._event("healed", t99, t100)
        if math.isnan(t100):
            laggards = [
                m.index
                for m in self.members
                if m.alive and m.node and not _holds(m.node, want, self.now_ms())
            ]
            raise InvariantError(
                f"directories did not converge within {p.budget_rounds} rounds of the heal: "
                f"{len(laggards)} nodes lag (e.g. {laggards[:5]})"
            )

    def _measure(
        self,
        before: tuple[Counter[str], Counter[str], Counter[str], Counter[str]],
        after: tuple[Counter[str], Counter[str], Counter[str], Counter[str]],
        elapsed: float,
    ) -> None:
        res = self.result
        sent = after[0] - before[0]
        received = after[1] - before[1]
        sent_bytes = after[2] - before[2]
        kinds = {m.address: m.kind for m in self.members}
        n = len(self.members)
        res.msgs_per_node_s = sum(sent[a] for a in kinds) / n / elapsed
        res.bytes_per_node_s = sum(sent_bytes[a] for a in kinds) / n / elapsed
        for kind in ("bootstrap", "provider", "relay"):
            addrs = [a for a, k in kinds.items() if k == kind]
            if addrs:
                res.msgs_per_node_s_by_kind[kind] = (
                    sum(sent[a] for a in addrs) / len(addrs) / elapsed
                )
        busiest = max(kinds, key=lambda a: (sent[a] + received[a], a))
        res.max_node_msgs_s = (sent[busiest] + received[busiest]) / elapsed
        res.max_node_kind = kinds[busiest]
        by_type = after[3] - before[3]
        res.requests_by_type = {t: c / n / elapsed for t, c in sorted(by_type.items())}

    def _directories_digest(self) -> str:
        h = hashlib.sha256()
        for m in self.members:
            if m.node is not None:
                h.update(m.address.encode())
                for e in sorted(m.node.directory.live(self.now_ms()), key=lambda e: e.provider):
                    h.update(f"{e.provider}:{e.seq};".encode())
        return h.hexdigest()

    def _fail_if_any(self) -> None:
        if self.failures:
            raise InvariantError("; ".join(self.failures[:5]))

    async def close(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(m.node.close() for m in self.members if m.node is not None))
        for m in self.members:
            if m.store is not None:
                m.store.close()
        for tenant in self.tenants:
            tenant.store.close()


# --- sweeps with spot checks (issue 16) ---------------------------------------------


@dataclass
class SimSweep:
    """One tenant's sweep in progress: trial results, open checks, what is left to run."""

    number: int
    truth: list[float]  # what an honest provider's trial reports (loss: lower is better)
    todo: list[int]  # trials waiting to be placed (first runs and re-runs)
    running: int = 0  # leases holding one of this sweep's runs
    results: dict[int, tuple[str, float]] = field(default_factory=dict)  # trial ->
    checked: set[int] = field(default_factory=set)
    checks: list[list[tuple[str, float]]] = field(default_factory=list)  # waiting: votes
    reruns: set[int] = field(default_factory=set)  # trials re-run after a liar's discard
    taken: Counter[str] = field(default_factory=Counter)  # provider -> trials run for it
    why: dict[int, str] = field(default_factory=dict)  # trial -> why its check was drawn


class Sweeps:
    """Tenants running sweeps on their leases and spot-checking the results.

    The rule is market.verification's, as node.tenant.verify.Verifier runs it: each
    result is re-run on another provider with the provider's check rate (from its streak
    of checked-valid results, kept in the tenant's real VerifyStore) and the same
    deterministic draw; a mismatch goes to a third provider (``decide``); the liar is
    dropped by this tenant (``VerifyStore.drop``, never asked again), its results of the
    sweep discarded and run again; the best is re-run before the sweep ends unless its
    provider is trusted (``best_needs_check``). Which providers are asked is the real
    Tenant.auction (market.asking's sampling, reputation, exclusions).

    What is modelled: the trial itself. A lease holds one run for ``lease_hold_s`` (the
    tenant pays for it through the real settlement); the run's metric is the trial's true
    value on an honest provider, and on a fabricator a made-up one better than any honest
    value (drawn at random, so two fabricators do not agree), as a provider that runs
    nothing and answers "succeeded, loss ..." would. The task exchange (workspace upload,
    sandbox, signed task result) is not simulated.
    """

    KINDS = ("trial", "rerun", "check", "decider")

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.p = sim.p
        self.tolerance = Tolerance()
        self.fab_ids = {sim.members[i].identity.node_id: i for i in sim.fabricators}
        self.current: list[SimSweep | None] = [None] * len(sim.tenants)
        self.sweep_no = [0] * len(sim.tenants)
        self.spend: Counter[str] = Counter()  # micro-credits paid, by kind of run
        self.runs: Counter[str] = Counter()
        self.results: Counter[tuple[int, str]] = Counter()  # (tenant, provider) -> returned
        self.caught_at: dict[tuple[int, str], int] = {}  # ... -> index of the catching result
        self.wrongly_caught = 0  # honest providers found in a minority (goal 0)
        self.unresolved = 0
        self.sweeps_done = 0
        self.fabricated_best = 0
        self.fabricated_results = 0  # fabricated values that ended up in a finished sweep
        # Spend of each tenant's first sweep (every provider new to it) and of later ones.
        self.spend_by_sweep: list[Counter[str]] = [Counter(), Counter()]
        # (tenant, sweep number) -> runs and spend by kind, checks by why they were drawn,
        # results by the rate their provider was checked at; and the sweeps that ended.
        self.by_sweep: dict[tuple[int, int], Counter[str]] = {}
        self.ended: list[tuple[int, int]] = []

    def store(self, t: int) -> VerifyStore:
        return VerifyStore(self.sim.tenants[t].store)

    def _new_sweep(self, t: int) -> SimSweep:
        self.sweep_no[t] += 1
        n = self.sweep_no[t]
        r = seeded(self.p.seed, "truth", t, n)
        trials = self.p.sweep_trials
        return SimSweep(n, [r.random() for _ in range(trials)], list(range(trials)))

    def _next_job(self, t: int) -> tuple[str, int, list[tuple[str, float]] | None] | None:
        """(kind, trial, votes of a check or None) to place next; None: nothing to place."""
        sw = self.current[t]
        if sw is None:
            sw = self.current[t] = self._new_sweep(t)
        if sw.checks:
            votes = sw.checks.pop(0)
            real = sum(1 for p, _ in votes if not p.startswith("#"))
            return ("check" if real == 1 else "decider", -1, votes)
        if sw.todo:
            n = sw.todo.pop(0)
            return ("rerun" if n in sw.reruns else "trial", n, None)
        if sw.running:
            return None
        # Everything ran and was judged: the best is re-run first unless trusted, and
        # again for the next best if it was discarded (Verifier.before_end).
        if sw.results:
            best = min(sw.results, key=lambda k: (sw.results[k][1], k))
            owner, value = sw.results[best]
            if best not in sw.checked and best_needs_check(self.store(t).trust(owner)):
                sw.why[best] = "best"
                return ("check", -1, [(owner, value), ("#trial", float(best))])
        self._finish(t, sw)
        return None

    def _finish(self, t: int, sw: SimSweep) -> None:
        self.sweeps_done += 1
        best_owner = None
        if sw.results:
            best = min(sw.results, key=lambda k: (sw.results[k][1], k))
            best_owner = sw.results[best][0]
            self.fabricated_best += best_owner in self.fab_ids
        self.fabricated_results += sum(1 for p, _ in sw.results.values() if p in self.fab_ids)
        self.sim._event("sweep", t, sw.number, (best_owner or "-")[:8])
        self.ended.append((t, sw.number))
        self.current[t] = None

    async def tenant_loop(self, t: int) -> None:
        """The tenant's sweeps: one auction per period, each lease holding one run."""
        sim = self.sim
        tenant = sim.tenants[t]
        rng = seeded(self.p.seed, "tenant-loop", t)
        while not sim._stopping:
            await asyncio.sleep(self.p.tenant_period_s * rng.uniform(0.5, 1.5))
            job = self._next_job(t)
            if job is None:
                continue
            kind, number, votes = job
            sw = self.current[t]
            assert sw is not None
            if votes is not None:
                number = self._trial_of(votes)
            involved = {p for p, _ in votes or [] if not p.startswith("#")}
            shut = self.store(t).dropped() | involved
            entry = sim.members[rng.randrange(len(sim.members))]
            report = None
            with contextlib.suppress(MercatoError):
                await tenant.refresh(entry.address)
                # A check goes to the most proven providers at hand, as Verifier's
                # _better_checker sends it: cheap fabricators that answer alike would
                # otherwise check each other. Newcomers check only when none is free.
                tries = [shut]
                if votes is None:
                    # Room for newcomers in trials (market.verification.may_take_trial,
                    # as Verifier.may_take applies it): while a proven provider is at
                    # hand, one that is not gets NEWCOMER_TRIALS trials of the sweep.
                    held = self._held_back(t, sw, shut, tenant)
                    if held:
                        tries.insert(0, shut | held)
                else:
                    proven = self._proven(t, shut)
                    if proven:
                        others = {a.provider for a in tenant.adverts()} - proven
                        tries.insert(0, shut | others)
                for exclude in tries:
                    report = await tenant.auction(
                        Requirement(kind="gpu", min_memory_bytes=20 * 10**9),
                        1,
                        3_000_000,
                        job_spec_hash=hashlib.sha256(f"sweep:{t}:{sw.number}".encode()).hexdigest(),
                        k=4,
                        bid_window_ms=BID_WINDOW_MS,
                        lease_ms=60_000,
                        heartbeat_interval_ms=60_000,
                        exclude=sorted(exclude),
                    )
                    if report.leases:
                        break
                    sim.check_candidates(tenant, report)
                    sim.auctions += 1
            if report is None or not report.leases or self.current[t] is not sw:
                self._put_back(sw, kind, number, votes)
                continue
            sim.check_candidates(tenant, report)
            sim.auctions += 1
            sim.leases += 1
            lease = report.leases[0]
            sim._event("sweep-lease", t, sw.number, kind, number, lease.provider[:8])
            sw.running += 1
            sim._spawn(self.run(t, sw, kind, number, votes, lease.lease_id))

    def _held_back(self, t: int, sw: SimSweep, shut: set[str], tenant: Tenant) -> set[str]:
        """Providers that may not take another trial of ``sw`` (may_take_trial)."""
        vs = self.store(t)
        at_hand = {a.provider for a in tenant.adverts()} - shut
        trust = {p: vs.trust(p) for p in at_hand}
        any_proven = any(proven(tr) for tr in trust.values())
        return {
            p
            for p, tr in trust.items()
            if not may_take_trial(tr, sw.taken[p], proven_leased=any_proven)
        }

    def _proven(self, t: int, shut: set[str]) -> set[str]:
        """Providers with the most checked-valid results for tenant ``t`` (at least one),
        not in ``shut``: the best checkers at hand."""
        vs = self.store(t)
        verified = {p: vs.trust(p).verified for (u, p) in self.results if u == t and p not in shut}
        top = max(verified.values(), default=0)
        return {p for p, n in verified.items() if n > 0 and n >= top // 2}

    @staticmethod
    def _trial_of(votes: list[tuple[str, float]]) -> int:
        # A check carries its trial number as a marker vote ("#trial", never counted).
        marks = [int(v) for p, v in votes if p == "#trial"]
        return marks[0] if marks else -1

    def _put_back(
        self, sw: SimSweep, kind: str, number: int, votes: list[tuple[str, float]] | None
    ) -> None:
        if votes is not None:
            sw.checks.insert(0, votes)
        elif number >= 0:
            sw.todo.insert(0, number)

    async def run(
        self,
        t: int,
        sw: SimSweep,
        kind: str,
        number: int,
        votes: list[tuple[str, float]] | None,
        lease_id: str,
    ) -> None:
        """Hold the lease for one run, release it (paying through the real settlement),
        and act on the result."""
        sim = self.sim
        tenant = sim.tenants[t]
        try:
            row = tenant.store.get_lease(lease_id)
            if row is None:
                raise InvariantError(f"tenant lost its lease row {lease_id}")
            receipt = await self._hold(tenant, row)
            if receipt is None:  # the provider crashed, restarted or is cut off
                if self.current[t] is sw:
                    self._put_back(sw, kind, number, votes)
                return
            if self.current[t] is not sw:
                return  # (cannot happen: a sweep ends only with nothing running)
            paid = receipt.amount
            self.spend[kind] += paid
            self.runs[kind] += 1
            self.spend_by_sweep[min(sw.number, 2) - 1][kind] += paid
            tally = self.by_sweep.setdefault((t, sw.number), Counter())
            tally[f"runs:{kind}"] += 1
            tally[f"spend:{kind}"] += paid
            if kind == "check":
                tally[f"check:{sw.why.get(number, '?')}"] += 1
            provider = row.provider
            value = self.value(provider, sw, number, lease_id)
            self.results[(t, provider)] += 1
            sim._event("run", t, sw.number, kind, number, provider[:8], value)
            if votes is None:
                sw.taken[provider] += 1
                self.on_result(t, sw, number, provider, value, lease_id)
            else:
                self.on_vote(t, sw, [*votes, (provider, value)])
        finally:
            sw.running -= 1

    async def _hold(self, tenant: Tenant, row: LeaseRow) -> ReceiptRow | None:
        """Hold ``row`` for one run and release it, settling as a real tenant does.

        Why: a provider bills a lease by debit notes that ride on heartbeat replies and
        ends the lease when one is not countersigned in time, then refuses the tenant's
        orders for a day (market.debit.SettlementPolicy). A tenant that never heartbeats
        lets every lease longer than two intervals plus the timeout lapse, and one that
        gives up a release lost on the way lets that lease lapse: either way, provider
        after provider refuses it and its sweeps starve (issue 16). So, as
        node/tenant/sweep.py: a heartbeat every ``heartbeat_s`` (Tenant.heartbeat
        countersigns the note its reply carries when our own meter covers it), and a
        release that got no answer is tried again, heartbeating meanwhile, for up to
        ``release_patience_s``. None: no receipt (the provider ended the lease without
        one for us, or stayed silent that long).
        """
        sim, loop = self.sim, asyncio.get_running_loop()
        beat = self.p.heartbeat_s
        end = loop.time() + self.p.lease_hold_s
        seq = 0
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(beat, left))
            if loop.time() < end:
                seq += 1
                await tenant.heartbeat(row, seq)
        give_up = loop.time() + self.p.release_patience_s
        while True:
            try:
                return await tenant.release(row)
            except MercatoError as e:
                sim.release_failures += 1
                sim._event("release-failed", row.lease_id, e.code)
                if isinstance(e, ReceiptRejected) or loop.time() >= give_up:
                    return None
            await asyncio.sleep(beat)
            seq += 1
            await tenant.heartbeat(row, seq)

    def value(self, provider: str, sw: SimSweep, number: int, lease_id: str) -> float:
        if provider in self.fab_ids:
            # Made up, "better" than any honest (non-negative) loss; two never agree.
            return -1.0 - seeded(self.p.seed, "fabricated", lease_id).random()
        return sw.truth[number]

    def on_result(
        self, t: int, sw: SimSweep, number: int, provider: str, value: float, lease_id: str
    ) -> None:
        sw.results[number] = (provider, value)
        vs = self.store(t)
        job_id = f"sim{t}.{sw.number}"
        key = f"{job_id}:{number}:{lease_id}:{provider}"
        rate = vs.trust(provider).rate
        level = rate_level(rate)
        self.by_sweep.setdefault((t, sw.number), Counter())[f"results:{level}"] += 1
        if should_check(rate, key, seeded_secret(self.p.seed, t)):
            sw.why[number] = level
            sw.checks.append([(provider, value), ("#trial", float(number))])

    def on_vote(self, t: int, sw: SimSweep, votes: list[tuple[str, float]]) -> None:
        """Judge a check as Verifier._judge does: the first two votes that agree are the
        truth, a vote agreeing with neither lied; until two agree another provider is
        asked, up to MAX_VOTES, then the trial is not reproducible."""
        number = self._trial_of(votes)
        real = [(p, v) for p, v in votes if not p.startswith("#")]
        marker = [(p, v) for p, v in votes if p.startswith("#")]
        orig_p, orig_v = real[0]
        if sw.results.get(number) != (orig_p, orig_v):
            return  # the original was discarded meanwhile (its provider was caught)
        vs = self.store(t)
        bad = liars([v for _, v in real], self.tolerance)
        if bad is None:
            if len(real) < MAX_VOTES:
                sw.checks.insert(0, real + marker)  # another provider decides
                return
            self.sim._event("verdict", t, sw.number, number, Verdict.UNRESOLVED.value)
            self.unresolved += 1  # the trial is not reproducible, its result not used
            sw.results.pop(number, None)
            return
        honest = [pv for k, pv in enumerate(real) if k not in bad]
        self._valid(vs, *dict.fromkeys(p for p, _ in honest))
        sw.checked.add(number)
        if len(real) > 2 or bad:
            self.sim._event("verdict", t, sw.number, number, verdict_of(bad).value)
        if 0 in bad:
            sw.results[number] = honest[0]
        for k in bad:
            self._caught(t, sw, real[k][0])

    def _valid(self, vs: VerifyStore, *providers: str) -> None:
        for p in providers:
            vs.set_trust(p, vs.trust(p).valid())

    def _caught(self, t: int, sw: SimSweep, liar: str) -> None:
        vs = self.store(t)
        vs.set_trust(liar, vs.trust(liar).lied())
        vs.drop(liar, self.sim.now_ms())
        self.caught_at.setdefault((t, liar), self.results[(t, liar)])
        if liar not in self.fab_ids:
            self.wrongly_caught += 1
        # Its other results of the sweep are discarded and run again elsewhere.
        for n, (p, _) in list(sw.results.items()):
            if p == liar:
                del sw.results[n]
                sw.checked.discard(n)
                sw.reruns.add(n)
                sw.todo.append(n)
        sw.checks = [[(p, v) for p, v in c if p != liar] for c in sw.checks if c[0][0] != liar]
        sw.checks = [c for c in sw.checks if any(not p.startswith("#") for p, _ in c)]

    def figures(self) -> dict[str, Any]:
        """Extra spend of verification, when each fabricator was caught, fabricated bests."""
        trial = self.spend["trial"]
        extra = self.spend["check"] + self.spend["decider"] + self.spend["rerun"]
        pairs = [
            {
                "fabricator": self.fab_ids[p],
                "tenant": t,
                "results": n,
                "caught_at": self.caught_at.get((t, p)),
            }
            for (t, p), n in sorted(self.results.items())
            if p in self.fab_ids
        ]
        reached = [x for x in pairs if x["results"] >= 20 or x["caught_at"] is not None]
        by20 = [x for x in reached if x["caught_at"] is not None and x["caught_at"] <= 20]
        halves = []
        for h in self.spend_by_sweep:
            base = h["trial"]
            more = h["check"] + h["decider"] + h["rerun"]
            halves.append(round(100 * more / base, 2) if base else None)
        ended = [self.by_sweep.get(k, Counter()) for k in self.ended]
        numbers = [n for _, n in self.ended]
        buckets = {}
        for lo, hi in SWEEP_BUCKETS:
            name = f"{lo}" if lo == hi else f"{lo}-{hi or ''}"
            got = [
                c for c, n in zip(ended, numbers, strict=True) if lo <= n and (not hi or n <= hi)
            ]
            if got:
                buckets[name] = overhead(got)
        last = [
            self.by_sweep.get((t, n), Counter())
            for t in range(len(self.sim.tenants))
            for n in [n for u, n in self.ended if u == t][-LAST_SWEEPS:]
        ]
        return {
            "fabricators": len(self.fab_ids),
            "sweeps": self.sweeps_done,
            # Verification's overhead over the sweeps that ended (runs: verify_bench's
            # definition; spend: the micro-credits paid), in all of them, in each
            # tenant's first sweep, in its later ones, by sweep number, and in each
            # tenant's last LAST_SWEEPS.
            "overhead": {
                "all": overhead(ended),
                "first": overhead([c for c, n in zip(ended, numbers, strict=True) if n == 1]),
                "later": overhead([c for c, n in zip(ended, numbers, strict=True) if n > 1]),
                "by_sweep": buckets,
                f"last_{LAST_SWEEPS}": overhead(last),
            },
            **self._lapses(),
            "runs": dict(sorted(self.runs.items())),
            "spend": dict(sorted(self.spend.items())),
            "extra_spend_pct": round(100 * extra / trial, 2) if trial else None,
            "extra_spend_pct_first_later_sweeps": halves,
            "caught_pairs": [x for x in pairs if x["caught_at"] is not None],
            "uncaught_pairs": [x for x in pairs if x["caught_at"] is None],
            "caught_by_20th": f"{len(by20)}/{len(reached)}",
            "caught_by_20th_frac": round(len(by20) / len(reached), 4) if reached else None,
            "fabricators_caught": len({x["fabricator"] for x in pairs if x["caught_at"]}),
            "fabricators_active": len({x["fabricator"] for x in pairs}),
            "wrongly_caught": self.wrongly_caught,
            "unresolved": self.unresolved,
            "fabricated_best": self.fabricated_best,
            "fabricated_results_kept": self.fabricated_results,
        }

    def _lapses(self) -> dict[str, int]:
        """Leases providers ended because a tenant's debit note went unpaid, and the
        (provider, tenant) pairs where the provider therefore refuses the tenant's orders
        (market.debit.SettlementPolicy.order_problem): an honest tenant has none, unless
        a partition keeps it from paying past a note's deadline."""
        lapsed = refusing = 0
        for m in self.sim.members:
            if m.store is None:
                continue
            for tenant in self.sim.tenants:
                record = m.store.counterparty(tenant.node_id)
                if record and record["lapsed"]:
                    lapsed += record["lapsed"]
                    refusing += 1
        return {"leases_lapsed": lapsed, "providers_refusing_tenants": refusing}


#: Sweep numbers (first, last; 0: no last) each tenant's sweeps are grouped by.
SWEEP_BUCKETS = ((1, 1), (2, 5), (6, 20), (21, 50), (51, 100), (101, 0))
#: Each tenant's last sweeps, the steady state the run reached.
LAST_SWEEPS = 10


def rate_level(rate: Fraction) -> str:
    """Which part of the rule a check rate comes from: the newcomer rate (streak below
    PROVEN_STREAK), 1/streak, or the floor."""
    if rate >= UNKNOWN_RATE:
        return "newcomer"
    return "floor" if rate <= FLOOR_RATE else "streak"


def overhead(sweeps: Sequence[Counter[str]]) -> dict[str, Any]:
    """Extra runs and spend of verification over ``sweeps`` (tallies of Sweeps.by_sweep):
    (checks + deciders + re-runs of discarded results) / first runs of trials, as
    bench/verify_bench.py defines it, in runs and in micro-credits paid; and why the
    checks were drawn (the newcomer rate, 1/streak, the floor, the best)."""
    total: Counter[str] = Counter()
    for c in sweeps:
        total.update(c)
    extra = ("check", "decider", "rerun")

    def pct(unit: str) -> float | None:
        base = total[f"{unit}:trial"]
        more = sum(total[f"{unit}:{k}"] for k in extra)
        return round(100 * more / base, 2) if base else None

    return {
        "sweeps": len(sweeps),
        "trials": total["runs:trial"],
        "extra_runs": sum(total[f"runs:{k}"] for k in extra),
        "extra_runs_pct": pct("runs"),
        "extra_spend_pct": pct("spend"),
        "checks_by_why": {k[6:]: v for k, v in sorted(total.items()) if k.startswith("check:")},
        "results_by_rate": {k[8:]: v for k, v in sorted(total.items()) if k.startswith("results:")},
    }


def check_engine(engine: BidEngine, who: str) -> None:
    """The provider's device accounting holds and it leases no more devices than it has."""
    try:
        engine.check_invariants()
    except AssertionError as e:
        raise InvariantError(f"{who}: {e}") from e
    leased = sum(
        len(lease.devices) for lease in engine.leases.values() if lease.state is LeaseState.ACTIVE
    )
    if leased > len(engine.devices):
        raise InvariantError(f"{who} leases {leased} devices, has {len(engine.devices)}")


def check_signed_leases(
    rows: Sequence[LeaseRow], devices: Sequence[Device], now_ms: int, who: str
) -> None:
    """The leases a provider has signed and not ended never share a device nor name one
    it does not have, across crashes and restarts (the store outlives the engine)."""
    ids = {d.id for d in devices}
    held: Counter[str] = Counter(
        d for row in rows if row.side == "provider" and row.end_ms > now_ms for d in row.devices
    )
    twice = sorted(d for d, n in held.items() if n > 1)
    unknown = sorted(set(held) - ids)
    if twice or unknown:
        raise InvariantError(f"{who} signed active leases on {twice or unknown} more than it has")


def check_candidates(
    order: Order, order_ms: int, providers: Sequence[str], seen: dict[str, Advert]
) -> None:
    """Every provider the order went to had an advert unexpired at the order time."""
    for provider in providers:
        advert = seen.get(provider)
        if advert is None:
            raise InvariantError(f"order {order.order_id} went to a provider without an advert")
        if advert.expires_ms <= order_ms:
            raise InvariantError(
                f"order {order.order_id} used an advert that expired at {advert.expires_ms}"
            )


def check_lease_rows(rows: Sequence[LeaseRow]) -> None:
    """Every lease carries an award signed by its tenant and an accept signed by its
    provider, and the accept names the SHA-256 of exactly that award envelope."""
    for row in rows:
        award = _open(row.award)
        accept = _open(row.accept)
        if not isinstance(award.body, Award) or not isinstance(accept.body, Accept):
            raise InvariantError(f"lease {row.lease_id}: not an award and an accept")
        if award.sender != row.tenant or accept.sender != row.provider:
            raise InvariantError(f"lease {row.lease_id}: signed by the wrong nodes")
        if accept.body.award_hash != hashlib.sha256(row.award).hexdigest():
            raise InvariantError(f"lease {row.lease_id}: the accept binds another award")
        if award.body.lease_id != row.lease_id or accept.body.lease_id != row.lease_id:
            raise InvariantError(f"lease {row.lease_id}: the envelopes name another lease")


_NEVER = 2**63


def _holds(node: Node, want: dict[str, int], now_ms: int) -> bool:
    return _holds_until(node, want, now_ms) > now_ms


def _holds_until(node: Node, want: dict[str, int], now_ms: int) -> int:
    """Until when (ms) ``node`` holds a live advert of every provider in ``want`` at its
    seq or newer, if nothing changes; ``now_ms`` or earlier when it does not hold now.
    (Without a change, a missing or old advert stays so, an expired one expired.)"""
    directory = node.directory
    until = _NEVER
    for provider, seq in want.items():
        e = directory.get(provider)
        if e is None or e.seq < seq or e.advert.expires_ms <= now_ms:
            return now_ms
        until = min(until, e.advert.expires_ms)
    return until


def _open(raw: bytes) -> Envelope:
    try:
        return open_envelope(raw, now_ms=0, replay=None)
    except MercatoError as e:
        raise InvariantError(f"a stored lease envelope does not verify: {e}") from e


# --- driver -------------------------------------------------------------------------


#: The memo of checked directory-request digests (protocol.messages): 4 MiB here, ten of
#: the 400 KB digests a 10,000-node run sends, where a daemon keeps 512 KiB.
SIM_DIGEST_MEMO_BYTES = 4 << 20


def run_once(params: Params) -> Result:
    """One simulation on a fresh virtual-time loop."""
    remember_checked_digests(SIM_DIGEST_MEMO_BYTES)
    errors: list[str] = []

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(str(context.get("exception") or context.get("message")))

    # Forked first, while the heap is small.
    oracle = SignatureOracle() if params.checker else None

    async def main() -> Result:
        asyncio.get_running_loop().set_exception_handler(on_error)
        sim = Simulation(params)
        sim.net.oracle = oracle
        return await sim.run()

    cpu0 = time.process_time()
    with contextlib.suppress(OSError):  # Linux: reset the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    # No garbage collection during a run. Python's collector walks every tracked object
    # it has not frozen; a run holds N nodes' state (an entry per provider at every node,
    # N^2 / 50), and the collections found nearly nothing to free: most objects die by
    # reference count. Measured with collections every 5 simulated seconds (each then
    # freezing its survivors, the cheapest way to collect): 21 collections at 1,000 nodes
    # took 1.3 s of 28 and found 243 unreachable objects in all; 23 at 2,000 took 4.1 s
    # and found 403; at 10,000 they were 5.6 % of the CPU. Automatic young-generation
    # collections were worse (9 ms each, 160 of them at 1,000 nodes). The few cycles a
    # run makes wait for its end (``_run_or_fail`` collects before the next run).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with (
            oracle or contextlib.nullcontext(),
            asyncio.Runner(loop_factory=VirtualTimeLoop) as runner,
        ):
            result = runner.run(main())
    finally:
        # The run's heap sits in the collector's young generation: re-enabled so, its
        # first pass would walk all of it (40 s at 10,000 nodes). Frozen and unfrozen,
        # it moves to the oldest generation in one step, as if it had survived there.
        gc.freeze()
        gc.unfreeze()
        if collecting:
            gc.enable()
    if errors:
        raise InvariantError("event loop errors: " + "; ".join(errors[:3]))
    result.cpu_s = time.process_time() - cpu0
    if oracle is not None:
        result.checker_hits, result.checker_misses = oracle.hits, oracle.misses
        result.checker_cpu_s = oracle.cpu_s
    result.max_rss_mb = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_log2(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b log2(x); returns (a, b)."""
    lx = [math.log2(x) for x in xs]
    return _line(lx, list(ys))


def fit_power(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Exponent k of y ~ x^k (least squares on logs): 0 is flat, 1 is linear."""
    return _line([math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys])[1]


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def print_table(results: Sequence[Result]) -> None:
    head = (
        f"{'N':>6} {'prov':>5} {'conv r':>7} {'conv s':>7} {'all r':>6} {'news r':>7} "
        f"{'msg/n/s':>8} {'B/n/s':>8} {'max n/s':>8} {'auct/s':>7} {'heal r':>7} "
        f"{'wall s':>7} {'RSS MB':>7}"
    )
    print(head)
    for r in results:
        print(
            f"{r.nodes:>6} {r.providers:>5} {r.converge_rounds:>7.2f} {r.converge_s:>7.1f} "
            f"{r.converge_all_rounds:>6.2f} {r.news_rounds_99:>7.2f} "
            f"{r.msgs_per_node_s:>8.2f} {r.bytes_per_node_s:>8.0f} {r.max_node_msgs_s:>8.1f} "
            f"{r.auctions_per_s:>7.2f} {r.heal_rounds_all:>7.2f} {r.wall_s:>7.0f} "
            f"{r.max_rss_mb:>7.0f}"
        )
    if len(results) >= 2:
        ns = [r.nodes for r in results]
        _, b = fit_log2(ns, [r.converge_rounds for r in results])
        _, bn = fit_log2(ns, [r.news_rounds_99 for r in results])
        k = fit_power(ns, [r.msgs_per_node_s for r in results])
        kb = fit_power(ns, [r.bytes_per_node_s for r in results])
        kmax = fit_power(ns, [r.max_node_msgs_s for r in results])
        print(
            f"growth: converge rounds = a + {b:.2f} x log2 N; news rounds = a + {bn:.2f} x "
            f"log2 N; msgs/node/s ~ N^{k:.2f}; bytes/node/s ~ N^{kb:.2f}; "
            f"busiest node ~ N^{kmax:.2f}"
        )


def print_verification(r: Result) -> None:
    """The figures of spot-check replication in one run (--fabricators)."""
    v = r.verification
    print(
        f"N={r.nodes} seed={r.seed}: {v['sweeps']} sweeps, runs {v['runs']}; "
        f"extra spend {v['extra_spend_pct']} % (first sweeps / later: "
        f"{v['extra_spend_pct_first_later_sweeps']}); {v['fabricators']} fabricators, "
        f"{v['fabricators_active']} got work, {v['fabricators_caught']} caught; "
        f"caught by 20th result {v['caught_by_20th']}; honest caught {v['wrongly_caught']}; "
        f"fabricated best {v['fabricated_best']}, fabricated results kept "
        f"{v['fabricated_results_kept']}"
    )
    if "overhead" in v:
        print(
            f"  leases lapsed unpaid {v['leases_lapsed']}, providers refusing a tenant "
            f"{v['providers_refusing_tenants']}; verification overhead, runs / spend:"
        )
        o = v["overhead"]
        rows = [(k, o[k]) for k in ("all", "first", "later")]
        rows += [(f"sweeps {k}", x) for k, x in o["by_sweep"].items()]
        rows += [(k, x) for k, x in o.items() if k.startswith("last_")]
        for name, x in rows:
            print(
                f"    {name:>14}: {x['sweeps']} sweeps, {x['trials']} trials, "
                f"+{x['extra_runs']} runs = {x['extra_runs_pct']} % / spend "
                f"{x['extra_spend_pct']} %; checks {x['checks_by_why']}, "
                f"results {x['results_by_rate']}"
            )
    for x in v["caught_pairs"]:
        print(
            f"  fabricator {x['fabricator']} caught by tenant {x['tenant']} at its result "
            f"{x['caught_at']} ({x['results']} returned)"
        )
    for x in v["uncaught_pairs"]:
        print(
            f"  fabricator {x['fabricator']} not caught by tenant {x['tenant']} "
            f"({x['results']} results)"
        )


def print_saved(paths: Sequence[Path]) -> int:
    """The table (and last line) of runs saved by --json, e.g. one file per N."""
    results: list[Result] = []
    for path in paths:
        try:
            rows = json.loads(path.read_text())
            results += [Result(**row) for row in (rows if isinstance(rows, list) else [rows])]
        except (OSError, ValueError, TypeError) as e:
            print(f"{path}: not a --json file of this script ({e})", file=sys.stderr)
            return 2
    if not results:
        print("no runs in the given files", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r.nodes)
    print_table(results)
    last = results[-1]
    print(f"converge_rounds={last.converge_rounds:.2f} msgs_per_node_s={last.msgs_per_node_s:.2f}")
    return 0


def _run_or_fail(params: Params, *, collect: bool = True) -> Result | str:
    try:
        result = run_once(params)
    except InvariantError as e:
        return f"N={params.nodes}: {e}"
    if collect:  # the next run in this process starts from a clean heap
        gc.collect()
    return result


class _Inline:
    """Runs submitted calls at once, in this process (what --jobs 1 means)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[[Params], Result | str], params: Params) -> Future[Result | str]:
        future: Future[Result | str] = Future()
        future.set_result(fn(params))
        return future


# --- settlement between strangers (issue 15) --------------------------------------


@dataclass
class SettlementParams:
    """A small market where some providers and tenants cheat (``--dishonest F``)."""

    providers: int = 30
    tenants: int = 20
    dishonest: float = 0.1  # fraction of each side
    seed: int = 1
    sim_s: float = 300.0
    latency_ms: float = 20.0
    debit_interval_ms: int = 10_000
    payment_timeout_ms: int = 2_000
    heartbeat_ms: int = 1_000
    trial_timeout_ms: int = 40_000
    task_grace_ms: int = 5_000
    price: int = 3_600_000  # micro-credits per device-hour: 1 per device-ms
    devices_per_provider: int = 4


@dataclass
class SettlementResult:
    """Per run: what liars gained and honest parties lost, in micro-credits."""

    params: dict[str, Any]
    leases: int = 0
    leases_honest_both: int = 0
    overbilled_honest_tenants: int = 0  # paid above what the tenant measured: goal 0
    overbilled_beyond_tolerance: int = 0  # ... above measured + the stated tolerance: 0
    refused_bills: int = 0
    refused_accepts: int = 0
    provider_loss_max_intervals: float = 0.0  # honest provider, worst lease
    provider_loss_mean_intervals: float = 0.0  # over leases with a dishonest tenant
    provider_unpaid_total: int = 0
    lapsed_leases: int = 0  # ended by the provider for an unpaid note
    lost_leases: int = 0  # ended by the provider for missing heartbeats
    leases_by_kind: dict[str, int] = field(default_factory=dict)
    settlement_msgs: int = 0
    all_msgs: int = 0
    settlement_share: float = 0.0
    trace: str = ""


class _TypedNetwork(SimNetwork):
    """Counts envelopes by message type (requests and replies)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.by_type: Counter[str] = Counter()

    async def deliver(self, source: str, dest: str, data: bytes, timeout_s: float) -> bytes:
        self.by_type[_type_of(data)] += 1
        reply = await super().deliver(source, dest, data, timeout_s)
        if reply:
            self.by_type[_type_of(reply)] += 1
        return reply


def _type_of(raw: bytes) -> str:
    from protocol.codec import decode

    env = decode(raw)
    return str(env.get("type", "?")) if isinstance(env, dict) else "?"


class _Overbiller(ProviderService):
    """Bills every note and receipt for twice the devices it leased."""

    async def _on_award(self, env: Envelope) -> Any:
        reply = await super()._on_award(env)
        award = env.body
        if isinstance(award, Award) and award.lease_id in self.debits:
            self.debits[award.lease_id].devices *= 2
        return reply

    def _receipt(self, lease: Any, now: int) -> bytes:
        lease.devices = lease.devices * 2  # only its bill: the engine's devices are freed
        try:
            return super()._receipt(lease, now)
        finally:
            lease.devices = lease.devices[: len(lease.devices) // 2]


class _Backdater(ProviderService):
    """Claims (and bills from) a lease start 30 days before the award arrived."""

    async def _on_award(self, env: Envelope) -> Any:
        award = env.body
        assert isinstance(award, Award)
        result = self.engine.on_award(award, env.sender, env.digest, self.node.clock())
        if not isinstance(result, Accept):
            return result
        lease = self.engine.leases[award.lease_id]
        lease.start_ms -= 30 * 86_400_000
        from market.debit import DebitSchedule

        self.debits[lease.lease_id] = DebitSchedule(
            len(lease.devices),
            lease.price,
            lease.start_ms,
            award.debit_interval_ms,
            award.payment_timeout_ms,
        )
        accept = result.model_copy(update={"start_ms": lease.start_ms})
        return self.node.seal(accept, to=env.sender)


class _NeverPays(Tenant):
    """Heartbeats, takes the work, and never countersigns a note or a receipt."""

    async def _settle(self, lease: LeaseRow, reply: Envelope) -> None:
        return None


class SettlementSim:
    """Honest and dishonest providers and tenants trading on virtual time."""

    def __init__(self, p: SettlementParams) -> None:
        self.p = p
        self.loop = asyncio.get_running_loop()
        self.net = _TypedNetwork(seed=p.seed, loss=0.0, latency_s=p.latency_ms / 1000)
        self.rng = seeded(p.seed, "settlement")
        self.trace = hashlib.sha256()
        n_bad_p = round(p.providers * p.dishonest)
        n_bad_t = round(p.tenants * p.dishonest)
        # Which ones cheat, and how, is drawn from the seed; behaviours take turns.
        bad_p = self.rng.sample(range(p.providers), n_bad_p)
        bad_t = self.rng.sample(range(p.tenants), n_bad_t)
        kinds_p = ["overbill", "backdate", "stall"]
        kinds_t = ["vanish", "never_pays"]
        self.provider_kind = ["honest"] * p.providers
        for j, i in enumerate(bad_p):
            self.provider_kind[i] = kinds_p[j % 3]
        self.tenant_kind = ["honest"] * p.tenants
        for j, i in enumerate(bad_t):
            self.tenant_kind[i] = kinds_t[j % 2]
        self.nodes: list[Node] = []
        self.services: list[ProviderService] = []
        self.tenants: list[Tenant] = []
        self.leases: list[dict[str, Any]] = []  # what each lease was, by the sim's clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self.by_node: dict[str, int] = {}

    def now_ms(self) -> int:
        return BASE_MS + int(self.loop.time() * 1000)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        p = self.p
        from market.debit import SettlementPolicy

        policy = SettlementPolicy(min_debit_interval_ms=1_000)
        for i in range(p.providers):
            seed = hashlib.sha256(f"mercato-settle-provider:{p.seed}:{i}".encode()).digest()
            identity = Identity.from_seed(seed)
            address = f"http://p{i}.sim"
            nonces = seeded(p.seed, "p-nonce", i)
            node = Node(
                identity,
                NodeSettings(
                    role="provider",
                    address=address,
                    bootstrap=[] if i == 0 else ["http://p0.sim"],
                    gossip_interval_s=2.0,
                    request_timeout_s=3.0,
                ),
                self.net.transport(address),
                clock=self.now_ms,
                rng=seeded(p.seed, "p-rng", i),
                nonce=lambda n=nonces: n.randbytes(16),  # type: ignore[misc]
            )
            # Floors spread +-10 %; liars undercut everyone (that is how they win work).
            floor = int(p.price * seeded(p.seed, "floor", i).uniform(0.9, 1.1))
            if self.provider_kind[i] != "honest":
                floor = int(p.price * 0.85)
            devices = [
                Device(f"d{j}", "L4", "gpu", 24 * 10**9, 121 * 10**12, 300 * 10**9, floor)
                for j in range(p.devices_per_provider)
            ]
            engine = BidEngine(
                identity.node_id,
                devices,
                Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=len(devices)),
            )
            cls = {"overbill": _Overbiller, "backdate": _Backdater}.get(
                self.provider_kind[i], ProviderService
            )
            service = cls(node, engine, Store(":memory:"), policy)
            service.start()
            self.net.attach(address, node.handle)
            await node.start()
            self.nodes.append(node)
            self.services.append(service)
            self.by_node[identity.node_id] = i
        for t in range(p.tenants):
            seed = hashlib.sha256(f"mercato-settle-tenant:{p.seed}:{t}".encode()).digest()
            nonces = seeded(p.seed, "t-nonce", t)
            cls_t: type[Tenant] = _NeverPays if self.tenant_kind[t] == "never_pays" else Tenant
            tenant = cls_t(
                Identity.from_seed(seed),
                Store(":memory:"),
                self.net.transport(f"http://t{t}.sim"),
                clock=self.now_ms,
                request_timeout_s=3.0,
                nonce=lambda n=nonces: n.randbytes(16),  # type: ignore[misc]
                debit_interval_ms=p.debit_interval_ms,
                payment_timeout_ms=p.payment_timeout_ms,
                task_grace_ms=p.task_grace_ms,
            )
            tenant.node.rng = seeded(p.seed, "t-rng", t)
            self.tenants.append(tenant)

    async def tenant_loop(self, t: int) -> None:
        tenant, kind = self.tenants[t], self.tenant_kind[t]
        rng = seeded(self.p.seed, "t-loop", t)
        await asyncio.sleep(5.0 + rng.uniform(0, 5))
        while self.loop.time() < self.p.sim_s - 60:
            try:
                await tenant.refresh(f"http://p{rng.randrange(self.p.providers)}.sim")
            except MercatoError:
                await asyncio.sleep(1.0)
                continue
            report = await tenant.auction(
                Requirement(kind="gpu"),
                1,
                10_000_000,
                job_spec_hash=hashlib.sha256(f"settle:{t}".encode()).hexdigest(),
                k=3,
                bid_window_ms=BID_WINDOW_MS,
                lease_ms=600_000,
                heartbeat_interval_ms=self.p.heartbeat_ms,
            )
            self.refused_accepts += sum(
                1 for x in report.ignored if x == "accept_start_outside_window"
            )
            for lease in report.leases:
                await self.use(tenant, kind, lease.lease_id, rng)
            await asyncio.sleep(rng.uniform(0.5, 2.0))

    refused_accepts = 0

    async def use(self, tenant: Tenant, kind: str, lease_id: str, rng: random.Random) -> None:
        """Hold a lease for one trial: heartbeats, a task, then release (or misbehave)."""
        p = self.p
        row = tenant.store.get_lease(lease_id)
        assert row is not None
        provider_kind = self.provider_kind[self.by_node[row.provider]]
        work_ms = int(rng.uniform(5_000, 30_000))
        tenant.task_assigned(row, "trial", p.trial_timeout_ms)
        started = self.now_ms()
        vanish_at = started + int(rng.uniform(0.3, 1.0) * work_ms)
        # A stalling provider never delivers: the tenant waits until the result is overdue.
        done_at = started + (
            p.trial_timeout_ms + p.task_grace_ms if provider_kind == "stall" else work_ms
        )
        seq = 0
        while self.now_ms() < done_at:
            if kind == "vanish" and self.now_ms() >= vanish_at:
                self._record(tenant, row, kind, provider_kind, started, None)
                return  # no heartbeat, no release: gone
            if not await tenant.heartbeat(row, seq):
                break
            seq += 1
            await asyncio.sleep(p.heartbeat_ms / 1000)
        if provider_kind != "stall":
            tenant.task_finished(row, "trial")
        if kind == "never_pays":
            with contextlib.suppress(MercatoError):
                await tenant.node.request(
                    tenant.peer_of(row),
                    Release(order_id=row.order_id, lease_id=row.lease_id, reason="done"),
                )
        else:
            with contextlib.suppress(MercatoError):
                await tenant.release(row)
        # The tenant's measure ends when the release's answer is in (the provider's
        # clock stops somewhere before that).
        self._record(tenant, row, kind, provider_kind, started, self.now_ms())

    def _record(
        self,
        tenant: Tenant,
        row: LeaseRow,
        kind: str,
        provider_kind: str,
        started: int,
        end: int | None,
    ) -> None:
        self.leases.append(
            {
                "tenant": tenant,
                "row": row,
                "tenant_kind": kind,
                "provider_kind": provider_kind,
                "started": started,
                "end": end,
            }
        )
        self.trace.update(f"{row.lease_id}:{kind}:{provider_kind}:{end}".encode())

    async def run(self) -> SettlementResult:
        await self.start()
        for t in range(self.p.tenants):
            self._spawn(self.tenant_loop(t))
        await asyncio.sleep(self.p.sim_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        result = self.measure()
        for node in self.nodes:
            await node.close()
        for tenant in self.tenants:
            await tenant.node.close()
        return result

    def measure(self) -> SettlementResult:
        from market.settlement import amount_owed

        p = self.p
        r = SettlementResult(params=asdict(p))
        losses: list[float] = []
        for lease in self.leases:
            row: LeaseRow = lease["row"]
            tenant: Tenant = lease["tenant"]
            r.leases += 1
            honest_t = lease["tenant_kind"] == "honest"
            honest_p = lease["provider_kind"] == "honest"
            r.leases_honest_both += honest_t and honest_p
            if honest_t:
                # What the tenant measured, by the simulation's clock (which is its own):
                # from sending the award to the release, stopped at an overdue trial.
                meter = tenant.meter(row)
                end = lease["end"] if lease["end"] is not None else self.now_ms()
                allowed = amount_owed(len(row.devices) * meter.measured_ms(end), row.price)
                paid = tenant.store.lease_paid(row.lease_id)
                r.overbilled_honest_tenants += max(0, paid - allowed)
                ceiling = amount_owed(meter.ceiling_device_ms(end), row.price)
                r.overbilled_beyond_tolerance += max(0, paid - ceiling)
            if honest_p:
                service = self.services[self.by_node[row.provider]]
                theirs = service.store.get_lease(row.lease_id)
                if theirs is None:
                    continue
                stop = theirs.updated_ms if theirs.state != "active" else self.now_ms()
                value = amount_owed(len(theirs.devices) * max(0, stop - theirs.start_ms), row.price)
                unpaid = max(0, value - service.store.lease_paid(row.lease_id))
                r.provider_unpaid_total += unpaid if not honest_t else 0
                r.lapsed_leases += "not countersigned" in theirs.end_reason
                r.lost_leases += theirs.state == "lost"
                if not honest_t:
                    # One settlement interval's value of this lease (its price, its devices).
                    interval = amount_owed(len(theirs.devices) * p.debit_interval_ms, row.price)
                    losses.append(unpaid / interval)
        kinds = Counter(f"{x['tenant_kind']}/{x['provider_kind']}" for x in self.leases)
        r.leases_by_kind = dict(sorted(kinds.items()))
        for tenant in self.tenants:
            r.refused_bills += len(tenant.refusals)
        r.refused_accepts = self.refused_accepts
        if losses:
            r.provider_loss_max_intervals = round(max(losses), 3)
            r.provider_loss_mean_intervals = round(sum(losses) / len(losses), 3)
        by_type = self.net.by_type
        r.settlement_msgs = by_type["debit_note"] + by_type["receipt"]
        r.all_msgs = sum(by_type.values())
        r.settlement_share = round(r.settlement_msgs / max(1, r.all_msgs), 4)
        r.trace = self.trace.hexdigest()
        return r


def run_settlement(p: SettlementParams) -> SettlementResult:
    """One settlement run on a fresh virtual-time loop."""

    async def main() -> SettlementResult:
        return await SettlementSim(p).run()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())


def settlement_main(args: argparse.Namespace) -> int:
    p = SettlementParams(
        providers=args.providers or SettlementParams.providers,
        tenants=args.tenants,
        dishonest=args.dishonest,
        seed=args.seed,
        sim_s=args.settle_s,
    )
    r = run_settlement(p)
    print(json.dumps(asdict(r)), file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(r), indent=1))
    print(
        f"{r.leases} leases ({r.leases_honest_both} honest on both sides); "
        f"refused {r.refused_bills} bills and {r.refused_accepts} accepts; "
        f"{r.lapsed_leases} leases ended for unpaid notes, {r.lost_leases} for silence"
    )
    print(
        f"overbilled_to_honest_tenants={r.overbilled_honest_tenants} "
        f"(beyond_tolerance={r.overbilled_beyond_tolerance}) "
        f"honest_provider_loss_max_intervals={r.provider_loss_max_intervals} "
        f"mean={r.provider_loss_mean_intervals} "
        f"settlement_share={r.settlement_share:.4f}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, help="one run of N nodes (default: the table)")
    ap.add_argument("--providers", type=int, default=0, help="default N/50, at least 10")
    ap.add_argument("--tenants", type=int, default=Params.tenants)
    ap.add_argument("--seed", type=int, default=Params.seed)
    ap.add_argument("--loss", type=float, default=Params.loss, help="per message, each way")
    ap.add_argument("--latency-ms", type=float, default=Params.latency_ms, help="one way")
    ap.add_argument("--partition", type=float, default=Params.partition_s, metavar="S",
                    help="split the network in two for S seconds (0: no partition)")  # fmt: skip
    ap.add_argument("--crash", type=float, default=Params.crash, metavar="F",
                    help="fraction of nodes that crash and restart (0: none)")  # fmt: skip
    ap.add_argument("--interval", type=float, default=Params.interval_s, help="gossip, s")
    ap.add_argument("--push-interval", type=float, default=0.0,
                    help="relay batching, s (default: the gossip interval)")  # fmt: skip
    ap.add_argument("--fanout", type=int, default=Params.fanout)
    ap.add_argument("--fabricators", type=float, metavar="F",
                    help="tenants run sweeps and spot-check results; a fraction F of "
                         "providers fabricate them (0: an honest market)")  # fmt: skip
    ap.add_argument("--steady", type=float, metavar="S",
                    help="seconds of the steady-state phase (default 20)")  # fmt: skip
    ap.add_argument("--lease-hold", type=float, metavar="S",
                    help="seconds a tenant holds each lease (one run of a trial with "
                         "--fabricators; default 10, 4 with --quick)")  # fmt: skip
    ap.add_argument("--tenant-period", type=float, metavar="S",
                    help="mean seconds between a tenant's auctions (default 2)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="N = 200, 500, 1000; short phases")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    ap.add_argument("--checker", action=argparse.BooleanOptionalAction,
                    help="check envelope signatures ahead in a second process (same "
                         "results; default: on with --jobs 1 on 2+ cores)")  # fmt: skip
    ap.add_argument("--dishonest", type=float, metavar="F",
                    help="settlement run: fraction F of providers and tenants cheat")  # fmt: skip
    ap.add_argument("--settle-s", type=float, default=SettlementParams.sim_s,
                    help="settlement run: simulated seconds")  # fmt: skip
    ap.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                    help="print the table of runs saved with --json, simulate nothing")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.table:
        return print_saved(args.table)
    if args.dishonest is not None:
        return settlement_main(args)
    sizes = [args.nodes] if args.nodes else list(QUICK_SIZES if args.quick else TABLE_SIZES)
    runs = []
    checker_default = args.jobs == 1 and (os.cpu_count() or 1) >= 2
    for n in sizes:
        params = Params(
            nodes=n,
            providers=args.providers,
            tenants=args.tenants,
            seed=args.seed,
            loss=args.loss,
            latency_ms=args.latency_ms,
            partition_s=args.partition,
            crash=args.crash,
            interval_s=args.interval,
            push_interval_s=args.push_interval,
            fanout=args.fanout,
            fabricators=args.fabricators,
            checker=args.checker if args.checker is not None else checker_default,
        )
        if args.quick:
            params.join_s, params.steady_s, params.restart_after_s = 5.0, 8.0, 6.0
            params.partition_s = min(params.partition_s, 16.0)
            params.lease_hold_s = 4.0
        if args.steady is not None:
            params.steady_s = args.steady
        if args.lease_hold is not None:
            params.lease_hold_s = args.lease_hold
        if args.tenant_period is not None:
            params.tenant_period_s = args.tenant_period
        runs.append(params)
    results: list[Result] = []
    # Each run is its own process when --jobs > 1 (largest first: it takes longest).
    with ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else _Inline() as pool:
        # A lone run is the process's last: its heap (GBs at 10,000 nodes) is not walked by
        # a collection nor freed object by object, the process just exits (``__main__``).
        run = _run_or_fail if len(runs) > 1 else functools.partial(_run_or_fail, collect=False)
        futures = [pool.submit(run, p) for p in sorted(runs, key=lambda p: -p.nodes)]
        for future in as_completed(futures):
            result = future.result()
            if isinstance(result, str):
                print(f"INVARIANT BROKEN (seed={args.seed}): {result}", file=sys.stderr)
                for f in futures:
                    f.cancel()
                return 1
            results.append(result)
            print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
            print(
                f"N={result.nodes}: converged in {result.converge_rounds:.2f} rounds, "
                f"{result.msgs_per_node_s:.2f} msgs/node/s, {result.auctions} auctions, "
                f"heal {result.heal_rounds_all:.2f} rounds, trace {result.trace[:16]}, "
                f"{result.wall_s:.0f} s wall",
                flush=True,
            )
            if result.checker_hits or result.checker_misses:
                checks = result.checker_hits + result.checker_misses
                print(
                    f"  signature checks done ahead by the second process: "
                    f"{result.checker_hits:,} of {checks:,} "
                    f"({100 * result.checker_hits / checks:.1f} %), its CPU "
                    f"{result.checker_cpu_s:.0f} s; this process's CPU {result.cpu_s:.0f} s",
                    flush=True,
                )
            if result.verification:
                print_verification(result)
    results.sort(key=lambda r: r.nodes)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print_table(results)
    last = results[-1]
    print(f"converge_rounds={last.converge_rounds:.2f} msgs_per_node_s={last.msgs_per_node_s:.2f}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        code = main()
        # Exit without tearing the simulation's heap down object by object (a collection
        # over the whole heap, then millions of frees): every result is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
