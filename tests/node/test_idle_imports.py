"""An idle provider daemon loads only what serving needs.

Every module a daemon imports stays resident for its lifetime: numpy (which sqlite-utils
pulls in whenever optuna has installed it, unless the store hides it), optuna, rich and
torch cost an operator tens of megabytes of memory per idle daemon for nothing it does
while waiting for work.
The check runs in a fresh interpreter, as `mercato provider run` starts one.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Imported by tenants (sweep search, tables) or by trials, never by an idle provider.
HEAVY = ("numpy", "optuna", "rich", "torch", "pandas", "sklearn")

_PROBE = """
import json, sys
import node.cli.main, node.cli.provider, node.daemon
from node.store.node_store import Store
Store(":memory:").close()  # the store is opened at start: sqlite-utils is imported then
from node.cli.provider import cmd_provider_run  # noqa: F401
print(json.dumps(sorted(set(m.split(".")[0] for m in sys.modules) & {heavy!r})))
"""


class TestIdleProviderImports:
    def test_the_provider_daemon_does_not_import_heavy_libraries(self) -> None:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE.format(heavy=set(HEAVY))],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        assert loaded == [], f"an idle provider daemon imports {loaded}"
