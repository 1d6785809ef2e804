"""One sweep, four schedulers, one run: a process pool, Ray Tune (twice) and Mercato.

The same N trials of the same program (``sweep_bench.TRIAL``: sleep S seconds, print a
metric) with the same number of slots run through, in this order:

* pool: ``sweep_bench.run_pool``, a thread pool starting each trial's command as a
  subprocess in a copy of the workspace. No sandbox, no network: the floor.
* Ray Tune, default: a function trainable on a local Ray instance of ``slots`` CPUs,
  ``max_concurrent_trials=slots``, ``reuse_actors=False`` (a new worker process per
  trial).
* Ray Tune, ``reuse_actors=True``: the same, each slot's actor kept across trials.
* Mercato: ``sweep_bench.run_cluster``, a 4-provider local cluster; every trial goes
  through the auction's leases, the bubblewrap sandbox, signed results and the store.
  Twice: as a tenant runs it by default, with spot checks (a sample of results re-run
  on another provider, and a canary per new provider: work the other schedulers do
  not do, so not counted in the ideal), and with ``verify: off``, the schedulers alone.

Each Ray trial runs the trial's command as a subprocess, as the pool and Mercato do, so
every side pays the same interpreter start and the same work; what differs is the
scheduler. Ray's own start (``ray.init``) is outside its clock, the cluster's start
(``mercato cluster up``) outside Mercato's: both are paid once, not per sweep. Mercato's
clock covers the whole submit (auction, upload, trials, receipts).

Efficiency is the ideal (N x S / slots) over the wall time. On a shared machine the
absolute figures move with the load; the ratios of one run are what count.

Ray is an optional benchmark dependency: ``pip install -e '.[bench]'`` (pinned in
pyproject.toml). Without it the Ray rows are skipped, with a line saying how to add it.

The last line printed is
``efficiency pool=<x> ray=<y> ray_reuse=<z> mercato=<w> mercato_unverified=<v>``.

Run: ``python bench/ray_compare.py [--trials 40] [--slots 4] [--sleep 0.5] [--no-ray]
[--no-spot-checks]`` (the last two leave rows out: Ray's default takes minutes at 200
trials, so on a shared machine the pool and Mercato rows alone are a short run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sweep_bench

INSTALL_HINT = "Ray Tune is not installed: pip install -e '.[bench]' (or 'ray[tune]==2.60.0')"


def trial_commands(job: Path) -> list[tuple[int, list[str]]]:
    """(trial number, argv) for every trial of the job, as the tenant renders them."""
    from market.jobspec import parse_job, render_command
    from market.search import Search

    spec = parse_job(job.read_text(), str(job))
    search = Search(spec, seed=0)
    out = []
    while (t := search.ask()) is not None:
        out.append((t.number, render_command(spec, t.params, interpreter="python3")))
    return out


def run_ray(job: Path, slots: int, scratch: Path, *, reuse_actors: bool) -> float:
    """Wall seconds of ``Tuner.fit()`` over every trial command."""
    from ray import tune

    commands = dict(trial_commands(job))
    workspace = str(job.parent)
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }

    def trainable(config: dict[str, Any]) -> None:
        # A copy of the workspace per trial, as the pool and the sandbox give each trial.
        work = Path(tempfile.mkdtemp(dir=config["scratch"]))
        shutil.rmtree(work)
        shutil.copytree(config["workspace"], work)
        proc = subprocess.run(
            config["argv"], cwd=work, env=env, capture_output=True, text=True, check=True
        )
        shutil.rmtree(work)
        tune.report({"value": json.loads(proc.stdout.splitlines()[-1])["value"]})

    space = {
        "argv": tune.grid_search([commands[n] for n in sorted(commands)]),
        "workspace": workspace,
        "scratch": str(scratch),
    }
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(
            storage_path=str(scratch / "ray-results"), verbose=0, log_to_file=False
        ),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    failed = sum(1 for r in results if r.error is not None)
    if failed or len(results) != len(commands):
        print(f"ray: {failed} of {len(results)} trials failed")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="skip the Ray Tune rows even when Ray is installed (its default takes minutes)",
    )
    parser.add_argument(
        "--no-spot-checks",
        action="store_true",
        help="run Mercato only with verify: off (the schedulers alone)",
    )
    args = parser.parse_args(argv)
    n, s, work = args.trials, args.slots, args.sleep
    ideal = n * work / s

    ray: Any = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print(INSTALL_HINT)

    tmp = Path(tempfile.mkdtemp(prefix="ray-compare-"))
    walls: dict[str, float | None] = {"pool": None, "ray": None, "ray_reuse": None}
    try:
        job = sweep_bench.write_workspace(tmp / "job", n, work)
        print(f"{n} trials of {work} s on {s} slots: ideal {ideal:.2f} s", flush=True)
        (tmp / "pool").mkdir()
        walls["pool"] = sweep_bench.run_pool(job, s, tmp / "pool").wall
        print(f"pool: {walls['pool']:.2f} s", flush=True)
        if ray is not None:
            t0 = time.perf_counter()
            ray.init(num_cpus=s, include_dashboard=False, log_to_driver=False)
            print(f"ray.init: {time.perf_counter() - t0:.1f} s (outside the clock)", flush=True)
            try:
                (tmp / "ray").mkdir()
                walls["ray"] = run_ray(job, s, tmp / "ray", reuse_actors=False)
                print(f"ray default: {walls['ray']:.2f} s", flush=True)
                walls["ray_reuse"] = run_ray(job, s, tmp / "ray", reuse_actors=True)
                print(f"ray reuse_actors: {walls['ray_reuse']:.2f} s", flush=True)
            finally:
                ray.shutdown()
        unverified = sweep_bench.write_workspace(tmp / "job-unverified", n, work, verify=False)
        runs = [("mercato", job, "home"), ("mercato_unverified", unverified, "home-unverified")]
        for key, where, home in runs[1:] if args.no_spot_checks else runs:
            c = sweep_bench.run_cluster(where, s, tmp / home)
            walls[key] = c["wall"]
            if c["gaps_ms"]:
                print(
                    f"{key}: submit to the first task's start {c['first_start_ms']:.0f} ms; "
                    f"per device, a task's end to the next one's start median "
                    f"{statistics.median(c['gaps_ms']):.0f} ms; a task's start to its "
                    f"signed result median {statistics.median(c['held_ms']):.0f} ms "
                    f"(runner {statistics.median(c['provider_ms']):.0f} ms); the last "
                    f"task's end to the end of submit {c['after_last_ms']:.0f} ms",
                    flush=True,
                )
            if c["succeeded"] != n:
                print(f"{key} ran {c['succeeded']}/{n} trials ({c['state']})")

        print(f"\n{'scheduler':<26}{'wall s':>9}{'efficiency':>12}{'ms/trial over S':>17}")
        labels = {
            "pool": "local process pool",
            "ray": "Ray Tune (default)",
            "ray_reuse": "Ray Tune (reuse_actors)",
            "mercato": "Mercato (spot checks on)",
            "mercato_unverified": "Mercato (verify: off)",
        }
        for key, label in labels.items():
            wall = walls.get(key)
            if wall is None:
                print(f"{label:<26}{'-':>9}{'-':>12}{'-':>17}")
                continue
            overhead = (wall * s / n - work) * 1000
            print(f"{label:<26}{wall:>9.2f}{ideal / wall:>12.2f}{overhead:>17.0f}")
        figures = " ".join(
            f"{k}={'-' if w is None else f'{ideal / w:.2f}'}" for k, w in walls.items()
        )
        print(f"efficiency {figures}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
