"""DiLoCo across providers on the local cluster against a DDP baseline (issue 17).

Runs examples/diloco (a small MLP, torch CPU) as W = 3 workers on a real local cluster
(real daemons, the real bwrap sandbox, outer steps relayed through the daemons to the
tenant), then again with one provider SIGKILLed after the second outer step. The DDP
baseline trains the same model on the same 3 data shards for the same number of steps,
averaging the 3 shards' gradients every step (what DDP over 3 ranks computes), in one
process. Reported:

* the held-out loss after every outer step (DiLoCo) and every H steps (DDP), the gap;
* bytes a worker sends per outer step against the bytes a DDP rank sends in the
  H ring all-reduces it replaces (2 (N-1)/N P x 4 bytes each), and the factor;
* utilisation per worker: time inside inner steps / wall time from the first inner
  step (what the worker itself measured).

Run: ``python bench/diloco_bench.py [--outer 8] [--inner 500]`` (about 2-3 minutes).
Writes bench/results/diloco.json and docs/diloco-loss.svg.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
JOB = """
name: diloco-bench
kind: training
training:
  world_size: {world}
  model: {{parameters: 1e9, gradient_bytes: 2}}
  tokens_per_step: 8192
  sync: {{method: diloco, inner_steps: {inner}, round_timeout: 20s, compression: {compression}}}
  steps: {steps}
  command: [train.py]
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


def run_job(
    home: Path, name: str, outer: int, inner: int, compression: str, kill_after: int | None
) -> dict[str, Any]:
    d = home / name
    d.mkdir()
    (d / "train.py").write_text((ROOT / "examples" / "diloco" / "train.py").read_text())
    job = JOB.format(world=WORKERS, inner=inner, steps=outer * inner, compression=compression)
    (d / "job.yaml").write_text(job)
    env = {**os.environ, "MERCATO_HOME": str(home)}
    env.pop("MERCATO_PEER", None)
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "submit", str(d / "job.yaml"), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        err.extend(iter(proc.stderr.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    while kill_after is not None and killed is None and proc.poll() is None:
        if any(f"outer step {kill_after}/" in x for x in err):
            started = [x for x in err if "started on" in x]
            prefix = started[0].split("started on ")[1].split()[0]
            for rec in cluster.load_state(cluster.cluster_root(home)):
                if rec.node_id.startswith(prefix) and rec.role == "provider":
                    os.kill(rec.pid, signal.SIGKILL)
                    killed = rec.name
        time.sleep(0.1)
    stdout, _ = proc.communicate(timeout=600)
    reader.join(5)
    wall = time.monotonic() - began
    summary = json.loads(stdout)
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
        }
    steps = [x.strip().split("] ", 1)[-1] for x in err if "outer step" in x]
    return {
        "state": summary["state"],
        "killed": killed,
        "wall_s": wall,
        "workers": workers,
        "outer_steps": steps,
        "events": [x.strip().split("] ", 1)[-1] for x in err if "lost" in x or "replacement" in x],
    }


def ddp_baseline(outer: int, inner: int) -> list[float]:
    """DDP over 3 ranks, in one process: the mean of the shards' gradients every step."""
    import torch

    spec = importlib.util.spec_from_file_location("train", ROOT / "examples/diloco/train.py")
    assert spec is not None
    assert spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    torch.set_num_threads(1)
    shards = [train.teacher_data(2048, seed=100 + 10 * w) for w in range(WORKERS)]
    x_eval, y_eval = train.teacher_data(512, seed=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.003)
    gens = [torch.Generator().manual_seed(7 + w) for w in range(WORKERS)]
    curve = []
    for _ in range(outer):
        for _ in range(inner):
            opt.zero_grad()
            for (x, y), gen in zip(shards, gens, strict=True):
                idx = torch.randint(0, len(x), (64,), generator=gen)
                (torch.nn.functional.mse_loss(model(x[idx]), y[idx]) / WORKERS).backward()
            opt.step()
        with torch.no_grad():
            curve.append(torch.nn.functional.mse_loss(model(x_eval), y_eval).item())
    return curve


def svg(curves: dict[str, list[float]], path: Path) -> None:
    """A small line plot of held-out loss per outer step, no plotting library needed."""
    w, h, pad = 560, 320, 40
    top = max(max(c) for c in curves.values())
    n = max(len(c) for c in curves.values())
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w // 2 - 40}" y="{h - 8}">outer step</text>',
        f'<text x="4" y="20">{top:.3g}</text><text x="16" y="{h - pad}">0</text>',
    ]
    for i, (name, c) in enumerate(curves.items()):
        pts = " ".join(
            f"{pad + (w - pad - 20) * (j + 1) / n:.1f},{h - pad - (h - pad - 20) * v / top:.1f}"
            for j, v in enumerate(c)
        )
        col = colours[i % len(colours)]
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{w - 230}" y="{24 + 16 * i}" fill="{col}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outer", type=int, default=8)
    ap.add_argument("--inner", type=int, default=500)
    args = ap.parse_args()
    params = 32 * 64 + 64 + 64 + 1  # examples/diloco's MLP
    blob = 20 + 4 * params
    ddp_step = 2 * (WORKERS - 1) * params * 4 // WORKERS
    began = time.monotonic()
    ddp = ddp_baseline(args.outer, args.inner)
    home = Path(tempfile.mkdtemp(prefix="diloco-bench-"))
    cluster.up(4, home=home, templates=TEMPLATES)
    try:
        full = run_job(home, "full", args.outer, args.inner, "fp32", None)
        killed = run_job(home, "killed", args.outer, args.inner, "fp32", 2)
    finally:
        cluster.down(home=home)

    def mean_curve(run: dict[str, Any]) -> list[float]:
        """The loss after each outer step: every worker loads the same global parameters,
        so any worker that ran from the first step to the last has the whole curve."""
        return max((w["curve"] for w in run["workers"].values()), key=len)

    result = {
        "workers": WORKERS,
        "inner_steps": args.inner,
        "outer_steps": args.outer,
        "parameters": params,
        "ddp_curve": ddp,
        "diloco": full,
        "diloco_one_provider_killed": killed,
        "bytes_per_worker_per_outer_step": blob,
        "ddp_bytes_per_rank_per_step": ddp_step,
        "ddp_bytes_per_rank_per_outer_step": ddp_step * args.inner,
        "reduction": ddp_step * args.inner / blob,
        "bench_wall_s": time.monotonic() - began,
    }
    out = ROOT / "bench" / "results" / "diloco.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    svg(
        {
            "DDP, 3 ranks (every step)": ddp,
            "DiLoCo, 3 providers": mean_curve(full),
            "DiLoCo, one provider killed": mean_curve(killed),
        },
        ROOT / "docs" / "diloco-loss.svg",
    )
    d_final = mean_curve(full)[-1]
    k_final = mean_curve(killed)[-1]
    print(f"DDP final held-out loss      {ddp[-1]:.5f}")
    print(f"DiLoCo final held-out loss   {d_final:.5f} ({(d_final / ddp[-1] - 1) * 100:+.1f} %)")
    print(f"  one provider killed        {k_final:.5f} ({(k_final / ddp[-1] - 1) * 100:+.1f} %)")
    print(
        f"bytes per worker per outer step {blob}; DDP per rank per step {ddp_step}, "
        f"x{args.inner} steps = {ddp_step * args.inner}: {result['reduction']:.0f}x fewer"
    )
    for label, run in (("full", full), ("killed", killed)):
        utils = {k: round(v["utilisation"] or 0, 3) for k, v in run["workers"].items()}
        print(f"utilisation per worker ({label}): {utils}; state {run['state']}")
        for e in run["events"]:
            print(f"  {e}")
    print(f"wall {result['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
