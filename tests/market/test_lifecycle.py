"""The job, trial and lease lifecycles: every move in the tables, and none besides."""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Any, get_args

import pytest

from market.lifecycle import (
    EXECUTOR_OUTCOMES,
    JOB,
    LEASE,
    RUN_OUTCOMES,
    SEARCH_OUTCOMES,
    TRIAL,
    IllegalTransitionError,
    JobState,
    LeaseState,
    Lifecycle,
    TrialState,
    recorded_trial_state,
)
from protocol.errors import MercatoError
from protocol.messages import TaskState

LIFECYCLES: list[tuple[Lifecycle[Any], type[Enum]]] = [
    (JOB, JobState),
    (TRIAL, TrialState),
    (LEASE, LeaseState),
]

#: Every move the tenant's code makes today (sweep.py, verify.py, gang.py, jobs.py,
#: tenant.py).
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "job": {
        ("running", "done"),
        ("running", "failed"),
        ("running", "cancelled"),
        ("failed", "running"),
    },
    "trial": {
        ("pending", "running"),
        ("pending", "failed"),
        ("pending", "cancelled"),
        ("running", "pending"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "pruned"),
        ("running", "cancelled"),
        ("succeeded", "pending"),  # verify.py: its provider was caught lying
        ("succeeded", "failed"),  # verify.py: three providers disagree
    },
    "lease": {("active", "ended"), ("active", "lost"), ("lost", "ended")},
}


class TestTables:
    @pytest.mark.parametrize(("lifecycle", "states"), LIFECYCLES, ids=["job", "trial", "lease"])
    def test_exactly_the_expected_moves_are_legal(
        self, lifecycle: Lifecycle[Any], states: type[Enum]
    ) -> None:
        legal = {
            (a.value, b.value)
            for a, b in itertools.permutations(states, 2)
            if lifecycle.legal(a, b)
        }
        assert legal == EXPECTED[lifecycle.name]

    @pytest.mark.parametrize(("lifecycle", "states"), LIFECYCLES, ids=["job", "trial", "lease"])
    def test_staying_in_a_state_is_not_a_move(
        self, lifecycle: Lifecycle[Any], states: type[Enum]
    ) -> None:
        for state in states:
            assert lifecycle.check(state, state) is state

    @pytest.mark.parametrize(("lifecycle", "states"), LIFECYCLES, ids=["job", "trial", "lease"])
    def test_every_illegal_move_raises_a_typed_error_naming_both_states(
        self, lifecycle: Lifecycle[Any], states: type[Enum]
    ) -> None:
        for a, b in itertools.permutations(states, 2):
            if lifecycle.legal(a, b):
                assert lifecycle.check(a, b) is b
                continue
            with pytest.raises(IllegalTransitionError) as info:
                lifecycle.check(a, b)
            err = info.value
            assert isinstance(err, MercatoError)
            assert err.code == "illegal_transition"
            assert (err.lifecycle, err.current, err.new) == (lifecycle.name, a, b)
            assert err.reason == f"a {lifecycle.name} cannot go from {a.value} to {b.value}"


class TestWhatUsersRelyOn:
    def test_a_failed_job_can_be_resumed_a_finished_or_cancelled_one_cannot(self) -> None:
        assert JOB.check(JobState.FAILED, JobState.RUNNING) is JobState.RUNNING
        for state in (JobState.DONE, JobState.CANCELLED):
            assert JOB.terminal(state)
            with pytest.raises(IllegalTransitionError):
                JOB.check(state, JobState.RUNNING)

    def test_a_finished_trial_is_never_queued_again(self) -> None:
        """Re-queueing a trial that already ended would run (and bill) it twice."""
        for state in (TrialState.FAILED, TrialState.PRUNED, TrialState.CANCELLED):
            assert TRIAL.terminal(state)
            with pytest.raises(IllegalTransitionError):
                TRIAL.check(state, TrialState.PENDING)
        assert TRIAL.check(TrialState.RUNNING, TrialState.PENDING) is TrialState.PENDING

    def test_a_result_found_false_is_run_again_or_failed(self) -> None:
        """A succeeded trial whose result spot checks proved false must not stay
        succeeded: the sweep would report a fabricated best. Its provider was caught,
        so it goes back to pending and runs elsewhere (the liar is not paid, nothing
        is billed twice); three disagreeing providers make it failed (not
        reproducible). Nothing else leaves succeeded."""
        assert TRIAL.check(TrialState.SUCCEEDED, TrialState.PENDING) is TrialState.PENDING
        assert TRIAL.check(TrialState.SUCCEEDED, TrialState.FAILED) is TrialState.FAILED
        for state in (TrialState.RUNNING, TrialState.PRUNED, TrialState.CANCELLED):
            with pytest.raises(IllegalTransitionError):
                TRIAL.check(TrialState.SUCCEEDED, state)

    def test_a_pending_trial_cannot_finish_without_running(self) -> None:
        for outcome in (TrialState.SUCCEEDED, TrialState.PRUNED):
            with pytest.raises(IllegalTransitionError):
                TRIAL.check(TrialState.PENDING, outcome)

    def test_a_released_lease_never_becomes_active_again(self) -> None:
        """An ended lease is settled: reviving it would bill time nobody leased."""
        assert LEASE.terminal(LeaseState.ENDED)
        for state in (LeaseState.ACTIVE, LeaseState.LOST):
            with pytest.raises(IllegalTransitionError):
                LEASE.check(LeaseState.ENDED, state)
        with pytest.raises(IllegalTransitionError):
            LEASE.check(LeaseState.LOST, LeaseState.ACTIVE)

    def test_timed_out_is_never_a_recorded_trial_state(self) -> None:
        """The tenant records a timeout as failed (reason in the detail), never as is."""
        others = [s for s in TrialState if s is not TrialState.TIMED_OUT]
        assert not any(TRIAL.legal(s, TrialState.TIMED_OUT) for s in others)


class TestOneWordPerOutcome:
    def test_no_completed_only_succeeded(self) -> None:
        values = {s.value for s in TrialState}
        assert "completed" not in values
        assert TrialState.SUCCEEDED in SEARCH_OUTCOMES
        assert TrialState.SUCCEEDED in RUN_OUTCOMES
        assert TrialState.SUCCEEDED in EXECUTOR_OUTCOMES

    def test_executor_outcomes_are_the_wire_task_states(self) -> None:
        """What a provider reports in task_status/task_result uses the same words."""
        wire = set(get_args(TaskState))
        assert {s.value for s in EXECUTOR_OUTCOMES} <= wire
        assert TrialState.RUNNING.value in wire

    def test_search_and_run_outcomes_are_trial_records(self) -> None:
        for outcome in SEARCH_OUTCOMES | RUN_OUTCOMES:
            assert TRIAL.legal(TrialState.RUNNING, outcome)
            # succeeded alone may be undone: a result spot checks prove false
            assert TRIAL.terminal(outcome) or outcome is TrialState.SUCCEEDED


class TestRecordedTrialState:
    @pytest.mark.parametrize(
        ("outcome", "metric_missing", "pruning", "recorded"),
        [
            (TrialState.SUCCEEDED, False, False, TrialState.SUCCEEDED),
            (TrialState.SUCCEEDED, False, True, TrialState.SUCCEEDED),
            (TrialState.SUCCEEDED, True, False, TrialState.FAILED),  # never reported
            (TrialState.CANCELLED, False, True, TrialState.PRUNED),
            (TrialState.CANCELLED, True, True, TrialState.PRUNED),
            (TrialState.CANCELLED, False, False, TrialState.FAILED),
            (TrialState.TIMED_OUT, False, False, TrialState.FAILED),
            (TrialState.TIMED_OUT, False, True, TrialState.FAILED),
            (TrialState.FAILED, False, True, TrialState.FAILED),
        ],
    )
    def test_how_a_run_is_recorded(
        self,
        outcome: TrialState,
        metric_missing: bool,
        pruning: bool,
        recorded: TrialState,
    ) -> None:
        state = recorded_trial_state(outcome, metric_missing=metric_missing, pruning=pruning)
        assert state is recorded
        assert TRIAL.legal(TrialState.RUNNING, state)

    @pytest.mark.parametrize("state", [TrialState.PENDING, TrialState.RUNNING, TrialState.PRUNED])
    def test_only_run_endings_are_accepted(self, state: TrialState) -> None:
        with pytest.raises(ValueError, match="not how a run ends"):
            recorded_trial_state(state, metric_missing=False, pruning=False)
