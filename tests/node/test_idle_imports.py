"""An idle provider daemon loads only what serving needs.

Every module a daemon imports stays resident for its lifetime: numpy (which sqlite-utils
pulled in whenever optuna had installed it), optuna, rich and torch cost an operator tens
of megabytes per idle daemon for nothing it does while waiting for work; the status
page, Slurm, the tenant's commands and PyYAML a few more (docs/benchmarks.md, "Idle
provider RSS"). The check runs `mercato provider run` in a fresh interpreter, as an
operator starts it, and looks at what it holds once it serves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Imported by tenants (sweep search, tables) or by trials, never by an idle provider.
HEAVY = ("numpy", "optuna", "rich", "torch", "pandas", "sklearn")
# Loaded on first use: the status page (Jinja2) and the status document on the first
# request for them, prometheus_client on the first scrape of /metrics, cryptography's
# serialization (and PEM codec) only in the child that reads the key file, Slurm where
# executor = "slurm", PyYAML and tarfile with a job file or a workspace, the tenant's,
# the cluster's and the ledger's commands when they run.
LAZY = (
    "jinja2",
    "markupsafe",
    "yaml",
    "tarfile",
    "difflib",
    "node.operator.page",
    "node.operator.document",
    "node.operator.client",
    "node.operator.plots",
    "node.operator.templating",
    "node.provider.slurm",
    "node.provider.slurm_inventory",
    "node.cli.tenant",
    "node.cli.cluster",
    "node.cli.localcluster",
    "market.evidence",
    "market.jobspec",
    "pydantic.networks",
    "prometheus_client",
    "cryptography.hazmat.primitives.serialization",
)
# Never loaded by the daemon: frozenlist's C++ extension (the C++ runtime, ~1 MB) for
# aiohttp's signal lists, where frozenlist's pure-Python FrozenList serves alike; the
# seccomp filter's compiler (libseccomp), run once at start in a child.
NEVER = ("frozenlist._frozenlist", "pyseccomp")

# Runs `mercato provider run` in this process; once the daemon is ready, a thread notes
# the modules it holds, loads the status page once, and stops the daemon with SIGTERM.
_PROBE = """
import json, os, signal, sys, threading, time
from pathlib import Path

def check():
    ready = Path({home!r}) / "daemon.json"
    while not ready.exists():
        time.sleep(0.05)
    idle = sorted(sys.modules)
    import urllib.request
    url = json.loads(ready.read_text())["control_url"] + "/"
    with urllib.request.urlopen(url, timeout=30) as resp:
        page = resp.read().decode()
    print(json.dumps({{"idle": idle, "page": page, "after": sorted(sys.modules)}}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=check, daemon=True).start()
from node.cli.main import main
sys.exit(main(["provider", "run", "--config", {config!r}]))
"""


def _run_idle_daemon(tmp_path: Path) -> dict[str, list[str] | str]:
    home = tmp_path / "home"
    config = tmp_path / "p.toml"
    config.write_text(
        "detect_gpus = false\n"
        f'[node]\nlisten_port = 0\nhome = "{home}"\n'
        '[[devices]]\nmodel = "RTX-4090"\ncount = 1\nprice_floor = 350000\nsimulated = true\n'
    )
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(home=str(home), config=str(config))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, list[str] | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class TestIdleProviderImports:
    def test_an_idle_daemon_holds_no_heavy_or_lazily_loaded_module(self, tmp_path: Path) -> None:
        run = _run_idle_daemon(tmp_path)
        idle = set(run["idle"])
        heavy = sorted({m.split(".")[0] for m in idle} & set(HEAVY))
        assert heavy == [], f"an idle provider daemon imports {heavy}"
        lazy = sorted(idle & set(LAZY))
        assert lazy == [], f"an idle provider daemon imports {lazy} before they are used"
        never = sorted(set(run["after"]) & set(NEVER))
        assert never == [], f"the provider daemon loads {never}"
        # The page that loads on first use answers that first request in full.
        assert "node.operator.page" in run["after"]
        page = run["page"]
        assert isinstance(page, str)
        assert page.lstrip().lower().startswith("<!doctype html>")
        assert "RTX-4090" in page


class TestLazyCommands:
    def test_every_command_names_a_function_that_exists(self) -> None:
        # The CLI imports a command's module only when it runs: a misspelt name would
        # surface only when someone types that command.
        import argparse
        import importlib

        from node.cli.main import _Command, build_parser

        found: list[str] = []
        parsers = [build_parser()]
        while parsers:
            parser = parsers.pop()
            func = parser.get_default("func")
            if isinstance(func, _Command):
                module = importlib.import_module(f"node.cli.{func.module}")
                assert callable(getattr(module, func.name, None)), parser.prog
                found.append(parser.prog)
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
        assert "mercato provider run" in found
        assert len(found) >= 20
