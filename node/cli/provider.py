"""``mercato provider ...``: the provider operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_OK

# --- provider -------------------------------------------------------------------


@contextlib.contextmanager
def _python_frozenlist() -> Iterator[None]:
    """While the daemon's modules import, frozenlist picks its pure-Python FrozenList.

    aiohttp keeps its signal lists (on_startup, on_cleanup, tracing hooks) in
    frozenlist's FrozenList, filled once at start; its compiled version is a C++
    extension whose loading maps the C++ runtime (libstdc++), ~1 MB of an idle daemon's
    resident set for lists nobody touches while it serves (docs/benchmarks.md, "Idle
    provider RSS"). ``FROZENLIST_NO_EXTENSIONS`` is frozenlist's own switch between the
    two (both are its public ``FrozenList``); it is read once, when frozenlist is first
    imported, so it is set only around that and taken out again: trials and supervisors
    this daemon starts never see it. tests/node/test_idle_imports.py fails if the
    compiled module is loaded anyway.
    """
    name = "FROZENLIST_NO_EXTENSIONS"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def cmd_provider_run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_config

    with _python_frozenlist():
        from node.daemon import run_daemon, setup_logging
    from node.home import NodeHome, resolve_home

    config = load_config(Path(args.config))
    path = config.node.home or resolve_home()
    try:
        home = NodeHome(path)
    except OSError as e:  # a typo in node.home must read as one, not as a traceback
        where = f"{args.config}: node.home" if config.node.home else "MERCATO_HOME"
        raise ConfigError(f"{where}: cannot use {path} as the node's home: {e.strerror}") from e
    setup_logging(home.path, verbose=args.verbose)
    asyncio.run(run_daemon(config, home))
    return EXIT_OK


def _operator_target(args: argparse.Namespace) -> tuple[Path, Any]:
    """The node home (and config, if given) that `provider status|prices` look at."""
    from node.config import load_config
    from node.home import resolve_home

    if args.config:
        config = load_config(Path(args.config))
        return Path(config.node.home or resolve_home()), config
    return (Path(args.home) if args.home else resolve_home()), None


def cmd_provider_status(args: argparse.Namespace) -> int:
    from node.operator import client, console

    home, config = _operator_target(args)
    doc = client.read_status(home, config)
    if args.json:
        print(json.dumps(doc.json_body(), indent=2))
    else:
        from rich.console import Console

        console.print_status(doc, Console())
    return EXIT_OK


def cmd_provider_prices(args: argparse.Namespace) -> int:
    from node.operator import client, console

    home, config = _operator_target(args)
    if args.set or args.reset:
        rows = client.send_price_update(home, dict(args.set or []), reset=args.reset).prices
    else:
        rows = client.read_status(home, config).prices
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
    else:
        from rich.console import Console

        console.print_prices(rows, Console())
    return EXIT_OK
