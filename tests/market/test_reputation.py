"""A tenant's own record of providers: Laplace's rule, exact fractions, immutable records."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest

from market.reputation import NEUTRAL, Reputation


class TestSuccess:
    def test_a_newcomer_starts_at_one_half(self) -> None:
        assert NEUTRAL.success() == Fraction(1, 2)
        assert Reputation().success() == Fraction(1, 2)

    @pytest.mark.parametrize(
        ("rep", "expected"),
        [
            (Reputation(completed=1), Fraction(2, 3)),
            (Reputation(failed=1), Fraction(1, 3)),
            (Reputation(completed=8), Fraction(9, 10)),
            (Reputation(completed=3, failed=1, declined=1, rejected=1), Fraction(4, 8)),
            (Reputation(declined=2), Fraction(1, 4)),
            (Reputation(completed=98, rejected=0), Fraction(99, 100)),
        ],
    )
    def test_laplace_estimate(self, rep: Reputation, expected: Fraction) -> None:
        assert rep.success() == expected

    def test_never_reaches_zero_or_one(self) -> None:
        assert Reputation(failed=10_000).success() > 0
        assert Reputation(completed=10_000).success() < 1

    def test_a_long_good_record_outweighs_one_failure(self) -> None:
        assert Reputation(completed=20, failed=1).success() > NEUTRAL.success()

    def test_bad_counts_every_kind_of_failure(self) -> None:
        assert Reputation(failed=1, declined=2, rejected=3).bad == 6


class TestRecord:
    def test_returns_a_new_record_and_leaves_the_old_one_alone(self) -> None:
        before = Reputation(completed=2)
        after = before.record("failed")
        assert after == Reputation(completed=2, failed=1)
        assert before == Reputation(completed=2)
        assert after is not before

    def test_the_shared_neutral_record_is_never_changed(self) -> None:
        NEUTRAL.record("completed").record("declined")
        assert Reputation() == NEUTRAL

    @pytest.mark.parametrize("outcome", ["completed", "failed", "declined", "rejected"])
    def test_each_outcome_counts_once(self, outcome: str) -> None:
        assert getattr(NEUTRAL.record(outcome), outcome) == 1

    def test_fields_cannot_be_assigned(self) -> None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            NEUTRAL.completed = 5  # type: ignore[misc]

    @pytest.mark.parametrize("outcome", ["success", "bad", "", "Completed"])
    def test_unknown_outcome_is_refused(self, outcome: str) -> None:
        with pytest.raises(ValueError, match="unknown outcome"):
            NEUTRAL.record(outcome)
