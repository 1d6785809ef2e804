"""DiLoCo across providers on the local cluster against a DDP baseline (issue 17).

Runs examples/diloco (a character-level language model on text made locally, torch
CPU) as W = 3 workers on a real local cluster (real daemons, the real bwrap sandbox,
outer steps relayed through the daemons to the tenant), then again with one provider
SIGKILLed after the second outer step. The workers overlap: each goes on with the next
round's inner steps while the outer step travels (mercato_trial.diloco, overlap=True).

Baselines, in this process, with the same model, data, inner steps and schedule:

* DDP over 3 ranks: the mean of the 3 shards' gradients every step (what DDP computes),
  the same number of steps as each DiLoCo worker, at each peak learning rate of a small
  sweep (0.01, 0.03; 0.003 was worse in every trial run); the best final loss is the
  baseline (not a weak one), while the DiLoCo workers keep the example's 0.01;
* the same DiLoCo schedule simulated in one process (no relay, nothing in flight), in
  fp32 and int8, through the real blob encoding and the tenant's outer loop: what the
  market's run should match, and what int8 costs.

Reported: the held-out loss (nats per character) after every outer step (DiLoCo) and
every H steps (DDP), the gap, and the chain's own entropy (the floor no model beats);
bytes a worker sends per outer step against the bytes a DDP rank sends in the H ring
all-reduces it replaces (2 (N-1)/N P x 4 bytes each), and the factor, for fp32 and
int8; utilisation per worker: time inside inner steps / wall time from the worker's
first inner step until it holds the final global parameters (measured by the worker;
the join before the first step is start-up, not training, and is left out, as in
OpenDiLoCo's and INTELLECT-1's figures; the wait for the last outer step is counted).

Two configurations. The default is long enough that training, not start-up, is what
is measured: an 87,056-parameter model (embeddings of 32, two hidden layers of 256,
batch 512), H = 500, 16 outer steps (8,000 inner steps of 3.5 ms of one core: about
45 s of training per worker when 3 workers share 2 free cores, 150 s measured at load
average 5-17), the provider killed after outer step 8; the
in-process DiLoCo simulations are left out (their cost is that of 9 more workers).
``--short`` is the first one: the 3,408-parameter model, 12 outer steps, about 5 s of
training per worker, killed after outer step 2, with the simulations. Every worker and
every baseline runs torch on one thread (torch.set_num_threads(1)): 3 workers on a
2-core machine must not oversubscribe it.

Run: ``python bench/diloco_bench.py [--short] [--outer N] [--inner H]`` (976 s measured
at load average 5-17, most of it the DDP sweep; ``--cluster-only`` 333 s; ``--short``
about 2 minutes). Writes bench/results/diloco.json and docs/diloco-loss.svg
(``--short``: diloco-short.json and diloco-loss-short.svg).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.cli import localcluster as cluster  # noqa: E402
from node.cli.localcluster import Template  # noqa: E402

WORKERS = 3
#: The model and batch of each configuration (examples/diloco/train.py's options).
MODELS = {
    "long": {"embed": 32, "hidden": 256, "layers": 2, "batch": 512, "shard": 200_000},
    "short": {},
}
JOB = """
name: diloco-bench
kind: training
training:
  world_size: {world}
  model: {{parameters: 1e9, gradient_bytes: 2}}
  tokens_per_step: 8192
  sync: {{method: diloco, inner_steps: {inner}, round_timeout: 20s, compression: {compression}}}
  steps: {steps}
  command: [train.py{args}]
  metric: {{name: loss, goal: minimize}}
resources:
  accelerator: gpu
budget:
  max_price: 5 credits
limits:
  trial_timeout: 10m
"""
TEMPLATES = (
    Template("sim-gpu-small", 1, 100_000, "none"),
    Template("sim-gpu-small", 1, 110_000, "none"),
    Template("sim-gpu-small", 1, 120_000, "none"),
    Template("sim-gpu-small", 1, 300_000, "none"),
)


def wait_all_free(home: Path, env: dict[str, str], timeout_s: float = 90.0) -> None:
    """Until every provider advertises all its devices free (as the e2e test waits).

    Right after ``cluster up`` the adverts are still spreading, and after a job its
    leases are released and the adverts renewed only a moment later; a plan made before
    that finds no split that fits.
    """
    total = sum(t.count for t in TEMPLATES)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "market", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        free = json.loads(out.stdout) if out.returncode == 0 else []
        if sum(int(r["free_units"]) for r in free) >= total:
            return
        time.sleep(0.5)
    raise SystemExit(f"not every device advertised free after {timeout_s:.0f} s")


def run_job(
    home: Path,
    name: str,
    outer: int,
    inner: int,
    compression: str,
    kill_after: int | None,
    model: dict[str, int],
) -> dict[str, Any]:
    d = home / name
    d.mkdir()
    (d / "train.py").write_text((ROOT / "examples" / "diloco" / "train.py").read_text())
    args = "".join(f', "--{k}", "{v}"' for k, v in model.items())
    job = JOB.format(
        world=WORKERS, inner=inner, steps=outer * inner, compression=compression, args=args
    )
    (d / "job.yaml").write_text(job)
    env = {**os.environ, "MERCATO_HOME": str(home)}
    env.pop("MERCATO_PEER", None)
    wait_all_free(home, env)
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "submit", str(d / "job.yaml"), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    seen: list[float] = []  # when each line of err arrived (monotonic)

    def read() -> None:
        assert proc.stderr is not None
        for line in iter(proc.stderr.readline, ""):
            seen.append(time.monotonic())
            err.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    killed_at = 0.0
    while kill_after is not None and killed is None and proc.poll() is None:
        if any(f"outer step {kill_after}/" in x for x in err):
            started = [x for x in err if "started on" in x]
            prefix = started[0].split("started on ")[1].split()[0]
            for rec in cluster.load_state(cluster.cluster_root(home)):
                if rec.node_id.startswith(prefix) and rec.role == "provider":
                    os.kill(rec.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    killed = rec.name
        time.sleep(0.05)
    # Not communicate(): it reads stderr too, racing the reader thread for lines (the
    # bench lost some of the tenant's events that way).
    proc.wait(timeout=900)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    reader.join(5)
    wall = time.monotonic() - began
    summary = json.loads(stdout)
    if summary["state"] != "done":
        print(f"{name}: {summary}\n{''.join(err[-20:])}", file=sys.stderr)
    logs = home / "tenant" / "jobs" / summary["job_id"] / "logs" / "diloco"
    workers: dict[str, Any] = {}
    for path in sorted(logs.glob("w*.log")):
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
        curve = [r["loss"] for r in recs if "worker" in r]
        final = [r for r in recs if "utilisation" in r]
        workers[path.stem] = {
            "curve": curve,
            "utilisation": final[-1]["utilisation"] if final else None,
            "inner_s": final[-1]["inner_s"] if final else None,
            "sync_s": final[-1]["sync_s"] if final else None,
            "wall_s": final[-1]["wall_s"] if final else None,
        }
    steps = [x.strip().split("] ", 1)[-1] for x in err if "outer step" in x]
    # Each event after the kill with the seconds since the kill: how long the tenant took
    # to know (the first refused connection), to count the worker lost, to replace it.
    after_kill = [
        f"+{t - killed_at:.2f} s {x.strip().split('] ', 1)[-1]}"
        for t, x in zip(seen, err, strict=False)
        if killed is not None and t >= killed_at and "live worker" not in x and x.strip()
    ]
    first_step_after = next(
        (
            t - killed_at
            for t, x in zip(seen, err, strict=False)
            if killed and t >= killed_at and "outer step" in x
        ),
        None,
    )
    return {
        "state": summary["state"],
        "killed": killed,
        "wall_s": wall,
        "workers": workers,
        "outer_steps": steps,
        "events": [
            x.strip().split("] ", 1)[-1]
            for x in err
            if "lost" in x or "replacement" in x or "unreachable" in x
        ],
        "after_kill": after_kill,
        "first_outer_step_after_kill_s": first_step_after,
    }


def example(model: dict[str, int] | None = None) -> Any:
    """examples/diloco/train.py as a module: its data, model and schedule, configured as
    the job's command line configures it."""
    spec = importlib.util.spec_from_file_location("train", ROOT / "examples/diloco/train.py")
    assert spec is not None
    assert spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.configure([f"--{k}={v}" for k, v in (model or {}).items()])
    return train


def ddp_baseline(outer: int, inner: int, peak: float, model: dict[str, int]) -> list[float]:
    """DDP over 3 ranks, in one process: the mean of the shards' gradients every step.

    The 3 shards' batches go through the model as one (the mean over the concatenation
    is the mean of the 3 batch means: what DDP's all-reduce averages), one torch thread.
    """
    import torch

    train = example(model)
    torch.set_num_threads(1)
    shards = [train.shard(w) for w in range(WORKERS)]
    x_eval, y_eval = train.held_out()
    net = train.make_model()
    opt = torch.optim.AdamW(net.parameters(), lr=peak, weight_decay=0.01)
    gens = [torch.Generator().manual_seed(7 + w) for w in range(WORKERS)]
    total = outer * inner
    curve = []
    step = 0
    for _ in range(outer):
        for _ in range(inner):
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step, total, peak)
            opt.zero_grad()
            xs, ys = [], []
            for (x, y), gen in zip(shards, gens, strict=True):
                idx = torch.randint(0, len(x), (train.BATCH,), generator=gen)
                xs.append(x[idx])
                ys.append(y[idx])
            train.loss_of(net, torch.cat(xs), torch.cat(ys)).backward()
            opt.step()
            step += 1
        with torch.no_grad():
            curve.append(train.loss_of(net, x_eval, y_eval).item())
    return curve


def ddp_sweep(outer: int, inner: int, lrs: tuple[float, ...], model: dict[str, int]) -> Any:
    """The DDP baseline at each learning rate, two processes at a time (two cores)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        runs = {lr: pool.submit(ddp_baseline, outer, inner, lr, model) for lr in lrs}
        return {lr: f.result() for lr, f in runs.items()}


def simulate(
    outer: int, inner: int, compression: str, ahead: int = 0, model: dict[str, int] | None = None
) -> list[float]:
    """The same DiLoCo schedule in one process: W workers, the tenant's outer loop.

    Each worker is examples/diloco's inner loop (same shard, seed, AdamW and schedule);
    its pseudo-gradient goes through mercato_trial's blob encoding and market.diloco's
    decoding and OuterLoop (average, Nesterov) exactly as on the cluster. With
    ``ahead`` 0 every worker starts the next round from the answer: plain (synchronous)
    DiLoCo. With ``ahead`` k each worker first takes k inner steps of the next round
    while the outer step is "in flight", then rebases them onto the answer, as
    mercato_trial.diloco's overlap does at its worst (``max_ahead`` steps every round).
    """
    import torch

    from market.diloco import OuterLoop, decode_blob
    from mercato_trial.diloco import encode

    train = example(model)
    torch.set_num_threads(1)
    shards = [train.shard(w) for w in range(WORKERS)]
    x_eval, y_eval = train.held_out()
    models = [train.make_model() for _ in range(WORKERS)]
    opts = [torch.optim.AdamW(m.parameters(), lr=train.LR, weight_decay=0.01) for m in models]
    gens = [torch.Generator().manual_seed(7 + w) for w in range(WORKERS)]
    loop = OuterLoop(outer, round_timeout_ms=1)

    def flat(m: Any) -> Any:
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def load(m: Any, values: Any) -> None:
        v = torch.tensor(list(values), dtype=torch.float32)
        torch.nn.utils.vector_to_parameters(v, m.parameters())

    start = flat(models[0]).clone()
    loop.join(start.tolist())
    for m in models:
        load(m, start)
    total = outer * inner
    curve = []
    done = [0] * WORKERS  # inner steps each worker has taken

    def inner_steps(w: int, n: int) -> None:
        m, opt, (x, y), gen = models[w], opts[w], shards[w], gens[w]
        for _ in range(n):
            for group in opt.param_groups:
                group["lr"] = train.lr_at(done[w], total)
            idx = torch.randint(0, len(x), (train.BATCH,), generator=gen)
            opt.zero_grad()
            train.loss_of(m, x[idx], y[idx]).backward()
            opt.step()
            done[w] += 1

    for r in range(outer):
        for w in range(WORKERS):
            inner_steps(w, (r + 1) * inner - done[w])
            blob = decode_blob(encode(start - flat(models[w]), compression))
            loop.report(f"w{w}", blob.values, now_ms=0)
        loop.step()
        assert loop.optimizer is not None
        start = torch.tensor(list(loop.optimizer.params), dtype=torch.float32)
        for w, m in enumerate(models):
            handed = flat(m).clone()
            if r + 1 < outer:
                inner_steps(w, ahead)  # taken while the outer step travels
            load(m, start + (flat(m) - handed))
        with torch.no_grad():
            curve.append(train.loss_of(models[0], x_eval, y_eval).item())
    return curve


def svg(curves: dict[str, list[float]], path: Path, floor: float) -> None:
    """A small line plot of held-out loss per outer step, no plotting library needed.

    The y axis runs from the floor (the chain's entropy, dashed) to the highest loss.
    """
    w, h, pad = 560, 320, 40
    top = max(max(c) for c in curves.values())
    bottom = floor
    n = max(len(c) for c in curves.values())
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w // 2 - 40}" y="{h - 8}">outer step</text>',
        f'<text x="4" y="20">{top:.3g}</text><text x="4" y="{h - pad}">{bottom:.3g}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="grey" '
        'stroke-dasharray="4 3"/>',
    ]
    for i, (name, c) in enumerate(curves.items()):
        span = max(1e-9, top - bottom)
        pts = " ".join(
            f"{pad + (w - pad - 20) * (j + 1) / n:.1f},"
            f"{h - pad - (h - pad - 20) * (v - bottom) / span:.1f}"
            for j, v in enumerate(c)
        )
        col = colours[i % len(colours)]
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{w - 230}" y="{24 + 16 * i}" fill="{col}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="the 5-second configuration")
    ap.add_argument("--outer", type=int, default=None, help="16 (--short: 12)")
    ap.add_argument("--inner", type=int, default=500)
    ap.add_argument("--kill-after", type=int, default=None, help="outer step (8; --short: 2)")
    ap.add_argument("--no-cluster", action="store_true", help="only the in-process runs")
    ap.add_argument(
        "--cluster-only",
        action="store_true",
        help="only the cluster runs; the in-process figures are read from the last results",
    )
    args = ap.parse_args()
    config = "short" if args.short else "long"
    model = MODELS[config]
    if args.outer is None:
        args.outer = 12 if args.short else 16
    kill_after = args.kill_after or (2 if args.short else args.outer // 2)
    import torch

    train = example(model)
    params = sum(p.numel() for p in train.make_model().parameters())
    floor = train.floor(*train.held_out())
    blobs = {c: 20 + b * params for c, b in (("fp32", 4), ("int8", 1))}
    ddp_step = 2 * (WORKERS - 1) * params * 4 // WORKERS
    began = time.monotonic()
    load_before = os.getloadavg()
    suffix = "-short" if args.short else ""
    out = ROOT / "bench" / "results" / f"diloco{suffix}.json"
    sim: dict[str, list[float]] = {}
    if args.cluster_only:
        last = json.loads(out.read_text())
        if (last["outer_steps"], last["inner_steps"]) != (args.outer, args.inner):
            raise SystemExit("--cluster-only: the last results are of another schedule")
        sweep = {float(lr): c for lr, c in last["ddp_sweep"].items()}
        for c in ("fp32", "int8", "overlapped"):
            if last.get(f"diloco_simulated_{c}"):
                sim[c] = last[f"diloco_simulated_{c}"]
    else:
        sweep = ddp_sweep(args.outer, args.inner, (0.01, 0.03), model)
        if args.short:
            sim = {c: simulate(args.outer, args.inner, c) for c in ("fp32", "int8")}
            sim["overlapped"] = simulate(args.outer, args.inner, "fp32", ahead=args.inner // 4)
    best_lr = min(sweep, key=lambda lr: sweep[lr][-1])
    ddp = sweep[best_lr]
    full = killed = None
    if not args.no_cluster:
        home = Path(tempfile.mkdtemp(prefix="diloco-bench-"))
        cluster.up(4, home=home, templates=TEMPLATES)
        try:
            full = run_job(home, "full", args.outer, args.inner, "fp32", None, model)
            killed = run_job(home, "killed", args.outer, args.inner, "fp32", kill_after, model)
        finally:
            cluster.down(home=home)

    def market_curve(run: dict[str, Any]) -> list[float]:
        """The loss after each outer step: every worker evaluates the same global
        parameters, so any worker that ran from the first step to the last has it all."""
        return max((w["curve"] for w in run["workers"].values()), key=len)

    result = {
        "config": config,
        "model": model,
        "kill_after_outer_step": kill_after,
        "workers": WORKERS,
        "inner_steps": args.inner,
        "outer_steps": args.outer,
        "parameters": params,
        "floor": floor,
        "torch": torch.__version__,
        "ddp_sweep": {str(lr): c for lr, c in sweep.items()},
        "ddp_best_lr": best_lr,
        "ddp_curve": ddp,
        "diloco_simulated_fp32": sim.get("fp32"),
        "diloco_simulated_int8": sim.get("int8"),
        "diloco_simulated_overlapped": sim.get("overlapped"),
        "diloco": full,
        "diloco_one_provider_killed": killed,
        "bytes_per_worker_per_outer_step": blobs,
        "ddp_bytes_per_rank_per_step": ddp_step,
        "ddp_bytes_per_rank_per_outer_step": ddp_step * args.inner,
        "reduction": {c: ddp_step * args.inner / b for c, b in blobs.items()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "bench_wall_s": time.monotonic() - began,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    curves = {f"DDP, 3 ranks every step (lr {best_lr})": ddp}
    if full is not None and killed is not None:
        curves["DiLoCo, 3 providers, overlapped"] = market_curve(full)
        curves["DiLoCo, one provider killed"] = market_curve(killed)
    if "fp32" in sim:
        curves["DiLoCo simulated in one process"] = sim["fp32"]
    svg(curves, ROOT / "docs" / f"diloco-loss{suffix}.svg", floor)

    def gap(v: float) -> str:
        return f"{(v / ddp[-1] - 1) * 100:+.1f} %, excess over the floor {v - floor:.4f}"

    print(f"floor (the chain's own entropy)     {floor:.4f} nats/char")
    for lr, c in sweep.items():
        best = " (best)" if lr == best_lr else ""
        print(f"DDP lr {lr:<6} final held-out loss {c[-1]:.4f}{best}")
    print(f"  DDP excess over the floor        {ddp[-1] - floor:.4f}")
    for c, curve in sim.items():
        print(f"DiLoCo simulated, {c:<10}      {curve[-1]:.4f} ({gap(curve[-1])})")
    if full is not None and killed is not None:
        for label, r in (("3 providers", full), ("one killed ", killed)):
            v = market_curve(r)[-1]
            print(f"DiLoCo market, {label}        {v:.4f} ({gap(v)})")
    for c, b in blobs.items():
        print(
            f"{c}: bytes per worker per outer step {b}; DDP per rank per step {ddp_step}, "
            f"x{args.inner} steps = {ddp_step * args.inner}: {ddp_step * args.inner / b:.0f}x fewer"
        )
    for label, run in (("full", full), ("killed", killed)):
        if run is None:
            continue
        utils = {k: round(v["utilisation"] or 0, 3) for k, v in run["workers"].items()}
        print(f"utilisation per worker ({label}): {utils}; state {run['state']}")
        # Rounds are synchronous: a worker that computes faster than the slowest waits
        # for it whatever the relay does. inner / slowest inner is that bound; the
        # slowest worker's inner time over its wall time is what the relay leaves.
        whole = {k: v for k, v in run["workers"].items() if v["inner_s"] and len(v["curve"])}
        slowest = max(whole.values(), key=lambda v: v["inner_s"])
        bound = {k: round(v["inner_s"] / slowest["inner_s"], 3) for k, v in whole.items()}
        print(f"  bound set by the slowest worker's pace: {bound}")
        for e in run["after_kill"]:
            print(f"  {e}")
        if run["first_outer_step_after_kill_s"] is not None:
            print(f"  first outer step {run['first_outer_step_after_kill_s']:.2f} s after the kill")
        inner = {k: round(v["inner_s"], 1) for k, v in whole.items()}
        print(f"  seconds inside inner steps per worker: {inner}")
    print(f"load average before {load_before}, after {result['load_average_after']}")
    print(f"wall {result['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
