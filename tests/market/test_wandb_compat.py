"""W&B sweep compatibility: every distribution, every command macro and hyperband as the
W&B sweep reference defines them (docs.wandb.ai, sweep configuration keys; the rules in
wandb/sweeps: params.py, hyperband_stopping.py, schema.json).

Pure and seeded. Statistical checks draw a few thousand values with a fixed seed and
use bounds several standard errors wide, so they test the shape of each distribution,
not the luck of one seed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from typing import Any

import pytest

from market.jobspec import (
    DEFAULT_COMMAND,
    PARAMS_FILE_ENV,
    JobError,
    JobSpec,
    missing_envvars,
    parse_job,
    render_command,
)
from market.lifecycle import TrialState
from market.search import FinishedTrial, Search, beta_cdf, beta_ppf

N = 3000


def spec(parameter: str, method: str = "random", extra: str = "") -> JobSpec:
    return parse_job(
        f"program: train.py\nmethod: {method}\nrun_cap: {N}\n{extra}parameters:\n  p: {parameter}\n"
    )


def draw(parameter: str, method: str = "random", n: int = N) -> list[Any]:
    s = spec(parameter, method, "metric: {name: loss}\n" if method == "bayes" else "")
    search = Search(s, seed=11)
    out = []
    for _ in range(n):
        t = search.ask()
        assert t is not None
        out.append(t.params["p"])
        if method == "bayes":
            search.tell(t.number, 0.0)
    return out


class TestDistributions:
    def test_constant_is_the_value(self) -> None:
        assert set(draw("{distribution: constant, value: adam}", n=50)) == {"adam"}

    def test_categorical_is_uniform_over_the_values(self) -> None:
        counts = Counter(draw("{distribution: categorical, values: [a, b, c]}"))
        assert set(counts) == {"a", "b", "c"}
        assert all(0.28 < counts[v] / N < 0.39 for v in "abc"), counts

    def test_int_uniform_gives_the_end_points_full_weight(self) -> None:
        values = draw("{distribution: int_uniform, min: 0, max: 4}")
        assert {type(v) for v in values} == {int}
        counts = Counter(values)
        assert set(counts) == {0, 1, 2, 3, 4}
        assert all(0.16 < counts[v] / N < 0.24 for v in range(5)), counts

    def test_uniform(self) -> None:
        values = draw("{distribution: uniform, min: 2.0, max: 4.0}")
        assert all(2.0 <= v <= 4.0 for v in values)
        assert 2.95 < statistics.fmean(values) < 3.05

    def test_q_uniform_gives_its_end_points_half_weight_as_wandb(self) -> None:
        # W&B: round(uniform(0, 10) / 1) * 1, so 0 and 10 each cover half a unit.
        values = draw("{distribution: q_uniform, min: 0, max: 10, q: 1}")
        assert {type(v) for v in values} == {int}  # an integer q gives integers
        counts = Counter(values)
        assert set(counts) == set(range(11))
        inner = statistics.fmean(counts[v] for v in range(1, 10))
        assert 0.35 < counts[0] / inner < 0.65, counts
        assert 0.35 < counts[10] / inner < 0.65, counts

    def test_q_uniform_grid_still_enumerates_the_lattice(self) -> None:
        s = spec("{distribution: q_uniform, min: 0, max: 1, q: 0.25}", "grid")
        search = Search(s)
        points = []
        while (t := search.ask()) is not None:
            points.append(t.params["p"])
        assert points == [0.0, 0.25, 0.5, 0.75, 1.0]

    def test_log_uniform_bounds_are_exponents_of_e(self) -> None:
        values = draw("{distribution: log_uniform, min: -4, max: 0}")
        assert all(math.exp(-4) <= v <= 1.0 for v in values)
        assert -2.1 < statistics.fmean(math.log(v) for v in values) < -1.9

    def test_log_uniform_values(self) -> None:
        values = draw("{distribution: log_uniform_values, min: 0.0001, max: 1}")
        assert all(0.0001 <= v <= 1 for v in values)
        # uniform in log: the median is the geometric middle, 0.01
        assert 0.007 < statistics.median(values) < 0.014

    @pytest.mark.parametrize(
        "parameter",
        [
            "{distribution: q_log_uniform, min: 0, max: 5, q: 4}",
            "{distribution: q_log_uniform_values, min: 1, max: 150, q: 4}",
        ],
    )
    def test_q_log_uniform_forms_are_multiples_of_q(self, parameter: str) -> None:
        values = draw(parameter, n=500)
        assert all(type(v) is int and v % 4 == 0 for v in values)
        assert all(0 <= v <= 152 for v in values)
        assert statistics.median(values) < 40  # log-uniform leans to the small end

    def test_inv_log_uniform_values_is_log_uniform_on_min_max(self) -> None:
        # W&B: exp(-u), u uniform on [-ln max, -ln min]
        values = draw("{distribution: inv_log_uniform_values, min: 0.001, max: 10}")
        assert all(0.001 <= v <= 10 for v in values)
        assert 0.07 < statistics.median(values) < 0.14  # geometric middle 0.1
        low = sum(v < 0.01 for v in values) / N  # one decade of four
        assert 0.21 < low < 0.29

    def test_inv_log_uniform_is_exp_of_minus_a_uniform(self) -> None:
        # W&B: exp(-u), u uniform on [min, max] = [1, 5]
        values = draw("{distribution: inv_log_uniform, min: 1, max: 5}")
        assert all(math.exp(-5) <= v <= math.exp(-1) for v in values)
        logs = [-math.log(v) for v in values]
        assert 2.9 < statistics.fmean(logs) < 3.1
        assert 1.1 < statistics.stdev(logs) < 1.2  # 4 / sqrt(12) = 1.155

    def test_normal(self) -> None:
        values = draw("{distribution: normal, mu: 5, sigma: 2}")
        assert 4.85 < statistics.fmean(values) < 5.15
        assert 1.9 < statistics.stdev(values) < 2.1

    def test_q_normal(self) -> None:
        values = draw("{distribution: q_normal, mu: 0, sigma: 10, q: 5}")
        assert all(type(v) is int and v % 5 == 0 for v in values)
        assert 9 < statistics.stdev(values) < 11

    def test_log_normal(self) -> None:
        values = draw("{distribution: log_normal, mu: 1, sigma: 0.5}")
        assert all(v > 0 for v in values)
        logs = [math.log(v) for v in values]
        assert 0.95 < statistics.fmean(logs) < 1.05
        assert 0.47 < statistics.stdev(logs) < 0.53

    def test_q_log_normal(self) -> None:
        values = draw("{distribution: q_log_normal, mu: 3, sigma: 0.5, q: 2}")
        assert all(type(v) is int and v % 2 == 0 and v >= 0 for v in values)
        assert 17 < statistics.median(values) < 23  # e**3 = 20.1

    def test_beta(self) -> None:
        values = draw("{distribution: beta, a: 2, b: 5}")
        assert all(0 <= v <= 1 for v in values)
        assert 0.275 < statistics.fmean(values) < 0.296  # a / (a + b) = 0.2857
        var = 2 * 5 / (7**2 * 8)
        assert 0.9 * var < statistics.variance(values) < 1.1 * var

    def test_beta_defaults_to_uniform(self) -> None:
        values = draw("{distribution: beta}")
        assert 0.48 < statistics.fmean(values) < 0.52
        assert 0.08 < statistics.variance(values) < 0.087  # 1/12

    def test_q_beta(self) -> None:
        values = draw("{distribution: q_beta, a: 5, b: 5, q: 0.1}")
        assert all(round(v, 1) == v and 0 <= v <= 1 for v in values)
        assert Counter(values).most_common(1)[0][0] == 0.5

    def test_beta_inverse_cdf_matches_scipy(self) -> None:
        stats = pytest.importorskip("scipy.stats")
        for a, b in [(1, 1), (2, 5), (0.5, 0.5), (5, 1), (0.3, 3), (30, 40)]:
            for u in (0.001, 0.1, 0.37, 0.5, 0.9, 0.999):
                assert beta_cdf(u, a, b) == pytest.approx(stats.beta.cdf(u, a, b), abs=1e-9)
                assert beta_ppf(u, a, b) == pytest.approx(stats.beta.ppf(u, a, b), abs=1e-9)

    @pytest.mark.parametrize(
        "parameter",
        [
            "{distribution: inv_log_uniform, min: 1, max: 5}",
            "{distribution: inv_log_uniform_values, min: 0.001, max: 10}",
            "{distribution: beta, a: 2, b: 5}",
            "{distribution: q_beta, a: 2, b: 5, q: 0.05}",
            "{distribution: q_uniform, min: 0, max: 10, q: 1}",
        ],
    )
    def test_bayes_samples_the_new_forms_and_restores_them(self, parameter: str) -> None:
        values = draw(parameter, "bayes", n=12)
        assert len(values) == 12
        s = spec(parameter, "bayes", "metric: {name: loss}\n")
        resumed = Search(s, seed=1)
        resumed.restore(
            [FinishedTrial(i, {"p": v}, TrialState.SUCCEEDED, 1.0) for i, v in enumerate(values)]
        )
        assert resumed.ask() is not None

    def test_bad_shapes_are_refused_with_the_key(self) -> None:
        with pytest.raises(JobError) as e:
            parse_job(
                "program: t.py\nmethod: random\nparameters:\n"
                "  a: {distribution: beta, a: 0}\n"
                "  b: {distribution: inv_log_uniform_values, min: 0, max: 1}\n"
                "  c: {distribution: beta, min: 0}\n"
            )
        found = {p.path: p.message for p in e.value.problems}
        assert "must be > 0" in found["parameters.a.a"]
        assert "min > 0" in found["parameters.b.min"]
        assert "does not apply" in found["parameters.c.min"]


def hyperband(et: str, goal: str = "minimize") -> Search:
    return Search(
        parse_job(
            "program: t.py\nmethod: random\nrun_cap: 50\n"
            f"metric: {{name: loss, goal: {goal}}}\nearly_terminate: {et}\n"
            "parameters:\n  x: {min: 0.0, max: 1.0}\n"
        )
    )


class TestHyperband:
    @pytest.mark.parametrize(
        ("et", "bands"),
        [
            ("{type: hyperband, min_iter: 3}", (3, 9, 27, 81)),
            ("{type: hyperband, min_iter: 2, eta: 2}", (2, 4, 8, 16)),
            ("{type: hyperband, max_iter: 27, s: 2}", (3, 9)),
            ("{type: hyperband, max_iter: 81, s: 3, eta: 3}", (3, 9, 27)),
            ("{type: hyperband, max_iter: 5, s: 2, eta: 2}", (1, 2)),
            ("{type: hyperband, max_iter: 10, s: 5, eta: 3}", (1, 3)),  # stops below 1
        ],
    )
    def test_bands_are_wandbs(self, et: str, bands: tuple[int, ...]) -> None:
        s = parse_job(
            "program: t.py\nmethod: random\nmetric: {name: loss}\n"
            f"early_terminate: {et}\nparameters:\n  x: {{min: 0.0, max: 1.0}}\n"
        )
        assert s.sweep_config.early_terminate is not None
        assert s.sweep_config.early_terminate.bands()[: len(bands)] == bands

    def test_a_max_iter_that_leaves_no_band_is_refused(self) -> None:
        with pytest.raises(JobError, match="no band"):
            hyperband("{type: hyperband, max_iter: 2, s: 1, eta: 3}")

    def test_the_wandb_reference_example_stops_the_same_runs(self) -> None:
        # hyperband_stop_runs' own example: max_iter 5, eta 2, s 2 -> bands 1 and 2;
        # a and e finished; b must stop at band 1, c passes band 1 but not band 2, d runs.
        search = hyperband("{type: hyperband, max_iter: 5, eta: 2, s: 2}")
        search.restore(
            [
                FinishedTrial(0, {"x": 0.1}, TrialState.SUCCEEDED, 9.0, {0: 10.0, 1: 9.0}),
                FinishedTrial(1, {"x": 0.2}, TrialState.SUCCEEDED, 6.0, {0: 10.0, 1: 6.0, 2: 6.0}),
            ]
        )
        b, c, d = (search.ask() for _ in range(3))
        assert b is not None
        assert c is not None
        assert d is not None
        stopped: set[str] = set()
        for step, values in enumerate([(10, 10, 10), (10, 8, 7), (None, 8, 7), (None, 8, 7)]):
            for name, trial, v in zip("bcd", (b, c, d), values, strict=True):
                if v is not None and name not in stopped and search.report(trial.number, step, v):
                    stopped.add(name)
        assert stopped == {"b", "c"}

    def test_a_trial_that_passed_a_band_is_checked_again(self) -> None:
        # Trial 1 passes band 1 while it is the only one there; when a better trial
        # reaches the band, the threshold moves and trial 1 stops at its next report.
        search = hyperband("{type: hyperband, min_iter: 1, eta: 4}")  # bands 1, 4, 16
        t1, t2 = search.ask(), search.ask()
        assert t1 is not None
        assert t2 is not None
        assert not search.report(t1.number, 0, 5.0)
        assert not search.report(t1.number, 1, 5.0)  # alone at band 1: passes
        assert not search.report(t2.number, 0, 1.0)
        assert not search.report(t2.number, 1, 1.0)  # band 1: [1, 5], threshold 1
        assert search.report(t1.number, 2, 5.0)  # still band 1, now worse than the threshold

    def test_the_count_of_values_decides_not_the_step_label(self) -> None:
        # Steps 100, 200, ... are labels: the first value is never judged with min_iter 1.
        search = hyperband("{type: hyperband, min_iter: 1, eta: 3}")
        good = search.ask()
        assert good is not None
        for i in range(3):
            assert not search.report(good.number, 100 * (i + 1), 1.0)
        search.tell(good.number, 1.0)
        bad = search.ask()
        assert bad is not None
        assert not search.report(bad.number, 100, 9.0)  # 1 value: below band 1
        assert search.report(bad.number, 200, 9.0)  # 2 values: band 1, worse: stop

    def test_maximize_stops_the_low_ones(self) -> None:
        search = hyperband("{type: hyperband, min_iter: 1, eta: 3}", goal="maximize")
        good = search.ask()
        assert good is not None
        for i in range(3):
            search.report(good.number, i, 0.9)
        search.tell(good.number, 0.9)
        bad = search.ask()
        assert bad is not None
        assert not search.report(bad.number, 0, 0.1)
        assert search.report(bad.number, 1, 0.1)

    def test_judged_by_the_best_value_so_far(self) -> None:
        search = hyperband("{type: hyperband, min_iter: 1, eta: 3}")
        good = search.ask()
        assert good is not None
        for i in range(3):
            search.report(good.number, i, 2.0)
        search.tell(good.number, 2.0)
        noisy = search.ask()
        assert noisy is not None
        assert not search.report(noisy.number, 0, 1.0)  # best so far 1.0
        assert not search.report(noisy.number, 1, 3.0)  # worse now, but its best beats 2.0


PARAMS = {"lr": 0.1, "flag": True, "off": False, "opt": {"b1": 0.9}}


def command_spec(command: list[str], extra: str = "") -> JobSpec:
    return parse_job(
        json.dumps(
            {
                "program": "train.py",
                "method": "random",
                "run_cap": 2,
                "command": command,
                "parameters": {"lr": {"values": [0.1]}, "x": {"min": 0.0, "max": 1.0}},
            }
        )
        + extra
    )


class TestCommandMacros:
    """Every macro of the W&B reference, expanded as the W&B agent does."""

    def expand(self, *items: str, environ: dict[str, str] | None = None) -> list[str]:
        return render_command(
            command_spec(list(items)),
            PARAMS,
            interpreter="python3",
            args_json_file="params-file.json",
            environ=environ,
        )

    def test_default_command(self) -> None:
        assert command_spec(list(DEFAULT_COMMAND)).sweep_config.command == list(DEFAULT_COMMAND)
        assert self.expand(*DEFAULT_COMMAND) == [
            "/usr/bin/env",
            "python3",
            "train.py",
            "--flag=True",
            "--lr=0.1",
            "--off=False",
            "--opt={'b1': 0.9}",
        ]

    def test_args_no_hyphens(self) -> None:
        assert self.expand("${args_no_hyphens}") == [
            "flag=True",
            "lr=0.1",
            "off=False",
            "opt={'b1': 0.9}",
        ]

    def test_args_no_boolean_flags(self) -> None:
        assert self.expand("${args_no_boolean_flags}") == [
            "--flag",
            "--lr=0.1",
            "--opt={'b1': 0.9}",
        ]

    def test_args_json_and_args_json_file(self) -> None:
        argv = self.expand("${args_json}", "${args_json_file}")
        assert json.loads(argv[0]) == PARAMS
        assert argv[1] == "params-file.json"

    def test_envvar_alone_and_inside_a_longer_item(self) -> None:
        env = {"DATA": "/data", "RUN": "r7"}
        argv = self.expand("${envvar:DATA}", "--out=${envvar:DATA}/${envvar:RUN}.ckpt", environ=env)
        assert argv == ["/data", "--out=/data/r7.ckpt"]

    def test_a_missing_envvar_is_named_before_anything_runs(self) -> None:
        s = command_spec(["python3", "--token=${envvar:NOPE_TOKEN}"])
        assert missing_envvars(s, {"HOME": "/h"}) == ["NOPE_TOKEN"]
        with pytest.raises(ValueError, match="NOPE_TOKEN"):
            render_command(s, PARAMS, "python3", environ={})

    def test_envvar_is_read_from_the_environment_given_not_the_process(self) -> None:
        # market/ reads no environment: the caller (the tenant) passes it.
        with pytest.raises(ValueError, match="PATH"):
            render_command(command_spec(["x${envvar:PATH}"]), PARAMS, "python3")


class TestNotes:
    """What Mercato reads differently, shown by `plan` and `submit`."""

    def test_a_command_without_args_macro_says_how_parameters_arrive(self) -> None:
        notes = " ".join(command_spec(["python3", "train.py", "--lr=${lr}"]).notes())
        assert "'--lr=${lr}' is passed as written" in notes
        assert "no ${args...} macro" in notes
        assert PARAMS_FILE_ENV in notes

    def test_a_command_with_args_needs_no_such_note(self) -> None:
        notes = " ".join(command_spec(["python3", "train.py", "${args}"]).notes())
        assert PARAMS_FILE_ENV not in notes

    def test_controller_and_strict_are_noted(self) -> None:
        s = parse_job(
            "program: t.py\nmethod: random\nrun_cap: 2\ncontroller: {type: local}\n"
            "metric: {name: loss}\n"
            "early_terminate: {type: hyperband, min_iter: 1, strict: false}\n"
            "parameters:\n  x: {min: 0.0, max: 1.0}\n"
        )
        notes = " ".join(s.notes())
        assert "'controller'" in notes
        assert "strict" in notes


class TestNames:
    def test_the_sweep_name_names_a_wrapped_job(self) -> None:
        s = parse_job(
            "sweep:\n  name: lr-search\n  program: run.py\n  method: random\n"
            "  parameters:\n    x: {min: 0.0, max: 1.0}\n"
        )
        assert s.name == "lr-search"

    def test_a_top_level_name_wins(self) -> None:
        s = parse_job(
            "name: mine\nsweep:\n  name: lr-search\n  program: run.py\n  method: random\n"
            "  parameters:\n    x: {min: 0.0, max: 1.0}\n"
        )
        assert s.name == "mine"

    def test_a_plain_wandb_file_is_named_by_its_name(self) -> None:
        s = parse_job(
            "name: lr-search\nprogram: run.py\nmethod: random\n"
            "parameters:\n  x: {min: 0.0, max: 1.0}\n"
        )
        assert s.name == "lr-search"
