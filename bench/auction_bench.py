"""Order-to-lease latency of the reverse auction.

The clock starts just before ``Tenant.auction`` and stops at its return: matchmaking
over the directory, the signed Order to each of the k best providers, their Bids (the
auction closes early, as soon as every asked provider answered), the Awards, the
Accepts, and the Releases of the losing bids. Between orders (not timed) the tenant
releases its leases, so capacity stays available, and refreshes its directory.

Two variants:

* real (default): ``node.cli.localcluster.up`` starts a bootstrap node and N provider daemons as
  subprocesses on loopback (home in a temporary directory, torn down at the end); the
  tenant talks HTTP to them with a real SQLite store file.
* ``--in-process``: N provider Nodes (ProviderService + BidEngine, wired as in
  node.daemon) on one ``node.net.transport.MemoryNetwork`` with ``Store(':memory:')``, and
  the tenant on the same network. No sockets, no processes: what is left is the cost
  of the protocol (sealing, opening, validating) and of the auction itself.

Units per order cycle 1, 2, 3, 4; every order asks k providers (default: all N, capped
by --k). Two warm-up orders (not counted) open the connection pool. Besides the total,
the table splits each order into its phases: collect (orders out, bids in), award
(awards out, accepts in, leases stored) and release (losing bids released).

Goal: N = 32 real daemons, p50 <= 100 ms. The last line printed is
``p50_ms=<x> p95_ms=<y>``.

Run: ``python bench/auction_bench.py --providers 32 [--in-process] [--orders 30] [--k K]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from market.auction import Auction, AuctionState
from market.bidding import BidEngine, devices_from_groups
from node.cli import localcluster as cluster
from node.net.node import Node, NodeSettings
from node.net.transport import HttpTransport, MemoryNetwork, Transport
from node.provider.inventory import DeviceDecl, InterconnectDecl, build_inventory
from node.provider.service import ProviderService
from node.store.node_store import Store
from node.tenant.client import AuctionReport, Tenant
from protocol.identity import Identity
from protocol.messages import Award, Requirement

JOB = hashlib.sha256(b"auction_bench").hexdigest()
MAX_PRICE = 5_000_000  # 5 credits per device-hour: above every floor of the templates
WARMUP = 2


class TimedTenant(Tenant):
    """A Tenant that notes when each phase of its last auction began (for the table)."""

    def __init__(self, identity: Identity, store: Store, transport: Transport) -> None:
        super().__init__(identity, store, transport)
        self.first_award: float | None = None
        self.release_start: float | None = None
        self.bids = 0
        self.no_bids: Counter[str] = Counter()

    async def _award(self, auction: Auction, award: Award) -> list[Award]:
        if self.first_award is None:
            self.first_award = time.perf_counter()
        return await super()._award(auction, award)

    async def _release_losers(self, auction: Auction) -> None:
        self.release_start = time.perf_counter()
        self.bids = auction.outcome.bids
        self.no_bids = Counter(auction.outcome.no_bids)
        self.no_bids.update({f"ignored ({r})": n for r, n in auction.outcome.ignored.items()})
        await super()._release_losers(auction)


@dataclass
class Sample:
    total_ms: float
    collect_ms: float
    award_ms: float
    release_ms: float
    bids: int
    asked: int


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    no_bids: Counter[str] = field(default_factory=Counter)


async def one_order(tenant: TimedTenant, units: int, k: int) -> tuple[Sample, AuctionReport]:
    tenant.first_award = tenant.release_start = None
    tenant.bids = 0
    tenant.no_bids = Counter()
    t0 = time.perf_counter()
    report = await tenant.auction(Requirement(kind="any"), units, MAX_PRICE, job_spec_hash=JOB, k=k)
    t3 = time.perf_counter()
    t1 = tenant.first_award or t3
    t2 = tenant.release_start or t3
    sample = Sample(
        total_ms=(t3 - t0) * 1000,
        collect_ms=(t1 - t0) * 1000,
        award_ms=(t2 - t1) * 1000,
        release_ms=(t3 - t2) * 1000,
        bids=tenant.bids,
        asked=len(report.asked),
    )
    return sample, report


async def drive(tenant: TimedTenant, peer: str, orders: int, k: int) -> Run:
    run = Run()
    await tenant.refresh(peer)
    for i in range(WARMUP + orders):
        units = 1 + i % 4
        sample, report = await one_order(tenant, units, k)
        if i >= WARMUP:
            run.samples.append(sample)
            run.no_bids.update(tenant.no_bids)
            if report.state is not AuctionState.LEASED:
                run.failures.append(report.failure or report.explanation)
        for lease in report.leases:
            row = tenant.store.get_lease(lease.lease_id)
            if row is not None:
                await tenant.release(row)
        await tenant.refresh(peer)
    return run


# --- real daemons -----------------------------------------------------------------


async def run_real(providers: int, orders: int, k: int) -> Run:
    home = Path(tempfile.mkdtemp(prefix="mercato-auction-bench-"))
    try:
        t0 = time.monotonic()
        nodes = await asyncio.to_thread(cluster.up, providers, home, 30.0, 180.0)
        print(f"cluster up: {providers} provider daemons in {time.monotonic() - t0:.1f} s")
        boot = next(n.address for n in nodes if n.role == "bootstrap")
        transport = HttpTransport()
        try:
            with Store(home / "tenant.sqlite") as store:
                tenant = TimedTenant(Identity.generate(), store, transport)
                return await drive(tenant, boot, orders, k)
        finally:
            await transport.close()
    finally:
        await asyncio.to_thread(cluster.down, home)
        shutil.rmtree(home, ignore_errors=True)


# --- in process -------------------------------------------------------------------


def provider_node(
    net: MemoryNetwork, address: str, template: cluster.Template
) -> tuple[Node, Store]:
    """One provider wired as node.daemon.Daemon.start wires it, on the memory network."""
    identity = Identity.generate()
    store = Store(":memory:")
    transport: Transport = net.transport(address)
    settings = NodeSettings(role="provider", address=address, advert_ttl_s=3600.0)
    node = Node(identity, settings, transport)
    inventory = build_inventory(
        [
            DeviceDecl(
                model=template.model,
                count=template.count,
                price_floor=template.price_floor,
                simulated=True,
            )
        ],
        InterconnectDecl(kind=template.interconnect),  # type: ignore[arg-type]
        detect=False,
    )
    engine = BidEngine(
        identity.node_id,
        devices_from_groups(inventory.device_groups(free=set(inventory.ids))),
        inventory.interconnect_message(),
    )
    ProviderService(node, engine, store).start()
    net.attach(address, node.handle)
    return node, store


async def run_in_process(providers: int, orders: int, k: int) -> Run:
    net = MemoryNetwork()
    boot_address = "http://bootstrap.mem"
    boot = Node(
        Identity.generate(),
        NodeSettings(role="bootstrap", address=boot_address, advert_ttl_s=3600.0),
        net.transport(boot_address),
    )
    net.attach(boot_address, boot.handle)
    stores = []
    for i in range(providers):
        node, store = provider_node(
            net, f"http://provider-{i + 1}.mem", cluster.TEMPLATES[i % len(cluster.TEMPLATES)]
        )
        stores.append(store)
        # The advert a started provider would publish, handed straight to the bootstrap
        # node (no gossip loops run: they would only add noise to the measurement).
        boot.ingest_advert(node.make_advert())
    try:
        with Store(":memory:") as store:
            tenant = TimedTenant(Identity.generate(), store, net.transport("http://tenant.mem"))
            return await drive(tenant, boot_address, orders, k)
    finally:
        for s in stores:
            s.close()


# --- report -----------------------------------------------------------------------


def pct(values: Sequence[float], q: int) -> float:
    """The q-th percentile, inclusive method (exact on the observed values' range)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(run: Run, providers: int, k: int, variant: str) -> None:
    s = run.samples
    print(
        f"{variant}: {providers} providers, k={k}, {len(s)} orders "
        f"(units 1-4); per order {sum(x.asked for x in s) / len(s):.1f} asked "
        f"(matchmaking skips providers its directory shows full), "
        f"{sum(x.bids for x in s) / len(s):.1f} bids; "
        f"{len(run.failures)} not leased"
    )
    print(f"{'phase':<10}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}{'mean ms':>10}")
    for name in ("collect", "award", "release", "total"):
        values = [getattr(x, f"{name}_ms") for x in s]
        print(
            f"{name:<10}{pct(values, 50):>10.1f}{pct(values, 95):>10.1f}"
            f"{max(values):>10.1f}{statistics.fmean(values):>10.1f}"
        )
    if run.no_bids:
        print("other answers: " + ", ".join(f"{n} {r}" for r, n in run.no_bids.most_common()))
    for why in sorted(set(run.failures)):
        print(f"  not leased: {why}")
    total = [x.total_ms for x in s]
    print(f"p50_ms={pct(total, 50):.1f} p95_ms={pct(total, 95):.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", type=int, default=8, help="provider count N (default 8)")
    p.add_argument("--orders", type=int, default=30, help="orders measured (default 30)")
    p.add_argument("--k", type=int, default=None, help="providers asked (default: all N)")
    p.add_argument("--in-process", action="store_true", help="MemoryNetwork, no daemons")
    args = p.parse_args(argv)
    if args.providers < 1 or args.orders < 1:
        p.error("--providers and --orders must be at least 1")
    k = min(args.k or args.providers, args.providers)
    if args.in_process:
        run = asyncio.run(run_in_process(args.providers, args.orders, k))
        variant = "in-process (MemoryNetwork)"
    else:
        run = asyncio.run(run_real(args.providers, args.orders, k))
        variant = "real daemons (HTTP on loopback)"
    report(run, args.providers, k, variant)


if __name__ == "__main__":
    main()
