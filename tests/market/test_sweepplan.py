"""A sweep's scheduling decisions, by stepping ``now``: no clock, no sleep, no store."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from market.sweepplan import LeaseWait, TrialDeadline, pick_pending, units_wanted


@dataclass(frozen=True)
class Pending:
    """A pending trial as the store keeps it (in-memory, for these pure tests)."""

    number: int
    failed_providers: list[str] = field(default_factory=list)


class TestUnitsWanted:
    def test_a_running_search_keeps_parallel_units(self) -> None:
        assert units_wanted(0, parallel=8, exhausted=False, unfinished=0, budget_held=False) == 8
        assert units_wanted(5, parallel=8, exhausted=False, unfinished=0, budget_held=False) == 3
        assert units_wanted(8, parallel=8, exhausted=False, unfinished=99, budget_held=False) == 0

    def test_an_exhausted_search_wants_only_what_its_unfinished_trials_need(self) -> None:
        assert units_wanted(0, parallel=8, exhausted=True, unfinished=3, budget_held=False) == 3
        assert units_wanted(2, parallel=8, exhausted=True, unfinished=3, budget_held=False) == 1
        assert units_wanted(0, parallel=8, exhausted=True, unfinished=50, budget_held=False) == 8
        # More units held than trials left: never a negative auction.
        assert units_wanted(6, parallel=8, exhausted=True, unfinished=1, budget_held=False) == 0

    def test_no_lease_is_bought_while_running_trials_hold_the_budget(self) -> None:
        assert units_wanted(0, parallel=8, exhausted=False, unfinished=4, budget_held=True) == 0


class TestPickPending:
    def test_a_trial_never_goes_back_to_a_provider_it_failed_on(self) -> None:
        pending = [Pending(0, ["p1"]), Pending(1), Pending(2, ["p2"])]
        assert pick_pending(pending, "p1", running=set()) == 1
        assert pick_pending(pending, "p2", running=set()) == 0
        assert pick_pending([Pending(0, ["p1"])], "p1", running=set()) is None

    def test_a_trial_still_running_is_not_assigned_twice(self) -> None:
        assert pick_pending([Pending(4), Pending(5)], "p", running={4}) == 1
        assert pick_pending([Pending(4)], "p", running={4}) is None


class TestLeaseWait:
    def test_gives_up_after_max_wait_of_holding_nothing(self) -> None:
        wait, now = LeaseWait(max_wait_s=120.0), 1_000.0
        assert not wait.waiting(now)  # the wait starts
        now += 119.9
        assert not wait.waiting(now)
        now += 0.1
        assert wait.waiting(now)

    def test_a_lease_restarts_the_wait(self) -> None:
        wait, now = LeaseWait(max_wait_s=10.0), 0.0
        wait.waiting(now)
        now += 9.0
        assert not wait.waiting(now)
        wait.holding()  # a lease came, and later was lost
        now += 5.0
        assert not wait.waiting(now)
        now += 9.9
        assert not wait.waiting(now)
        now += 0.1
        assert wait.waiting(now)

    def test_wait_forever_never_gives_up(self) -> None:
        wait, now = LeaseWait(max_wait_s=None), 0.0
        for _ in range(100):
            assert not wait.waiting(now)
            now += 3_600.0


class TestTrialDeadline:
    @pytest.mark.parametrize("assigned", [0.0, 1_234.5])
    def test_a_queued_trial_may_wait_one_limit_before_its_own_starts(self, assigned: float) -> None:
        deadline = TrialDeadline(assigned, limit_s=70.0)
        assert deadline.latest == assigned + 140.0
        # Started at once: the limit counts from its start.
        assert deadline.started(assigned) == assigned + 70.0
        # Started after 30 s in the provider's queue: 30 + 70.
        assert deadline.started(assigned + 30.0) == assigned + 100.0
        # A provider that says "started" very late never buys more than twice the limit.
        assert deadline.started(assigned + 100.0) == assigned + 140.0
