"""The sweep search: which trials a tenant runs, in what order, and when it stops.

Pure and seeded: the same spec, seed and calls give the same trials.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import pytest

from market.jobspec import DEFAULT_RUN_CAP, JobSpec, parse_job
from market.lifecycle import TrialState
from market.search import Best, FinishedTrial, Search, SearchError, Trial


def job(parameters: str, method: str = "random", extra: str = "") -> JobSpec:
    return parse_job(f"program: train.py\nmethod: {method}\n{extra}parameters:\n{parameters}")


def drain(search: Search) -> list[Trial]:
    """Ask until the search is exhausted (nothing is told)."""
    out = []
    while (trial := search.ask()) is not None:
        out.append(trial)
    return out


GRID = job(
    "  kernel: {values: [rbf, linear]}\n"
    "  C: {values: [0.1, 1, 10]}\n"
    "  degree: {distribution: int_uniform, min: 2, max: 3}\n"
    "  gamma: {value: scale}\n",
    method="grid",
    extra="metric: {name: val_loss}\n",
)

MIXED = (
    "  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}\n"
    "  wd: {distribution: log_uniform, min: -9, max: -2}\n"
    "  dropout: {distribution: uniform, min: 0.0, max: 0.5}\n"
    "  layers: {distribution: int_uniform, min: 1, max: 4}\n"
    "  width: {distribution: q_uniform, min: 16, max: 256, q: 16}\n"
    "  momentum: {distribution: q_uniform, min: 0.5, max: 0.99, q: 0.01}\n"
    "  batch: {distribution: q_log_uniform_values, min: 16, max: 512, q: 1}\n"
    "  noise: {distribution: normal, mu: 1.0, sigma: 0.1}\n"
    "  scale: {distribution: log_normal, mu: 0.0, sigma: 0.5}\n"
    "  act: {values: [relu, gelu, [1, 2]]}\n"
    "  seed: {value: 7}\n"
    "  opt:\n"
    "    parameters:\n"
    "      beta1: {values: [0.9, 0.95]}\n"
    "      eps: {distribution: log_uniform_values, min: 1e-8, max: 1e-6}\n"
)


def assert_within_mixed_bounds(params: dict[str, Any]) -> None:
    assert 0.0001 <= params["lr"] <= 0.1
    assert math.exp(-9) <= params["wd"] <= math.exp(-2)  # W&B: exponents of e
    assert 0.0 <= params["dropout"] <= 0.5
    assert type(params["layers"]) is int
    assert 1 <= params["layers"] <= 4
    assert type(params["width"]) is int  # an integer q gives integers, as in W&B
    assert params["width"] % 16 == 0
    assert 16 <= params["width"] <= 256
    assert type(params["momentum"]) is float
    assert 0.5 <= params["momentum"] <= 0.99
    assert round(params["momentum"], 2) == params["momentum"]  # on the 0.01 lattice
    assert type(params["batch"]) is int
    assert 16 <= params["batch"] <= 512
    assert type(params["noise"]) is float
    assert params["scale"] > 0
    assert params["act"] in ("relu", "gelu", [1, 2])
    assert params["seed"] == 7
    assert set(params["opt"]) == {"beta1", "eps"}
    assert params["opt"]["beta1"] in (0.9, 0.95)
    assert 1e-8 <= params["opt"]["eps"] <= 1e-6


class TestGrid:
    def test_enumerates_the_full_product_exactly_once_in_wandb_order(self) -> None:
        trials = drain(Search(GRID, seed=0))
        points = [(t.params["C"], t.params["degree"], t.params["kernel"]) for t in trials]
        # W&B's order: parameters sorted by name, the first one varying slowest.
        assert points == list(itertools.product([0.1, 1, 10], [2, 3], ["rbf", "linear"]))
        assert [t.number for t in trials] == list(range(12))
        assert all(t.params["gamma"] == "scale" for t in trials)

    def test_is_exhausted_after_the_last_point(self) -> None:
        search = Search(GRID)
        drain(search)
        assert search.exhausted
        assert search.ask() is None
        assert not search.done  # twelve trials still running
        for n in range(12):
            search.tell(n, 1.0)
        assert search.done

    def test_run_cap_cuts_the_grid(self) -> None:
        capped = job("  a: {values: [1, 2, 3, 4]}\n", method="grid", extra="run_cap: 3\n")
        assert [t.params["a"] for t in drain(Search(capped))] == [1, 2, 3]

    def test_q_uniform_grid_is_the_q_lattice(self) -> None:
        spec = job("  m: {distribution: q_uniform, min: 0.1, max: 0.4, q: 0.1}\n", method="grid")
        assert [t.params["m"] for t in drain(Search(spec))] == [0.1, 0.2, 0.3, 0.4]

    def test_same_order_for_any_seed(self) -> None:
        first = [t.params for t in drain(Search(GRID, seed=1))]
        assert first == [t.params for t in drain(Search(GRID, seed=99))]


class TestRandomAndBayes:
    @pytest.mark.parametrize("method", ["random", "bayes"])
    def test_every_distribution_stays_in_bounds_and_type(self, method: str) -> None:
        spec = job(MIXED, method=method, extra="metric: {name: loss}\nrun_cap: 25\n")
        search = Search(spec, seed=3)
        trials = []
        while (trial := search.ask()) is not None:
            assert_within_mixed_bounds(trial.params)
            # Tell a value so TPE leaves its random start-up phase and models the space.
            search.tell(trial.number, trial.params["lr"] * 1000 + trial.params["dropout"])
            trials.append(trial)
        assert len(trials) == 25

    def test_seeded_searches_repeat_and_other_seeds_differ(self) -> None:
        spec = job(MIXED, extra="run_cap: 5\n")
        a = [t.params for t in drain(Search(spec, seed=1))]
        assert a == [t.params for t in drain(Search(spec, seed=1))]
        assert a != [t.params for t in drain(Search(spec, seed=2))]

    def test_run_cap_is_honoured(self) -> None:
        spec = job("  x: {min: 0.0, max: 1.0}\n", extra="run_cap: 7\n")
        search = Search(spec)
        trials = drain(search)
        assert len(trials) == 7
        assert search.issued == 7
        assert search.running == frozenset(range(7))

    def test_failed_and_pruned_trials_count_toward_the_cap(self) -> None:
        spec = job("  x: {min: 0.0, max: 1.0}\n", extra="run_cap: 2\n")
        search = Search(spec)
        first = search.ask()
        assert first is not None
        search.tell(first.number, None, "failed")
        second = search.ask()
        assert second is not None
        assert search.ask() is None

    def test_without_run_cap_stops_at_the_default(self) -> None:
        search = Search(job("  x: {values: [1, 2]}\n"))
        assert search.trial_cap == DEFAULT_RUN_CAP
        assert len(drain(search)) == DEFAULT_RUN_CAP

    def test_probabilities_weigh_random_choices(self) -> None:
        spec = job(
            "  arch: {values: [small, large], probabilities: [0.9, 0.1]}\n", extra="run_cap: 300\n"
        )
        counts = Counter(t.params["arch"] for t in drain(Search(spec, seed=5)))
        assert counts["small"] > 200
        assert counts["large"] > 0

    def test_bayes_concentrates_near_the_optimum(self) -> None:
        # Minimise (x - 0.8)**2 on [0, 1]: after TPE's random start-up (10 trials) its
        # proposals land closer to 0.8 than uniform draws would (mean distance 0.34).
        spec = job(
            "  x: {min: 0.0, max: 1.0}\n", "bayes", extra="metric: {name: loss}\nrun_cap: 40\n"
        )
        search = Search(spec, seed=0)
        late = []
        while (trial := search.ask()) is not None:
            x = trial.params["x"]
            if trial.number >= 20:
                late.append(abs(x - 0.8))
            search.tell(trial.number, (x - 0.8) ** 2)
        assert sum(late) / len(late) < 0.15
        best = search.best()
        assert best is not None
        assert abs(best.params["x"] - 0.8) < 0.1


class TestTellAndBest:
    def test_best_honours_minimize(self) -> None:
        search = Search(GRID)
        trials = drain(search)[:3]
        for t, value in zip(trials, [0.5, 0.2, 0.9], strict=True):
            search.tell(t.number, value)
        assert search.best() == Best(trials[1].number, trials[1].params, 0.2)

    def test_best_honours_maximize(self) -> None:
        spec = job(
            "  a: {values: [1, 2, 3]}\n", "grid", extra="metric: {name: acc, goal: maximize}\n"
        )
        search = Search(spec)
        for t, value in zip(drain(search), [0.5, 0.9, 0.2], strict=True):
            search.tell(t.number, value)
        best = search.best()
        assert best is not None
        assert (best.params["a"], best.value) == (2, 0.9)

    def test_failed_pruned_and_metricless_trials_are_never_best(self) -> None:
        search = Search(GRID)
        a, b, c, d = drain(search)[:4]
        assert search.best() is None
        search.tell(a.number, 0.1, "failed")
        search.report(b.number, 1, 0.01)
        search.tell(b.number, None, "pruned")
        search.tell(c.number, None)  # succeeded but never printed the metric
        assert search.best() is None
        search.tell(d.number, 5.0)
        best = search.best()
        assert best is not None
        assert best.number == d.number

    def test_no_metric_means_no_best(self) -> None:
        search = Search(job("  a: {values: [1]}\n", "grid"))
        (t,) = drain(search)
        search.tell(t.number, 1.0)
        assert search.best() is None

    def test_telling_an_unknown_or_finished_trial_is_a_typed_error(self) -> None:
        search = Search(GRID)
        t = search.ask()
        assert t is not None
        with pytest.raises(SearchError, match="never asked") as info:
            search.tell(99, 1.0)
        assert info.value.code == "search_error"
        search.tell(t.number, 1.0)
        with pytest.raises(SearchError, match="already told"):
            search.tell(t.number, 1.0)
        with pytest.raises(SearchError, match="state"):
            search.tell(t.number, 1.0, "exploded")  # type: ignore[arg-type]

    def test_target_stops_the_sweep(self) -> None:
        spec = job(
            "  x: {min: 0.0, max: 1.0}\n", extra="metric: {name: loss, target: 0.1}\nrun_cap: 50\n"
        )
        search = Search(spec)
        t = search.ask()
        assert t is not None
        search.tell(t.number, 0.5)
        t = search.ask()
        assert t is not None
        search.tell(t.number, 0.05)
        assert search.ask() is None


HYPERBAND = "metric: {name: loss}\nearly_terminate: {type: hyperband, min_iter: 1, eta: 3}\n"


def run_curve(search: Search, trial: Trial, losses: list[float]) -> int:
    """Report a loss per step (1, 2, ...) until pruned; return the steps run."""
    for step, loss in enumerate(losses, start=1):
        if search.report(trial.number, step, loss):
            search.tell(trial.number, None, "pruned")
            return step
    search.tell(trial.number, losses[-1])
    return len(losses)


GOOD = [1.0 / s for s in range(1, 10)]
BAD = [10.0] * 9


class TestEarlyTermination:
    def test_a_clearly_bad_trial_is_pruned_at_the_first_band(self) -> None:
        # min_iter 1: W&B judges a trial once it has logged more than 1 value.
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND + "run_cap: 10\n"))
        for _ in range(3):
            trial = search.ask()
            assert trial is not None
            assert run_curve(search, trial, GOOD) == 9  # good trials run to the end
        bad = search.ask()
        assert bad is not None
        assert run_curve(search, bad, BAD) == 2

    def test_a_diverged_trial_is_pruned(self) -> None:
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND))
        trial = search.ask()
        assert trial is not None
        assert search.report(trial.number, 1, float("nan")) is True

    def test_nothing_is_pruned_without_early_terminate(self) -> None:
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra="metric: {name: loss}\n"))
        for curve in (GOOD, GOOD, GOOD, BAD):
            trial = search.ask()
            assert trial is not None
            assert run_curve(search, trial, curve) == 9

    def test_a_step_reported_twice_keeps_its_first_answer(self) -> None:
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND))
        good = search.ask()
        assert good is not None
        run_curve(search, good, GOOD)
        bad = search.ask()
        assert bad is not None
        assert search.report(bad.number, 0, 11.0) is False  # before the first band
        assert search.report(bad.number, 1, 10.0) is True
        assert search.report(bad.number, 1, 0.0) is True
        # What is stored for a restore is what the pruner judged: the first value.
        assert search.reported(bad.number) == {0: 11.0, 1: 10.0}
        search.tell(bad.number, None, "pruned")
        assert search.reported(bad.number) == {}

    def test_reports_after_tell_are_ignored_and_unknown_trials_refused(self) -> None:
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND))
        t = search.ask()
        assert t is not None
        search.tell(t.number, 0.5)
        assert search.report(t.number, 3, 100.0) is False
        with pytest.raises(SearchError):
            search.report(42, 1, 1.0)
        other = search.ask()
        assert other is not None
        with pytest.raises(SearchError, match="step"):
            search.report(other.number, -1, 1.0)

    def test_wandb_max_iter_and_s_set_the_first_rung(self) -> None:
        extra = "metric: {name: loss}\nearly_terminate: {type: hyperband, max_iter: 27, s: 2}\n"
        search = Search(job("  x: {min: 0.0, max: 1.0}\n", extra=extra))
        good = search.ask()
        assert good is not None
        run_curve(search, good, [1.0] * 27)
        bad = search.ask()
        assert bad is not None
        # Bands 27 / 3**2 = 3 and 27 / 3 = 9: judged once it has logged 4 values.
        assert run_curve(search, bad, [10.0] * 27) == 4


class TestRestore:
    def test_grid_resumes_with_the_remaining_points_only(self) -> None:
        first = Search(GRID, seed=0)
        trials = drain(first)
        for t in trials[:5]:
            first.tell(t.number, float(t.number))
        # Trials 5 and 6 were running when the tenant stopped; the rest never started.
        finished = [
            FinishedTrial(t.number, t.params, TrialState.SUCCEEDED, float(t.number))
            for t in trials[:5]
        ]
        resumed = Search(GRID, seed=0)
        resumed.restore(finished, next_number=7)
        rest = drain(resumed)
        done = [t.params for t in trials[:5]]
        assert len(rest) == 12 - 5
        assert all(t.params not in done for t in rest)
        assert sorted(map(repr, done + [t.params for t in rest])) == sorted(
            repr(t.params) for t in trials
        )
        assert [t.number for t in rest] == list(range(7, 14))
        best = resumed.best()
        assert best is not None
        assert (best.number, best.params) == (0, trials[0].params)

    def test_a_grid_point_finished_twice_leaves_no_point_out(self) -> None:
        spec = job("  a: {values: [1, 2, 3, 4]}\n", "grid", extra="metric: {name: loss}\n")
        first = drain(Search(spec))
        # Trial 0 was retried under a new number after its provider vanished.
        finished = [
            FinishedTrial(0, first[0].params, "failed"),
            FinishedTrial(4, first[0].params, TrialState.SUCCEEDED, 0.5),
        ]
        resumed = Search(spec)
        resumed.restore(finished)
        assert [t.params["a"] for t in drain(resumed)] == [2, 3, 4]

    def test_trials_running_at_the_stop_run_again_under_their_own_numbers(self) -> None:
        spec = job(
            "  a: {values: [1, 2, 3, 4]}\n",
            "grid",
            extra="metric: {name: loss}\n" + HYPERBAND.split("\n", 1)[1],
        )
        first = drain(Search(spec))
        resumed = Search(spec)
        resumed.restore(
            [FinishedTrial(0, first[0].params, TrialState.SUCCEEDED, 0.5, {0: 0.5, 1: 0.5})],
            running=[Trial(2, first[2].params)],
        )
        assert resumed.running == frozenset({2})
        # The grid hands out only the points neither finished nor running.
        assert [(t.number, t.params["a"]) for t in drain(resumed)] == [(3, 2), (4, 4)]
        assert resumed.report(2, 0, 9.0) is False
        assert resumed.report(2, 1, 9.0) is True  # judged against trial 0's band
        resumed.tell(2, None, "pruned")
        resumed.tell(3, 0.1)
        best = resumed.best()
        assert best is not None
        assert (best.number, best.params) == (3, {"a": 2})
        with pytest.raises(SearchError, match="twice"):
            Search(spec).restore(
                [FinishedTrial(0, first[0].params, "failed")], running=[Trial(0, first[0].params)]
            )

    def test_random_resumes_under_the_cap_with_new_numbers(self) -> None:
        spec = job(MIXED, extra="metric: {name: loss}\nrun_cap: 10\n")
        first = Search(spec, seed=4)
        trials = drain(first)[:4]
        finished = [
            FinishedTrial(trials[0].number, trials[0].params, TrialState.SUCCEEDED, 0.3),
            FinishedTrial(trials[1].number, trials[1].params, "failed"),
            FinishedTrial(trials[2].number, trials[2].params, "pruned", None, {1: 9.0}),
            FinishedTrial(trials[3].number, trials[3].params, TrialState.SUCCEEDED, 0.2),
        ]
        resumed = Search(spec, seed=4)
        resumed.restore(finished)
        assert resumed.finished == 4
        rest = drain(resumed)
        assert [t.number for t in rest] == [4, 5, 6, 7, 8, 9]
        best = resumed.best()
        assert best is not None
        assert (best.number, best.value) == (3, 0.2)
        assert best.params == trials[3].params

    def test_bayes_learns_from_restored_trials(self) -> None:
        spec = job(
            "  x: {min: 0.0, max: 1.0}\n", "bayes", extra="metric: {name: loss}\nrun_cap: 30\n"
        )
        finished = [
            FinishedTrial(n, {"x": n / 20}, TrialState.SUCCEEDED, (n / 20 - 0.8) ** 2)
            for n in range(20)
        ]
        resumed = Search(spec, seed=0)
        resumed.restore(finished)
        proposals = [t.params["x"] for t in drain(resumed)]
        assert len(proposals) == 10
        assert sum(abs(x - 0.8) for x in proposals) / len(proposals) < 0.2

    def test_early_termination_keeps_its_rungs_after_restore(self) -> None:
        spec = job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND)
        good = {step: v for step, v in enumerate(GOOD, start=1)}
        resumed = Search(spec)
        resumed.restore([FinishedTrial(0, {"x": 0.5}, TrialState.SUCCEEDED, GOOD[-1], good)])
        bad = resumed.ask()
        assert bad is not None
        assert run_curve(resumed, bad, BAD) == 2

    def test_pruning_decides_the_same_before_and_after_a_restart(self) -> None:
        spec = job("  x: {min: 0.0, max: 1.0}\n", extra=HYPERBAND + "run_cap: 20\n")
        curves = [
            [1.0 / s for s in range(1, 10)],
            [2.0 / s for s in range(1, 10)],
            [0.5 + 1.0 / s for s in range(1, 10)],
            [0.8 / s for s in range(1, 10)],
            [3.0 / s for s in range(1, 10)],
        ]
        later = [[1.5 / s for s in range(1, 10)], [0.9 / s for s in range(1, 10)]]
        original = Search(spec)
        finished = []
        for curve in curves:
            trial = original.ask()
            assert trial is not None
            ran = run_curve(original, trial, curve)
            steps = dict(enumerate(curve[:ran], start=1))
            state = "pruned" if ran < len(curve) else TrialState.SUCCEEDED
            value = None if state == "pruned" else curve[-1]
            finished.append(FinishedTrial(trial.number, trial.params, state, value, steps))
        assert any(f.state == "pruned" for f in finished)  # the rungs did cut something
        resumed = Search(spec)
        resumed.restore(finished)
        for curve in later:
            a, b = original.ask(), resumed.ask()
            assert a is not None
            assert b is not None
            assert run_curve(original, a, curve) == run_curve(resumed, b, curve)

    def test_restore_needs_a_fresh_search(self) -> None:
        search = Search(GRID)
        search.ask()
        with pytest.raises(SearchError, match="fresh"):
            search.restore([])

    def test_a_stored_trial_that_does_not_fit_the_spec_is_refused(self) -> None:
        params = {"C": 0.1, "degree": 2, "kernel": "poly", "gamma": "scale"}
        with pytest.raises(SearchError, match="kernel"):
            Search(GRID).restore([FinishedTrial(0, params, TrialState.SUCCEEDED, 1.0)])
        with pytest.raises(SearchError, match="no value for degree"):
            Search(GRID).restore(
                [FinishedTrial(0, {"C": 0.1, "kernel": "rbf"}, TrialState.SUCCEEDED, 1.0)]
            )
        ok = {"C": 0.1, "degree": 2, "kernel": "rbf"}
        with pytest.raises(SearchError, match="twice"):
            Search(GRID).restore(
                [FinishedTrial(0, ok, TrialState.SUCCEEDED), FinishedTrial(0, ok, "failed")]
            )

    def test_a_restored_sweep_that_reached_its_target_stays_stopped(self) -> None:
        spec = job("  x: {min: 0.0, max: 1.0}\n", extra="metric: {name: loss, target: 0.1}\n")
        resumed = Search(spec)
        resumed.restore([FinishedTrial(0, {"x": 0.3}, TrialState.SUCCEEDED, 0.01)])
        assert resumed.ask() is None


class TestWandbExample:
    def test_the_wandb_docs_sweep_runs_as_written(self) -> None:
        # docs.wandb.ai "Define a sweep configuration": the example sweep.yaml.
        spec = parse_job(
            "program: train.py\n"
            "method: random\n"
            "name: sweep\n"
            "metric:\n"
            "  goal: maximize\n"
            "  name: val_acc\n"
            "parameters:\n"
            "  batch_size:\n"
            "    values: [16, 32, 64]\n"
            "  lr:\n"
            "    min: 0.0001\n"
            "    max: 0.1\n"
            "  epochs:\n"
            "    values: [5, 10, 15]\n"
            "  optimizer:\n"
            "    values: ['adam', 'sgd']\n"
            "run_cap: 6\n"
        )
        search = Search(spec, seed=0)
        trials = drain(search)
        assert len(trials) == 6
        for t in trials:
            assert set(t.params) == {"batch_size", "lr", "epochs", "optimizer"}
            assert t.params["batch_size"] in (16, 32, 64)
            assert 0.0001 <= t.params["lr"] <= 0.1
            search.tell(t.number, t.params["lr"])
        best = search.best()
        assert best is not None
        assert best.value == max(t.params["lr"] for t in trials)


CONTINUOUS = (
    "  x: {distribution: uniform, min: -5, max: 5}\n"
    "  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}\n"
    "  act: {values: [relu, gelu]}\n"
)


def interrupted(
    spec: JobSpec, seed: int, finished: int, running: int
) -> tuple[Search, list[Trial]]:
    """A search that ran ``finished + running`` trials, restored as a resumed tenant does."""
    first = Search(spec, seed=seed)
    asked = [first.ask() for _ in range(finished + running)]
    trials = [t for t in asked if t is not None]
    for t in trials[:finished]:
        first.tell(t.number, float(t.params["x"]) ** 2)
    resumed = Search(spec, seed=seed)
    resumed.restore(
        [
            FinishedTrial(t.number, t.params, TrialState.SUCCEEDED, float(t.params["x"]) ** 2)
            for t in trials[:finished]
        ],
        next_number=finished + running,
        running=trials[finished:],
    )
    return resumed, trials


class TestResumeContinuesTheStream:
    """Issue 13: a resumed random sweep had 12 trials but 6 distinct points (bayes 8 of 12)."""

    def test_random_proposes_what_the_uninterrupted_run_would_have(self) -> None:
        spec = job(CONTINUOUS, extra="run_cap: 12\nmetric: {name: loss}\n")
        whole = [t.params for t in drain(Search(spec, seed=3))]
        resumed, before = interrupted(spec, seed=3, finished=4, running=2)
        after = [t.params for t in drain(resumed)]
        assert [t.params for t in before] + after == whole
        assert len({repr(sorted(p.items())) for p in whole}) == 12

    @pytest.mark.parametrize("method", ["random", "bayes"])
    def test_every_point_after_a_resume_is_new(self, method: str) -> None:
        spec = job(CONTINUOUS, method, extra="run_cap: 14\nmetric: {name: loss}\n")
        resumed, before = interrupted(spec, seed=0, finished=5, running=1)
        after = drain(resumed)
        points = [repr(sorted(t.params.items())) for t in before + after]
        assert len(after) == 14 - 6
        assert len(set(points)) == len(points) == 14

    def test_bayes_skips_a_point_tried_before_the_restart(self) -> None:
        # Two values only: TPE's fresh stream would repeat the one tried before.
        spec = job("  a: {values: [1, 2]}\n", "bayes", extra="run_cap: 2\nmetric: {name: loss}\n")
        resumed, before = interrupted_cat(spec)
        after = drain(resumed)
        assert [t.params["a"] for t in after] == [3 - before[0].params["a"]]


def interrupted_cat(spec: JobSpec) -> tuple[Search, list[Trial]]:
    first = Search(spec, seed=0)
    t = first.ask()
    assert t is not None
    resumed = Search(spec, seed=0)
    resumed.restore([FinishedTrial(t.number, t.params, TrialState.SUCCEEDED, 1.0)], next_number=1)
    return resumed, [t]
