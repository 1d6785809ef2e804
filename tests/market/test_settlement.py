"""Settlement arithmetic: what a receipt says is owed, exact on integers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.settlement import (
    MICRO_PER_CREDIT,
    MS_PER_HOUR,
    amount_owed,
    expected_cost,
    format_credits,
)

#: Upper bounds that cover a year of 100_000 devices at 1000 credits per device-hour.
DEVICE_MS = st.integers(min_value=1, max_value=100_000 * 365 * 24 * MS_PER_HOUR)
PRICE = st.integers(min_value=1, max_value=1_000 * MICRO_PER_CREDIT)


class TestAmountOwed:
    def test_one_device_hour_costs_exactly_the_price(self) -> None:
        assert amount_owed(MS_PER_HOUR, 350_000) == 350_000

    def test_one_millisecond_at_one_micro_credit_per_hour_rounds_up_to_one(self) -> None:
        assert amount_owed(1, 1) == 1

    def test_rounds_up_never_down(self) -> None:
        # 90 minutes at 3 micro-credits per hour is 4.5: the provider gets 5.
        assert amount_owed(90 * 60_000, 3) == 5
        # One millisecond past an exact hour at 1 credit/h owes one more micro-credit.
        assert amount_owed(MS_PER_HOUR + 1, MICRO_PER_CREDIT) == MICRO_PER_CREDIT + 1

    def test_nothing_used_or_free_hardware_owes_nothing(self) -> None:
        assert amount_owed(0, 2_500_000) == 0
        assert amount_owed(10 * MS_PER_HOUR, 0) == 0

    def test_huge_values_stay_exact(self) -> None:
        # Floats would lose the last micro-credit here (> 2**53).
        device_ms = 10**12 * MS_PER_HOUR + 1
        owed = amount_owed(device_ms, 10**6)
        assert type(owed) is int
        assert owed == 10**18 + 1

    @pytest.mark.parametrize(("device_ms", "price"), [(-1, 1), (1, -1)])
    def test_negative_input_is_refused(self, device_ms: int, price: int) -> None:
        with pytest.raises(ValueError, match="non-negative"):
            amount_owed(device_ms, price)

    @given(device_ms=DEVICE_MS, price=PRICE)
    def test_is_the_smallest_integer_covering_price_times_time(
        self, device_ms: int, price: int
    ) -> None:
        amount = amount_owed(device_ms, price)
        assert type(amount) is int
        assert amount * MS_PER_HOUR >= device_ms * price  # never less than price x time
        assert (amount - 1) * MS_PER_HOUR < device_ms * price  # overpays < 1 micro-credit

    @given(a=DEVICE_MS, b=DEVICE_MS, price=PRICE)
    def test_splitting_usage_over_receipts_overpays_at_most_one_per_receipt(
        self, a: int, b: int, price: int
    ) -> None:
        whole = amount_owed(a + b, price)
        split = amount_owed(a, price) + amount_owed(b, price)
        assert whole <= split <= whole + 1


class TestExpectedCost:
    def test_one_hour_of_work_costs_the_price_per_device(self) -> None:
        # 1 device at 100 FLOP/s and 100 % utilisation needs an hour for 360_000 FLOP.
        assert expected_cost(1_000, 1, 360_000, 100, 100) == 1_000

    def test_device_count_cancels_out(self) -> None:
        one = expected_cost(1_000, 1, 10**15, 10**14, 40)
        eight = expected_cost(1_000, 8, 10**15, 10**14, 40)
        assert one == eight

    def test_rounds_up(self) -> None:
        # Half an hour at price 3 is 1.5 micro-credits: 2.
        assert expected_cost(3, 1, 180_000, 100, 100) == 2

    @pytest.mark.parametrize(("flops", "util"), [(0, 40), (10**12, 0)])
    def test_zero_speed_is_refused(self, flops: int, util: int) -> None:
        with pytest.raises(ValueError, match="positive"):
            expected_cost(1, 1, 10**12, flops, util)


class TestFormatCredits:
    @pytest.mark.parametrize(
        ("micro", "text"),
        [
            (0, "0"),
            (1, "0.000001"),
            (2_500_000, "2.5"),
            (1_000_000, "1"),
            (10_000_000, "10"),
            (350_000, "0.35"),
            (1_234_567_891, "1234.567891"),
            (-2_500_000, "-2.5"),
            (-1, "-0.000001"),
        ],
    )
    def test_people_facing_credits(self, micro: int, text: str) -> None:
        assert format_credits(micro) == text

    @given(st.integers(min_value=-(10**18), max_value=10**18))
    def test_round_trips_exactly(self, micro: int) -> None:
        text = format_credits(micro)
        sign = -1 if text.startswith("-") else 1
        whole, _, frac = text.lstrip("-").partition(".")
        back = sign * (int(whole) * MICRO_PER_CREDIT + int(frac.ljust(6, "0") or "0"))
        assert back == micro
