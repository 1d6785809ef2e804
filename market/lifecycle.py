"""The lifecycles of a job, a trial and a tenant's lease: one Enum and one table each.

Each record that changes state in the store (a job, a trial of a job, a lease the
tenant holds) moves only along its table; anything else is a bug in the caller and
raises :class:`IllegalTransitionError` before the store is touched. Writing the state a
record already has is not a move and is always allowed (a resumed job is ``running``
again, a renewed lease stays ``active``). The words are the ones the store keeps, so the
tables change no stored value::

    job     running --> done | failed | cancelled          failed --resume--> running

    trial   pending --> running --> succeeded | failed | pruned | cancelled
               |           |
               |           +--lease lost, tenant restarted--> pending
               +--> failed (no provider left) | cancelled

            succeeded --result proved false, provider caught--> pending
            succeeded --three providers disagree--> failed

    lease   active --> ended (released, receipt checked) | lost (provider gone)
            lost --> ended (a late release still came back with a valid receipt)

One word per outcome across the tree: a trial that ran to its end and reported is
``succeeded`` everywhere (the executor's outcome, the tenant's record, the search's
``tell``), never "completed". ``timed_out`` is an executor outcome only: the tenant
records such a trial as ``failed`` with the reason in its detail (see
:func:`recorded_trial_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Generic, TypeVar

from market.bidding import LeaseState
from protocol.errors import MercatoError

__all__ = [
    "EXECUTOR_OUTCOMES",
    "JOB",
    "LEASE",
    "RUN_OUTCOMES",
    "SEARCH_OUTCOMES",
    "TRIAL",
    "IllegalTransitionError",
    "JobState",
    "LeaseState",
    "Lifecycle",
    "TrialState",
    "recorded_trial_state",
]


class IllegalTransitionError(MercatoError):
    """A record was asked to move between two states its lifecycle does not connect.

    Always a bug in our own code (a peer's message never names a state directly), so
    it is raised, not counted: the caller's write is refused and the store keeps the
    state it had.
    """

    code = "illegal_transition"
    http_status = 409

    def __init__(self, lifecycle: str, current: Enum, new: Enum) -> None:
        self.lifecycle = lifecycle
        self.current = current
        self.new = new
        super().__init__(f"a {lifecycle} cannot go from {current.value} to {new.value}")


class JobState(StrEnum):
    """A tenant's job (sweep, training or service run) as its store records it."""

    RUNNING = "running"
    DONE = "done"  # ran to its end; some of a sweep's trials may have failed
    FAILED = "failed"  # nothing useful came out (every trial failed, the run failed)
    CANCELLED = "cancelled"  # by the tenant


class TrialState(StrEnum):
    """A trial: the tenant's record of it, and how a run of it ended on a provider."""

    PENDING = "pending"  # waiting for a slot on a lease (tenant side only)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # an executor outcome; recorded by the tenant as failed
    PRUNED = "pruned"  # stopped early by the search (tenant side only)
    CANCELLED = "cancelled"


S = TypeVar("S", bound=Enum)


@dataclass(frozen=True, slots=True)
class Lifecycle(Generic[S]):
    """A transition table: which states each state may move to."""

    name: str
    moves: Mapping[S, frozenset[S]]

    def legal(self, current: S, new: S) -> bool:
        """Whether ``current -> new`` is a move of this lifecycle (or no move at all)."""
        return new == current or new in self.moves.get(current, frozenset())

    def check(self, current: S, new: S) -> S:
        """``new`` if the move is legal; raises IllegalTransitionError otherwise."""
        if not self.legal(current, new):
            raise IllegalTransitionError(self.name, current, new)
        return new

    def terminal(self, state: S) -> bool:
        """Whether no move leaves ``state``."""
        return not self.moves.get(state)


JOB: Lifecycle[JobState] = Lifecycle(
    "job",
    {
        JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
        JobState.FAILED: frozenset({JobState.RUNNING}),  # `mercato resume`
    },
)

TRIAL: Lifecycle[TrialState] = Lifecycle(
    "trial",
    {
        TrialState.PENDING: frozenset(
            {TrialState.RUNNING, TrialState.FAILED, TrialState.CANCELLED}
        ),
        TrialState.RUNNING: frozenset(
            {
                TrialState.PENDING,  # its lease was lost, or the tenant restarted
                TrialState.SUCCEEDED,
                TrialState.FAILED,
                TrialState.PRUNED,
                TrialState.CANCELLED,
            }
        ),
        # A result is undone only when spot-check replication proves it false
        # (node/tenant/verify.py): left as succeeded, a fabricated value would be
        # reported as the sweep's best. Nothing runs or is billed twice: the liar is
        # not paid.
        TrialState.SUCCEEDED: frozenset(
            {
                TrialState.PENDING,  # its provider was caught lying: run it elsewhere
                TrialState.FAILED,  # three providers disagree: not reproducible
            }
        ),
    },
)

LEASE: Lifecycle[LeaseState] = Lifecycle(
    "lease",
    {
        LeaseState.ACTIVE: frozenset({LeaseState.ENDED, LeaseState.LOST}),
        LeaseState.LOST: frozenset({LeaseState.ENDED}),
    },
)

#: How a run of a trial can end on a provider (an executor's TrialOutcome.state).
EXECUTOR_OUTCOMES = frozenset(
    {TrialState.SUCCEEDED, TrialState.FAILED, TrialState.TIMED_OUT, TrialState.CANCELLED}
)
#: What the search is told about a finished trial (Search.tell).
SEARCH_OUTCOMES = frozenset({TrialState.SUCCEEDED, TrialState.FAILED, TrialState.PRUNED})
#: How a training or service run ends for the tenant (a gang's report).
RUN_OUTCOMES = frozenset({TrialState.SUCCEEDED, TrialState.FAILED, TrialState.CANCELLED})


def recorded_trial_state(outcome: TrialState, *, metric_missing: bool, pruning: bool) -> TrialState:
    """The state the tenant records for a trial whose run ended with ``outcome``.

    A run that succeeded but never reported the sweep's metric taught the search
    nothing, so it failed; a run the search cancelled (``pruning``) was pruned; every
    other ending, a timeout included, is a failure whose reason goes in the detail.
    """
    if outcome not in EXECUTOR_OUTCOMES:
        raise ValueError(f"{outcome.value} is not how a run ends")
    if outcome is TrialState.SUCCEEDED and not metric_missing:
        return TrialState.SUCCEEDED
    if outcome is TrialState.CANCELLED and pruning:
        return TrialState.PRUNED
    return TrialState.FAILED
