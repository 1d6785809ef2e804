"""``mercato``: the one console script, with subcommands for each kind of user.

Provider operators: ``mercato provider run --config provider.toml``.
Tenants: ``mercato market``.
Developers: ``mercato cluster up|status|down``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from protocol.errors import MercatoError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _credits(micro: int) -> str:
    """Format micro-credits for people (integers stay integers in every store)."""
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}".rstrip("0").rstrip(".") or "0"


# --- provider -------------------------------------------------------------------


def cmd_provider_run(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.daemon import run_daemon, setup_logging
    from node.home import NodeHome, resolve_home

    config = load_config(Path(args.config))
    home = NodeHome(config.node.home or resolve_home())
    setup_logging(home.path, verbose=args.verbose)
    asyncio.run(run_daemon(config, home))
    return EXIT_OK


# --- tenant ---------------------------------------------------------------------


def resolve_peer(explicit: str | None) -> str:
    """--peer, then $MERCATO_PEER, then the local cluster's bootstrap node."""
    from node.cluster import bootstrap_address

    peer = explicit or os.environ.get("MERCATO_PEER") or bootstrap_address()
    if not peer:
        raise MercatoError(
            "no peer to ask: pass --peer URL, set MERCATO_PEER, "
            "or start a local cluster with `mercato cluster up`"
        )
    return peer.rstrip("/")


async def fetch_market(peer: str) -> list[dict[str, Any]]:
    """Fetch and verify the directory from ``peer`` as a tenant (never called back)."""
    from node.core import Node, NodeSettings, Peer
    from node.home import NodeHome, resolve_home
    from node.transport import HttpTransport

    identity = NodeHome(resolve_home() / "tenant").load_or_create_identity()
    transport = HttpTransport()
    try:
        node = Node(identity, NodeSettings(role="tenant", address=None), transport)
        entries = await node.fetch_directory(Peer(address=peer, role="bootstrap"))
        now = node.clock()
    finally:
        await transport.close()
    rows = []
    for e in sorted(entries, key=lambda e: e.provider):
        a = e.advert
        rows.append(
            {
                "provider": a.provider,
                "address": a.address,
                "devices": [
                    {
                        "model": g.model,
                        "kind": g.kind,
                        "count": len(g.ids),
                        "free": len(g.free),
                        "memory_bytes": g.memory_bytes,
                        "fp16_flops": g.fp16_flops,
                        "price_floor": g.price_floor,
                        "simulated": g.simulated,
                    }
                    for g in a.devices
                ],
                "interconnect": a.interconnect.model_dump(),
                "free_units": a.free_units,
                "seq": a.seq,
                "expires_in_ms": a.expires_ms - now,
            }
        )
    return rows


def cmd_market(args: argparse.Namespace) -> int:
    rows = asyncio.run(fetch_market(resolve_peer(args.peer)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = Table(title=f"Market: {len(rows)} providers")
    for col in ("provider", "devices", "free", "interconnect", "floor (cr/dev-h)", "expires"):
        table.add_column(col)
    for r in rows:
        devs = ", ".join(f"{d['count']}x {d['model']}" for d in r["devices"])
        ic = r["interconnect"]
        floors = ", ".join(_credits(d["price_floor"]) for d in r["devices"])
        table.add_row(
            r["provider"][:12],
            devs,
            str(r["free_units"]),
            f"{ic['kind']} {ic['bandwidth'] // 10**9} GB/s",
            floors,
            f"{r['expires_in_ms'] / 1000:.0f} s",
        )
    Console().print(table)
    return EXIT_OK


# --- cluster --------------------------------------------------------------------


def cmd_cluster_up(args: argparse.Namespace) -> int:
    import time

    from node import cluster

    t0 = time.monotonic()
    nodes = cluster.up(args.providers, ttl_s=args.advert_ttl)
    took = time.monotonic() - t0
    print(f"cluster up: 1 bootstrap + {args.providers} providers in {took:.1f} s")
    for n in nodes:
        print(f"  {n.name:<12} pid {n.pid:<7} {n.address}  {n.node_id}")
    print(f"homes under {cluster.cluster_root()}; stop with `mercato cluster down`")
    return EXIT_OK


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from node import cluster

    rows = cluster.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no local cluster (start one with `mercato cluster up --providers 4`)")
        return EXIT_OK
    table = Table(title="Local cluster")
    for col in ("name", "pid", "address", "devices", "health"):
        table.add_column(col)
    for r in rows:
        devs = ", ".join(f"{d['count']}x {d['model']}" for d in r["devices"]) or "-"
        table.add_row(r["name"], str(r["pid"]), r["address"], devs, r["health"])
    Console().print(table)
    return EXIT_OK


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from node import cluster

    n = cluster.down()
    print(f"stopped {n} node{'s' if n != 1 else ''}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mercato",
        description="Mercato: a decentralized compute marketplace.",
        epilog="Homes live under $MERCATO_HOME (default ~/.mercato).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prov = sub.add_parser("provider", help="run and manage a provider daemon")
    prov_sub = prov.add_subparsers(dest="provider_command", required=True, metavar="ACTION")
    run = prov_sub.add_parser(
        "run",
        help="run the daemon in the foreground until SIGTERM/SIGINT",
        description="Run a provider (or bootstrap) daemon with the given TOML config.",
    )
    run.add_argument("--config", required=True, help="path to provider.toml")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_provider_run)

    market = sub.add_parser(
        "market",
        help="show the providers and prices the network advertises",
        description="Fetch the advert directory from a peer, verify every signature, show it.",
    )
    market.add_argument("--peer", help="a node's URL (default: $MERCATO_PEER or local cluster)")
    market.add_argument("--json", action="store_true", help="machine-readable output")
    market.set_defaults(func=cmd_market)

    cl = sub.add_parser("cluster", help="a local multi-node test cluster on loopback")
    cl_sub = cl.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    cup = cl_sub.add_parser(
        "up",
        help="start a bootstrap node and N simulated providers",
        description="Start a bootstrap node and N provider daemons on free loopback ports, "
        "with a mixed simulated inventory; return when all are advertised.",
    )
    cup.add_argument("--providers", type=int, default=4, help="number of providers (default 4)")
    cup.add_argument(
        "--advert-ttl", type=float, default=6.0, help="advert lifetime in seconds (default 6)"
    )
    cup.set_defaults(func=cmd_cluster_up)
    cst = cl_sub.add_parser("status", help="list each node with pid, address, devices, health")
    cst.add_argument("--json", action="store_true", help="machine-readable output")
    cst.set_defaults(func=cmd_cluster_status)
    cdn = cl_sub.add_parser("down", help="stop every node of the local cluster")
    cdn.set_defaults(func=cmd_cluster_down)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MercatoError as e:
        print(f"mercato: {e.reason}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
