"""Sybil-resistant asking, as a real Tenant runs an auction (issue 16).

The network is the in-memory transport (these tests are about whom the tenant asks, so
every test name says ``memory_transport``); the adverts are real signed envelopes that
enter the tenant's directory as relayed adverts do. Nobody answers the orders: the
auction ends without a lease, and ``asked`` says whom it asked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import PCIE, rtx_group

from market.asking import host_key
from node.net.transport import MemoryNetwork
from node.store.node_store import Store
from node.tenant.client import Tenant
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Advert, Requirement


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def advert(identity: Identity, address: str, floor: int) -> bytes:
    body = Advert(
        provider=identity.node_id,
        address=address,
        devices=[rtx_group(price_floor=floor)],
        interconnect=PCIE,
        seq=1,
        expires_ms=now_ms() + 600_000,
    )
    return seal(identity, body, now_ms=now_ms(), nonce=os.urandom(16))


class TestSybilAsking:
    async def test_memory_transport_fifty_identities_behind_one_address_get_one_question(
        self, tmp_path: Path
    ) -> None:
        net = MemoryNetwork(seed=5)
        with Store(tmp_path / "tenant.sqlite") as store:
            tenant = Tenant(Identity.generate(), store, net.transport("http://tenant.mem:1"))
            sybils = [Identity.generate() for _ in range(50)]
            for i, s in enumerate(sybils):  # the cheapest offers of the market
                assert tenant.node.ingest_advert(advert(s, f"http://sybil.mem:{7000 + i}", 1))
            honest = [Identity.generate() for _ in range(3)]
            for i, h in enumerate(honest):
                assert tenant.node.ingest_advert(advert(h, f"http://host{i}.mem:7000", 350_000))
            report = await tenant.auction(
                Requirement(kind="gpu"), 1, 10**7, job_spec_hash="ab" * 32, bid_window_ms=50
            )
            asked = [c.provider for c in report.asked]
            hosts = [host_key(c.address) for c in report.asked]
            assert len(hosts) == len(set(hosts)), hosts
            assert sum(p in {s.node_id for s in sybils} for p in asked) == 1
            assert {h.node_id for h in honest} <= set(asked)
            await tenant.node.close()
