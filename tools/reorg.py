#!/usr/bin/env python3
"""Reorganise node/ by role (issue 14): one deterministic, re-runnable move.

Run from the repository root on a clean tree::

    python tools/reorg.py            # do it (then review `git status` and commit)
    python tools/reorg.py --dry-run  # only say what would move

What it does, in order:

1. ``git mv`` each module of the tables below to its room (history follows), splits the
   modules of ``SPLITS`` along top-level definitions (only when the parts form no import
   cycle; otherwise the module moves whole), and writes each new package's light
   ``__init__.py`` (a docstring, no re-exports: nothing to form an import cycle).
2. ``git mv`` the tests of ``TESTS`` into the mirrored layout under tests/node/, fixing
   ``Path(__file__)`` depths so fixture directories are still found.
3. Applies the few hand-written ``PATCHES`` (the sandbox binds ``mercato_trial`` instead
   of ``node/``; Dockerfile; README layout). Each is guarded: applied once, reported if
   its anchor is gone.
4. Rewrites every import (AST based) and every dotted or path reference in strings,
   comments and docs (``node.core``, ``"node.cli"``, ``node/core.py``, mock targets,
   ``node.cli:main`` entry points) of every tracked file.
5. Sorts the imports it touched and formats the files it wrote (ruff, if installed).

Files the tables do not know (a new flat ``node/foo.py``, a new ``tests/node/test_x.py``)
are reported and left in place; their imports are still rewritten. To place one, add a
line to ``MODULES`` (or ``TESTS``) and run again. Idempotent: every step checks whether
it is still to do, and references are rewritten only for modules whose old file still
exists, so a second run changes nothing. It refuses to run on a dirty tree; if it stops
half-way, ``git reset --hard && git clean -fd`` and run it again.

After it: ``pip install -e .`` again (a new top-level package, ``mercato_trial``, is not
in an existing editable install's path map).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------
# The mapping. One line per module; entries whose old file does not exist are ignored,
# so a line for a module that may or may not appear (supervisor, prices...) is harmless.
# --------------------------------------------------------------------------------------

#: old dotted module -> new dotted module (the file moves whole)
MODULES: dict[str, str] = {
    # net/: the peer node, gossip, transports, the HTTP edge, limits, metrics
    "node.core": "node.net.node",
    "node.gossip": "node.net.gossip",
    "node.transport": "node.net.transport",
    "node.ratelimit": "node.net.ratelimit",
    "node.metrics": "node.net.metrics",
    "node.simloop": "node.net.simloop",
    "node.http": "node.net.http",
    "node.edge": "node.net.edge",
    "node.addresses": "node.net.addresses",
    # provider/: what a provider runs
    "node.provider": "node.provider.service",
    "node.work": "node.provider.work",
    "node.executor": "node.provider.executor",
    "node.sandbox": "node.provider.sandbox",
    "node.supervisor": "node.provider.supervisor",
    "node.seccomp": "node.provider.seccomp",
    "node.inventory": "node.provider.inventory",
    "node.slurm": "node.provider.slurm",
    "node.slurm_inventory": "node.provider.slurm_inventory",
    "node.prices": "node.provider.prices",
    # tenant/: what a tenant runs
    "node.tenant": "node.tenant.client",
    "node.taskclient": "node.tenant.taskclient",
    "node.sweep": "node.tenant.sweep",
    "node.gang": "node.tenant.gang",
    "node.jobs": "node.tenant.jobs",
    # operator/: what an operator looks at
    "node.status_page": "node.operator.status_page",
    # cli/: the local cluster is the developer's tool behind `mercato cluster`
    "node.cluster": "node.cli.localcluster",
    "node.ledger_cli": "node.cli.ledger",
    # the only code bound into a sandbox
    "node.trial": "mercato_trial",
}

#: modules that stay where they are (not reported as unknown)
STAY: frozenset[str] = frozenset(
    {"node", "node.daemon", "node.config", "node.home", "node.workspace"}
)


@dataclass(frozen=True)
class Split:
    """A module split along its top-level definitions into the modules of a package.

    ``rules`` claim names by regular expression (first match wins). A definition no rule
    claims goes with its users when they all sit in one part, to ``shared`` when several
    parts use it, and to ``rest`` when none does. Module code that defines nothing
    (``if __name__ == "__main__"``) goes with what it uses.
    """

    package: str
    #: part that inherits the module's history (git mv) and docstring
    history: str
    rules: tuple[tuple[str, str], ...]
    shared: str
    rest: str
    docstrings: dict[str, str]
    #: where the module goes whole when the split is not clean (cycle, global state)
    fallback: str


SPLITS: dict[str, Split] = {
    "node.store": Split(
        package="node.store",
        history="node_store",
        rules=(
            ("schema", r"StoreError|SchemaTooNewError|MigrationError|Migration|MIGRATIONS"),
            ("schema", r"SCHEMA_VERSION|MIN_SQLITE_VERSION|_?migration_\w+|_m\d+\w*"),
            ("job_store", r"JobStore|JobRow|TrialRow|_trial_row|_TRIAL_\w+|_job_row"),
            ("node_store", r"Store"),
        ),
        shared="schema",
        rest="node_store",
        docstrings={
            "schema": "The store's schema: its migrations, version and errors.\n\n"
            "To change the schema, append a Migration; never edit one that has shipped\n"
            "(see node.store.node_store for how they are applied).",
            "job_store": "The tenant's jobs and trials, kept in the node's store.",
        },
        fallback="node.store.node_store",
    ),
    "node.cli": Split(
        package="node.cli",
        history="main",
        rules=(
            ("main", r"main|build_parser"),
            ("provider", r"cmd_provider_\w+"),
            ("cluster", r"cmd_cluster_\w+"),
            ("tenant", r"cmd_\w+"),
        ),
        shared="common",
        rest="tenant",
        docstrings={
            "provider": "``mercato provider ...``: the provider operator's commands.",
            "tenant": "The tenant's commands: market, order, plan, submit and the job commands.",
            "cluster": "``mercato cluster ...``: the developer's local cluster.",
            "common": "What the commands of several users share.",
        },
        fallback="node.cli.main",
    ),
}

#: new package -> docstring of its (light) __init__.py
PACKAGES: dict[str, str] = {
    "node.net": "The network side of a node: the peer node (adverts, gossip), transports,\n"
    "the HTTP edge, rate limits, metrics, and the virtual-time loop of the simulation.",
    "node.store": "The node's SQLite store: schema and migrations, the node store, the job store.",
    "node.provider": "The provider's side: the auction service, the task service, executors,\n"
    "the sandbox, the inventory of devices.",
    "node.tenant": "The tenant's side: the auction client, the task client, sweeps, gangs, jobs.",
    "node.operator": "The operator's view of a node: the status page, its JSON API and\n"
    "console output.",
    "node.cli": "``mercato``: the one console script, one module per user (provider, tenant,\n"
    "cluster); ``main`` builds the parser.",
}

#: extra files to create when absent: path -> content
NEW_FILES: dict[str, str] = {
    "node/cli/__main__.py": '"""``python -m node.cli``: the ``mercato`` command."""\n\n'
    "import sys\n\nfrom node.cli.main import main\n\nsys.exit(main())\n",
    "mercato_trial/py.typed": "",
}

#: old test path -> new test path (mirrors the module's room)
TESTS: dict[str, str] = {
    "tests/node/test_gossip.py": "tests/node/net/test_gossip.py",
    "tests/node/test_hostile_edge.py": "tests/node/net/test_hostile_edge.py",
    "tests/node/test_hostile_protocol.py": "tests/node/net/test_hostile_protocol.py",
    "tests/node/test_ratelimit.py": "tests/node/net/test_ratelimit.py",
    "tests/node/test_simulation.py": "tests/node/net/test_simulation.py",
    "tests/node/test_store.py": "tests/node/store/test_store.py",
    "tests/node/test_inventory.py": "tests/node/provider/test_inventory.py",
    "tests/node/test_sandbox.py": "tests/node/provider/test_sandbox.py",
    "tests/node/test_hostile_work.py": "tests/node/provider/test_hostile_work.py",
    "tests/node/test_supervisor.py": "tests/node/provider/test_supervisor.py",
    "tests/node/test_sandbox_limits.py": "tests/node/provider/test_sandbox_limits.py",
    "tests/node/test_work_log.py": "tests/node/provider/test_work_log.py",
    "tests/node/test_slurm.py": "tests/node/provider/test_slurm.py",
    "tests/node/test_slurm_inventory.py": "tests/node/provider/test_slurm_inventory.py",
    "tests/node/test_tenant.py": "tests/node/tenant/test_tenant.py",
    "tests/node/test_sweep_e2e.py": "tests/node/tenant/test_sweep_e2e.py",
    "tests/node/test_training_e2e.py": "tests/node/tenant/test_training_e2e.py",
    "tests/node/test_sweep_promises.py": "tests/node/tenant/test_sweep_promises.py",
    "tests/node/test_wandb_e2e.py": "tests/node/tenant/test_wandb_e2e.py",
    "tests/node/test_task_retransmit.py": "tests/node/tenant/test_task_retransmit.py",
    "tests/node/test_status_page.py": "tests/node/operator/test_status_page.py",
    "tests/node/test_operator_cli.py": "tests/node/cli/test_operator_cli.py",
    "tests/node/test_cluster.py": "tests/node/cli/test_cluster.py",
    "tests/node/test_tenant_cli.py": "tests/node/cli/test_tenant_cli.py",
    "tests/node/test_ledger_cli.py": "tests/node/cli/test_ledger_cli.py",
    "tests/node/test_billing.py": "tests/node/tenant/test_billing.py",
    # stay in tests/node/: the composition root, config, home, whole-market e2e
    "tests/node/test_daemon.py": "tests/node/test_daemon.py",
    "tests/node/test_config.py": "tests/node/test_config.py",
    "tests/node/test_home.py": "tests/node/test_home.py",
    "tests/node/test_auction_e2e.py": "tests/node/test_auction_e2e.py",
}


@dataclass(frozen=True)
class Patch:
    """A hand-written edit: ``old`` (a regex) becomes ``new``; ``done`` says it is in.

    With ``done=None`` the patch is in when ``old`` no longer matches; ``count=0``
    replaces every match.
    """

    path: str
    old: str
    new: str
    done: str | None
    why: str
    flags: int = re.MULTILINE
    count: int = 1


PATCHES: tuple[Patch, ...] = (
    Patch(
        "node/provider/sandbox.py",
        r"def _node_package_dir\(\) -> str:\n(?:    #.*\n)*    return os\.path\.dirname\(os\.path"
        r"\.abspath\(__file__\)\)\n",
        "def _trial_package_dir() -> str:\n"
        "    # Only mercato_trial (the report helper) is bound into the sandbox, not node/.\n"
        "    return os.path.dirname(os.path.abspath(mercato_trial.__file__))\n",
        "def _trial_package_dir",
        "the sandbox binds mercato_trial/, not node/",
    ),
    Patch(
        "node/provider/sandbox.py",
        r"\b_node_package_dir\b",
        "_trial_package_dir",
        None,
        "callers of the sandbox's bound package",
        count=0,
    ),
    Patch(
        "node/provider/sandbox.py",
        r"^(?=from node\.)",
        "import mercato_trial\n",
        "import mercato_trial\n",
        "the sandbox imports mercato_trial to find it",
        re.MULTILINE | re.DOTALL,
    ),
    Patch(
        "node/provider/sandbox.py",
        r"and the ``node`` package",
        "and the ``mercato_trial`` package",
        "the ``mercato_trial`` package",
        "sandbox docstring",
    ),
    Patch(
        "tests/node/provider/test_sandbox.py",
        r"\Z",
        "\n\ndef node_installed_for_every_trial() -> bool:\n"
        '    """Whether node/ is under sys.prefix (a wheel install), which the sandbox binds."""\n'
        "    import node\n"
        "\n"
        "    return Path(node.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())\n"
        "\n"
        "\n"
        "class TestTrialHelperBinding:\n"
        "    async def test_trials_import_mercato_trial_but_not_the_node(\n"
        "        self, executor: SandboxExecutor, workspace: Path\n"
        "    ) -> None:\n"
        '        """Only the report helper is bound in: the provider\'s own code stays out."""\n'
        "        if node_installed_for_every_trial():\n"
        '            pytest.skip("node is installed under sys.prefix, which every trial sees")\n'
        "        import node.daemon\n"
        "\n"
        '        code = f"""\n'
        "        import os\n"
        '        print("daemon.py visible:", os.path.exists({node.daemon.__file__!r}))\n'
        "        from mercato_trial import report\n"
        "        report(step=1)\n"
        '        """\n'
        "        outcome = await executor.run(make_spec(workspace, code))\n"
        "        log = outcome.log_path.read_bytes()\n"
        '        assert b"daemon.py visible: False" in log, log\n'
        "        assert outcome.state is TrialState.SUCCEEDED, log\n"
        '        assert outcome.metrics == {"step": 1}\n',
        "class TestTrialHelperBinding",
        "a test that trials see mercato_trial and not node/",
        flags=0,
    ),
    Patch(
        "deploy/Dockerfile",
        r"^COPY node/ node/\n",
        "COPY node/ node/\nCOPY mercato_trial/ mercato_trial/\n",
        "COPY mercato_trial/",
        "the image builds the new package",
    ),
    Patch(
        "deploy/Dockerfile.dockerignore",
        r"^!node/\n",
        "!node/\n!mercato_trial/\n",
        "!mercato_trial/",
        "the build context holds the new package",
    ),
    Patch(
        "pyproject.toml",
        r'include = \["protocol\*", "market\*", "node\*"\]',
        'include = ["protocol*", "market*", "node*", "mercato_trial*"]',
        '"mercato_trial*"',
        "the wheel ships mercato_trial",
    ),
    Patch(
        "pyproject.toml",
        r'^node = \["py\.typed"\]\n',
        'node = ["py.typed"]\nmercato_trial = ["py.typed"]\n',
        'mercato_trial = ["py.typed"]',
        "mercato_trial is typed",
    ),
    Patch(
        "docs/executors.md",
        r"A module `node/<backend>\.py`",
        "A module `node/provider/<backend>.py`",
        "node/provider/<backend>.py",
        "where a new executor goes",
    ),
    Patch(
        "README.md",
        r"^`node/` all I/O \(daemon, transports, store, sandbox, CLI\)\. `tests/`, `bench/`, "
        r"`docs/`,\n`deploy/`, `examples/`\.\n",
        "`node/` all I/O, one room per role:\n"
        "\n"
        "| where | what |\n"
        "|---|---|\n"
        "| `node/daemon.py` | the composition root: starts and stops every service |\n"
        "| `node/config.py`, `home.py`, `workspace.py` | provider config, node home,"
        " workspace archives |\n"
        "| `node/net/` | the peer node (adverts, gossip), transports, rate limits, metrics,"
        " virtual-time loop |\n"
        "| `node/store/` | SQLite schema and migrations, node store, job store |\n"
        "| `node/provider/` | the provider's side: auction service, task service, executors,"
        " sandbox, inventory |\n"
        "| `node/tenant/` | the tenant's side: auction client, task client, sweeps, gangs,"
        " jobs |\n"
        "| `node/operator/` | the operator's view: status page, JSON API, console output |\n"
        "| `node/cli/` | the `mercato` command, one module per user: provider, tenant,"
        " cluster |\n"
        "| `mercato_trial/` | the only code bound into a trial's sandbox: `report()` |\n"
        "\n"
        "`tests/` (mirrors the tree), `bench/`, `docs/`, `deploy/`, `examples/`, `tools/`.\n",
        "one room per role",
        "README layout section",
    ),
)

#: text files (besides *.py) whose references are rewritten
TEXT_SUFFIXES = (".md", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".txt", ".sh", ".service")
TEXT_NAMES = ("Dockerfile", "Dockerfile.dockerignore")
#: never rewritten: this script (its tables name the old modules) and raw results
SKIP = ("tools/reorg.py", "bench/results/")

# --------------------------------------------------------------------------------------


class Refused(Exception):
    """The tree is not in a state the script may touch."""


@dataclass
class Report:
    """What happened, and what a person must look at."""

    done: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)

    def did(self, line: str) -> None:
        self.done.append(line)
        print(f"  {line}")

    def warn(self, line: str) -> None:
        self.todo.append(line)
        print(f"  ! {line}")


def mod_path(module: str) -> Path:
    """node.net.node -> node/net/node.py; a package's file is its __init__.py."""
    base = Path(*module.split("."))
    if base.is_dir() or module in PACKAGES or module == "mercato_trial":
        return base / "__init__.py"
    return base.with_suffix(".py")


def old_path(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def git_files() -> list[str]:
    return [f for f in git("ls-files", "-z").split("\0") if f and Path(f).is_file()]


# --- splitting ------------------------------------------------------------------------


@dataclass
class Stmt:
    node: ast.stmt
    text: str  # with its leading comments and blank lines
    defines: set[str]
    uses: set[str]
    part: str | None = None


def _bound_names(node: ast.stmt) -> set[str]:
    """Names a top-level statement binds in the module (not inside functions/classes)."""
    out: set[str] = set()
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            out.add(sub.id)
        elif isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(sub.name)
    return out


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _globals_written(node: ast.AST) -> set[str]:
    return {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}


def _is_header(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return True
    # if TYPE_CHECKING: (imports only)
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        and not node.orelse
        and all(isinstance(s, ast.Import | ast.ImportFrom) for s in node.body)
    )


def _filtered_import(node: ast.Import | ast.ImportFrom, used: set[str]) -> str | None:
    names = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
    if not names:
        return None
    if isinstance(node, ast.Import):
        return ast.unparse(ast.Import(names=names))
    return ast.unparse(ast.ImportFrom(module=node.module, names=names, level=node.level))


def plan_split(source: str, split: Split) -> tuple[dict[str, str], dict[str, str], list[str]] | str:
    """The parts' texts, the symbol -> part map and notes, or why the split is not clean."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    body = list(tree.body)
    docstring = None
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstring = body.pop(0)
    headers: list[ast.Import | ast.ImportFrom | ast.If] = []
    stmts: list[Stmt] = []
    prev_end = docstring.end_lineno if docstring and docstring.end_lineno else 0
    for node in body:
        end = node.end_lineno or node.lineno
        if _is_header(node):
            headers.append(node)  # type: ignore[arg-type]
            prev_end = end
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            prev_end = end
            continue
        text = "".join(lines[prev_end:end])
        prev_end = end
        stmts.append(Stmt(node, text, _bound_names(node), _used_names(node)))
    trailer = "".join(lines[prev_end:])
    if trailer.strip():
        return "text after the last statement"

    owner: dict[str, Stmt] = {}
    for s in stmts:
        for name in s.defines:
            if name in owner and owner[name] is not s:
                return f"{name} is bound by two top-level statements"
            owner[name] = s
    # rules first
    for s in stmts:
        for part, pattern in split.rules:
            if s.defines and all(re.fullmatch(pattern, n) for n in s.defines):
                s.part = part
                break

    def users(s: Stmt) -> list[Stmt]:
        return [u for u in stmts if u is not s and s.defines & u.uses]

    def deps(s: Stmt) -> list[Stmt]:
        return [owner[n] for n in s.uses if n in owner and owner[n] is not s]

    for _ in range(len(stmts) + 1):
        changed = False
        for s in stmts:
            if s.part is not None:
                continue
            if not s.defines:  # module code: goes with what it uses
                parts = {d.part for d in deps(s)}
                if None not in parts:
                    s.part = parts.pop() if len(parts) == 1 else split.shared
                    changed = True
                continue
            us = users(s)
            parts = {u.part for u in us}
            if not us:
                s.part, changed = split.rest, True
            elif None not in parts:
                s.part, changed = (parts.pop() if len(parts) == 1 else split.shared), True
        if not changed:
            # break a stalemate (mutual helpers): the first undecided goes to shared
            undecided = [s for s in stmts if s.part is None]
            if not undecided:
                break
            undecided[0].part = split.shared
    sym_part: dict[str, str] = {}
    for name, s in owner.items():
        if s.part is not None:
            sym_part[name] = s.part

    # globals rebound from another part would be a different variable after the split
    for s in stmts:
        for name in _globals_written(s.node):
            if name in sym_part and sym_part[name] != s.part:
                return f"{name} is rebound with `global` from another part"

    part_names = sorted({p for p in (s.part for s in stmts) if p is not None})
    graph: dict[str, set[str]] = {p: set() for p in part_names}
    needs: dict[str, dict[str, set[str]]] = {p: {} for p in part_names}
    for s in stmts:
        assert s.part is not None
        for name in s.uses:
            other = sym_part.get(name)
            if other and other != s.part:
                graph[s.part].add(other)
                needs[s.part].setdefault(other, set()).add(name)
    cycle = _find_cycle(graph)
    if cycle:
        return "the parts would import each other: " + " -> ".join(cycle)

    texts: dict[str, str] = {}
    original_doc = ast.get_docstring(tree, clean=False) if docstring else None
    for part in part_names:
        own = [s for s in stmts if s.part == part]
        used: set[str] = set().union(*(s.uses for s in own))
        guarded = {
            id(h): [i for i in (_filtered_import(i, used) for i in h.body) if i]  # type: ignore[arg-type]
            for h in headers
            if isinstance(h, ast.If)
        }
        if any(guarded.values()):
            used.add("TYPE_CHECKING")
        out: list[str] = []
        doc = original_doc if part == split.history else split.docstrings.get(part)
        if doc is None:
            doc = f"Part of {split.package} ({part})."
        doc = doc.rstrip()
        out.append(f'"""{doc}"""\n\n' if "\n" not in doc else f'"""{doc}\n"""\n\n')
        out.append("from __future__ import annotations\n\n")
        for h in headers:
            if isinstance(h, ast.If):
                kept = guarded[id(h)]
                if kept:
                    out.append("if TYPE_CHECKING:\n" + "".join(f"    {i}\n" for i in kept))
            else:
                if isinstance(h, ast.ImportFrom) and h.module == "__future__":
                    continue
                line = _filtered_import(h, used)
                if line:
                    out.append(line + "\n")
        for other, names in sorted(needs[part].items()):
            out.append(f"from {split.package}.{other} import {', '.join(sorted(names))}\n")
        body_text = "".join(s.text for s in own)
        out.append("\n\n" + body_text.lstrip("\n"))
        texts[part] = "".join(out)
    notes = [
        f"line {s.node.lineno}: module code (defines nothing) went to {split.package}.{s.part}"
        for s in stmts
        if not s.defines and not _is_main_guard(s.node)
    ]
    return texts, sym_part, notes


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# --- the plan -------------------------------------------------------------------------


@dataclass
class Plan:
    """What this run does: only modules whose old file still exists are active."""

    moves: dict[str, str] = field(default_factory=dict)  # old module -> new module
    splits: dict[str, tuple[Split, dict[str, str], dict[str, str]]] = field(
        default_factory=dict
    )  # old module -> (split, part texts, symbol -> new module)
    tests: dict[str, str] = field(default_factory=dict)

    def active(self) -> bool:
        return bool(self.moves or self.splits or self.tests)


def make_plan(report: Report) -> Plan:
    plan = Plan()
    for old, new in MODULES.items():
        if old_path(old).is_file() and not mod_path(new).exists():
            plan.moves[old] = new
    for old, split in SPLITS.items():
        path = old_path(old)
        if not path.is_file():
            continue
        result = plan_split(path.read_text(), split)
        if isinstance(result, str):
            report.warn(f"{path}: not split ({result}); moved whole to {split.fallback}")
            plan.moves[old] = split.fallback
            continue
        texts, sym_part, notes = result
        for note in notes:
            report.warn(f"{path}: {note}; check it runs where it should")
        symbols = {name: f"{split.package}.{part}" for name, part in sym_part.items()}
        plan.splits[old] = (split, texts, symbols)
    for old, new in TESTS.items():
        if old != new and Path(old).is_file() and not Path(new).exists():
            plan.tests[old] = new
    return plan


# --- moving ---------------------------------------------------------------------------


_CREATED: set[Path] = set()


def ensure_package(module: str, report: Report, dry: bool) -> None:
    """Create the package directories of ``module`` with their light __init__.py."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        init = Path(*parts[:i]) / "__init__.py"
        if init.exists() or pkg == "node" or init in _CREATED:
            continue
        _CREATED.add(init)
        doc = PACKAGES.get(pkg)
        if doc is None:
            report.warn(f"{pkg}: new package with no docstring in PACKAGES")
            doc = f"The {parts[i - 1]} part of {'.'.join(parts[: i - 1])}."
        report.did(f"create {init}")
        if not dry:
            init.parent.mkdir(parents=True, exist_ok=True)
            body = f'"""{doc}"""\n' if "\n" not in doc else f'"""{doc}\n"""\n'
            init.write_text(body)
            git("add", str(init))


def git_mv(src: Path, dst: Path, report: Report, dry: bool) -> None:
    report.did(f"git mv {src} {dst}")
    if not dry:
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(src), str(dst))


def do_moves(plan: Plan, report: Report, dry: bool, written: set[Path]) -> None:
    # Packages first: node/tenant.py and node/tenant/ may coexist only briefly.
    for old, new in sorted(plan.moves.items()):
        dst = mod_path(new)
        if new == "mercato_trial":
            dst = Path("mercato_trial/__init__.py")
        if "." in new:
            ensure_package(new, report, dry)
        git_mv(old_path(old), dst, report, dry)
        written.add(dst)
    for old, (split, texts, _) in sorted(plan.splits.items()):
        pkg_dir = Path(*split.package.split("."))
        ensure_package(f"{split.package}.{split.history}", report, dry)
        git_mv(old_path(old), pkg_dir / f"{split.history}.py", report, dry)
        for part, text in sorted(texts.items()):
            dst = pkg_dir / f"{part}.py"
            report.did(f"write {dst} (split from {old_path(old)})")
            if not dry:
                dst.write_text(text)
                git("add", str(dst))
            written.add(dst)
    for path, text in NEW_FILES.items():
        p = Path(path)
        if not p.exists() and (p.parent.exists() or dry):
            report.did(f"create {p}")
            if not dry:
                p.write_text(text)
                git("add", str(p))
            written.add(p)


_FILE_DEPTH = re.compile(
    r"Path\(__file__\)(?P<resolve>\.resolve\(\))?(?:\.parent(?!s)|\.parents\[(?P<n>\d+)\])"
    r"(?P<after>\s*/)?"
)


def _deepen(text: str, delta: int) -> str:
    def sub(m: re.Match[str]) -> str:
        level = int(m["n"]) if m["n"] is not None else 0
        if level == 0 and not m["after"]:
            return m[0]  # the file's own directory (sys.path for a sibling): stays
        level += delta
        tail = ".parent" if level == 0 else f".parents[{level}]"
        return f"Path(__file__){m['resolve'] or ''}{tail}{m['after'] or ''}"

    return _FILE_DEPTH.sub(sub, text)


def move_tests(plan: Plan, report: Report, dry: bool, written: set[Path]) -> None:
    for old, new in sorted(plan.tests.items()):
        src, dst = Path(old), Path(new)
        git_mv(src, dst, report, dry)
        delta = len(dst.parts) - len(src.parts)
        if dry:
            continue
        text = dst.read_text()
        if "__file__" in text and delta:
            fixed = _deepen(text, delta)
            dst.write_text(fixed)
            rest = len(re.findall(r"(?<![\w.])__file__", _FILE_DEPTH.sub("", fixed)))
            rest += len(re.findall(r"Path\(__file__\)\.parent(?!s)(?!\s*/)", fixed))
            if rest:
                report.warn(f"{dst}: {rest} use(s) of __file__ left as they were; check them")
        written.add(dst)
    if not dry:
        sibling_imports(report)


def sibling_imports(report: Report) -> None:
    """A test that imports another test module must still sit next to it."""
    for path in sorted(Path("tests").rglob("test_*.py")):
        text = path.read_text()
        for m in re.finditer(r"^\s*(?:from (test_\w+) import|import (test_\w+))", text, re.M):
            name = m[1] or m[2]
            if not (path.parent / f"{name}.py").exists():
                report.warn(f"{path}: imports {name}, which is not next to it any more")


def unknown_files(report: Report) -> None:
    known = set(MODULES) | set(SPLITS) | STAY
    for path in sorted(Path("node").glob("*.py")):
        module = "node." + path.stem if path.stem != "__init__" else "node"
        if module not in known:
            report.warn(f"{path}: not in MODULES, left in place (add a line to place it)")
    for path in sorted(Path("tests/node").glob("test_*.py")):
        if str(path) not in TESTS:
            report.warn(f"{path}: not in TESTS, left in place (add a line to place it)")


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    """A replacement for re.sub that is taken as is (no backslash escapes)."""
    return lambda _: text


def apply_patches(report: Report, dry: bool, written: set[Path]) -> None:
    for patch in PATCHES:
        path = Path(patch.path)
        if not path.exists():
            if not dry:
                report.warn(f"{path}: missing, patch not applied ({patch.why})")
            continue
        text = path.read_text()
        if patch.done is not None and patch.done in text:
            continue
        new, count = re.subn(
            patch.old, _literal(patch.new), text, count=patch.count, flags=patch.flags
        )
        if not count and patch.done is None:
            continue
        if not count:
            report.warn(f"{path}: anchor not found, do by hand: {patch.why}")
            continue
        report.did(f"patch {path}: {patch.why}")
        if not dry:
            path.write_text(new)
        written.add(path)


# --- rewriting references -------------------------------------------------------------


class Rewriter:
    """Old module names -> new, in imports (AST), strings, comments and docs (text)."""

    def __init__(self, plan: Plan) -> None:
        self.moves = dict(plan.moves)
        self.symbols: dict[str, dict[str, str]] = {
            old: symbols for old, (_, _, symbols) in plan.splits.items()
        }
        #: the split's new modules: `node.store.schema` is already a new name
        self.parts: dict[str, set[str]] = {
            old: set(texts) for old, (_, texts, _) in plan.splits.items()
        }
        self.tests = dict(plan.tests)
        names = sorted([*self.moves, *self.symbols], key=len, reverse=True)
        self.dotted = (
            re.compile(
                r"(?<![\w.])(?P<mod>"
                + "|".join(map(re.escape, names))
                + r")(?:(?P<sep>[.:])(?P<sym>\w+))?(?!\w)"
            )
            if names
            else None
        )
        paths: dict[str, str] = {}
        for old, new in self.moves.items():
            paths[str(old_path(old))] = str(mod_path(new))
        for old in self.symbols:
            paths[str(old_path(old))] = str(old_path(old).with_suffix("")) + "/"
        paths.update(self.tests)
        self.paths = paths
        self.path_re = (
            re.compile(
                r"(?<![\w/.-])(?P<p>"
                + "|".join(map(re.escape, sorted(paths, key=len, reverse=True)))
                + r")(?![\w/])"
            )
            if paths
            else None
        )
        self.problems: list[str] = []
        #: modules this file imports as ``import node.x`` (its code then says node.x.y)
        self._bare: dict[str, str] = {}

    def active(self) -> bool:
        return bool(self.dotted or self.path_re)

    # text ---------------------------------------------------------------------------

    def text(self, s: str, where: str) -> str:
        if self.dotted:
            s = self.dotted.sub(lambda m: self._dotted(m, where), s)
        if self.path_re:
            s = self.path_re.sub(lambda m: self.paths[m["p"]], s)
        return s

    def _dotted(self, m: re.Match[str], where: str) -> str:
        mod, sep, sym = m["mod"], m["sep"], m["sym"]
        if mod in self.moves:
            return self.moves[mod] + (f"{sep}{sym}" if sep else "")
        symbols = self.symbols[mod]
        if sep and sym in symbols:
            return f"{symbols[sym]}{sep}{sym}"
        if sep == "." and sym in self.parts[mod]:
            return m[0]
        if sep and sym not in ("py",):
            self.problems.append(f"{where}: '{m[0]}' names no definition of split {mod}")
        return m[0]

    # python -------------------------------------------------------------------------

    def python(self, source: str, where: str) -> str:
        self._bare = {}
        source = self._imports(source, where)
        return self._tokens(source, where)

    def _imports(self, source: str, where: str) -> str:
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            self.problems.append(f"{where}: not parsed ({e}); imports not rewritten")
            return source
        lines = source.splitlines(keepends=True)
        edits: list[tuple[int, int, str]] = []
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            new = self._import(node, where)
            if new is None:
                continue
            first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
            head, tail = lines[first][: node.col_offset], lines[last][node.end_col_offset or 0 :]
            if head.strip() or (tail.strip() and not tail.strip().startswith("#")):
                self.problems.append(f"{where}:{node.lineno}: import shares its line; by hand")
                continue
            indent = head
            text = "".join(indent + line + "\n" for line in new)
            if tail.strip():
                text = text[:-1] + "  " + tail.strip() + "\n"
            edits.append((first, last, text))
        for first, last, text in sorted(edits, reverse=True):
            lines[first : last + 1] = [text]
        return "".join(lines)

    def _import(self, node: ast.Import | ast.ImportFrom, where: str) -> list[str] | None:
        here = f"{where}:{node.lineno}"
        if isinstance(node, ast.Import):
            out, changed = [], False
            for a in node.names:
                if a.name in self.moves or a.name in self.symbols:
                    if a.name in self.symbols:
                        self.problems.append(f"{here}: `import {a.name}`: rewrite its uses by hand")
                        out.append(ast.Import(names=[a]))
                        continue
                    if a.asname is None:  # the code says node.x.y: rewritten with the tokens
                        self._bare[a.name] = self.moves[a.name]
                    out.append(ast.Import(names=[ast.alias(self.moves[a.name], a.asname)]))
                    changed = True
                else:
                    out.append(ast.Import(names=[a]))
            return [ast.unparse(i) for i in out] if changed else None
        if node.level:
            if where.startswith("node/"):
                self.problems.append(f"{here}: relative import; check it by hand")
            return None
        mod = node.module or ""
        if mod in self.moves:
            return [ast.unparse(ast.ImportFrom(self.moves[mod], node.names, 0))]
        if mod in self.symbols:
            groups: dict[str, list[ast.alias]] = {}
            for a in node.names:
                target = self.symbols[mod].get(a.name)
                if target is None:
                    self.problems.append(f"{here}: {a.name} is not defined in split {mod}")
                    target = mod
                groups.setdefault(target, []).append(a)
            return [ast.unparse(ast.ImportFrom(t, names, 0)) for t, names in sorted(groups.items())]
        if mod == "node":
            stay: list[ast.alias] = []
            out_lines: list[str] = []
            changed = False
            for a in node.names:
                full = f"node.{a.name}"
                if full in self.moves:
                    new = self.moves[full]
                    parent, _, base = new.rpartition(".")
                    bound = a.asname or a.name
                    alias = ast.alias(base, None if base == bound else bound)
                    if parent:
                        out_lines.append(ast.unparse(ast.ImportFrom(parent, [alias], 0)))
                    else:
                        out_lines.append(ast.unparse(ast.Import(names=[alias])))
                    changed = True
                else:
                    if full in self.symbols:
                        self.problems.append(
                            f"{here}: `from node import {a.name}` of a split module"
                        )
                    stay.append(a)
            if not changed:
                return None
            if stay:
                out_lines.insert(0, ast.unparse(ast.ImportFrom("node", stay, 0)))
            return out_lines
        return None

    def _tokens(self, source: str, where: str) -> str:
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (tokenize.TokenError, SyntaxError) as e:
            self.problems.append(f"{where}: not tokenized ({e}); strings not rewritten")
            return source
        lines = source.splitlines(keepends=True)
        edits: list[tuple[tuple[int, int], tuple[int, int], str]] = []
        edits += self._dotted_code(tokens)
        for tok in tokens:
            if tok.type == tokenize.COMMENT or tok.type == tokenize.STRING:
                new = self._string(tok.string, where) if tok.type == tokenize.STRING else None
                if tok.type == tokenize.COMMENT:
                    new = self.text(tok.string, where)
                if new is not None and new != tok.string:
                    edits.append((tok.start, tok.end, new))
        for (sr, sc), (er, ec), new in sorted(edits, reverse=True):
            before = lines[sr - 1][:sc]
            after = lines[er - 1][ec:]
            lines[sr - 1 : er] = [before + new + after]
        return "".join(lines)

    def _dotted_code(
        self, tokens: list[tokenize.TokenInfo]
    ) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
        """``node.x`` in code, in a file that did ``import node.x``: the new dotted name."""
        if not self._bare:
            return []
        code = [t for t in tokens if t.type in (tokenize.NAME, tokenize.OP)]
        edits = []
        for i, tok in enumerate(code):
            if tok.string != "node" or (i and code[i - 1].string == "."):
                continue
            j, parts = i, ["node"]
            while (
                j + 2 < len(code)
                and code[j + 1].string == "."
                and code[j + 2].type == tokenize.NAME
            ):
                parts.append(code[j + 2].string)
                j += 2
                name = ".".join(parts)
                if name in self._bare:
                    if code[i - 1].string != "import":
                        edits.append((tok.start, code[j].end, self._bare[name]))
                    break
        return edits

    def _string(self, s: str, where: str) -> str:
        prefix = re.match(r"[A-Za-z]*", s)
        assert prefix is not None
        if "f" not in prefix[0].lower():
            return self.text(s, where)
        # f-string: leave the {expressions} alone, rewrite the literal text between them
        out, i, depth, chunk = [], 0, 0, []
        while i < len(s):
            c = s[i]
            if depth == 0 and s.startswith("{{", i):
                chunk.append("{{")
                i += 2
                continue
            if c == "{":
                if depth == 0:
                    out.append(self.text("".join(chunk), where))
                    chunk = []
                depth += 1
            elif c == "}" and depth:
                depth -= 1
                if depth == 0:
                    out.append("".join(chunk) + "}")
                    chunk = []
                    i += 1
                    continue
            chunk.append(c)
            i += 1
        out.append(self.text("".join(chunk), where) if depth == 0 else "".join(chunk))
        return "".join(out)


def rewrite_all(plan: Plan, report: Report, dry: bool, written: set[Path]) -> None:
    rw = Rewriter(plan)
    if not rw.active():
        return
    for name in sorted({*git_files(), *(str(p) for p in written if p.exists())}):
        if name.startswith(SKIP) or name.endswith("/__init__.py.orig"):
            continue
        path = Path(name)
        if path.suffix == ".py":
            fix: Callable[[str, str], str] = rw.python
        elif path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            fix = rw.text
        else:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = fix(text, name)
        if new != text:
            written.add(path)
            if not dry:
                path.write_text(new)
    for line in dict.fromkeys(rw.problems):
        report.warn(line)


def split_cross_use(plan: Plan, report: Report) -> None:
    """A mock target names where a symbol is defined; other parts bound it at import."""
    for old, (split, texts, symbols) in plan.splits.items():
        for part, text in texts.items():
            for name, target in symbols.items():
                if target != f"{split.package}.{part}" and re.search(
                    rf"^from {re.escape(target)} import .*\b{name}\b", text, re.M
                ):
                    pattern = re.compile(rf"['\"]{re.escape(old)}\.{name}\b")
                    for f in git_files():
                        if (
                            f.endswith(".py")
                            and not f.startswith(SKIP)
                            and pattern.search(Path(f).read_text())
                        ):
                            report.warn(
                                f"{f}: patches {old}.{name}, which {split.package}.{part}"
                                " imported by name: patch it there too"
                            )


def tidy(written: Iterable[Path], report: Report) -> None:
    """Sort imports and format the Python files this run wrote."""
    ruff = shutil.which("ruff", path=".venv/bin") or shutil.which("ruff")
    files = sorted(str(p) for p in written if p.suffix == ".py" and p.exists())
    if not files:
        return
    if ruff is None:
        report.warn("ruff not found: run `ruff check --fix --select I` and `ruff format` yourself")
        return
    subprocess.run([ruff, "check", "--fix", "--select", "I", "--quiet", *files], check=False)
    subprocess.run([ruff, "format", "--quiet", *files], check=False)


def leftovers(report: Report) -> None:
    """References to an old name that survive the rewrite (bare words, odd spellings)."""
    old = [m for m in [*MODULES, *SPLITS] if not old_path(m).exists()]
    gone = [m for m in old if m.rsplit(".", 1)[1] not in ("tenant", "provider", "store", "cli")]
    if not gone:
        return
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, gone)) + r")(?![\w])")
    for name in git_files():
        if name.startswith(SKIP):
            continue
        path = Path(name)
        if path.suffix != ".py" and path.suffix not in TEXT_SUFFIXES:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in pattern.finditer(line):
                # `node.metrics` etc. as an attribute of a variable called node is code
                if path.suffix == ".py" and not re.search(r"[\"'#]", line[: m.start()]):
                    continue
                report.warn(f"{name}:{n}: still says {m[1]}: {line.strip()[:80]}")


def check_clean() -> None:
    if not Path("pyproject.toml").is_file() or not Path("node").is_dir():
        raise Refused("run me from the repository root (pyproject.toml and node/ not found)")
    status = git("status", "--porcelain", "--untracked-files=normal")
    if status.strip():
        raise Refused("the tree is dirty; commit or stash first:\n" + status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would move, touch nothing")
    parser.add_argument(
        "--allow-dirty", action="store_true", help=argparse.SUPPRESS
    )  # for testing the script itself
    args = parser.parse_args(argv)
    try:
        if not args.allow_dirty:
            check_clean()
    except Refused as e:
        print(f"reorg: {e}", file=sys.stderr)
        return 2
    report = Report()
    written: set[Path] = set()
    print("plan:")
    plan = make_plan(report)
    print("moves:")
    do_moves(plan, report, args.dry_run, written)
    move_tests(plan, report, args.dry_run, written)
    print("patches:")
    apply_patches(report, args.dry_run, written)
    print("references:")
    rewrite_all(plan, report, args.dry_run, written)
    split_cross_use(plan, report)
    if not args.dry_run:
        tidy(written, report)
    print("unknown files and leftovers:")
    unknown_files(report)
    if not args.dry_run:
        leftovers(report)
    changed = sorted(str(p) for p in written)
    print(f"\n{len(report.done)} steps, {len(changed)} files written, {len(report.todo)} to check.")
    if report.todo:
        print("to check by hand:")
        for line in report.todo:
            print(f"  - {line}")
    if plan.active() and not args.dry_run:
        print("\nnext: pip install -e . (new package mercato_trial), review `git status`, commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
