"""What verification costs a real digits sweep: the same sweep with checks off and on.

One local cluster (``node.cli.localcluster.up``: a bootstrap node and ``--providers``
honest provider daemons, the real sandbox) runs examples/digits-sweep (24 SVM trials,
scikit-learn) several times, each through ``node.tenant.jobs.submit`` in this process
with ``--parallel`` units:

1. ``verify: off``, from a fresh tenant home;
2. verification on (the default), from another fresh tenant home: the tenant's *first*
   sweep, every provider new to it (a canary on each first lease, every result at the
   newcomer rate 1/4, the best re-run);
3. verification on, from a tenant home that knows all providers but one: their record
   is set to a streak of ``--streak`` checked-valid results and a passed canary (40:
   what the top three providers of bench/verify_bench.py reach after about 50 sweeps),
   the last provider is a newcomer. The steady state of an honest market, measured on
   real daemons without running 50 sweeps first.

The providers are ``--providers`` alike (one T4 each, same price), so ``--parallel 4``
leases four of them, one unit each, as the model does. Printed per run: micro-credits
paid (the job's spend: the receipts of its leases), wall time, checks opened, and from
the providers' logs every task of the job that ran (trials, checks, canaries) and its
seconds; then, for the first sweep and the trusted one, extra spend = paid(on) /
paid(off) - 1, extra wall time, extra runs and extra provider run time (the compute
bought). The off run goes first and again last (the lower of the two counts), so a
drift in load shows; the load average is printed with each run.

Lease billing is by time held, so spend follows wall time. On one shared machine the
providers share its cores: wall time tracks the CPU queue more than the work, and fewer
leases finish about as fast as more (on a market every provider is its own machine).
Runs and run time are the figures load moves least.

    python bench/verify_digits_bench.py [--providers 4] [--parallel 4] [--streak 40]
    python bench/verify_digits_bench.py --sweeps 3

``--sweeps K`` runs none of the above but a series: ONE fresh tenant home runs K digits
sweeps in a row, verification on, on the same providers, and each sweep's paid
micro-credits, task runs (trials + checks + canaries) and checks are printed, so the
overhead is seen to fall as the tenant's streaks with its providers build (the first
sweep pays canaries and the newcomer rate on every result; later ones the proven rate).

Needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits-sweep"


def workspace(where: Path, verify: bool) -> Path:
    """A copy of the digits example whose job file turns checks on or off."""
    shutil.copytree(EXAMPLE, where)
    job = where / "sweep.yaml"
    text = job.read_text()
    if not verify:
        text += "verify: off\n"
    job.write_text(text)
    return job


def provider_runs(nodes: list[Any], job_id: str) -> list[int]:
    """Milliseconds of every task of ``job_id`` the providers ran (trials, checks and
    canaries), from their logs: the compute the tenant bought, whatever the wall time."""
    pattern = re.compile(rf"task {re.escape(job_id[:40])}\.\S+ \w+ in (\d+) ms")
    out: list[int] = []
    for n in nodes:
        log = Path(n.home) / "logs" / "node.log"
        if n.role == "provider" and log.exists():
            out += [int(m[1]) for m in pattern.finditer(log.read_text())]
    return out


def run(job: Path, tenant: Path, peer: str, parallel: int, nodes: list[Any]) -> dict[str, Any]:
    """Submit ``job`` with the tenant home ``tenant``; what it paid and how long it took."""
    from node.tenant import jobs

    os.environ["MERCATO_HOME"] = str(tenant)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = jobs.submit(job, peer=peer, parallel=parallel, seed=0, quiet=True)
    wall = time.perf_counter() - t0
    store = jobs.tenant_home().store_path
    with sqlite3.connect(store) as db:
        checks = _count(db, "SELECT COUNT(*) FROM verify_checks WHERE job_id = ?", summary)
    best = summary.best
    ms = provider_runs(nodes, summary.job.job_id)
    return {
        "state": summary.state,
        "paid_micro": summary.spend,
        "wall_s": round(wall, 1),
        "succeeded": sum(1 for r in summary.trials if r.state == "succeeded"),
        "best": None if best is None else best.value,
        "best_verified": summary.best_verified,
        "checks": checks,
        "runs": len(ms),
        "run_s": round(sum(ms) / 1000, 1),
        "load_1min": round(load, 2),
    }


def know(tenant: Path, providers: list[str], streak: int) -> None:
    """A tenant home whose record of ``providers`` is ``streak`` checked-valid results."""
    from market.verification import Trust
    from node.store.node_store import Store
    from node.store.verify_store import VerifyStore

    store_path = tenant / "tenant" / "node.sqlite"
    store_path.parent.mkdir(parents=True)
    with Store(store_path) as store:
        vs = VerifyStore(store)
        for p in providers:
            vs.set_trust(p, Trust(streak=streak, verified=streak))
            vs.canary_passed(p, 1_000)


def series(job: Path, tenant: Path, peer: str, a: argparse.Namespace, nodes: list[Any]) -> None:
    """``a.sweeps`` sweeps in a row by one tenant home: what each paid and ran."""
    done = []
    for k in range(1, a.sweeps + 1):
        r = run(job, tenant, peer, a.parallel, nodes)
        extra = r["runs"] - r["succeeded"]
        done.append(r)
        print(json.dumps({"run": f"sweep {k}", "extra_runs": extra, **r}), flush=True)
    print(
        json.dumps(
            {
                "paid_micro": [r["paid_micro"] for r in done],
                "runs": [r["runs"] for r in done],
                "checks": [r["checks"] for r in done],
                "load_avg": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


def _count(db: sqlite3.Connection, sql: str, summary: Any) -> int | None:
    try:
        return int(db.execute(sql, (summary.job.job_id,)).fetchone()[0])
    except sqlite3.Error:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--streak", type=int, default=40, help="known providers' streak (run 3)")
    ap.add_argument("--sweeps", type=int, default=0, metavar="K",
                    help="only a series of K sweeps by one fresh tenant, checks on")  # fmt: skip
    a = ap.parse_args()
    from node.cli import localcluster as cluster

    root = Path(tempfile.mkdtemp(prefix="verify-digits-"))
    os.environ.pop("MERCATO_PEER", None)
    try:
        with warnings.catch_warnings():
            # cluster.up drops its Popen handles of the detached daemons on purpose.
            warnings.simplefilter("ignore", ResourceWarning)
            alike = (cluster.Template("T4", 1, 150_000, "pcie"),)
            nodes = cluster.up(a.providers, home=root / "cluster", timeout_s=180.0, templates=alike)
        peer = next(n.address for n in nodes if n.role == "bootstrap")
        if a.sweeps:
            series(workspace(root / "ws-on", verify=True), root / "tenant", peer, a, nodes)
            return
        off = workspace(root / "ws-off", verify=False)
        on = workspace(root / "ws-on", verify=True)
        runs: dict[str, dict[str, Any]] = {}
        runs["off"] = run(off, root / "tenant-off", peer, a.parallel, nodes)
        print(json.dumps({"run": "off", **runs["off"]}), flush=True)
        runs["on_first"] = run(on, root / "tenant-on", peer, a.parallel, nodes)
        print(json.dumps({"run": "on, first sweep", **runs["on_first"]}), flush=True)
        providers = [n.node_id for n in nodes if n.role == "provider"]
        know(root / "tenant-known", providers[:-1], a.streak)
        runs["on_trusted"] = run(on, root / "tenant-known", peer, a.parallel, nodes)
        print(json.dumps({"run": f"on, {len(providers) - 1} known", **runs["on_trusted"]}))
        runs["off2"] = run(off, root / "tenant-off2", peer, a.parallel, nodes)
        print(json.dumps({"run": "off again", **runs["off2"]}), flush=True)
    finally:
        cluster.down(home=root / "cluster")
        shutil.rmtree(root, ignore_errors=True)
    base = min((runs["off"], runs["off2"]), key=lambda r: r["paid_micro"])
    summary = {"off_paid_micro": base["paid_micro"], "off_wall_s": base["wall_s"]}
    for key in ("on_first", "on_trusted"):
        if key in runs:
            r = runs[key]
            summary[f"{key}_extra_spend_pct"] = round(
                100 * (r["paid_micro"] / max(1, base["paid_micro"]) - 1), 1
            )
            summary[f"{key}_extra_wall_pct"] = round(100 * (r["wall_s"] / base["wall_s"] - 1), 1)
            summary[f"{key}_extra_runs_pct"] = round(100 * (r["runs"] / base["runs"] - 1), 1)
            summary[f"{key}_extra_run_s_pct"] = round(100 * (r["run_s"] / base["run_s"] - 1), 1)
    summary["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
