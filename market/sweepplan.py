"""How a sweep schedules: pure decisions the tenant's runner (node/tenant/sweep.py) acts on.

Nothing here reads a clock, sleeps or touches the store: the runner passes in what it
holds and ``now`` (its event loop's time, in seconds), and gets back what to do:

* :func:`units_wanted`: how many more lease units to auction for;
* :func:`pick_pending`: which pending trial a provider's free slot takes next (never
  one that failed on that provider before);
* :class:`LeaseWait`: when a sweep that holds no lease has waited long enough to stop;
* :class:`TrialDeadline`: when the tenant stops waiting for a trial's result.

Money decisions (may one more trial start, may one more lease be bought) are
market/sweepguard.py's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol


def units_wanted(
    held: int, *, parallel: int, exhausted: bool, unfinished: int, budget_held: bool
) -> int:
    """Lease units to auction for now (0: none).

    A sweep wants ``parallel`` units while its search still has trials to give; once
    the search is exhausted only as many as trials are unfinished. ``budget_held``: the
    budget refused a trial while trials still run on the leases held; their worst case
    holds the budget, so a new lease could not be used and is not bought.
    """
    if budget_held:
        return 0
    want = min(unfinished if exhausted else parallel, parallel)
    return max(0, want - held)


class PendingTrial(Protocol):
    """A trial waiting for a slot, as the store keeps it."""

    @property
    def number(self) -> int: ...

    @property
    def failed_providers(self) -> list[str]: ...


def pick_pending(
    pending: Sequence[PendingTrial], provider: str, running: Collection[int]
) -> int | None:
    """Index in ``pending`` of the first trial ``provider`` may take, or None.

    A trial that failed on a provider is retried elsewhere (a broken machine must not
    eat its retries); one that still runs (a late retry) is not assigned twice.
    """
    for i, trial in enumerate(pending):
        if trial.number not in running and provider not in trial.failed_providers:
            return i
    return None


@dataclass(slots=True)
class LeaseWait:
    """How long a sweep with nothing running has held no lease; when to give up.

    ``max_wait_s`` None waits forever (``submit --wait-forever``).
    """

    max_wait_s: float | None
    since: float | None = None

    def holding(self) -> None:
        """A lease is held (or arrived): the wait is over."""
        self.since = None

    def waiting(self, now: float) -> bool:
        """No lease held at ``now``; True once the wait reached ``max_wait_s``."""
        if self.since is None:
            self.since = now
            return False
        return self.max_wait_s is not None and now - self.since >= self.max_wait_s


@dataclass(frozen=True, slots=True)
class TrialDeadline:
    """When the tenant stops waiting for a trial's result (then it cancels and retries).

    The provider enforces the trial's timeout; the tenant checks it did. ``limit_s``
    is the timeout plus the tenant's grace. The clock starts when the provider says the
    trial runs; until then (queued behind another trial of the lease) the trial may
    wait one ``limit_s`` more, so the deadline is never later than twice the limit
    after the assignment.
    """

    assigned: float
    limit_s: float

    @property
    def latest(self) -> float:
        """The deadline while the trial has not started."""
        return self.assigned + 2 * self.limit_s

    def started(self, now: float) -> float:
        """The deadline once the provider said at ``now`` that the trial runs."""
        return min(self.latest, now + self.limit_s)
