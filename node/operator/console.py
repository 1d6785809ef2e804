"""``mercato provider status`` and ``mercato provider prices`` for people (Rich tables)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from market.settlement import format_credits
from node.operator.document import ClusterView, StatusDocument
from node.operator.prices import PriceView


def print_status(doc: StatusDocument, console: Console) -> None:
    """The status document as a few tables."""
    if doc.source == "store":
        console.print(f"[yellow]{doc.daemon}: showing what the store knows[/]")
    console.print(
        f"node {doc.node_id or '?'}  role {doc.role or '?'}  "
        f"address {doc.address or '-'}  peers {len(doc.peers)}  "
        f"adverts {len(doc.adverts)}"
    )
    if doc.devices:
        t = Table(title="Devices")
        for col in ("device", "model", "state", "lease", "task", "floor (cr/dev-h)"):
            t.add_column(col)
        for d in doc.devices:
            t.add_row(
                d.id or f"{d.count or ''}x",
                d.model,
                d.state,
                d.lease_id or "",
                d.task_id or "",
                format_credits(d.price_floor),
            )
        console.print(t)
    if doc.cluster is not None:
        print_cluster(doc.cluster, console)
    t = Table(title=f"Leases ({len(doc.leases)})")
    for col in ("lease", "tenant", "devices", "price (cr/dev-h)", "state", "tasks"):
        t.add_column(col)
    for x in doc.leases:
        t.add_row(
            x.lease_id,
            x.tenant[:12],
            f"{len(x.devices)}x {x.model}",
            format_credits(x.price),
            x.state,
            str(x.tasks),
        )
    console.print(t)
    if doc.tasks:
        t = Table(title=f"Tasks ({len(doc.tasks)})")
        for col in ("task", "state", "lease", "parameters", "metrics"):
            t.add_column(col)
        for task in doc.tasks[:50]:
            t.add_row(
                task.task_id,
                task.state,
                task.lease_id,
                " ".join(f"{k}={v}" for k, v in sorted(task.params.items())),
                ", ".join(f"{k}={v}" for k, v in list(task.metrics.items())[:4]),
            )
        console.print(t)
    e = doc.earnings
    if e is not None:
        console.print(
            f"earned {format_credits(e.earned)} credits "
            f"({e.countersigned} countersigned receipts); "
            f"{format_credits(e.pending)} awaiting countersignature; "
            f"{format_credits(e.accruing)} accruing on active leases"
        )


def print_cluster(c: ClusterView, console: Console) -> None:
    """The cluster behind the executor: its nodes, then one line per allocation."""
    t = Table(
        title=f"Cluster ({c.executor}): {c.running} allocations running, "
        f"{c.pending} pending, {c.steps} steps"
    )
    for col in ("node", "state", "reason", "CPUs in use", "GPUs sold"):
        t.add_column(col)
    for n in c.nodes:
        # Text, not markup: a node name or reason is Slurm's (an admin's) words.
        t.add_row(
            Text(n.name), n.state, Text(n.reason), f"{n.cpus_alloc}/{n.cpus}", str(n.gpus_sold)
        )
    console.print(t)
    for a in c.allocations:
        job = "?" if a.job_id is None else a.job_id
        console.print(
            f"  lease {a.lease_id}: Slurm job {job} on {a.node} {a.state} {a.reason}".rstrip()
            + f" ({a.steps} steps)",
            markup=False,
            highlight=False,
        )
    if c.error:
        console.print(f"cannot read the cluster: {c.error}", style="red", markup=False)


def print_prices(rows: Sequence[PriceView], console: Console) -> None:
    """The price floors in effect, and who set each."""
    t = Table(title="Price floors (credits per device-hour)")
    for col in ("model", "floor", "config", "set by"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.model,
            format_credits(r.floor),
            "?" if r.config_floor is None else format_credits(r.config_floor),
            "operator" if r.override else "config",
        )
    console.print(t)
