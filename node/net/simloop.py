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
import heapq
import selectors
from asyncio import events
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: asyncio's own thresholds (base_events): purge cancelled timers from the heap once
#: they are more than half of at least this many.
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5
#: Loop iterations with callbacks ready (no clock jump) between two polls of the real
#: selector; it is always polled before virtual time jumps and before blocking.
POLL_EVERY = 64
_MAX_SELECT_TIMEOUT = 24 * 3600.0  # asyncio's MAXIMUM_SELECT_TIMEOUT


class _VirtualSelector:
    """Wraps a real selector: a wait with a timeout advances virtual time instead."""

    def __init__(self, loop: VirtualTimeLoop, selector: selectors.BaseSelector) -> None:
        self._loop = loop
        self._selector = selector

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._selector.select(None)
        if len(self._selector.get_map()) > 1:
            events = self._selector.select(0)
        else:
            # Only the loop's self-pipe is registered (no real I/O: a simulation on the
            # in-memory transport): the one thing a poll could find is another thread's
            # wake-up, whose callback is already in the ready queue (call_soon_threadsafe
            # appends it before writing the pipe). Looking there spares a system call per
            # jump of the clock, millions in a run.
            if self._loop._ready:  # type: ignore[attr-defined]
                return []
            events = []
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
        self._skipped_polls = 0
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

    # --- the timer heap -------------------------------------------------------------
    #
    # asyncio keeps its timers in a heap of TimerHandle objects, which heapq orders by
    # calling TimerHandle.__lt__, a Python method: a simulation of thousands of nodes
    # holds tens of thousands of timers, and those calls cost a few percent of a run.
    # Here the heap holds (when, handle) pairs instead. A tuple compares its first
    # items in C, and only when two timers are due at exactly the same instant does it
    # fall back to the handles (``==`` then ``<``), which is then False either way, as
    # TimerHandle.__lt__ is. So every comparison heapq makes has the same answer as with
    # the handles themselves, the heap has the same shape after every operation, and
    # timers fire in exactly the order asyncio's own loop fires them (ties included),
    # which keeps a simulation's trace byte for byte the same.

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: Any = None,
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self._debug:  # type: ignore[attr-defined]
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_at")  # type: ignore[attr-defined]
        timer = events.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:  # type: ignore[attr-defined]
            del timer._source_traceback[-1]  # type: ignore[attr-defined]
        heapq.heappush(self._scheduled, (timer._when, timer))  # type: ignore[attr-defined]
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def _run_once(self) -> None:
        """One iteration of the loop: asyncio's ``BaseEventLoop._run_once`` on the heap of
        (when, handle) pairs, polling the real selector at least every ``POLL_EVERY``
        iterations and before every jump of the clock (each poll is a system call, and
        a run of the simulator makes millions of iterations with callbacks ready)."""
        scheduled: list[tuple[float, Any]] = self._scheduled  # type: ignore[has-type]
        sched_count = len(scheduled)
        if (
            sched_count > _MIN_SCHEDULED_TIMER_HANDLES
            and self._timer_cancelled_count / sched_count  # type: ignore[has-type]
            > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
        ):
            # Remove the cancelled timers when they are too many (as asyncio does).
            kept = []
            for item in scheduled:
                if item[1]._cancelled:
                    item[1]._scheduled = False
                else:
                    kept.append(item)
            heapq.heapify(kept)
            self._scheduled = scheduled = kept
            self._timer_cancelled_count = 0
        else:
            # Remove the cancelled timers at the head of the heap.
            while scheduled and scheduled[0][1]._cancelled:
                self._timer_cancelled_count -= 1
                handle = heapq.heappop(scheduled)[1]
                handle._scheduled = False

        ready = self._ready  # type: ignore[attr-defined]
        timeout: float | None = None
        if ready or self._stopping:  # type: ignore[attr-defined]
            timeout = 0
        elif scheduled:
            timeout = min(max(0.0, scheduled[0][0] - self._virtual_now), _MAX_SELECT_TIMEOUT)

        if timeout == 0 and self._skipped_polls < POLL_EVERY:
            self._skipped_polls += 1
        else:
            self._skipped_polls = 0
            event_list = self._selector.select(timeout)  # type: ignore[attr-defined]
            if event_list:
                self._process_events(event_list)  # type: ignore[attr-defined]
            event_list = None  # break cycles when an exception occurs

        # Timers that are due.
        end_time = self._virtual_now + self._clock_resolution  # type: ignore[attr-defined]
        while scheduled:
            if scheduled[0][0] >= end_time:
                break
            handle = heapq.heappop(scheduled)[1]
            handle._scheduled = False
            ready.append(handle)

        # Run the callbacks ready now, not those they schedule (the next iteration's).
        debug = self._debug  # type: ignore[attr-defined]
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            if debug:
                self._current_handle = handle
                try:
                    handle._run()
                finally:
                    self._current_handle = None
            else:
                handle._run()
        handle = None  # break cycles when an exception occurs


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run the coroutine ``main`` to completion on a fresh VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)
