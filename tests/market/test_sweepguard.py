"""The sweep's promises as pure decisions: the budget cap, the failure rule, the metric hint.

Time is stepped by hand (``now += ...``); no clock, no sleep.
"""

from __future__ import annotations

import pytest

from market.jobspec import DEFAULT_MAX_SPEND, JobError, parse_job
from market.settlement import amount_owed
from market.sweepguard import (
    LEASE_SLACK_MS,
    Budget,
    FailureWatch,
    LeaseUse,
    missing_metric,
    sweep_estimate,
    worst_case_spend,
)

PRICE = 3_600_000  # 3.6 credits per device-hour: 1 micro-credit per device-ms
MINUTE = 60_000


def lease(active: int, units: int = 1, devices: int = 1, start: int = 0) -> LeaseUse:
    return LeaseUse(PRICE, devices, units, start, active)


class TestBudget:
    def test_a_one_micro_credit_cap_starts_nothing(self) -> None:
        # Issue 13: a 1 micro-credit cap spent 2,243 micro-credits.
        budget = Budget(max_spend=1, trial_ms=MINUTE)
        assert budget.affordable_units(0, [], 0, PRICE, 1, wanted=8) == 0
        assert not budget.can_start(0, [lease(0)], on=0, now_ms=0)

    def test_trials_start_while_their_worst_case_fits_and_not_after(self) -> None:
        one = amount_owed(MINUTE + LEASE_SLACK_MS, PRICE)
        budget = Budget(max_spend=3 * one, trial_ms=MINUTE)
        leases = [lease(0)]
        started = 0
        while budget.can_start(0, leases, on=0, now_ms=0):
            started += 1
            leases = [lease(started)]
        # One unit runs its trials one after another, each for up to a minute.
        assert started == 3
        assert worst_case_spend(0, [lease(3)], 0, MINUTE) <= 3 * one

    def test_a_lease_bills_every_device_it_holds_busy_or_not(self) -> None:
        one = amount_owed(MINUTE + LEASE_SLACK_MS, PRICE)
        budget = Budget(max_spend=3 * one, trial_ms=MINUTE)
        assert not budget.can_start(0, [lease(0, units=4, devices=4)], on=0, now_ms=0)
        assert budget.can_start(0, [lease(0, units=3, devices=3)], on=0, now_ms=0)

    def test_time_held_counts_and_settled_money_counts(self) -> None:
        budget = Budget(max_spend=10 * MINUTE, trial_ms=MINUTE)
        now = 0
        assert budget.can_start(0, [lease(0)], on=0, now_ms=now)
        now += 8 * MINUTE  # the lease has billed 8 minutes already
        assert budget.can_start(0, [lease(0)], on=0, now_ms=now)
        assert not budget.can_start(2 * MINUTE, [lease(0)], on=0, now_ms=now)
        now += MINUTE
        assert not budget.can_start(0, [lease(0)], on=0, now_ms=now)

    def test_queued_trials_of_one_unit_run_one_after_another(self) -> None:
        budget = Budget(max_spend=2 * MINUTE + LEASE_SLACK_MS, trial_ms=MINUTE)
        assert budget.can_start(0, [lease(1)], on=0, now_ms=0)  # the second: 2 minutes
        assert not budget.can_start(0, [lease(2)], on=0, now_ms=0)  # a third: 3 minutes

    def test_a_new_lease_is_sized_to_what_the_budget_pays(self) -> None:
        one = amount_owed(MINUTE + LEASE_SLACK_MS, PRICE)
        budget = Budget(max_spend=5 * one, trial_ms=MINUTE)
        assert budget.affordable_units(0, [], 0, PRICE, 1, wanted=8) == 5
        assert budget.affordable_units(0, [], 0, PRICE, 2, wanted=8) == 2  # 2 devices each
        assert budget.affordable_units(4 * one, [], 0, PRICE, 1, wanted=8) == 1
        assert budget.affordable_units(0, [], 0, 0, 1, wanted=8) == 8  # free devices

    def test_the_explanation_names_the_figures(self) -> None:
        text = Budget(1, MINUTE).explain_exhausted(0, PRICE, 1)
        assert "max_spend 0.000001" in text
        assert "3.6 cr/device-hour" in text


class TestJobFileBudget:
    def test_zero_is_refused_with_a_reason(self) -> None:
        # Issue 13: `max_spend: 0` meant unlimited.
        with pytest.raises(JobError) as e:
            parse_job(
                "program: t.py\nmethod: grid\nparameters: {a: {value: 1}}\nbudget: {max_spend: 0}\n"
            )
        assert "budget.max_spend" in str(e.value)
        assert "positive" in str(e.value)

    def test_absent_means_the_documented_default(self) -> None:
        spec = parse_job("program: t.py\nmethod: grid\nparameters: {a: {value: 1}}\n")
        assert spec.budget.max_spend is None
        assert spec.budget.spend_cap == DEFAULT_MAX_SPEND == 100_000_000
        assert spec.limits.max_failures == 5

    def test_max_failures_is_read(self) -> None:
        spec = parse_job(
            "program: t.py\nmethod: grid\nparameters: {a: {value: 1}}\nlimits: {max_failures: 2}\n"
        )
        assert spec.limits.max_failures == 2


class TestEstimate:
    def test_trials_times_timeout_times_price(self) -> None:
        runtime, cost = sweep_estimate(12, 4, MINUTE, PRICE, 1)
        assert runtime == 3 * 60.0
        assert cost == 12 * MINUTE  # 1 micro-credit per device-ms


class TestFailureWatch:
    def test_stops_after_max_failures_in_a_row(self) -> None:
        watch = FailureWatch(3)
        for n in range(2):
            watch.record(n, "failed", "failed (exit code 2)")
        watch.record(2, "pruned")
        assert not watch.should_stop
        watch.record(3, "failed", "failed (exit code 2)")
        assert watch.should_stop
        assert "3 trials failed in a row" in watch.explain()
        assert "3x, last trial 3): failed (exit code 2)" in watch.explain()

    def test_a_success_resets_the_count(self) -> None:
        watch = FailureWatch(2)
        watch.record(0, "failed", "x")
        watch.record(1, "succeeded")
        watch.record(2, "failed", "y")
        assert not watch.should_stop
        assert watch.commonest() in {("x", 1, 0), ("y", 1, 2)}


class TestMissingMetric:
    def test_a_typo_names_the_printed_metric(self) -> None:
        text = missing_metric("val_los", ["val_loss", "step", "acc"])
        assert "never reported the metric 'val_los'" in text
        assert "'val_loss'" in text
        assert "typo" in text

    def test_no_close_name_lists_what_was_printed(self) -> None:
        assert "'acc'" in missing_metric("loss", ["acc"])
        assert missing_metric("loss", []) == "trial never reported the metric 'loss'"
