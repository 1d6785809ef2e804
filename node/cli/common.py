"""What the commands of several users share."""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_ERROR = 1


# --- options that mean the same in every command ------------------------------------


def add_peer(sp: argparse.ArgumentParser) -> None:
    """``--peer URL``: the node a tenant's command talks to."""
    sp.add_argument("--peer", help="a node's URL (default: $MERCATO_PEER or local cluster)")


def add_json(
    sp: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup,
    text: str = "machine-readable output",
) -> None:
    """``--json``: print JSON instead of tables (on a parser or a mutually exclusive group)."""
    sp.add_argument("--json", action="store_true", help=text)


def add_job(sp: argparse.ArgumentParser) -> None:
    """The JOB argument of the commands that look at one job of the tenant's store."""
    sp.add_argument("job", help="job id (or a unique prefix)")


def add_store_home(sp: argparse.ArgumentParser) -> None:
    """``--home``: the node or tenant home whose store a command reads."""
    sp.add_argument("--home", help="a node home (default: $MERCATO_HOME/tenant)")
