"""``mercato cluster ...``: the developer's local cluster."""

from __future__ import annotations

import argparse
import json

from node.cli.common import EXIT_OK

# --- cluster --------------------------------------------------------------------


def cmd_cluster_up(args: argparse.Namespace) -> int:
    import time

    from node.cli import localcluster as cluster

    t0 = time.monotonic()
    nodes = cluster.up(args.providers, ttl_s=args.advert_ttl)
    took = time.monotonic() - t0
    print(f"cluster up: 1 bootstrap + {args.providers} providers in {took:.1f} s")
    for n in nodes:
        print(f"  {n.name:<12} pid {n.pid:<7} {n.address}  {n.node_id}")
    print(f"homes under {cluster.cluster_root()}; stop with `mercato cluster down`")
    return EXIT_OK


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from node.cli import localcluster as cluster

    rows = cluster.status()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no local cluster (start one with `mercato cluster up --providers 4`)")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Local cluster")
    for col in ("name", "pid", "status page", "devices", "health"):
        table.add_column(col)
    for r in rows:
        devs = ", ".join(f"{d['count']}x {d['model']}" for d in r["devices"]) or "-"
        table.add_row(r["name"], str(r["pid"]), r["status_url"], devs, r["health"])
    Console().print(table)
    return EXIT_OK


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from node.cli import localcluster as cluster

    n = cluster.down()
    print(f"stopped {n} node{'s' if n != 1 else ''}")
    return EXIT_OK
