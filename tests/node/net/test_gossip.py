"""Discovery among many nodes on the in-memory transport (a fake network: these tests are
about gossip logic, so every test name says ``memory_transport``).

Nodes run their real background loops on virtual time (node.net.simloop): every node's
clock is the loop's, and the loop jumps to its next timer instead of sleeping, so an
advert's TTL, the gossip interval and a wait's bound are the intervals a deployment
uses, whatever the machine's load. Waits poll until a condition holds, with bounds in
virtual seconds; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from node.net import simloop
from node.net.node import CapacityFn, Node, NodeSettings, Role
from node.net.transport import MemoryNetwork
from protocol import codec
from protocol.envelope import open_envelope, seal
from protocol.identity import Identity
from protocol.messages import Advert, DeviceGroup, Directory, Interconnect

INTERVAL_S = 1.0  # virtual seconds between gossip rounds
CONVERGE_TIMEOUT_S = 600.0  # virtual seconds
N_PROVIDERS = 49  # + 1 bootstrap = 50 nodes
#: The virtual clock's epoch: 2026-01-01 00:00 UTC, in ms.
T0_MS = 1_767_225_600_000

AdvertSealer = Callable[..., bytes]


def now_ms() -> int:
    """Every node's clock: the virtual loop's time, from T0_MS."""
    return T0_MS + int(asyncio.get_running_loop().time() * 1000)


def virtual_time(
    test: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., None]:
    """Run an async test on a fresh VirtualTimeLoop; its ``net`` is closed on that loop."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            try:
                await test(*args, **kwargs)
            finally:
                await kwargs["net"].close()

        simloop.run(main())

    return run


def address(name: str) -> str:
    return f"http://{name}.mem"


class Capacity:
    """A simulated machine whose free devices a test can change (a CapacityFn)."""

    def __init__(self, n: int) -> None:
        self.ids = [f"gpu{i}" for i in range(n)]
        self.free = list(self.ids)

    def __call__(self) -> tuple[list[DeviceGroup], Interconnect]:
        group = DeviceGroup(
            model="L4",
            kind="gpu",
            ids=self.ids,
            free=self.free,
            memory_bytes=24 * 10**9,
            fp16_flops=121 * 10**12,
            memory_bandwidth=300 * 10**9,
            price_floor=400_000,
            simulated=True,
        )
        return [group], Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=len(self.ids))


@dataclass
class Net:
    """A MemoryNetwork with its nodes; ``close()`` stops them all."""

    network: MemoryNetwork = field(default_factory=lambda: MemoryNetwork(seed=7))
    nodes: list[Node] = field(default_factory=list)
    capacities: dict[str, Capacity] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(11))

    @property
    def providers(self) -> list[Node]:
        return [n for n in self.nodes if n.capacity is not None]

    async def add(
        self,
        name: str,
        role: Role = "provider",
        bootstrap: list[str] | None = None,
        *,
        ttl_s: float = 60.0,
    ) -> Node:
        addr = address(name)
        capacity: CapacityFn | None = None
        if role == "provider":
            capacity = self.capacities[addr] = Capacity(1 + len(self.nodes) % 4)
        settings = NodeSettings(
            role=role,
            address=addr,
            bootstrap=bootstrap if bootstrap is not None else [address("boot")],
            gossip_interval_s=INTERVAL_S,
            request_timeout_s=1.0,
            advert_ttl_s=ttl_s,
        )
        node = Node(
            Identity.generate(),
            settings,
            self.network.transport(addr),
            capacity=capacity,
            rng=random.Random(self.rng.random()),
            clock=now_ms,
        )
        self.network.attach(addr, node.handle)
        await node.start()
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        await asyncio.gather(*(node.close() for node in self.nodes))


@pytest.fixture
def net() -> Net:
    """A fresh network; the test's own loop (``virtual_time``) closes its nodes."""
    return Net()


async def build(net: Net, providers: int = N_PROVIDERS) -> None:
    """A bootstrap node, then every provider starting at once (as a cluster does)."""
    await net.add("boot", role="bootstrap", bootstrap=[])
    await asyncio.gather(*(net.add(f"p{i}") for i in range(providers)))
    order = {address(f"p{i}"): i for i in range(providers)}  # nodes[i + 1] is "p{i}"
    net.nodes[1:] = sorted(net.nodes[1:], key=lambda n: order[n.settings.address or ""])


async def gossip_rounds(net: Net, rounds: int) -> None:
    """Wait until the network carried ``rounds`` exchanges per node (progress, not time)."""
    target = net.network.delivered + rounds * len(net.nodes)
    await eventually(lambda: net.network.delivered >= target)


async def eventually(condition: Callable[[], bool], timeout_s: float = CONVERGE_TIMEOUT_S) -> None:
    """Poll until ``condition`` holds; fail (with no timing claim) if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} virtual s")
        await asyncio.sleep(0.05)


def held(node: Node) -> dict[str, int]:
    """provider -> seq of every live advert ``node`` would show a tenant."""
    return {e.provider: e.seq for e in node.directory.live(now_ms())}


def newest(net: Net) -> dict[str, int]:
    """provider -> the seq of its own current advert (what everyone should converge on)."""
    out = {}
    for p in net.providers:
        entry = p.directory.get(p.node_id)
        assert entry is not None
        out[p.node_id] = entry.seq
    return out


def converged(nodes: list[Node], want: dict[str, int]) -> Callable[[], bool]:
    return lambda: all(held(n) == want for n in nodes)


def signer(raw: bytes) -> str:
    return open_envelope(raw, now_ms=now_ms(), replay=None).sender


async def push(net: Net, target: Node, adverts: list[bytes]) -> None:
    """An outsider pushes ``adverts`` to ``target`` in a signed Directory message."""
    attacker = Identity.generate()
    raw = seal(
        attacker,
        Directory(adverts=adverts),
        now_ms=now_ms(),
        nonce=os.urandom(16),
        to=target.node_id,
    )
    assert target.settings.address is not None
    reply = await net.network.transport(address("outsider")).request(target.settings.address, raw)
    assert reply == b""


class TestConvergence:
    @virtual_time
    async def test_memory_transport_every_advert_reaches_every_node(self, net: Net) -> None:
        await build(net)
        assert len(net.nodes) == 50
        want = newest(net)
        assert len(want) == N_PROVIDERS
        await eventually(converged(net.nodes, want))
        own = {p.node_id: p.directory.get(p.node_id) for p in net.providers}
        for entry in net.nodes[0].directory.live(now_ms()):
            assert signer(entry.envelope) == entry.provider
        for node in net.nodes:
            for entry in node.directory.live(now_ms()):
                # What every node holds is the provider's own signed bytes, verbatim.
                assert entry == replace(own[entry.provider], received_ms=entry.received_ms)
        # Everyone also learnt of many peers, not only the bootstrap node.
        assert all(len(n.peers) >= 3 for n in net.nodes)

    @virtual_time
    async def test_memory_transport_a_capacity_change_spreads(self, net: Net) -> None:
        await build(net, providers=10)
        await eventually(converged(net.nodes, newest(net)))
        seller = net.providers[3]
        assert seller.settings.address is not None
        cap = net.capacities[seller.settings.address]
        cap.free = cap.free[1:]  # one device leased
        before = newest(net)[seller.node_id]
        seller.capacity_changed()
        await eventually(lambda: newest(net)[seller.node_id] > before)
        await eventually(converged(net.nodes, newest(net)))
        for node in net.nodes:
            entry = node.directory.get(seller.node_id)
            assert entry is not None
            assert entry.advert.free_units == len(cap.free)


class TestForgery:
    @virtual_time
    async def test_memory_transport_forged_adverts_are_dropped_everywhere(
        self, net: Net, sealed_advert: AdvertSealer
    ) -> None:
        await build(net, providers=12)
        await eventually(converged(net.nodes, newest(net)))
        victim = net.providers[0]
        genuine = victim.directory.get(victim.node_id)
        assert genuine is not None
        mallory = Identity.generate()
        t = now_ms()
        big = genuine.seq + 1_000_000  # would win everywhere if it were accepted

        # (a) signed by Mallory's own key, naming the victim as provider
        impersonation = sealed_advert(
            mallory, seq=big, expires_ms=t + 600_000, now_ms=t, provider=victim.node_id
        )
        # (b) the victim's genuine bytes with the seq raised: the signature no longer holds
        env = codec.decode(genuine.envelope)
        env["body"]["seq"] = big
        tampered = codec.encode(env)
        # (c) the victim's advert body re-signed by Mallory (as herself)
        resigned = seal(
            mallory,
            Advert.model_validate({**genuine.advert.model_dump(), "seq": big}),
            now_ms=t,
            nonce=os.urandom(16),
        )
        # (d) re-signed by Mallory but still claiming the victim's public key
        env = codec.decode(resigned)
        env["from"] = victim.identity.public_key
        stolen_key = codec.encode(env)
        forged = [impersonation, tampered, resigned, stolen_key]

        target = net.providers[7]
        await push(net, target, forged)
        counts = target.metrics.rejection_counts()
        assert counts.get("sender_mismatch") == 2
        assert counts.get("bad_signature") == 2

        # Give gossip many rounds to (wrongly) spread anything; then look everywhere.
        await gossip_rounds(net, 20)
        for node in net.nodes:
            entry = node.directory.get(victim.node_id)
            assert entry is not None
            assert entry.seq < big
            assert signer(entry.envelope) == victim.node_id
            assert all(e.envelope not in forged for e in node.directory.live(now_ms()))
            assert mallory.node_id not in node.directory

    @virtual_time
    async def test_memory_transport_forged_adverts_pushed_everywhere_are_counted_everywhere(
        self, net: Net, sealed_advert: AdvertSealer
    ) -> None:
        await build(net, providers=10)
        victim = net.providers[0]
        t = now_ms()
        forged = sealed_advert(
            Identity.generate(),
            seq=2**62,
            expires_ms=t + 600_000,
            now_ms=t,
            provider=victim.node_id,
        )
        for node in net.nodes:
            await push(net, node, [forged, b"\x93not an envelope"])
        for node in net.nodes:
            counts = node.metrics.rejection_counts()
            assert counts.get("sender_mismatch") == 1
            assert counts.get("malformed") == 1
            entry = node.directory.get(victim.node_id)
            assert entry is None or entry.seq < 2**62

    @virtual_time
    async def test_memory_transport_an_expired_advert_is_not_relayed(
        self, net: Net, sealed_advert: AdvertSealer
    ) -> None:
        await build(net, providers=10)
        ghost = Identity.generate()
        t = now_ms()
        dead = sealed_advert(ghost, seq=1, expires_ms=t - 1, now_ms=t - 60_000)
        await push(net, net.providers[2], [dead])
        assert net.providers[2].metrics.rejection_counts().get("expired_advert") == 1
        await gossip_rounds(net, 10)
        assert all(ghost.node_id not in n.directory for n in net.nodes)


class TestCatchUp:
    @virtual_time
    async def test_memory_transport_a_late_joiner_catches_up(self, net: Net) -> None:
        await build(net, providers=15)
        await eventually(converged(net.nodes, newest(net)))
        # Joins through an ordinary provider, long after the adverts were pushed.
        late = await net.add("late", bootstrap=[address("p13")])
        want = newest(net)
        assert len(want) == 16
        await eventually(converged(net.nodes, want))
        assert len(late.directory) == 16
        # Everyone can now reach it (its address came with its advert).
        assert all(late.settings.address in n.peers for n in net.nodes if n is not late)

    @virtual_time
    async def test_memory_transport_a_partition_catches_up_after_heal(self, net: Net) -> None:
        await build(net, providers=19)
        await eventually(converged(net.nodes, newest(net)))
        left = net.nodes[:10]  # with the bootstrap node
        right = net.nodes[10:]
        net.network.partition(
            [[n.settings.address or "" for n in left], [n.settings.address or "" for n in right]]
        )
        # One provider on each side changes what it sells.
        before = newest(net)
        for side in (left, right):
            seller = side[-1]
            assert seller.settings.address is not None
            cap = net.capacities[seller.settings.address]
            cap.free = []
            seller.capacity_changed()
        seller_left, seller_right = left[-1], right[-1]
        await eventually(
            lambda: all(newest(net)[s.node_id] > before[s.node_id] for s in (left[-1], right[-1]))
        )
        await eventually(
            lambda: (
                all(
                    held(n).get(seller_left.node_id) == newest(net)[seller_left.node_id]
                    for n in left
                )
                and all(
                    held(n).get(seller_right.node_id) == newest(net)[seller_right.node_id]
                    for n in right
                )
            )
        )
        # Nothing crossed the partition.
        fresh = newest(net)
        assert all(held(n)[seller_right.node_id] < fresh[seller_right.node_id] for n in left)
        assert all(held(n)[seller_left.node_id] < fresh[seller_left.node_id] for n in right)

        net.network.heal()
        await eventually(converged(net.nodes, newest(net)))
        for node in net.nodes:
            for seller in (seller_left, seller_right):
                entry = node.directory.get(seller.node_id)
                assert entry is not None
                assert entry.advert.free_units == 0


class TestExpiry:
    @virtual_time
    async def test_memory_transport_a_dead_providers_advert_expires_everywhere(
        self, net: Net
    ) -> None:
        await build(net, providers=10)
        doomed = await net.add("doomed", ttl_s=10.0)  # ten gossip rounds
        await eventually(converged(net.nodes, newest(net)))
        entry = doomed.directory.get(doomed.node_id)
        assert entry is not None
        # The provider crashes: no more refreshes, nobody can reach it.
        await doomed.close()
        net.network.set_down(address("doomed"))
        last_expiry = max(
            e.advert.expires_ms
            for n in net.nodes
            if (e := n.directory.get(doomed.node_id)) is not None
        )
        others = [n for n in net.nodes if n is not doomed]
        await eventually(lambda: now_ms() > last_expiry, timeout_s=20.0)
        # From its expiry on, no node ever shows it to a tenant, even before purging...
        for node in others:
            assert doomed.node_id not in held(node)
            assert doomed.node_id not in node.directory.digest(now_ms())
        # ...and every node purges it; the other providers stay.
        await eventually(lambda: all(doomed.node_id not in n.directory for n in others))
        want = {k: v for k, v in newest(net).items() if k != doomed.node_id}
        await eventually(converged(others, want))

    @virtual_time
    async def test_memory_transport_a_live_provider_never_expires(self, net: Net) -> None:
        """Adverts are refreshed before they expire, so a live provider never disappears."""
        await build(net, providers=5)
        short = await net.add("short", ttl_s=3.0)  # refreshed every 1.2 s
        await eventually(converged(net.nodes, newest(net)))
        first = newest(net)[short.node_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.5  # past the first advert's expiry
        while loop.time() < deadline:
            assert all(short.node_id in held(node) for node in net.nodes)
            await asyncio.sleep(0.1)
        assert newest(net)[short.node_id] > first
        await eventually(converged(net.nodes, newest(net)))


@virtual_time
async def test_memory_transport_close_stops_every_loop(net: Net) -> None:
    await build(net, providers=3)
    await net.close()
    before = net.network.delivered
    await asyncio.sleep(10 * INTERVAL_S)
    assert net.network.delivered == before
    await net.close()  # idempotent


@virtual_time
async def test_memory_transport_news_pushed_to_a_closing_node_never_fails_the_sender(
    net: Net, sealed_advert: AdvertSealer
) -> None:
    """A node that is shutting down drops the relay of news it still receives, rather
    than raising into the peer that pushed it (which would take that peer's loop down)."""
    await build(net, providers=2)
    target = net.providers[0]
    assert target.settings.address is not None
    sent_by: dict[str, int] = {}
    deliver = net.network.deliver

    async def counted(source: str, dest: str, data: bytes, timeout_s: float) -> bytes:
        sent_by[source] = sent_by.get(source, 0) + 1
        return await deliver(source, dest, data, timeout_s)

    net.network.deliver = counted  # type: ignore[method-assign]
    closing = asyncio.create_task(target.close())
    for _ in range(10):
        await asyncio.sleep(0)
        t = now_ms()
        news = sealed_advert(Identity.generate(), seq=1, expires_ms=t + 60_000, now_ms=t)
        await push(net, target, [news])  # answered (b""), never an error, every time
    await closing
    # Closed for good: the news that reached it during the close started no relay, and
    # in ten gossip intervals it sends nothing, while the others keep gossiping.
    sent_by.clear()
    await asyncio.sleep(10 * INTERVAL_S)
    assert sent_by.get(target.settings.address, 0) == 0
    assert sum(sent_by.values()) > 0


class TestImplausibleAdverts:
    async def test_memory_transport_node_drops_and_counts_an_impossible_advert(self) -> None:
        """10,000 "H100-SXM" at 2^63-1 FLOP/s never enters a directory (issue 16)."""
        net = MemoryNetwork(seed=3)
        settings = NodeSettings(role="bootstrap", address=address("boot"), bootstrap=[])
        node = Node(Identity.generate(), settings, net.transport(address("boot")))
        liar = Identity.generate()
        groups = []
        for b in range(10):
            ids = [f"b{b}-{i}" for i in range(1000)]
            groups.append(
                DeviceGroup(
                    model="H100-SXM",
                    kind="gpu",
                    ids=ids,
                    free=ids,
                    memory_bytes=80 * 10**9,
                    fp16_flops=2**63 - 1,
                    memory_bandwidth=3_350 * 10**9,
                    price_floor=5_000_000,
                )
            )
        advert = Advert(
            provider=liar.node_id,
            address=address("liar"),
            devices=groups,
            interconnect=Interconnect(kind="nvlink", bandwidth=450 * 10**9, gang_size=8),
            seq=1,
            expires_ms=now_ms() + 60_000,
        )
        raw = seal(liar, advert, now_ms=now_ms(), nonce=os.urandom(16))
        assert node.ingest_advert(raw) is None
        assert liar.node_id not in node.directory
        counted = node.metrics.rejection_counts()["implausible_advert"]
        assert counted == 1
        # The memo of verified adverts keeps no verdict of a refused one: every copy is
        # refused and counted again, also by another node sharing the memo (as the
        # simulation's nodes do).
        assert node.ingest_advert(raw) is None
        assert node.metrics.rejection_counts()["implausible_advert"] == 2
        other_settings = NodeSettings(role="bootstrap", address=address("b2"), bootstrap=[])
        other = Node(
            Identity.generate(),
            other_settings,
            net.transport(address("b2")),
            verified=node.verified,
        )
        assert other.ingest_advert(raw) is None
        assert liar.node_id not in other.directory
