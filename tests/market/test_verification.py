"""The spot-check rule (market/verification.py): rates, draws, tolerance, majority."""

from __future__ import annotations

from fractions import Fraction

import pytest
from conftest import PCIE, rtx_group

from market.matching import rank
from market.verification import (
    CANARY_METRIC,
    FLOOR_RATE,
    MAX_VOTES,
    NEWCOMER_TRIALS,
    PROVEN_STREAK,
    UNKNOWN_RATE,
    Tolerance,
    Trust,
    Verdict,
    canary_answer,
    canary_command,
    catch_probability,
    check_rate,
    compare,
    liars,
    may_take_trial,
    measured_flops,
    proven,
    should_check,
    slowness,
    trial_seed,
    verdict_of,
)
from protocol.messages import Advert, Requirement


class TestCheckRate:
    def test_newcomers_are_checked_often_proven_providers_rarely(self) -> None:
        assert check_rate(0) == UNKNOWN_RATE == Fraction(1, 4)
        assert check_rate(4) == Fraction(1, 4)
        assert check_rate(10) == Fraction(1, 10)
        assert check_rate(1_000_000) == FLOOR_RATE

    def test_a_fabricator_is_caught_by_its_20th_result_with_99_percent(self) -> None:
        # Its results never pass a check, so its streak never grows past 0.
        assert catch_probability(20) >= 0.99
        assert catch_probability(20, Fraction(1, 5)) < 0.99  # why 1/4, not 1/5

    def test_trust_grows_only_with_checked_results_and_resets_when_caught(self) -> None:
        t = Trust()
        for _ in range(12):
            t = t.valid()
        assert t.rate == Fraction(1, 12)
        t = t.lied()
        assert (t.streak, t.caught, t.rate) == (0, 1, UNKNOWN_RATE)

    def test_the_draw_is_deterministic_and_near_its_rate(self) -> None:
        keys = [f"job:{n}:task:provider" for n in range(4000)]
        secret = bytes(range(32))
        picks = [should_check(Fraction(1, 4), k, secret) for k in keys]
        assert picks == [should_check(Fraction(1, 4), k, secret) for k in keys]
        assert 900 < sum(picks) < 1100

    def test_without_the_tenants_key_the_draw_cannot_be_told(self) -> None:
        # A provider sees every part of the key (job id, trial number, task id, its
        # own id); only the tenant's secret decides. Another key picks other results,
        # no better than chance: 4000 draws at 1/2 agree about half the time.
        keys = [f"job:{n}:task:provider" for n in range(4000)]
        mine = [should_check(Fraction(1, 2), k, b"\x01" * 32) for k in keys]
        guess = [should_check(Fraction(1, 2), k, b"\x02" * 32) for k in keys]
        agree = sum(a == b for a, b in zip(mine, guess, strict=True))
        assert 1800 < agree < 2200

    def test_a_short_draw_secret_is_refused(self) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            should_check(Fraction(1, 2), "job:1:task:provider", b"short")


class TestRoomForNewcomers:
    def test_a_newcomer_gets_few_trials_while_a_proven_provider_is_leased(self) -> None:
        newcomer = Trust()
        taken = 0
        while may_take_trial(newcomer, taken, proven_leased=True):
            taken += 1
        assert taken == NEWCOMER_TRIALS == 1

    def test_with_nobody_proven_leased_nobody_is_held_back(self) -> None:
        # A tenant's first sweep: every provider is new, the sweep must still run.
        assert all(may_take_trial(Trust(), n, proven_leased=False) for n in range(100))

    def test_a_provider_is_proven_once_its_rate_leaves_the_newcomer_rate(self) -> None:
        t = Trust()
        steps = 0
        while not proven(t):
            assert t.rate == UNKNOWN_RATE  # still checked at 1/4 until proven
            t = t.valid()
            steps += 1
        assert steps == PROVEN_STREAK == 5
        assert t.rate < UNKNOWN_RATE
        assert all(may_take_trial(t, n, proven_leased=True) for n in range(100))

    def test_a_fabricator_never_leaves_the_newcomers_room(self) -> None:
        # Caught or not, its streak never grows: it stays a newcomer, one trial a sweep.
        t = Trust().lied()
        assert not proven(t)
        assert not may_take_trial(t, NEWCOMER_TRIALS, proven_leased=True)


class TestSeed:
    def test_same_trial_same_seed_other_trial_other_seed(self) -> None:
        assert trial_seed(7, 3) == trial_seed(7, 3)
        assert trial_seed(7, 3) != trial_seed(7, 4)
        assert trial_seed(7, 3) != trial_seed(8, 3)
        assert 0 <= trial_seed(7, 3) < 2**31


class TestDisputes:
    tol = Tolerance(abs=1e-6, rel=1e-3)

    def test_within_tolerance_agrees(self) -> None:
        assert compare(0.9512, 0.9515, self.tol) is Verdict.AGREED
        assert compare(0.0, 5e-7, self.tol) is Verdict.AGREED
        assert compare(0.95, 0.999999, self.tol) is None
        assert compare(float("nan"), 0.5, self.tol) is None
        assert compare(float("inf"), float("inf"), self.tol) is Verdict.AGREED

    def test_the_minority_of_three_lied(self) -> None:
        assert verdict_of(liars([1e-6, 0.64, 0.64], self.tol) or ()) is Verdict.ORIGINAL_LIED
        assert verdict_of(liars([0.64, 1e-6, 0.64], self.tol) or ()) is Verdict.CHECK_LIED
        assert liars([0.1, 0.2, 0.3], self.tol) is None  # unresolved so far
        assert verdict_of(liars([77.5, 1e-6, 0.64, 0.64], self.tol) or ()) is Verdict.BOTH_LIED
        assert verdict_of(()) is Verdict.AGREED

    def test_votes_name_every_liar_once_two_agree(self) -> None:
        assert liars([0.64, 0.64], self.tol) == ()
        assert liars([1e-6, 0.64, 0.64], self.tol) == (0,)
        assert liars([0.64, 1e-6, 0.64], self.tol) == (1,)
        # Two fabricators, the original and the check, then the honest decider: no two
        # agree until a fourth vote sides with the decider, and then both are named.
        assert liars([77.5, 1e-6, 0.64], self.tol) is None
        assert liars([77.5, 1e-6, 0.64, 0.64], self.tol) == (0, 1)
        assert liars([0.1, 0.2, 0.3, 0.4], self.tol) is None  # a program ignoring its seed
        assert MAX_VOTES == 4


class TestMeasuredSpeed:
    def test_the_same_trials_on_two_providers_give_their_speed_ratio(self) -> None:
        # Trials of very different sizes; "slow" takes 10x as long on each it shares.
        rows = []
        for t, size in enumerate([1_000, 50_000, 3_000, 700]):
            rows += [("fast", f"t{t}", size), ("slow", f"t{t}", 10 * size)]
        rows.append(("fast", "alone", 123_456))  # a trial only one ran: no evidence
        s = slowness(rows)
        assert s["slow"] / s["fast"] == pytest.approx(10, rel=1e-3)

    def test_measured_speed_replaces_an_inflated_claim_in_ranking(self) -> None:
        # "liar" claims an H100 and runs like a tenth of a T4; "t4" tells the truth.
        liar, t4 = "l" * 32, "t" * 32
        declared = {liar: 989 * 10**12, t4: 65 * 10**12}
        rows = [(liar, f"t{i}", 10_000) for i in range(3)]
        rows += [(t4, f"t{i}", 1_000) for i in range(3)]
        measured = measured_flops(declared, slowness(rows))
        assert measured[liar] * 10 == pytest.approx(measured[t4], rel=1e-3)

        def advert(provider: str, model: str, flops: int, floor: int) -> Advert:
            group = rtx_group(price_floor=floor).model_copy(
                update={"model": model, "fp16_flops": flops}
            )
            return Advert(
                provider=provider,
                address="http://203.0.113.1:1",
                devices=[group],
                interconnect=PCIE,
                seq=1,
                expires_ms=10**12,
            )

        req = Requirement(kind="gpu")
        ads = [advert(liar, "H100-SXM", declared[liar], 500_000)]
        ads.append(advert(t4, "T4", declared[t4], 150_000))
        by_claim = rank(req, 1, 10**7, ads)
        assert by_claim[0].provider == liar  # on paper, the H100 is cheaper per FLOP
        by_measure = rank(req, 1, 10**7, ads, measured_flops=measured)
        assert by_measure[0].provider == t4


class TestCanary:
    def test_the_canary_program_prints_what_the_tenant_computes(self) -> None:
        import json
        import subprocess
        import sys

        nonce = bytes(range(16))
        argv = canary_command(nonce, rounds=1_000)
        argv[0] = sys.executable
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == {CANARY_METRIC: canary_answer(nonce, rounds=1_000)}
        assert canary_answer(nonce, 1_000) != canary_answer(bytes(16), 1_000)
        assert canary_answer(nonce, 1_000) < 2**48  # exact as a float metric


class TestJobFile:
    BASE = """
name: q
sweep:
  program: trial.py
  method: grid
  metric: {name: loss, goal: minimize}
  command: ["${env}", "${interpreter}", "${program}", "${args}", "--seed=${seed}", "${seed}"]
  parameters:
    x: {values: [1, 2]}
"""

    def test_verify_is_on_by_default_and_configurable(self) -> None:
        from market.jobspec import JobError, parse_job

        on = parse_job(self.BASE).verify
        assert (on.enabled, on.rate, on.best, on.canary) == (True, None, True, True)
        assert parse_job(self.BASE + "verify: off\n").verify.enabled is False
        custom = parse_job(self.BASE + "verify: {rate: 0.5, tolerance: {rel: 0.01}}\n")
        assert (custom.verify.rate, custom.verify.tolerance.rel) == (0.5, 0.01)
        with pytest.raises(JobError, match=r"verify\.rate"):
            parse_job(self.BASE + "verify: {rate: 2}\n")

    def test_the_seed_macro_expands_to_the_trials_seed(self) -> None:
        from market.jobspec import parse_job, render_command

        spec = parse_job(self.BASE)
        argv = render_command(spec, {"x": 1}, interpreter="python3", seed=trial_seed(9, 0))
        assert argv[-2:] == ["--seed=${seed}", str(trial_seed(9, 0))]
