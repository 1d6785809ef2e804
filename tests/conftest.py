"""Suite-wide test settings.

Hypothesis runs without per-example deadlines: CI has two shared cores, so wall time per
example says nothing about correctness (speed is measured in bench/, not here). The
example count is kept modest so the whole suite stays fast; raise it locally with
``--hypothesis-profile=thorough``.

Shared fixtures: ``sealed_advert`` builds a real, signed advert envelope; ``closers``
collects a test's async closers (daemons, tenants, servers) and runs them in reverse at
its end.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, settings

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Advert, DeviceGroup, Interconnect

settings.register_profile(
    "default",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=2_000, deadline=None)
settings.load_profile("default")


#: (identity, seq=, expires_ms=, now_ms=, free=, address=, provider=) -> envelope bytes
AdvertSealer = Callable[..., bytes]


def rtx_group(free: int = 2, price_floor: int = 350_000) -> DeviceGroup:
    """Two simulated RTX 4090s, ``free`` of them unleased (figures as in market.catalog)."""
    ids = ["gpu0", "gpu1"]
    return DeviceGroup(
        model="RTX-4090",
        kind="gpu",
        ids=ids,
        free=ids[:free],
        memory_bytes=24 * 10**9,
        fp16_flops=165 * 10**12,
        memory_bandwidth=1008 * 10**9,
        price_floor=price_floor,
        simulated=True,
    )


PCIE = Interconnect(kind="pcie", bandwidth=32 * 10**9, gang_size=2)


@pytest.fixture
def sealed_advert() -> AdvertSealer:
    """A factory of adverts signed by ``identity`` (``provider`` overrides the named node)."""

    def make(
        identity: Identity,
        *,
        seq: int,
        expires_ms: int,
        now_ms: int,
        free: int = 2,
        address: str = "http://127.0.0.1:9",
        provider: str | None = None,
    ) -> bytes:
        advert = Advert(
            provider=provider or identity.node_id,
            address=address,
            devices=[rtx_group(free)],
            interconnect=PCIE,
            seq=seq,
            expires_ms=expires_ms,
        )
        return seal(identity, advert, now_ms=now_ms, nonce=os.urandom(16))

    return make


@pytest.fixture
def bwrap() -> None:
    """Skip, saying why, where bubblewrap cannot run on this machine (the sandbox tests).

    Here and not in a conftest.py of their own: tests import this module as ``conftest``
    (PCIE, rtx_group), and a second conftest.py would shadow it on sys.path.
    """
    from node.provider.sandbox import probe_bwrap

    probe = probe_bwrap()
    if not probe.ok:
        pytest.skip(f"bubblewrap cannot run on this machine: {probe.reason}")


@pytest.fixture
async def closers() -> AsyncIterator[list[Callable[[], Awaitable[None]]]]:
    """What a test started, closed in reverse order when it ends (pass or fail)."""
    stack: list[Callable[[], Awaitable[None]]] = []
    yield stack
    for close in reversed(stack):
        await close()
