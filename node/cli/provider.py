"""``mercato provider ...``: the provider operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_OK

# --- provider -------------------------------------------------------------------


def cmd_provider_run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_config
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
