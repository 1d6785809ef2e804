"""Where a trial's milliseconds go on the provider, layer by layer, in one interleaved run.

Each round runs the same trial (``sweep_bench.TRIAL`` with ``--sleep 0``: an
interpreter that parses its arguments and prints a metric) once per layer, in turn,
so the machine's load hits every layer alike:

0. ``interp``: ``python -I -S -c pass``, the start of one interpreter as the
   supervisor starts (twice per sandboxed trial: outside, and ``enter`` inside).
1. ``bare``: ``subprocess.run(python3 trial.py)`` in a fresh copy of the workspace.
   The interpreter's start and exit: the floor every scheduler pays.
2. ``supervisor``: ``SandboxExecutor(use_bwrap=False, allow_unsandboxed=True).run``:
   the executor's copy of the workspace, ``posix_spawn`` of the supervisor (its own
   ``python -I -S``), rlimits, the fork and exec of the trial, the reaping, the output
   collector, removing the trial directory.
3. ``sandbox``: ``SandboxExecutor(use_bwrap=True, warm=False).run``: the same inside
   bubblewrap (namespaces, the read-only root's mounts, seccomp, ``supervisor.py enter``).
4. ``warm``: ``SandboxExecutor(use_bwrap=True).run`` with a ``warm_key``: the trial in
   the sandbox kept from the round before, started by its runner (a fork, no new
   interpreter, no bwrap); its copy into the emptied slot, the runner's clean-up after.
4b. ``prepared``: the same with the trial's work dir copied before the clock starts
   (``SandboxExecutor.prepare``, as the provider does for a task waiting in a lease's
   queue while the one before it runs): at its start the copy is renamed into the slot.

5. ``phases``: the prepared warm layer once more with a probe trial (``sweep_bench.TRIAL``'s
   body between two readings of the monotonic clock, which the sandbox shares), so a
   warm trial splits into: the provider's work before it asks the runner (``before
   send``: the slot emptied, the workspace copied, the log opened), the runner's fork
   to the script's first line (``to script``), the script itself (``script``: its
   imports, argparse, the metric line), and its last line to the runner's answer at
   the provider (``to answer``: the child's exit, the reaping, the clean-up checks).

For the executor layers the script also times, from the provider's side: the copy of
the workspace (``_prepare``), the spawn to the trial's exit (``run`` minus the copy),
and the removal of the trial directory (``discard``, done after the result ships).

The difference between layers is what each adds per trial. The exchange with the
tenant (assignment, long poll, signed result, the tenant's store) is the cluster's
overhead per trial in ``bench/sweep_bench.py`` minus the sandbox layer here.

The last line printed is ``interp_ms=<i> bare_ms=<a> supervisor_ms=<b> sandbox_ms=<c>
warm_ms=<d> prepared_ms=<e>`` (medians).

Run: ``python bench/trial_breakdown.py [--rounds 30]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sweep_bench

from node.provider.executor import TrialSpec
from node.provider.sandbox import SandboxExecutor

# The interpreter the executors run (theirs is first on PATH too), not a shim's.
ENV = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "LANG": "C.UTF-8"}
ARGV = ["python3", "trial.py", "--a", "1", "--b", "2", "--sleep", "0"]


def interp() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return time.perf_counter() - t0


def bare(workspace: Path, scratch: Path, n: int) -> float:
    work = scratch / f"bare-{n}"
    t0 = time.perf_counter()
    shutil.copytree(workspace, work)
    subprocess.run(ARGV, cwd=work, env=ENV, capture_output=True, check=True)
    shutil.rmtree(work)
    return time.perf_counter() - t0


async def executor_run(
    ex: SandboxExecutor,
    workspace: Path,
    n: int,
    parts: dict[str, list[float]],
    warm_key: str | None = None,
    prepared: bool = False,
) -> float:
    spec = TrialSpec(
        task_id=f"t{n}", argv=ARGV, workspace=workspace, timeout_s=60, warm_key=warm_key
    )
    took: dict[str, float] = {"copy": 0.0}  # none with a prepared copy (rename only)
    if prepared:
        await ex.prepare(spec)
    if warm_key is None:
        prepare = ex._prepare

        def timed_prepare(s: TrialSpec) -> Path:
            t = time.perf_counter()
            try:
                return prepare(s)
            finally:
                took["copy"] = time.perf_counter() - t

        ex._prepare = timed_prepare  # type: ignore[method-assign]
    else:
        prepare_warm = ex._prepare_warm

        def timed_prepare_warm(s: TrialSpec, slot: Path, stale: Path | None = None) -> Path:
            t = time.perf_counter()
            try:
                return prepare_warm(s, slot, stale)
            finally:
                took["copy"] = time.perf_counter() - t

        ex._prepare_warm = timed_prepare_warm  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        outcome = await ex.run(spec)
    finally:
        # The class's own method again (else each round would wrap the last's wrapper).
        ex.__dict__.pop("_prepare" if warm_key is None else "_prepare_warm")
    t1 = time.perf_counter()
    if outcome.exit_code != 0:
        raise SystemExit(f"trial failed: {outcome}: {outcome.log_path.read_text()}")
    ex.discard(spec.task_id)
    t2 = time.perf_counter()
    parts["copy"].append(took["copy"])
    parts["spawn to exit"].append(t1 - t0 - took["copy"])
    parts["discard"].append(t2 - t1)
    return t2 - t0


PROBE = (
    "import time, sys\n"
    "sys.stdout.write('first %r\\n' % time.monotonic())\n"
    + sweep_bench.TRIAL.split('"""', 2)[2]
    + "sys.stdout.write('last %r\\n' % time.monotonic())\n"
)


async def probe_run(ex: SandboxExecutor, workspace: Path, n: int) -> dict[str, float]:
    """One warm probe trial, split at the runner's request and answer (see ``phases``)."""
    marks: dict[str, float] = {}
    warm_type = type(next(iter(ex._warm_idle)))
    send, reply = warm_type._send, warm_type._reply

    async def timed_send(self: object, data: bytes, fd: int) -> None:
        marks["send"] = time.monotonic()
        await send(self, data, fd)  # type: ignore[arg-type]

    async def timed_reply(self: object) -> dict[str, object]:
        answer = await reply(self)  # type: ignore[arg-type]
        marks["answer"] = time.monotonic()
        return answer

    warm_type._send, warm_type._reply = timed_send, timed_reply  # type: ignore[method-assign]
    argv = ["python3", "probe.py", "--a", "1", "--b", "2", "--sleep", "0"]
    spec = TrialSpec(task_id=f"p{n}", argv=argv, workspace=workspace, timeout_s=60, warm_key="p")
    await ex.prepare(spec)  # queued while the trial before ran, as on a provider
    out: list[bytes] = []
    t0 = time.monotonic()
    try:
        outcome = await ex.run(spec, out.append)
    finally:
        warm_type._send, warm_type._reply = send, reply  # type: ignore[method-assign]
    ex.discard(spec.task_id)
    text = b"".join(out).decode()
    if outcome.exit_code != 0:
        raise SystemExit(f"probe failed: {text}")
    first = float(text.split("first ")[1].split()[0])
    last = float(text.split("last ")[1].split()[0])
    return {
        "before send": marks["send"] - t0,
        "to script": first - marks["send"],
        "script": last - first,
        "to answer": marks["answer"] - last,
    }


async def main_async(rounds: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="trial-breakdown-"))
    try:
        job = sweep_bench.write_workspace(tmp / "job", 10, 0.0)
        workspace = job.parent
        (tmp / "bare").mkdir()
        plain = SandboxExecutor(
            tmp / "plain", use_bwrap=False, allow_unsandboxed=True, hidden_paths=[tmp / "h"]
        )
        boxed = SandboxExecutor(tmp / "boxed", use_bwrap=True, hidden_paths=[tmp / "h"], warm=False)
        warm = SandboxExecutor(tmp / "warm", use_bwrap=True, hidden_paths=[tmp / "h"])
        ready = SandboxExecutor(tmp / "ready", use_bwrap=True, hidden_paths=[tmp / "h"])
        times: dict[str, list[float]] = {
            "interp": [],
            "bare": [],
            "supervisor": [],
            "sandbox": [],
            "warm": [],
            "prepared": [],
        }
        parts: dict[str, dict[str, list[float]]] = {
            k: {"copy": [], "spawn to exit": [], "discard": []}
            for k in ("supervisor", "sandbox", "warm", "prepared")
        }
        (workspace / "probe.py").write_text(PROBE)
        probe = SandboxExecutor(tmp / "probe", use_bwrap=True, hidden_paths=[tmp / "h"])
        phases: dict[str, list[float]] = {}
        # The warm sandbox's first trial starts it (a cold start): not one of the rounds.
        await executor_run(warm, workspace, -1, {k: [] for k in parts["warm"]}, "bench")
        await executor_run(ready, workspace, -1, {k: [] for k in parts["warm"]}, "bench")
        await executor_run(probe, workspace, -1, {k: [] for k in parts["warm"]}, "p")
        for n in range(rounds):
            times["interp"].append(await asyncio.to_thread(interp))
            times["bare"].append(await asyncio.to_thread(bare, workspace, tmp / "bare", n))
            times["supervisor"].append(await executor_run(plain, workspace, n, parts["supervisor"]))
            times["sandbox"].append(await executor_run(boxed, workspace, n, parts["sandbox"]))
            times["warm"].append(await executor_run(warm, workspace, n, parts["warm"], "bench"))
            times["prepared"].append(
                await executor_run(ready, workspace, n, parts["prepared"], "bench", prepared=True)
            )
            for phase, took in (await probe_run(probe, workspace, n)).items():
                phases.setdefault(phase, []).append(took)
        await warm.close()
        await ready.close()
        await probe.close()
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"{rounds} rounds, interleaved; medians in ms (p90 in brackets)")
        for k, v in times.items():
            p90 = sorted(v)[int(0.9 * (len(v) - 1))] * 1000
            print(f"  {k:<11}{med[k]:7.1f}  [{p90:6.1f}]")
            for part, xs in parts.get(k, {}).items():
                print(f"      {part:<15}{statistics.median(xs) * 1000:7.1f}")
        print("  warm phases (probe trial):")
        for phase, xs in phases.items():
            print(f"      {phase:<15}{statistics.median(xs) * 1000:7.1f}")
        print(
            f"  supervisor adds {med['supervisor'] - med['bare']:.1f} ms over bare; "
            f"bubblewrap adds {med['sandbox'] - med['supervisor']:.1f} ms over the supervisor; "
            f"warm saves {med['sandbox'] - med['warm']:.1f} ms of the sandbox's"
        )
        print(" ".join(f"{k}_ms={v:.1f}" for k, v in med.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.rounds))


if __name__ == "__main__":
    sys.exit(main())
