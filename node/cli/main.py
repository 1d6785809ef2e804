"""``mercato``: the one console script, with subcommands for each kind of user.

Provider operators: ``mercato provider run|status|prices --config provider.toml``.
Tenants: ``mercato market``.
Developers: ``mercato cluster up|status|down``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from node.cli.common import EXIT_ERROR, add_job, add_json, add_peer, add_store_home
from protocol.errors import MercatoError


@dataclass(frozen=True)
class _Command:
    """The command ``node.cli.<module>.<name>``, imported when it runs.

    `mercato provider run` is a daemon that runs for months: it never loads the
    tenant's or the cluster's commands (tests/node/test_idle_imports.py).
    """

    module: Literal["provider", "tenant", "cluster"]
    name: str

    def __call__(self, args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f"node.cli.{self.module}"), self.name
        )
        return command(args)


def _model_floor(text: str) -> tuple[str, int]:
    """'H100-SXM=2.5' -> ('H100-SXM', 2_500_000); catalog aliases become canonical names."""
    from market.catalog import UnknownDeviceModel, lookup

    model, sep, credits = text.partition("=")
    if not sep or not model.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write MODEL=CREDITS, e.g. H100-SXM=2.5")
    try:
        model = lookup(model.strip()).name
    except UnknownDeviceModel:
        model = model.strip()  # the daemon answers with the models it sells
    return model, _parse_credits(credits.strip())


def _parse_credits(text: str) -> int:
    """'2.5' credits -> 2_500_000 micro-credits, exactly (no float on the way)."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of credits") from None
    micro = value * 1_000_000
    if micro != micro.to_integral_value() or micro < 0:
        raise argparse.ArgumentTypeError("credits need at most 6 decimals and must be >= 0")
    return int(micro)


# --- parser ---------------------------------------------------------------------


#: node.tenant.sweep.DEFAULT_MAX_WAIT_S (not imported: the parser must not load the sweep stack).
DEFAULT_MAX_WAIT_S = 120.0


def _wait_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--max-wait",
        type=float,
        default=DEFAULT_MAX_WAIT_S,
        metavar="SECONDS",
        help="give up (exit 1, with the providers' reasons) after this long without any "
        f"lease (default {DEFAULT_MAX_WAIT_S:g})",
    )
    sp.add_argument(
        "--wait-forever", action="store_true", help="keep waiting for a lease, however long"
    )


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
    run.set_defaults(func=_Command("provider", "cmd_provider_run"))
    pst = prov_sub.add_parser(
        "status",
        help="devices, leases, tasks and earnings of this provider",
        description="Ask the running daemon (its /status.json over loopback); when it is "
        "down, show what its store knows (leases, receipts, earnings, saved floors).",
    )
    prc = prov_sub.add_parser(
        "prices",
        help="show or set the price floors of the running daemon",
        description="Without --set, show each device model's floor. --set MODEL=CREDITS "
        "(credits per device-hour) changes it on the running daemon at once: the request "
        "is signed with the node's own key from its home, the provider re-advertises, and "
        "the floor is kept across restarts until the config's floor for that model changes.",
    )
    for sp in (pst, prc):
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--config", help="the daemon's provider.toml (finds its home)")
        where.add_argument("--home", help="the daemon's home (default: $MERCATO_HOME)")
        add_json(sp)
    pst.set_defaults(func=_Command("provider", "cmd_provider_status"))
    prc.add_argument(
        "--set",
        action="append",
        type=_model_floor,
        metavar="MODEL=CREDITS",
        help="new floor for a device model, e.g. RTX-4090=0.4 (repeatable)",
    )
    prc.add_argument(
        "--reset", action="store_true", help="drop every earlier --set: back to the config"
    )
    prc.set_defaults(func=_Command("provider", "cmd_provider_prices"))

    market = sub.add_parser(
        "market",
        help="show the providers and prices the network advertises",
        description="Fetch the advert directory from a peer, verify every signature, show it.",
    )
    add_peer(market)
    add_json(market)
    market.set_defaults(func=_Command("tenant", "cmd_market"))

    submit = sub.add_parser(
        "submit",
        help="run a job file (a W&B-format sweep) on the market",
        description="Validate the job file (nothing is spent on a bad file), pack its "
        "directory as the workspace, lease providers by reverse auction and run every "
        "trial, retrying trials of providers that fail. Ctrl-C cancels; "
        "`mercato resume JOB` continues after a crash.",
    )
    submit.add_argument("job", help="path to the job YAML (its directory is the workspace)")
    submit.add_argument("--parallel", type=int, default=8, help="trials at once (default 8)")
    submit.add_argument("--seed", type=int, help="search seed (default: random, stored)")
    add_peer(submit)
    submit.add_argument("--quiet", action="store_true", help="no live progress view")
    add_json(submit, "print the summary as JSON")
    _wait_options(submit)
    submit.set_defaults(func=_Command("tenant", "cmd_submit"))

    serve_p = sub.add_parser(
        "serve",
        help="serve a kind: service job: replicas on providers behind one local gateway",
        description="Lease service.replicas providers (distinct by default), start the "
        "service on each, wait until its health path answers through the provider, and "
        "serve them all at one local address, retrying idempotent requests on another "
        "replica and replacing a replica whose provider dies. Runs until "
        "`mercato cancel JOB` or Ctrl-C, then releases every lease.",
    )
    serve_p.add_argument("job", help="path to the job YAML (its directory is the workspace)")
    serve_p.add_argument("--host", default="127.0.0.1", help="gateway address (default loopback)")
    serve_p.add_argument("--port", type=int, default=0, help="gateway port (default: any free)")
    add_peer(serve_p)
    add_json(serve_p, "print the gateway as a JSON line")
    serve_p.set_defaults(func=_Command("tenant", "cmd_serve"))

    token_p = sub.add_parser(
        "token",
        help="authorise someone to call a served job's replicas directly",
        description="Print, for each live replica of a served job, its provider URL and a "
        "capability token signed by this tenant: whoever holds it may call that replica "
        "until it expires, for the given methods under the given path.",
    )
    token_p.add_argument("job", help="job id (or a unique prefix) of a `mercato serve` job")
    token_p.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token_p.add_argument("--methods", default="GET,POST", help="comma-separated (GET,POST)")
    token_p.add_argument("--path", default="/", help="allowed path prefix (default /)")
    token_p.add_argument("--sub", default="", help="a label for the holder (logs only)")
    add_json(token_p)
    token_p.set_defaults(func=_Command("tenant", "cmd_token"))

    plan_p = sub.add_parser(
        "plan",
        help="classify a job and show where it could run now (spends nothing)",
        description="A dry run: the workload class with its figures (compute per step, "
        "bytes per sync, required bandwidth), the providers that could host the job now "
        "with expected runtime and cost, or what is missing. Exit 1 if it cannot be placed.",
    )
    plan_p.add_argument("job", help="path to the job YAML")
    add_peer(plan_p)
    add_json(plan_p)
    plan_p.add_argument(
        "--parallel", type=int, default=8, help="trials at once, for the estimate (default 8)"
    )
    plan_p.set_defaults(func=_Command("tenant", "cmd_plan"))

    resume = sub.add_parser("resume", help="continue a job after the tenant stopped")
    add_job(resume)
    resume.add_argument("--parallel", type=int, default=8)
    add_peer(resume)
    resume.add_argument("--quiet", action="store_true")
    add_json(resume)
    _wait_options(resume)
    resume.set_defaults(func=_Command("tenant", "cmd_resume"))

    cancel = sub.add_parser(
        "cancel",
        help="stop a running job (its leases are released)",
        description="Mark the job cancelled in the tenant's store. The process running it "
        "(`submit` or `resume`) notices within a second, cancels its trials on the "
        "providers, releases every lease (paying the time used) and exits.",
    )
    add_job(cancel)
    add_json(cancel)
    cancel.set_defaults(func=_Command("tenant", "cmd_cancel"))

    jobs_p = sub.add_parser(
        "jobs",
        help="list this tenant's jobs",
        description="Every job in the tenant's store ($MERCATO_HOME/tenant): its state, "
        "trial counts by state, best value and spend so far.",
    )
    add_json(jobs_p)
    jobs_p.set_defaults(func=_Command("tenant", "cmd_jobs"))

    status = sub.add_parser(
        "status",
        help="a job's trials and best result so far",
        description="One job: state, trial counts (queued trials apart from running "
        "ones), best trial, spend, and a table of its trials with their parameters, "
        "value, provider and detail.",
    )
    add_job(status)
    add_json(status)
    status.set_defaults(func=_Command("tenant", "cmd_status"))

    logs = sub.add_parser(
        "logs",
        help="the output of one trial",
        description="What one trial printed (stdout and stderr, as the provider streamed "
        "it), from the tenant's copy under $MERCATO_HOME/tenant/jobs/JOB/logs.",
    )
    add_job(logs)
    logs.add_argument("trial", type=int, help="trial number")
    logs.set_defaults(func=_Command("tenant", "cmd_logs"))

    results = sub.add_parser(
        "results",
        help="every trial's parameters and metric",
        description="Every trial of a job with its parameters, state and metric value: a "
        "summary, --json (a list of trials), or --csv (one column per parameter; nested "
        "parameters as dotted columns such as opt.lr).",
    )
    add_job(results)
    fmt = results.add_mutually_exclusive_group()
    add_json(fmt)
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per trial")
    results.set_defaults(func=_Command("tenant", "cmd_results"))

    evid = sub.add_parser(
        "evidence",
        help="a job's spot checks and disputes, with the providers' signed results",
        description="JSON: every dispute of the job (the original, the check and the "
        "deciding provider's signed task_result envelopes, base64), the parameters, seed, "
        "command and workspace hash to re-run it, the providers dropped and the payments "
        "refused. --json adds every check, agreed ones too.",
    )
    add_job(evid)
    add_json(evid, "include every check")
    evid.set_defaults(func=_Command("tenant", "cmd_evidence"))

    order = sub.add_parser(
        "order",
        help="run a reverse auction for devices and lease the winners",
        description="Send an order to the best-matching providers, award the bids with the "
        "lowest expected cost to complete, and (unless --keep) release the leases after "
        "--hold seconds, countersigning each provider's receipt.",
    )
    order.add_argument("--units", type=int, default=1, help="units wanted (default 1)")
    order.add_argument(
        "--min-units",
        type=int,
        help="fewest units that count as success (default: --units); with fewer leased, exit 1",
    )
    order.add_argument("--kind", choices=["gpu", "ipu", "cpu", "any"], default="any")
    order.add_argument("--model", help="a catalog model, e.g. H100-SXM")
    order.add_argument("--devices-per-unit", type=int, default=1)
    order.add_argument("--gang", action="store_true", help="all units on one provider")
    order.add_argument(
        "--max-price",
        type=_parse_credits,
        default=10_000_000,
        help="credits per device-hour (default 10)",
    )
    order.add_argument("-k", type=int, default=8, help="providers to ask (default 8)")
    order.add_argument("--hold", type=float, default=0.0, help="seconds to hold the leases")
    order.add_argument("--keep", action="store_true", help="do not release the leases")
    add_peer(order)
    add_json(order)
    order.set_defaults(func=_Command("tenant", "cmd_order"))

    leases = sub.add_parser(
        "leases",
        help="list leases and receipts from a node's or the tenant's store",
        description="Leases held on either side with their receipts and the ledger balance.",
    )
    add_store_home(leases)
    add_json(leases)
    leases.set_defaults(func=_Command("tenant", "cmd_leases"))

    from node.cli.ledger import add_ledger_parser

    add_ledger_parser(sub)

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
    cup.set_defaults(func=_Command("cluster", "cmd_cluster_up"))
    cst = cl_sub.add_parser("status", help="list each node with pid, address, devices, health")
    add_json(cst)
    cst.set_defaults(func=_Command("cluster", "cmd_cluster_status"))
    cdn = cl_sub.add_parser("down", help="stop every node of the local cluster")
    cdn.set_defaults(func=_Command("cluster", "cmd_cluster_down"))
    return p


def error_json(e: MercatoError) -> dict[str, Any]:
    """The one shape of an error under --json: ``{"error": {"code", "reason"}}``, printed
    on stdout (where a --json caller reads), plus ``problems`` for a bad job file."""
    err: dict[str, Any] = {"code": e.code, "reason": e.reason}
    problems = getattr(e, "problems", None)
    if problems:
        err["problems"] = [{"path": p.path, "message": p.message} for p in problems]
    return {"error": err}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            code: int = args.func(args)
        except MercatoError as e:
            if getattr(args, "json", False):
                print(json.dumps(error_json(e), indent=2))
            else:
                print(f"mercato: {e.reason}", file=sys.stderr)
            code = EXIT_ERROR
        except KeyboardInterrupt:
            code = 130
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`mercato status JOB --json | head -1`): not an error of
        # ours. Python's documented recipe (library/signal.html, "Note on SIGPIPE"):
        # point stdout at devnull so the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
