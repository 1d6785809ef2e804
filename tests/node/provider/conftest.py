"""Fixtures shared by the provider's sandbox tests."""

from __future__ import annotations

import pytest

from node.provider.sandbox import probe_bwrap


@pytest.fixture
def bwrap() -> None:
    """Skip, saying why, where bubblewrap cannot run on this machine."""
    probe = probe_bwrap()
    if not probe.ok:
        pytest.skip(f"bubblewrap cannot run on this machine: {probe.reason}")
