"""Resident memory of an idle provider daemon, and where it goes.

An operator runs one daemon per host and leaves it idle most of the time, so its
resident set is the price of being on the market (issue 19: <= 64 MB in a plain
install). This script measures it the way an operator would see it: ``mercato provider
run`` of a throwaway config (one simulated device, no bootstrap, a fresh home) under
the given venv's interpreter, and ``VmRSS`` of ``/proc/PID/status`` once it has settled.
MB here are 1000 kB of VmRSS, as in docs/benchmarks.md.

Two modes:

- ``--venv A --venv B [--rounds 3]``: alternates the venvs round by round (so the
  machine's load hits each alike); each run measures a daemon's first run on a fresh
  home (it creates its key and store) and then its restart on that home, and prints
  one line per run, then the medians per venv. The daemon is started as the operator
  starts it: the venv's ``mercato`` script.
  Build each venv as a plain install of one commit: ``python -m venv /tmp/v &&
  /tmp/v/bin/pip install <tree>`` (no extras, so optuna and numpy are installed, as an
  operator's would be).
- ``--venv A --breakdown``: runs the daemon once with an import hook that notes the
  resident set before and after each module's import (its own share: the children's
  deltas are subtracted), then prints the heaviest modules and top-level packages, the
  resident set by mapping (libraries, malloc heap, anonymous: pymalloc's arenas) and
  how many modules it holds. Imports made by a function at run time name the
  function's file and line instead of an importing module.

Run: ``python bench/idle_rss.py --venv /tmp/v-old --venv /tmp/v-new --rounds 3``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONFIG = """detect_gpus = false
[node]
role = "provider"
listen_port = 0
home = "{home}"

[[devices]]
model = "RTX-4090"
count = 1
price_floor = 350000
simulated = true
"""

# Installed in the daemon's interpreter before `node.cli.main` is imported: a finder in
# front of sys.meta_path that wraps each loader, so each module's creation (an
# extension's dlopen) and execution (unmarshal and module body) is bracketed by two
# reads of the resident set. Nested imports are subtracted from their parent.
_HOOK = r"""
import importlib.abc, json, os, sys
PAGE = os.sysconf("SC_PAGE_SIZE") // 1024
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
own = {}
parent = {}
stack = []
def caller():
    # An import outside any module's import (a function's lazy import): name the
    # function's file and line instead of a module.
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename == "<string>"):
        frame = frame.f_back
    if frame is None:
        return ""
    return "(run) %s:%d" % (frame.f_code.co_filename.rsplit("site-packages/", 1)[-1],
                            frame.f_lineno)
class Wrap(importlib.abc.Loader):
    def __init__(self, name, loader):
        self.name, self.loader = name, loader
    def _timed(self, fn, *a):
        if self.name not in parent:
            parent[self.name] = stack[-1][0] if stack else caller()
        stack.append([self.name, 0])
        start = rss()
        try:
            return fn(*a)
        finally:
            total = rss() - start
            children = stack.pop()[1]
            own[self.name] = own.get(self.name, 0) + total - children
            if stack:
                stack[-1][1] += total
    def create_module(self, spec):
        return self._timed(self.loader.create_module, spec)
    def exec_module(self, module):
        module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        return self._timed(self.loader.exec_module, module)
    def __getattr__(self, attr):
        return getattr(self.loader, attr)
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = Wrap(name, spec.loader)
                return spec
        return None
sys.meta_path.insert(0, Finder())
base = rss()
import atexit
def dump():
    with open(os.environ["IDLE_RSS_DUMP"], "w") as f:
        dump = {"start_kB": base, "own_kB": own, "parent": parent}
        json.dump(dict(dump, modules=sorted(sys.modules)), f)
import signal
def stop(signum, frame):
    dump()
    os._exit(0)
signal.signal(signal.SIGUSR1, stop)
from node.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _start(python: Path, workdir: Path, hook: bool) -> subprocess.Popen[bytes]:
    home = workdir / "home"
    config = workdir / "p.toml"
    config.write_text(CONFIG.format(home=home))
    (home / "daemon.json").unlink(missing_ok=True)
    args = ["provider", "run", "--config", str(config)]
    mercato = python.parent / "mercato"  # the operator's command, where installed
    if hook:
        cmd = [str(python), "-c", _HOOK, *args]
    elif mercato.exists():
        cmd = [str(mercato), *args]
    else:
        cmd = [str(python), "-m", "node.cli", *args]
    env = dict(os.environ, IDLE_RSS_DUMP=str(workdir / "dump.json"))
    log = (workdir / "log").open("wb")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not (home / "daemon.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not start: {(workdir / 'log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def measure(python: Path, settle: float) -> tuple[int, int]:
    """VmRSS (kB) of an idle daemon `settle` seconds after it wrote daemon.json: on its
    first run (a fresh home: it creates its key and store), then restarted on that home
    (what a daemon is for most of its life)."""
    with tempfile.TemporaryDirectory(prefix="idle-rss-") as tmp:
        rss = []
        for _run in ("first", "restart"):
            proc = _start(python, Path(tmp), hook=False)
            try:
                time.sleep(settle)
                rss.append(_rss_kb(proc.pid))
            finally:
                _stop(proc)
        return rss[0], rss[1]


def _smaps(pid: int) -> Counter[str]:
    by_map: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$", line)
        if m:
            name = m.group(1) or "[anon]"
        elif line.startswith("Rss:"):
            by_map[name] += int(line.split()[1])
    return by_map


def breakdown(python: Path, settle: float, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="idle-rss-") as tmp:
        proc = _start(python, Path(tmp), hook=True)
        time.sleep(settle)
        rss = _rss_kb(proc.pid)
        maps = _smaps(proc.pid)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=30)
        dump = json.loads((Path(tmp) / "dump.json").read_text())
        if os.environ.get("IDLE_RSS_KEEP"):
            Path(os.environ["IDLE_RSS_KEEP"]).write_text(json.dumps(dump))
    own: dict[str, int] = dump["own_kB"]
    print(
        f"VmRSS {rss / 1000:.1f} MB (with the import hook); interpreter before imports "
        f"{dump['start_kB'] / 1000:.1f} MB; {len(dump['modules'])} modules held"
    )
    print(f"\nby mapping (kB), top {top}:")
    for name, kb in maps.most_common(top):
        print(f"{kb:8d}  {name}")
    parent: dict[str, str] = dump["parent"]

    def chain(name: str) -> str:
        names = [name]
        while parent.get(names[-1]) and len(names) < 12:
            names.append(parent[names[-1]])
        return " <- ".join(names)

    print(f"\nby module, own share (kB) and who imported it, top {top}:")
    for name, kb in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{kb:8d}  {chain(name)}")
    packages: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for name, kb in own.items():
        packages[name.split(".")[0]] += kb
        counts[name.split(".")[0]] += 1
    print(f"\nby top-level package (kB, modules), top {top}:")
    for name, kb in packages.most_common(top):
        print(f"{kb:8d}  {counts[name]:4d}  {name}")
    print(
        f"\nimports: {sum(own.values()) / 1000:.1f} MB; after imports (objects, heap, "
        f"libraries touched later): {(rss - dump['start_kB'] - sum(own.values())) / 1000:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venv",
        action="append",
        type=Path,
        required=True,
        help="a venv with mercato installed (repeat to compare)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds after the daemon is ready before reading VmRSS",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="one run of the first venv with per-module deltas"
    )
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    pythons = [venv / "bin" / "python" for venv in args.venv]
    if args.breakdown:
        breakdown(pythons[0], args.settle, args.top)
        return
    results: dict[Path, list[tuple[int, int]]] = {venv: [] for venv in args.venv}
    for round_ in range(args.rounds):
        for venv, python in zip(args.venv, pythons, strict=True):
            first, restart = measure(python, args.settle)
            results[venv].append((first, restart))
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            print(
                f"round {round_ + 1} {venv}: first run {first / 1000:.1f} MB, "
                f"restarted {restart / 1000:.1f} MB (load {load})",
                flush=True,
            )
    for venv, runs in results.items():
        for i, what in enumerate(("first run", "restarted")):
            kbs = [run[i] for run in runs]
            each = ", ".join(f"{kb / 1000:.1f}" for kb in kbs)
            print(f"{venv} {what}: median {statistics.median(kbs) / 1000:.1f} MB ({each})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
