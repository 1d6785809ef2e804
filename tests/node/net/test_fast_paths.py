"""The shortcuts that make a 10,000-node simulation affordable (issue 19) give the answers
of the long way: a copy of the advert a node holds is settled without the directory, the
peer index grows without a rebuild, and the virtual loop's timer heap fires timers in the
order asyncio's own heap does. Pure logic on the in-memory transport (a fake network) and
the virtual-time loop; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import os
import random

from conftest import AdvertSealer

from node.net import simloop
from node.net.node import Node, NodeSettings, Peer
from node.net.transport import MemoryNetwork
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Directory

T0_MS = 1_767_225_600_000


class Clock:
    """A node's clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = T0_MS

    def __call__(self) -> int:
        return self.now


def _node(clock: Clock, *, shared: Node | None = None) -> Node:
    net = MemoryNetwork(seed=1)
    settings = NodeSettings(role="bootstrap", address="http://boot.mem", bootstrap=[])
    return Node(
        Identity.generate(),
        settings,
        net.transport("http://boot.mem"),
        clock=clock,
        verified=shared.verified if shared is not None else None,
    )


async def _push(node: Node, clock: Clock, adverts: list[bytes]) -> list[str]:
    """An outsider pushes ``adverts``; returns the providers the node queued to relay."""
    node._news.clear()
    raw = seal(
        Identity.generate(),
        Directory(adverts=adverts),
        now_ms=clock(),
        nonce=os.urandom(16),
        to=node.node_id,
    )
    assert await node.handle(raw, "http://outsider.mem") == b""
    return list(node._news)


class TestCopiesOfHeldAdverts:
    def test_memory_transport_a_copy_is_not_relayed_but_a_newer_advert_is(
        self, sealed_advert: AdvertSealer
    ) -> None:
        async def main() -> None:
            clock = Clock()
            node = _node(clock)
            p = Identity.generate()
            first = sealed_advert(p, seq=1, expires_ms=clock() + 60_000, now_ms=clock())
            newer = sealed_advert(p, seq=2, expires_ms=clock() + 60_000, now_ms=clock())
            assert await _push(node, clock, [first]) == [p.node_id]
            # Copies (fresh bytes objects, as every decoded message brings) are no news.
            assert await _push(node, clock, [bytes(bytearray(first))]) == []
            assert await _push(node, clock, [first, bytes(bytearray(first))]) == []
            # The same provider's newer advert is news, though the memo knows the older one.
            assert await _push(node, clock, [bytes(bytearray(first)), newer]) == [p.node_id]
            entry = node.directory.get(p.node_id)
            assert entry is not None
            assert entry.seq == 2
            # The older one is held no more: its copies change nothing.
            assert await _push(node, clock, [first]) == []
            entry = node.directory.get(p.node_id)
            assert entry is not None
            assert entry.seq == 2
            assert node.metrics.rejection_counts() == {}

        simloop.run(main())

    def test_memory_transport_a_copy_of_a_held_advert_that_expired_is_counted(
        self, sealed_advert: AdvertSealer
    ) -> None:
        async def main() -> None:
            clock = Clock()
            node = _node(clock)
            p = Identity.generate()
            raw = sealed_advert(p, seq=1, expires_ms=clock() + 60_000, now_ms=clock())
            assert await _push(node, clock, [raw]) == [p.node_id]
            clock.now += 60_000  # it expires now; the directory has not been swept yet
            assert await _push(node, clock, [bytes(bytearray(raw))]) == []
            assert node.metrics.rejection_counts() == {"expired_advert": 1}

        simloop.run(main())

    def test_memory_transport_a_node_sharing_the_memo_still_takes_the_advert_as_news(
        self, sealed_advert: AdvertSealer
    ) -> None:
        """The memo's bytes object is what a node holds; another node that shares the memo
        (as the simulator's nodes do) and holds nothing yet must still take it in."""

        async def main() -> None:
            clock = Clock()
            a = _node(clock)
            b = _node(clock, shared=a)
            p = Identity.generate()
            raw = sealed_advert(p, seq=1, expires_ms=clock() + 60_000, now_ms=clock())
            assert await _push(a, clock, [raw]) == [p.node_id]
            assert await _push(b, clock, [bytes(bytearray(raw))]) == [p.node_id]
            assert await _push(b, clock, [raw]) == []
            assert b.peers["http://127.0.0.1:9"].node_id == p.node_id

        simloop.run(main())


class TestPeerIndex:
    def test_memory_transport_peers_learned_after_a_sample_are_sampled_and_named(self) -> None:
        """The index grows as peers are learned; after any mix of learning, naming and
        dropping it is the table in order (what sampling and address lookups use)."""
        node = _node(Clock())
        rng = random.Random(5)
        ids = [Identity.generate().node_id for _ in range(40)]
        for step in range(400):
            i = rng.randrange(40)
            action = rng.random()
            if action < 0.6:
                named = ids[i] if rng.random() < 0.7 else None
                node.learn_peer(f"http://n{i}.mem", named, "provider")
            elif action < 0.8 and node.peers:
                peer = rng.choice(list(node.peers.values()))
                for _ in range(node.settings.max_peer_failures):
                    node._peer_failed(peer)
            else:
                node.learn_peer(f"http://n{i}.mem", ids[i], "provider")
            if step % 3 == 0:  # build the index now and then, as gossip does
                node.sample_peers(1)
            table = list(node.peers.values())
            assert node._peer_index() == table
            for peer in table:
                if peer.node_id is not None:
                    assert node._address_of(peer.node_id) == peer.address
            picked = node.sample_peers(len(table))
            assert sorted(p.address for p in picked) == sorted(p.address for p in table)
        assert node.metrics.peers._only().value == len(node.peers)

    def test_memory_transport_a_peer_list_counts_its_new_peers_once(self) -> None:
        node = _node(Clock())
        node.learn_peer("http://a.mem", None, "provider")
        assert node.metrics.peers._only().value == 1
        assert node._learn("http://b.mem", None, "provider") is True
        assert node._learn("http://b.mem", None, "provider") is False
        assert isinstance(node.peers["http://b.mem"], Peer)


class TestTimerHeap:
    def test_timers_fire_in_the_order_of_asyncios_own_heap(self) -> None:
        """Many timers due at the same instants, some cancelled, some scheduled by others
        as they fire: the pairs heap fires them in exactly the order of asyncio's heap of
        handles (ties are not FIFO there, so any other tie rule would differ)."""

        class AsyncioHeap(simloop.VirtualTimeLoop):
            call_at = asyncio.BaseEventLoop.call_at  # type: ignore[assignment]
            _run_once = asyncio.BaseEventLoop._run_once  # type: ignore[attr-defined]

        def scenario(loop: asyncio.AbstractEventLoop) -> list[int]:
            rng = random.Random(3)
            fired: list[int] = []
            handles: list[asyncio.TimerHandle] = []
            done = loop.create_future()

            def fire(n: int) -> None:
                fired.append(n)
                if n % 7 == 0:  # a callback schedules more, at colliding instants
                    for k in range(3):
                        handles.append(loop.call_later(rng.choice([0.0, 0.5, 1.0]), fire, -k))
                if len(fired) >= 900 and not done.done():
                    done.set_result(None)

            for n in range(1200):
                handles.append(loop.call_at(rng.choice([1.0, 2.0, 2.5, 3.0]), fire, n))
                if rng.random() < 0.3:
                    rng.choice(handles).cancel()
            loop.run_until_complete(asyncio.wait_for(done, 3600))
            return fired

        orders = []
        for cls in (AsyncioHeap, simloop.VirtualTimeLoop):
            loop = cls()
            try:
                orders.append(scenario(loop))
            finally:
                loop.close()
        assert len(orders[0]) >= 900
        assert orders[1] == orders[0]
