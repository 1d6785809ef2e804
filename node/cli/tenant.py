"""The tenant's commands: market, order, plan, submit and the job commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from market.lifecycle import JobState
from node.cli.common import EXIT_ERROR, EXIT_OK
from protocol.errors import MercatoError

if TYPE_CHECKING:
    # rich is imported where a table is printed: a provider daemon never loads it.
    from rich.console import Console
    from rich.table import Table

EXIT_USAGE = 2


def _credits(micro: int) -> str:
    """Format micro-credits for people (integers stay integers in every store)."""
    from market.settlement import format_credits

    return format_credits(micro)


# --- tenant ---------------------------------------------------------------------


def resolve_peer(explicit: str | None) -> str:
    """--peer, then $MERCATO_PEER, then the local cluster's bootstrap node."""
    from node.cli.localcluster import bootstrap_address

    peer = explicit or os.environ.get("MERCATO_PEER") or bootstrap_address()
    if not peer:
        raise MercatoError(
            "no peer to ask: pass --peer URL, set MERCATO_PEER, "
            "or start a local cluster with `mercato cluster up`"
        )
    return peer.rstrip("/")


async def fetch_market(peer: str) -> list[dict[str, Any]]:
    """Fetch and verify the directory from ``peer`` as a tenant (never called back)."""
    from node.home import NodeHome, resolve_home
    from node.net.node import Node, NodeSettings, Peer
    from node.net.transport import tenant_transport
    from node.views import advert_summary

    identity = NodeHome(resolve_home() / "tenant").load_or_create_identity()
    transport = tenant_transport(peer)
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
                **advert_summary(a, now),
                "devices": [
                    {
                        "model": g.model,
                        "kind": g.kind,
                        "count": len(g.ids),
                        "free": len(g.free),
                        "memory_bytes": g.memory_bytes,
                        "fp16_flops": g.fp16_flops,
                        "price_floor_micro_credits_per_device_hour": g.price_floor,
                        "simulated": g.simulated,
                    }
                    for g in a.devices
                ],
                "interconnect": a.interconnect.model_dump(),
            }
        )
    return rows


def cmd_market(args: argparse.Namespace) -> int:
    rows = asyncio.run(fetch_market(resolve_peer(args.peer)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"Market: {len(rows)} providers")
    for col in ("provider", "devices", "free", "interconnect", "floor (cr/dev-h)", "expires"):
        table.add_column(col)
    for r in rows:
        devs = ", ".join(f"{d['count']}x {d['model']}" for d in r["devices"])
        ic = r["interconnect"]
        floors = ", ".join(
            _credits(d["price_floor_micro_credits_per_device_hour"]) for d in r["devices"]
        )
        table.add_row(
            r["provider"][:12],
            devs,
            str(r["free_units"]),
            f"{ic['kind']} {ic['bandwidth'] // 10**9} GB/s",
            floors,
            f"{r['expires_in_ms'] / 1000:.0f} s",
        )
    from rich.console import Console

    Console().print(table)
    return EXIT_OK


def _tenant_home() -> Path:
    from node.home import resolve_home

    return resolve_home() / "tenant"


def _store_path(args: argparse.Namespace) -> Path:
    """The store of ``--home`` (default: the tenant's), which must exist: for reading."""
    home = Path(args.home) if args.home else _tenant_home()
    path = home / "node.sqlite"
    if not path.exists():
        raise MercatoError(f"no store at {path} (pass --home of a node or tenant)")
    return path


async def _order(args: argparse.Namespace) -> dict[str, Any]:
    import hashlib

    from node.home import NodeHome
    from node.net.transport import tenant_transport
    from node.store.node_store import Store
    from node.tenant.client import Tenant
    from protocol.messages import Requirement

    home = NodeHome(_tenant_home())
    peer = resolve_peer(args.peer)
    transport = tenant_transport(peer)
    with Store(home.store_path) as store:
        tenant = Tenant(home.load_or_create_identity(), store, transport)
        try:
            await tenant.refresh(peer)
            req = Requirement(
                kind=args.kind,
                model=args.model,
                devices_per_unit=args.devices_per_unit,
                gang=args.gang,
            )
            report = await tenant.auction(
                req,
                args.units,
                args.max_price,
                job_spec_hash=hashlib.sha256(b"mercato order (no job)").hexdigest(),
                k=args.k,
                lease_ms=int(args.hold * 1000) + 60_000,
            )
            receipts = []
            if report.leases and not args.keep:
                await asyncio.sleep(args.hold)
                for lease in report.leases:
                    row = store.get_lease(lease.lease_id)
                    if row is not None:
                        r = await tenant.release(row)
                        receipts.append({"lease_id": r.lease_id, "amount_micro_credits": r.amount})
        finally:
            await tenant.close()  # a cancelled auction's releases (Ctrl-C) end first
            await transport.close()
    wanted = args.min_units if args.min_units is not None else args.units
    short = ""
    if report.units < wanted:
        short = (
            f"leased {report.units} of the {args.units} units asked "
            f"(at least {wanted} wanted; --min-units sets that)"
        )
    return {
        "order_id": report.order.order_id,
        "state": report.state.value,
        "units": report.units,
        "units_asked": args.units,
        "min_units": wanted,
        "short": short,
        "asked": [c.provider for c in report.asked],
        "answers": report.explanation,
        "failure": report.failure,
        "leases": [
            {
                "lease_id": x.lease_id,
                "provider": x.provider,
                "model": x.model,
                "units": x.units,
                "devices": list(x.devices),
                "price_micro_credits_per_device_hour": x.price,
            }
            for x in report.leases
        ],
        "receipts": receipts,
    }


def cmd_order(args: argparse.Namespace) -> int:
    result = asyncio.run(_order(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"order {result['order_id']}: {result['state']}, {result['units']} units "
            f"({result['answers']})"
        )
        for x in result["leases"]:
            print(
                f"  lease {x['lease_id']}: {x['units']}x {x['model']} from "
                f"{x['provider'][:12]} at "
                f"{_credits(x['price_micro_credits_per_device_hour'])} cr/device-h"
            )
        for r in result["receipts"]:
            print(f"  receipt {r['lease_id']}: {_credits(r['amount_micro_credits'])} credits")
        if result["failure"]:
            print(f"  no lease: {result['failure']}")
        if result["short"]:
            print(f"  {result['short']}")
    return EXIT_OK if result["state"] == "leased" and not result["short"] else EXIT_ERROR


def cmd_leases(args: argparse.Namespace) -> int:
    from node.store.node_store import ReceiptRow, Store
    from node.views import lease_summary

    path = _store_path(args)
    with Store(path) as store:
        leases = store.list_leases()
        receipts: dict[str, list[ReceiptRow]] = {}
        for rec in store.list_receipts():
            receipts.setdefault(rec.lease_id, []).append(rec)
        balance = store.ledger_balance()
    rows: list[dict[str, Any]] = [
        {
            **lease_summary(x),
            "side": x.side,
            "order_id": x.order_id,
            "provider": x.provider,
            "price_micro_credits_per_device_hour": x.price,
            "award_hash": x.award_hash,
            "receipts": [
                {
                    "receipt_hash": r.receipt_hash,
                    "device_ms": r.device_ms,
                    "amount_micro_credits": r.amount,
                    "countersigned": r.countersign is not None,
                }
                for r in receipts.get(x.lease_id, [])
            ],
        }
        for x in leases
    ]
    if args.json:
        print(json.dumps({"leases": rows, "balance_micro_credits": balance}, indent=2))
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"Leases ({path.parent})")
    for col in ("lease", "side", "counterparty", "units", "price (cr/dev-h)", "state", "paid"):
        table.add_column(col)
    for r in rows:
        other = r["provider"] if r["side"] == "tenant" else r["tenant"]
        paid = sum(x["amount_micro_credits"] for x in r["receipts"] if x["countersigned"])
        table.add_row(
            r["lease_id"],
            r["side"],
            other[:12],
            f"{r['units']}x {r['model']}",
            _credits(r["price_micro_credits_per_device_hour"]),
            r["state"],
            _credits(paid),
        )
    from rich.console import Console

    Console().print(table)
    print(f"ledger balance: {_credits(balance)} credits")
    return EXIT_OK


# --- jobs -----------------------------------------------------------------------


def _print_summary(summary: Any, as_json: bool, console: Console | None = None) -> None:
    data = summary.to_json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    # Rich wraps to the terminal (or $COLUMNS); markup off: parameters may hold brackets.
    from rich.console import Console

    out = console or Console()
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data["trials"].items())) or "no trials"
    out.print(f"job {data['job_id']} ({data['name']}): {data['state']}; {counts}", markup=False)
    if data["state"] not in (JobState.DONE, JobState.RUNNING) and data["detail"]:
        out.print(f"why: {data['detail']}", markup=False)
    best = data["best"]
    if best is not None:
        out.print(f"best: trial {best['number']} value {best['value']:.6g}", markup=False)
        out.print(f"      parameters {_params_text(best['params'])}", markup=False)
    out.print(f"spend: {_credits(data['spend_micro_credits'])} credits", markup=False)


def _max_wait(args: argparse.Namespace) -> float | None:
    """--max-wait seconds, or None (no limit) with --wait-forever."""
    return None if args.wait_forever else args.max_wait


def cmd_submit(args: argparse.Namespace) -> int:
    from node.tenant import jobs

    summary = jobs.submit(
        Path(args.job),
        peer=resolve_peer(args.peer),
        parallel=args.parallel,
        seed=args.seed,
        quiet=args.quiet or args.json,
        max_wait_s=_max_wait(args),
    )
    _print_summary(summary, args.json)
    return EXIT_OK if summary.job.state is JobState.DONE else EXIT_ERROR


def cmd_serve(args: argparse.Namespace) -> int:
    from node.tenant import serve

    state = serve.serve(
        Path(args.job),
        peer=resolve_peer(args.peer),
        host=args.host,
        port=args.port,
        as_json=args.json,
    )
    return EXIT_OK if state == "cancelled" else EXIT_ERROR


def cmd_token(args: argparse.Namespace) -> int:
    from node.net.node import wall_clock_ms
    from node.tenant import jobs
    from node.tenant.serve import issue_tokens

    home = jobs.tenant_home()
    with _open_tenant_store() as store:
        job = jobs.find(store, args.job)
    methods = tuple(m.strip().upper() for m in args.methods.split(",") if m.strip())
    try:
        tokens = issue_tokens(
            jobs.job_dir(home, job.job_id),
            home.load_or_create_identity(),
            ttl_ms=int(args.ttl * 1000),
            methods=methods,
            path=args.path,
            sub=args.sub,
            now_ms=wall_clock_ms(),
        )
    except ValueError as e:  # pydantic: a method or path the token format refuses
        raise MercatoError(f"cannot issue that token: {e}") from None
    if args.json:
        print(json.dumps(tokens, indent=2))
        return EXIT_OK
    for t in tokens:
        print(f"replica {t['replica']}: curl -H 'Authorization: Mercato {t['token']}' {t['url']}/")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    from node.tenant import jobs

    summary = jobs.resume(
        args.job,
        peer=resolve_peer(args.peer),
        parallel=args.parallel,
        quiet=args.quiet or args.json,
        max_wait_s=_max_wait(args),
    )
    _print_summary(summary, args.json)
    return EXIT_OK if summary.job.state is JobState.DONE else EXIT_ERROR


async def _plan(args: argparse.Namespace) -> Any:
    from market.placement import plan
    from node.net.transport import tenant_transport
    from node.store.node_store import Store
    from node.tenant import jobs
    from node.tenant.client import Tenant

    spec, _ = jobs.load_job_file(Path(args.job))
    home = jobs.tenant_home()
    peer = resolve_peer(args.peer)
    transport = tenant_transport(peer)
    try:
        with Store(home.store_path) as store:
            tenant = Tenant(home.load_or_create_identity(), store, transport)
            await tenant.refresh(peer)
            return spec, plan(
                spec, tenant.adverts(), reputation=tenant.reputation(), now_ms=tenant.clock()
            )
    finally:
        await transport.close()


def jobs_notes(spec: Any) -> list[str]:
    from node.tenant import jobs

    return jobs.notes(spec)


def cmd_plan(args: argparse.Namespace) -> int:
    spec, p = asyncio.run(_plan(args))
    c = p.classification
    estimate = _sweep_estimate(spec, p, args.parallel) if spec.kind == "sweep" else None
    cands = [
        {
            "provider": x.provider,
            "address": x.address,
            "model": x.model,
            "free": x.free,
            "interconnect": x.interconnect,
            "bandwidth": x.bandwidth,
            "gang_size": x.gang_size,
            "price_floor_micro_credits_per_device_hour": x.price,
            "success": round(x.success, 3),
            "fits": x.fits,
            "why_not": x.why_not,
            "expected_runtime_s": x.runtime_s,
            "expected_cost_micro_credits": x.cost,
        }
        for x in p.candidates
    ]
    data = {
        "kind": p.kind,
        "class": c.workload.value,
        "compute_s_per_step": c.compute_s,
        "sync_bytes": c.sync_bytes,
        "steps_per_sync": c.steps_per_sync,
        "wan_ratio": c.wan_ratio,
        "required_bandwidth": c.required_bandwidth,
        "explanation": c.explanation,
        "order": p.requirement.model_dump(),
        "candidates": cands,
        "placeable": p.placeable,
        "missing": p.missing,
        "notes": jobs_notes(spec),
    }
    if estimate is not None:
        data["estimate"] = estimate
    if p.split is not None:
        data["split"] = _split_data(p.split)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK if p.placeable else EXIT_ERROR
    print(f"{spec.name}: {p.kind} job, class {c.workload.value}")
    for note in data["notes"]:
        print(f"note: {note}")
    print(c.explanation)
    if c.sync_bytes:
        need = c.required_bandwidth
        print(
            f"  compute per step {c.compute_s:.3g} s; {c.sync_bytes / 1e9:.3g} GB per sync "
            f"every {c.steps_per_sync} step(s); WAN ratio {c.wan_ratio:.3g}; "
            f"required bandwidth {'-' if need is None else f'{need / 1e9:.3g} GB/s'}"
        )
    from rich.table import Table

    table = Table(title="Providers that could host it now")
    for col in ("provider", "devices", "fabric", "floor", "fits", "runtime", "cost (cr)"):
        table.add_column(col)
    for x in cands:
        rt = x["expected_runtime_s"]
        cost = x["expected_cost_micro_credits"]
        table.add_row(
            x["provider"][:12],
            f"{x['free']} free {x['model']}",
            f"{x['interconnect']} {x['bandwidth'] / 1e9:.3g} GB/s x{x['gang_size']}",
            _credits(x["price_floor_micro_credits_per_device_hour"]),
            "yes" if x["fits"] else f"no: {x['why_not']}",
            "-" if rt is None else f"{rt:.0f} s",
            "-" if cost is None else _credits(cost),
        )
    from rich.console import Console

    Console().print(table)
    if p.split is not None:
        print(f"split: {p.split.describe()}")
        print(f"  outer step traffic: {p.split.traffic.summary()}")
        for line in p.split.considered:
            print(f"  considered {line}")
    if estimate is not None:
        print(estimate["text"])
    if p.missing:
        print(f"cannot place it now: {p.missing}")
    return EXIT_OK if p.placeable else EXIT_ERROR


def _split_data(split: Any) -> dict[str, Any]:
    """A DiLoCo split as JSON: the workers and the traffic per outer step against DDP."""
    t = split.traffic
    return {
        "devices_per_worker": split.devices_per_worker,
        "workers": [
            {"provider": w.provider, "model": w.model, "devices": w.devices, "price": w.price}
            for w in split.workers
        ],
        "expected_runtime_s": split.runtime_s,
        "expected_cost_micro_credits": split.cost,
        "outer_step": {
            "inner_steps": t.inner_steps,
            "bytes_per_worker": t.bytes_per_worker,
            "tenant_bytes": t.tenant_bytes,
            "time_s_over_wan": t.time_s,
            "ddp_bytes_per_step": t.ddp_bytes_per_step,
            "ddp_bytes_per_outer_step": t.ddp_bytes_per_outer_step,
            "reduction": t.reduction,
        },
        "considered": list(split.considered),
    }


def _sweep_estimate(spec: Any, p: Any, parallel: int) -> dict[str, Any] | None:
    """Fill a sweep's runtime and cost per candidate; return the headline estimate.

    No trial has run yet, so the only trial time known is its limit: the estimate is
    trials x trial_timeout x the provider's floor, an upper bound that the budget check
    of `submit` uses too (market/sweepguard.py).
    """
    import dataclasses

    from market.sweepguard import sweep_estimate

    trials = spec.sweep_config.trial_cap
    timeout_ms = spec.limits.trial_timeout_ms
    per = spec.resources.devices_per_trial
    for i, x in enumerate(p.candidates):
        lanes = max(1, min(parallel, x.free // max(1, per)))
        runtime, cost = sweep_estimate(trials, lanes, timeout_ms, x.price, per)
        p.candidates[i] = dataclasses.replace(x, runtime_s=runtime, cost=cost)
    best = p.best
    if best is None:
        return None
    cap = spec.budget.spend_cap
    text = (
        f"estimate: {trials} trials x {timeout_ms / 1000:g} s (trial_timeout; the real "
        f"trial time is not known before the first trial) x {_credits(best.price)} "
        f"cr/device-hour x {per} device(s) = at most {_credits(best.cost)} credits, "
        f"{best.runtime_s:.0f} s at {min(parallel, max(1, best.free // per))} at once; "
        f"budget.max_spend {_credits(cap)} credits"
    )
    if best.cost > cap:
        text += " (the sweep stops when what it may spend reaches the budget)"
    return {
        "trials": trials,
        "trial_time_s": timeout_ms / 1000,
        "assumption": "every trial runs to limits.trial_timeout",
        "runtime_s": best.runtime_s,
        "cost_micro_credits": best.cost,
        "max_spend_micro_credits": cap,
        "text": text,
    }


def cmd_cancel(args: argparse.Namespace) -> int:
    from node.tenant import jobs

    job = jobs.cancel(args.job)
    if args.json:
        print(json.dumps({"job_id": job.job_id, "state": job.state}, indent=2))
    else:
        print(f"job {job.job_id}: {job.state}")
    return EXIT_OK


def _open_tenant_store() -> Any:
    from node.store.node_store import Store
    from node.tenant import jobs

    path = jobs.tenant_home().store_path
    return Store(path)


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.store.job_store import JobStore
    from node.tenant import jobs

    with _open_tenant_store() as store:
        rows = [jobs.summarize(store, j).to_json() for j in JobStore(store).list_jobs()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    from rich.table import Table

    table = Table(title="Jobs")
    for col in ("job", "name", "state", "trials", "best", "spend (cr)"):
        # Rich splits a word only when its column is narrower than the word: the state
        # column always holds "interrupted:" whole, however the others are sized.
        table.add_column(col, min_width=len("interrupted:") if col == "state" else None)
    for r in rows:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r["trials"].items()))
        best = r["best"]
        table.add_row(
            r["job_id"],
            r["name"],
            # A killed tenant left it "running": say so, and how to go on.
            f"interrupted: mercato resume {r['job_id']}"
            if r["state"] == "interrupted"
            else r["state"],
            counts,
            "-" if best is None else f"{best['value']:.6g}",
            _credits(r["spend_micro_credits"]),
        )
    from rich.console import Console

    Console().print(table)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from node.tenant import jobs
    from node.tenant.serve import serve_view

    with _open_tenant_store() as store:
        summary = jobs.summarize(store, jobs.find(store, args.job))
    served = serve_view(jobs.job_dir(jobs.tenant_home(), summary.job.job_id))
    if args.json:
        data = summary.to_json()
        data["trial_list"] = [jobs.trial_json(t) for t in summary.trials]
        if served is not None:
            data["serve"] = served
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from rich.console import Console

    console = Console()
    _print_summary(summary, False, console)
    if served is not None:
        console.print(serve_table(served))
    else:
        console.print(status_table(summary.trials))
    return EXIT_OK


def serve_table(served: dict[str, Any]) -> Table:
    """A served job's replicas: where, readiness, requests, error rate, latency."""
    from rich.table import Table

    table = Table(
        title=f"gateway {served.get('gateway') or '-'}: {served.get('ready', 0)}/"
        f"{served.get('replicas_wanted', 0)} ready, {served.get('requests', 0)} requests, "
        f"{served.get('retries', 0)} retried, {served.get('failed', 0)} failed"
    )
    for col in ("replica", "provider", "state", "requests", "errors", "p50 ms", "p99 ms"):
        table.add_column(col, no_wrap=True)
    for r in [*served.get("replaced", []), *served.get("replicas", [])]:
        table.add_row(
            f"{r['replica']}.{r['generation']}",
            str(r["provider"])[:8],
            r["state"] + (f" ({r['why']})" if r.get("why") else ""),
            str(r["requests"]),
            f"{r['errors']} ({100 * r['error_rate']:.1f}%)",
            "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}",
            "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}",
        )
    return table


def _params_text(params: dict[str, Any]) -> str:
    """``a=1 opt.lr=0.01``: dotted names, one space between, so a narrow cell wraps
    between parameters rather than inside JSON."""
    from node.tenant.jobs import _dotted

    return " ".join(f"{k}={v}" for k, v in sorted(_dotted(params).items()))


def status_table(trials: list[Any]) -> Table:
    """A job's trials, readable at 80 columns: the short columns never wrap, parameters
    and detail take what is left and wrap between words."""
    from rich import box
    from rich.table import Table

    from node.tenant.sweep import queued

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("try", justify="right", no_wrap=True)
    table.add_column("provider", no_wrap=True, max_width=8, overflow="ellipsis")
    table.add_column("params", ratio=3, overflow="fold", min_width=16)
    table.add_column("detail", ratio=1, overflow="fold")
    for t in trials:
        table.add_row(
            str(t.number),
            "queued" if queued(t) else t.state.value,
            "" if t.value is None else f"{t.value:.4g}",
            str(t.attempts),
            (t.provider or "")[:8],
            _params_text(t.params),
            "" if queued(t) else t.detail,
        )
    return table


def cmd_logs(args: argparse.Namespace) -> int:
    from node.tenant import jobs

    with _open_tenant_store() as store:
        job = jobs.find(store, args.job)
    path = jobs.job_dir(jobs.tenant_home(), job.job_id) / "logs" / f"{args.trial}.log"
    if not path.exists():
        raise MercatoError(f"no log for trial {args.trial} of {job.job_id} (yet)")
    sys.stdout.write(path.read_text(errors="replace"))
    return EXIT_OK


def cmd_evidence(args: argparse.Namespace) -> int:
    """The job's spot checks and disputes, with the signed results, as JSON."""
    from node.store.verify_store import evidence
    from node.tenant import jobs

    with _open_tenant_store() as store:
        job = jobs.find(store, args.job)
        doc = evidence(store, job.job_id)
    if not args.json:
        doc = {k: v for k, v in doc.items() if k != "all_checks"}
    print(json.dumps(doc, indent=2))
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from node.tenant import jobs

    with _open_tenant_store() as store:
        summary = jobs.summarize(store, jobs.find(store, args.job))
    if args.csv:
        sys.stdout.write(jobs.results_csv(summary.trials))
    elif args.json:
        print(json.dumps([jobs.trial_json(t) for t in summary.trials], indent=2))
    else:
        _print_summary(summary, False)
    return EXIT_OK
