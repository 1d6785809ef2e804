"""An asyncio event loop on virtual time, for simulating many nodes in one process.

``loop.time()`` returns a virtual clock. When no callback is ready, the loop does not
sleep until its next timer: it moves the clock straight to that timer and runs it. So
``asyncio.sleep(60)`` returns at once in wall time, exactly 60 virtual seconds later,
and the order in which timers fire is the order they would fire in real time (the idea
of the ``looptime`` library, without patching a running loop).

Real I/O still works (the selector is polled without blocking before each jump), but a
coroutine waiting on real I/O or on another thread does not hold virtual time back: use
this loop only for code whose waits are timers and in-process events, as the in-memory
transport's are. With nothing scheduled at all, the loop blocks on the selector as a
normal loop would (that is how ``asyncio.Runner`` waits for its executor at shutdown).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _VirtualSelector:
    """Wraps a real selector: a wait with a timeout advances virtual time instead."""

    def __init__(self, loop: VirtualTimeLoop, selector: selectors.BaseSelector) -> None:
        self._loop = loop
        self._selector = selector

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._selector.select(None)
        events = self._selector.select(0)
        if not events and timeout > 0:
            self._loop.advance(timeout)
        return events

    def __getattr__(self, name: str) -> Any:
        # register, unregister, modify, get_key, get_map, close: the real selector's.
        return getattr(self._selector, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual and jumps to the next timer."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = float(start)
        selector = _VirtualSelector(self, selectors.DefaultSelector())
        super().__init__(selector)  # type: ignore[arg-type]

    def time(self) -> float:
        """Virtual seconds (starts at ``start``; only timers move it)."""
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the loop does this itself when it would sleep)."""
        if seconds < 0:
            raise ValueError("virtual time only moves forward")
        self._virtual_now += seconds


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run the coroutine ``main`` to completion on a fresh VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)
