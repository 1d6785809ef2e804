"""The promises a sweep keeps about money, failures and waiting: pure decisions.

The tenant's sweep runner (node/tenant/sweep.py) asks these before it spends: nothing here
reads a clock, sleeps or touches a file; time comes in as ``now_ms``.

**Budget.** ``budget.max_spend`` is a hard cap. A lease bills its devices for every
millisecond it is held (market/settlement.py), so the worst case of a lease is being
held until every trial assigned to it has run to its limit: the trials of one unit run
one after another, each for at most ``trial_timeout`` plus the tenant's grace (the
tenant cancels a trial past that, node/tenant/sweep.py). A trial is started only if what is
settled, plus the worst case of every lease held, with that trial added, stays within
``max_spend``; a lease is only bought if one more trial at ``max_price`` would fit.
The estimate is deliberately pessimistic: a sweep may stop with some budget unspent,
never with more spent than the cap.

**Failures.** A sweep stops after ``limits.max_failures`` trials in a row failed
(pruned and cancelled trials do not count; a success resets the count). A program
that cannot run (a missing file, an interpreter the provider lacks, a typo in the
metric name) fails every trial the same way, and each is billed: stopping early keeps
the cost of a broken job to a few trials. ``FailureWatch.explain`` names the
commonest failure, for the user to read.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from market.jobspec import DEFAULT_MAX_FAILURES
from market.settlement import amount_owed, format_credits

#: Added to each lease's worst case: the provider may bill up to 1 s of clock skew
#: (node/tenant/client.py accepts that in a receipt) and the release takes a round trip.
LEASE_SLACK_MS = 2_000


@dataclass(frozen=True, slots=True)
class LeaseUse:
    """A lease held now, as the budget sees it."""

    price: int  # micro-credits per device-hour
    devices: int  # devices leased (all units)
    units: int  # trials it runs at once
    start_ms: int  # when the tenant's clock started billing it
    active: int  # trials assigned to it (running or queued on the provider)


def lease_worst_case(lease: LeaseUse, now_ms: int, trial_ms: int) -> int:
    """Micro-credits the lease costs if every trial assigned to it runs to its limit.

    Its units work through the assigned trials ``units`` at a time, each for at most
    ``trial_ms`` from now, and the lease is released once they are done.
    """
    rounds = -(-lease.active // max(1, lease.units))
    end = max(now_ms, lease.start_ms) + rounds * trial_ms + LEASE_SLACK_MS
    return amount_owed(lease.devices * max(0, end - lease.start_ms), lease.price)


def worst_case_spend(settled: int, leases: Iterable[LeaseUse], now_ms: int, trial_ms: int) -> int:
    """What the sweep may have spent at most once everything it started has ended."""
    return settled + sum(lease_worst_case(x, now_ms, trial_ms) for x in leases)


@dataclass(frozen=True, slots=True)
class Budget:
    """``budget.max_spend`` against what is settled and what is held."""

    max_spend: int  # micro-credits
    trial_ms: int  # trial_timeout plus the tenant's grace: the most one trial runs

    def can_start(self, settled: int, leases: Sequence[LeaseUse], on: int, now_ms: int) -> bool:
        """May one more trial go to ``leases[on]`` without risking the cap?"""
        grown = [
            LeaseUse(x.price, x.devices, x.units, x.start_ms, x.active + 1) if i == on else x
            for i, x in enumerate(leases)
        ]
        return worst_case_spend(settled, grown, now_ms, self.trial_ms) <= self.max_spend

    def affordable_units(
        self,
        settled: int,
        leases: Sequence[LeaseUse],
        now_ms: int,
        price: int,
        devices_per_unit: int,
        wanted: int,
    ) -> int:
        """How many more units (each running one trial) a new lease at ``price`` may have."""
        left = self.max_spend - worst_case_spend(settled, leases, now_ms, self.trial_ms)
        one = amount_owed(devices_per_unit * (self.trial_ms + LEASE_SLACK_MS), price)
        if left <= 0:
            return 0
        if one == 0:
            return wanted
        return max(0, min(wanted, left // one))

    def explain_exhausted(self, spent: int, price: int, devices_per_unit: int) -> str:
        """Why no more trials start, in one line for people."""
        one = amount_owed(devices_per_unit * (self.trial_ms + LEASE_SLACK_MS), price)
        return (
            f"budget: {format_credits(spent)} of max_spend {format_credits(self.max_spend)} "
            f"credits spent; one more trial may cost up to {format_credits(one)} credits "
            f"({devices_per_unit} device(s) x {self.trial_ms / 1000:g} s at "
            f"{format_credits(price)} cr/device-hour)"
        )


def sweep_estimate(
    trials: int, parallel: int, trial_ms: int, price: int, devices_per_trial: int
) -> tuple[float, int]:
    """Runtime (s) and cost (micro-credits) of a sweep if every trial runs ``trial_ms``.

    ``trials`` x ``trial_ms`` x price x devices, ``parallel`` trials at a time: the
    figure ``mercato plan`` shows, with that assumption printed next to it.
    """
    rounds = -(-trials // max(1, parallel))
    cost = amount_owed(trials * devices_per_trial * trial_ms, price)
    return rounds * trial_ms / 1000, cost


# --- failures ---------------------------------------------------------------------


@dataclass
class FailureWatch:
    """Counts failed trials in a row; says when the sweep should stop and why."""

    max_failures: int = DEFAULT_MAX_FAILURES
    in_a_row: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    last_of: dict[str, int] = field(default_factory=dict)  # reason -> last trial number

    def record(self, number: int, state: str, reason: str = "") -> None:
        """A trial ended in ``state`` (succeeded, failed, pruned or cancelled)."""
        if state == "succeeded":
            self.in_a_row = 0
        elif state == "failed":
            self.in_a_row += 1
            self.reasons[reason] += 1
            self.last_of[reason] = number

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_failures

    def commonest(self) -> tuple[str, int, int] | None:
        """(reason, how many trials failed so, the last such trial) or None."""
        if not self.reasons:
            return None
        reason, n = self.reasons.most_common(1)[0]
        return reason, n, self.last_of[reason]

    def explain(self) -> str:
        """One line: how many failed in a row and the commonest reason."""
        common = self.commonest()
        head = f"{self.in_a_row} trials failed in a row (limits.max_failures: {self.max_failures})"
        if common is None:
            return head
        reason, n, last = common
        return f"{head}; commonest failure ({n}x, last trial {last}): {reason}"


def missing_metric(metric: str, printed: Iterable[str]) -> str:
    """The failure of a trial that never printed ``metric``, naming a close printed name."""
    names = sorted(set(printed))
    close = difflib.get_close_matches(metric, names, n=1, cutoff=0.6)
    out = f"trial never reported the metric {metric!r}"
    if close:
        return f"{out}; it printed {close[0]!r}: a typo in sweep.metric.name?"
    if names:
        shown = ", ".join(repr(n) for n in names[:8])
        return f"{out}; it printed {shown}"
    return out
