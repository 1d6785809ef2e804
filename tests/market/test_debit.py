"""The tenant's meter and the provider's debit schedule, stepped through time (pure)."""

from __future__ import annotations

from market.debit import (
    ACCEPT_SKEW_MS,
    BILLING_TOLERANCE_MS,
    DebitSchedule,
    NoteState,
    SettlementPolicy,
    TenantMeter,
    accept_start_problem,
    interval_problem,
)
from market.settlement import amount_owed

T0 = 1_700_000_000_000
PRICE = 3_600_000  # 3.6 credits per device-hour: 1 micro-credit per device-ms


class TestAcceptWindow:
    def test_a_start_inside_the_round_trip_is_accepted(self) -> None:
        assert accept_start_problem(T0 + 50, T0, T0 + 100) is None

    def test_a_skewed_clock_within_the_stated_skew_is_accepted(self) -> None:
        assert accept_start_problem(T0 - ACCEPT_SKEW_MS, T0, T0 + 100) is None
        assert accept_start_problem(T0 + 100 + ACCEPT_SKEW_MS, T0, T0 + 100) is None

    def test_a_start_a_month_back_or_an_hour_ahead_is_refused_with_the_reason(self) -> None:
        month = 30 * 86_400_000
        assert "before the award was sent" in (accept_start_problem(T0 - month, T0, T0 + 1) or "")
        assert "after it arrived" in (accept_start_problem(T0 + 3_600_000, T0, T0 + 1) or "")


class TestTenantMeter:
    def test_a_bill_up_to_the_measured_time_plus_tolerance_is_signed(self) -> None:
        meter = TenantMeter(devices=2, price=PRICE, start_ms=T0)
        now = T0 + 10_000
        most = 2 * (10_000 + 10 + BILLING_TOLERANCE_MS)  # 10 ms: 1000 ppm of 10 s
        assert meter.bill_problem(most, PRICE, amount_owed(most, PRICE), now) is None
        problem = meter.bill_problem(most + 1, PRICE, amount_owed(most + 1, PRICE), now)
        assert problem is not None
        assert "exceeds" in problem

    def test_nothing_after_stop_is_ever_paid(self) -> None:
        meter = TenantMeter(devices=8, price=PRICE, start_ms=T0)
        meter.stop(T0 + 10_000)  # a trial's timeout
        now = T0 + 84_000  # the provider stalled for 74 s more
        assert meter.measured_ms(now) == 10_000
        bill = 8 * 84_000
        assert meter.bill_problem(bill, PRICE, amount_owed(bill, PRICE), now) is not None

    def test_notes_must_move_forward(self) -> None:
        meter = TenantMeter(devices=1, price=PRICE, start_ms=T0)
        assert meter.signed(0, 5_000, 5_000) == 5_000
        assert meter.note_problem(0, 6_000, PRICE, 6_000, T0 + 7_000) is not None
        assert meter.note_problem(1, 4_000, PRICE, 4_000, T0 + 7_000) is not None
        assert meter.note_problem(1, 6_000, PRICE, 6_000, T0 + 7_000) is None
        assert meter.signed(1, 6_000, 6_000) == 1_000  # only the increment is new money


class TestDebitSchedule:
    def test_notes_fall_due_each_interval_and_are_cumulative(self) -> None:
        s = DebitSchedule(devices=2, price=PRICE, start_ms=T0, interval_ms=1_000, timeout_ms=500)
        assert s.issue(T0 + 999) is None
        first = s.issue(T0 + 1_000)
        assert first is not None
        assert (first.seq, first.device_ms) == (0, 2_000)
        assert s.issue(T0 + 1_500) is None
        second = s.issue(T0 + 2_100)
        assert second is not None
        assert (second.seq, second.amount) == (1, 4_200)

    def test_a_silent_tenant_lapses_one_interval_plus_the_timeout_after_its_last_payment(
        self,
    ) -> None:
        s = DebitSchedule(devices=1, price=PRICE, start_ms=T0, interval_ms=1_000, timeout_ms=500)
        note = s.issue(T0 + 1_000)
        assert note is not None
        assert s.countersigned(note.seq, note.amount, T0 + 1_000) == note.amount
        now = T0 + 1_000
        while s.state(now) is not NoteState.LAPSED:
            s.issue(now)  # nobody collects or signs these
            now += 10
        # The unpaid work when the provider stops is at most one interval plus the timeout.
        assert now == s.lapse_ms() == T0 + 2_500
        assert now - (T0 + 1_000) <= s.max_unpaid_ms()
        assert s.unpaid_amount(now) == 1_500

    def test_a_tenant_that_never_countersigns_lapses_after_the_first_note(self) -> None:
        s = DebitSchedule(devices=1, price=PRICE, start_ms=T0, interval_ms=1_000, timeout_ms=500)
        assert s.issue(T0 + 1_000) is not None
        assert s.state(T0 + 1_499) is NoteState.OUTSTANDING
        assert s.state(T0 + 1_500) is NoteState.LAPSED

    def test_a_paying_tenant_never_lapses(self) -> None:
        s = DebitSchedule(devices=1, price=PRICE, start_ms=T0, interval_ms=1_000, timeout_ms=500)
        for now in range(T0, T0 + 60_000, 100):
            assert s.state(now) is not NoteState.LAPSED
            note = s.issue(now)
            if note is not None:
                s.countersigned(note.seq, note.amount, now)

    def test_terms_outside_the_providers_bounds_are_refused(self) -> None:
        assert interval_problem(10_000, 10_000) is None
        assert "debit interval" in (interval_problem(10, 10_000) or "")
        assert "payment timeout" in (interval_problem(10_000, 10**9) or "")


class TestOrderPolicy:
    def test_a_tenant_with_a_lapsed_note_is_refused_for_the_memory_then_forgiven(self) -> None:
        policy = SettlementPolicy(lapse_memory_ms=60_000)
        why = policy.order_problem(1, T0, 0, T0 + 59_999)
        assert why is not None
        assert "lapsed unpaid" in why
        assert policy.order_problem(1, T0, 0, T0 + 60_000) is None

    def test_unpaid_exposure_at_the_limit_is_refused(self) -> None:
        policy = SettlementPolicy(max_unpaid_per_tenant=1_000)
        assert policy.order_problem(0, 0, 999, T0) is None
        why = policy.order_problem(0, 0, 1_000, T0)
        assert why is not None
        assert "limit of 1000" in why
        assert SettlementPolicy().order_problem(0, 0, 10**15, T0) is None  # 0: no limit
