"""Sweep throughput: the same short trials through a local cluster and a plain process pool.

Both sides run the same N trials (default 200) of the same stdlib program, with the
same number of slots S (default 4) and the same command line (rendered from the job
file as the tenant renders it):

* cluster: ``node.cli.localcluster.up`` starts a bootstrap node and 4 provider daemons (homes in
  a temporary directory, torn down at the end even on error); ``node.tenant.jobs.submit`` runs
  the job in this process with ``--parallel S``, so the tenant leases S units by
  auction and every trial goes the whole way: assignment, sandbox (bubblewrap) on the
  provider, long-polled log and signed result, the store. The clock covers the whole
  submit: auction, workspace upload, trials and lease release with receipts.
* pool: a ``ThreadPoolExecutor`` of S threads, each running the trial's command as a
  subprocess in a copy of the workspace and reading its metric line. No sandbox, no
  network, no store: the floor a scheduler cannot beat. It runs before and after the
  cluster; the faster of the two counts.

Each trial *sleeps* 0.5 s and prints a metric. Sleeping, not busy-looping: on a 2-core
machine S busy trials would measure how the kernel shares 2 cores among S processes,
the same on both sides; sleeping trials leave the cores to what differs, the
scheduling and per-trial overhead of the market (messages, signatures, sandbox start,
store writes). Start-up of the interpreter is paid on both sides. For the same reason
S defaults to 4, not 8: a cluster trial costs about twice the CPU of a pool trial (the
sandbox's supervisor and bubblewrap, the daemons' messages, gossip), so 8 slots of
0.5 s trials ask more of 2 shared cores than they have and the run measures CPU
contention again (the CPU line shows it; try ``--slots 8``).

Figures: wall time, trials/s and per-trial overhead (slot-seconds per trial beyond the
0.5 s of work) for each side; CPU seconds of each side; for the cluster also the
provider-side wall time per trial (sandbox and interpreter start included, from the
providers' logs) and the trial span (first assignment to last result), with what
comes before it (job stored, auction) and after it (leases released, receipts).
Goal: efficiency >= 0.90.

The last line printed is ``efficiency=<pool_time / cluster_time>``, two decimals.

With ``--executor slurm`` the cluster side is a bootstrap node and one provider daemon
with ``executor = "slurm"`` fronting a one-node Slurm cluster started for the run
(deploy/slurm/local-cluster.sh, S fake GPUs; needs root and slurm-wlm): each lease is
a Slurm allocation and each trial a job step (``srun``) running the same sandbox. A
local provider whose model the job does not ask for stands by (a cluster needs one).

By default the job verifies as any job does (a canary per provider, spot checks that
run some trials twice: docs/benchmarks.md, "Verified results"), which the pool does
not; ``--no-verify`` (``verify: off``) compares the schedulers alone.

Run: ``python bench/sweep_bench.py [--trials 200] [--slots 4] [--sleep 0.5]
[--executor sandbox|slurm] [--no-verify]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRIAL = '''\
"""A bench trial: sleep, then report a metric."""
import argparse, json, time
p = argparse.ArgumentParser()
p.add_argument("--a", type=int, required=True)
p.add_argument("--b", type=int, required=True)
p.add_argument("--sleep", type=float, required=True)
x = p.parse_args()
time.sleep(x.sleep)
print(json.dumps({"value": ((x.a * 10 + x.b) * 7919) % 1000 / 1000}), flush=True)
'''

PROVIDERS = 4


def job_yaml(trials: int, sleep: float, accelerator: str = "any", verify: bool = True) -> str:
    # A grid of two small value lists, as sweeps have (a 200-value list would mostly
    # measure Optuna comparing 200-choice distributions at every ask).
    if trials % 10:
        raise SystemExit("--trials must be a multiple of 10")
    a = ", ".join(str(i) for i in range(trials // 10))
    return f"""\
name: sweep-bench
sweep:
  program: trial.py
  method: grid
  metric: {{name: value, goal: minimize}}
  parameters:
    a: {{values: [{a}]}}
    b: {{values: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}
    sleep: {{value: {sleep}}}
resources: {{accelerator: {accelerator}}}
budget: {{max_price: 5 credits, max_spend: 100 credits}}
limits: {{trial_timeout: 1m, max_output: 64KB, retries: 2}}
""" + ("" if verify else "verify: off\n")


def write_workspace(
    where: Path, trials: int, sleep: float, accelerator: str = "any", verify: bool = True
) -> Path:
    where.mkdir(parents=True)
    (where / "trial.py").write_text(TRIAL)
    (where / "sweep.yaml").write_text(job_yaml(trials, sleep, accelerator, verify))
    return where / "sweep.yaml"


# --- the pool -------------------------------------------------------------------


@dataclass
class Pool:
    wall: float
    each: list[float]  # seconds per trial, process start to exit
    values: dict[int, float]  # trial number -> metric
    cpu: float  # seconds, of every trial process


def run_pool(job: Path, slots: int, scratch: Path) -> Pool:
    """Every trial's command in a thread pool of ``slots`` threads."""
    from market.jobspec import parse_job, render_command
    from market.search import Search

    spec = parse_job(job.read_text(), str(job))
    search = Search(spec, seed=0)
    trials = []
    while (t := search.ask()) is not None:
        trials.append(t)
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }

    def one(number: int, params: dict[str, Any]) -> tuple[int, float, float]:
        # A copy of the workspace per trial, as the sandbox gives each trial its own.
        work = scratch / f"pool-{number}"
        shutil.copytree(job.parent, work)
        argv = render_command(spec, params, interpreter="python3")
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, check=True)
        took = time.perf_counter() - t0
        shutil.rmtree(work)
        return number, took, json.loads(proc.stdout.splitlines()[-1])["value"]

    t0, cpu0 = time.perf_counter(), _children_cpu()
    with ThreadPoolExecutor(slots) as pool:
        results = list(pool.map(lambda t: one(t.number, t.params), trials))
    wall = time.perf_counter() - t0
    return Pool(
        wall, [r[1] for r in results], {r[0]: r[2] for r in results}, _children_cpu() - cpu0
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds of a live process and of the children it reaped (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# --- the cluster ----------------------------------------------------------------


SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "local-cluster.sh"
SLURM_MODEL = "sim-gpu-large"  # what the Slurm provider sells; the stand-by sells another


def _slurm_provider(home: Path, boot: str, state: Path) -> Any:
    """Config and start of a provider daemon with executor = "slurm" (a NodeRecord)."""
    from node.cli import localcluster as cluster

    root = cluster.cluster_root(home) / "provider-slurm"
    root.mkdir(parents=True)
    config = root / "provider.toml"
    config.write_text(
        f"""detect_gpus = false
executor = "slurm"
[node]
role = "provider"
listen_host = "127.0.0.1"
listen_port = 0
home = {json.dumps(str(root))}
bootstrap = [{json.dumps(boot)}]
[gossip]
interval_s = 0.5
request_timeout_s = 2.0
[advert]
ttl_s = 6.0
refresh_fraction = 0.3
[http]
max_connections_per_peer = 512
[slurm]
slurm_conf = {json.dumps(str(state / "slurm.conf"))}
partition = "mercato"
device_root = {json.dumps(str(state / "dev"))}
gpus = [{{ type = "sim", model = "{SLURM_MODEL}", price_floor = 100000, simulated = true }}]
"""
    )
    rec = cluster.NodeRecord(
        name="provider-slurm", role="provider", home=str(root), config=str(config)
    )
    proc = cluster._start(rec)
    cluster._wait_ready(rec, proc, time.monotonic() + 120)
    rec.pid = proc.pid
    return rec, proc


_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO mercato\.work: task (\S+) "
    r"(?:started under lease \S+ on (\S+)|\w+ in \d+ ms)",
    re.M,
)


def slot_timeline(nodes: list[Any], job_id: str, t0_ms: float, end_ms: float) -> dict[str, Any]:
    """From the providers' logs: each device's idle gap between the end of one task and
    the start of the next, each task's time from its start to its result (the runner's
    wall time, ``provider_ms``, plus the provider's work around it), and the sweep's
    fixed cost before the first task starts on a provider and after the last ends (ms).
    A task's start is when the provider hands it to its executor; its end when its
    signed result is ready."""
    gaps: list[float] = []
    held: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    for n in nodes:
        log = Path(n.home) / "logs" / "node.log"
        if n.role != "provider" or not log.exists():
            continue
        begun: dict[str, tuple[str, float]] = {}  # task -> (devices, start ms)
        last_end: dict[str, float] = {}  # devices -> end of their last task
        for m in _LOG_LINE.finditer(log.read_text()):
            if not m[3].startswith(job_id):
                continue
            at = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) * 1000 + int(m[2])
            if m[4] is not None:
                begun[m[3]] = (m[4], at)
                if m[4] in last_end:
                    gaps.append(at - last_end[m[4]])
                starts.append(at)
            elif m[3] in begun:
                last_end[begun[m[3]][0]] = at
                ends.append(at)
                held.append(at - begun[m[3]][1])
    if not starts or not ends:
        return {"gaps_ms": [], "held_ms": [], "first_start_ms": 0.0, "after_last_ms": 0.0}
    return {
        "gaps_ms": gaps,
        "held_ms": held,
        "first_start_ms": min(starts) - t0_ms,
        "after_last_ms": end_ms - max(ends),
    }


def run_cluster(job: Path, slots: int, home: Path, executor: str = "sandbox") -> dict[str, Any]:
    """Submit the job to a fresh cluster under ``home`` (4 sandbox providers, or one
    provider fronting Slurm); figures out."""
    from node.cli import localcluster as cluster
    from node.store.job_store import JobStore
    from node.store.node_store import Store
    from node.tenant import jobs

    os.environ["MERCATO_HOME"] = str(home)
    os.environ.pop("MERCATO_PEER", None)
    t0 = time.monotonic()
    slurm_state = home / "slurm"
    slurm_proc = None
    with warnings.catch_warnings():
        # cluster.up drops its Popen handles of the detached daemons on purpose.
        warnings.simplefilter("ignore", ResourceWarning)
        if executor == "slurm":
            subprocess.run(
                [str(SLURM_SCRIPT), "start", str(slurm_state)],
                env={**os.environ, "GPUS": str(slots)},
                check=True,
                capture_output=True,
                timeout=120,
            )
            standby = cluster.Template("sim-gpu-small", 1, 100_000, "none")
            nodes = cluster.up(1, home=home, timeout_s=180.0, templates=(standby,))
            boot = next(n.address for n in nodes if n.role == "bootstrap")
            rec, slurm_proc = _slurm_provider(home, boot, slurm_state)
            nodes.append(rec)
            time.sleep(3)  # its first advert reaches the bootstrap's directory
        else:
            nodes = cluster.up(PROVIDERS, home=home, timeout_s=180.0)
    print(f"cluster up ({executor}) in {time.monotonic() - t0:.1f} s", flush=True)
    try:
        peer = next(n.address for n in nodes if n.role == "bootstrap")
        daemons0 = sum(_process_cpu(n.pid) for n in nodes)
        t0, t0_ms, tenant0 = time.perf_counter(), time.time() * 1000, time.process_time()
        summary = jobs.submit(job, peer=peer, parallel=slots, seed=0, quiet=True)
        wall, end_ms = time.perf_counter() - t0, time.time() * 1000
        tenant_cpu = time.process_time() - tenant0
        daemons_cpu = sum(_process_cpu(n.pid) for n in nodes) - daemons0
        with Store(jobs.tenant_home().store_path) as store:
            rows = JobStore(store).trials(summary.job.job_id)
            leases = [x for x in store.list_leases() if x.job_id == summary.job.job_id]
        provider_ms = []
        every = re.compile(rf"task {re.escape(summary.job.job_id)}\.\S+ (?:\(lease \S+\) )?\w+ in ")
        runs = 0
        pattern = re.compile(
            rf"task {re.escape(summary.job.job_id)}\.\d+\.\d+ (?:\(lease \S+\) )?\w+ in (\d+) ms"
        )
        for n in nodes:
            log = Path(n.home) / "logs" / "node.log"
            if n.role == "provider" and log.exists():
                text = log.read_text()
                provider_ms += [int(m[1]) for m in pattern.finditer(text)]
                runs += len(every.findall(text))
        timeline = slot_timeline(nodes, summary.job.job_id, t0_ms, end_ms)
        started = [r.started_ms for r in rows if r.started_ms is not None]
        finished = [r.finished_ms for r in rows if r.finished_ms is not None]
        return {
            "wall": wall,
            "state": summary.job.state,
            "succeeded": sum(1 for r in rows if r.state == "succeeded"),
            "trials": len(rows),
            "values": {r.number: r.value for r in rows},
            "span": (max(finished) - min(started)) / 1000 if rows else 0.0,
            "before": (min(started) - t0_ms) / 1000 if rows else 0.0,
            "after": (end_ms - max(finished)) / 1000 if rows else 0.0,
            "provider_ms": provider_ms,
            "runs": runs,
            "leases": [(x.provider[:8], x.units, x.model) for x in leases],
            "cpu": (tenant_cpu, daemons_cpu),
            **timeline,
        }
    finally:
        if slurm_proc is not None:
            slurm_proc.terminate()
            slurm_proc.wait(timeout=60)
        cluster.down(home=home)
        if executor == "slurm":
            subprocess.run(
                [str(SLURM_SCRIPT), "stop", str(slurm_state)], capture_output=True, timeout=120
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--executor", choices=("sandbox", "slurm"), default="sandbox")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="the job without spot checks and canaries (the pool verifies nothing either)",
    )
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        accelerator = SLURM_MODEL if args.executor == "slurm" else "any"
        job = write_workspace(tmp / "job", args.trials, args.sleep, accelerator, not args.no_verify)
        n, s, work = args.trials, args.slots, args.sleep
        ideal = n * work / s
        print(f"{n} trials of {work} s on {s} slots: ideal {ideal:.2f} s", flush=True)

        # The pool runs before and after the cluster and its faster run counts: on a
        # shared machine the load changes from minute to minute, and the faster run
        # is the floor the cluster is held to.
        (tmp / "pool").mkdir()
        pools = [run_pool(job, s, tmp / "pool")]
        c = run_cluster(job, s, tmp / "home", args.executor)
        pools.append(run_pool(job, s, tmp / "pool"))
        print("pool runs: " + ", ".join(f"{p.wall:.2f} s" for p in pools))
        pool = min(pools, key=lambda p: p.wall)
        pool_wall, pool_each, pool_values = pool.wall, pool.each, pool.values

        if c["succeeded"] != n or c["values"] != pool_values:
            print(f"cluster ran {c['succeeded']}/{n} trials ({c['state']}); results differ")
        leased = ", ".join(f"{u}x {m} on {p}" for p, u, m in c["leases"])
        print(f"leases: {leased}")
        print(f"{'':<10}{'wall s':>9}{'trials/s':>10}{'overhead/trial ms':>19}")
        for name, wall in (("pool", pool_wall), ("cluster", c["wall"])):
            overhead = (wall * s / n - work) * 1000
            print(f"{name:<10}{wall:>9.2f}{n / wall:>10.1f}{overhead:>19.0f}")
        tenant_cpu, daemons_cpu = c["cpu"]
        print(
            f"CPU s: pool {pool.cpu:.1f} ({pool.cpu / n * 1000:.0f} ms/trial); cluster "
            f"{tenant_cpu + daemons_cpu:.1f} ({(tenant_cpu + daemons_cpu) / n * 1000:.0f} "
            f"ms/trial) = tenant {tenant_cpu:.1f} + daemons and their trials {daemons_cpu:.1f}"
        )
        print(f"tasks run on providers (spot checks and canaries included): {c['runs']}")
        if c["provider_ms"]:
            print(
                f"per trial, process start to exit: pool mean "
                f"{statistics.mean(pool_each) * 1000:.0f} ms; cluster (provider-side, "
                f"sandbox included) mean {statistics.mean(c['provider_ms']):.0f} ms, "
                f"p95 {sorted(c['provider_ms'])[int(0.95 * (len(c['provider_ms']) - 1))]} ms"
            )
        if c["gaps_ms"]:
            g = sorted(c["gaps_ms"])
            print(
                f"per device, end of a task to the start of the next (provider log): median "
                f"{statistics.median(g):.0f} ms, p90 {g[int(0.9 * (len(g) - 1))]:.0f} ms; "
                f"start to signed result median {statistics.median(c['held_ms']):.0f} ms "
                f"(runner's wall {statistics.median(c['provider_ms']):.0f} ms); "
                f"submit to the first task's start {c['first_start_ms']:.0f} ms, last "
                f"task's end to the end of submit {c['after_last_ms']:.0f} ms"
            )
        print(
            f"cluster trial span (first assignment to last result): {c['span']:.2f} s; "
            f"before it (job stored, auction): {c['before']:.2f} s; "
            f"after it (leases released, receipts): {c['after']:.2f} s"
        )
        print(
            f"against the ideal ({n} x {work} s / {s} slots = {ideal:.2f} s): "
            f"pool {ideal / pool_wall:.2f}, cluster {ideal / c['wall']:.2f}"
        )
        print(f"efficiency={pool_wall / c['wall']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
