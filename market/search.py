"""Hyperparameter search: Optuna behind an ask/tell loop that the tenant drives.

The tenant asks for a trial, places it on some provider, and tells the outcome when the
result comes back; intermediate metric values go through ``report``, which answers
whether the trial should stop early. Nothing here waits, reads a clock or touches a
file: Optuna runs with its in-memory storage (it stamps trials with the wall clock for
its own records; no decision here depends on those stamps).

Methods, as in W&B:

* ``grid``: the full product of every parameter's values, in W&B's order (parameters
  sorted by name, the first varying slowest), each point once. Points are handed to
  Optuna as enqueued trials rather than through its GridSampler, because GridSampler
  ties grid points to trial numbers and re-runs points once every point is running:
  after a restart (restored trials get new numbers) it would repeat finished points.
* ``random``: Optuna's RandomSampler, seeded.
* ``bayes``: Optuna's TPE (multivariate, with the constant liar so trials running in
  parallel are not proposed twice), seeded. W&B uses a Gaussian process; TPE is the
  Bayesian optimiser Optuna ships and copes with categorical parameters.

A restart (``restore``) does not start the sampler over: grid goes on with the points not
yet visited, random continues its seeded stream exactly where it was (the resumed
sweep proposes what the uninterrupted one would have), and bayes continues with a
stream derived from the seed and the trials already asked, skipping points tried
before the restart (``_continue_stream``).

A sweep stops (``ask`` returns None) after ``SweepConfig.trial_cap`` trials: run_cap,
the grid's size, or ``DEFAULT_RUN_CAP`` for random and bayes without run_cap (W&B would
run forever; a market that spends credits must not). It also stops once a completed
trial reaches ``metric.target``. Failed and pruned trials count toward the cap, as runs
do in W&B (a grid counts distinct points); retrying a trial lost with its provider is
the tenant's business (it keeps the trial's number and parameters) and costs the search
nothing.

Early termination (``early_terminate: {type: hyperband}``) follows W&B's rule
(wandb/sweeps, hyperband_stopping.py): bands are counts of logged metric values
(``EarlyTerminate.bands``), every trial is judged again at each report against the
highest band it has reached, and it stops when its best value so far is worse than the
value at rank int(n / eta) of the n trials that reached that band (see ``_hyperband``).

W&B distributions map to Optuna's: int_uniform -> IntDistribution; uniform and
q_uniform -> FloatDistribution, q_uniform rounded to round(x / q) * q afterwards as in
W&B (so the end points of its lattice get half the weight of the others); a grid
enumerates q_uniform's lattice instead; log_uniform_values (and log_uniform, whose
bounds are exponents of e) -> FloatDistribution(log=True), with q applied to the
sampled value for the q_ forms; inv_log_uniform_values and inv_log_uniform are
log-uniform as well: W&B draws x = exp(-u) with u uniform on [-ln max, -ln min], or on
[min, max] (then x lies in [exp(-max), exp(-min)]); categorical ->
CategoricalDistribution over the values' indices; constant -> fixed, not searched. The
normal family, beta (shape a, b), q_beta and categorical values with ``probabilities``
(random search) are sampled through a uniform variable u in [0, 1] and the inverse CDF.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, NamedTuple

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState as _OptunaState

from market.jobspec import JobSpec, Method, Parameter
from market.lifecycle import SEARCH_OUTCOMES, TrialState
from protocol.errors import MercatoError

# Optuna logs every finished trial at INFO; the tenant has its own log.
optuna.logging.set_verbosity(optuna.logging.WARNING)

_STUDY_NAME = "mercato-sweep"
# Keeps u away from 0 and 1, where the inverse normal CDF is infinite.
_U_EPS = 1e-12


class SearchError(MercatoError):
    """The search was driven wrongly (unknown trial, restore after ask, bad stored trial)."""

    code = "search_error"
    http_status = 409


@dataclass(frozen=True, slots=True)
class Trial:
    """A trial to run: its number (unique within the sweep) and its parameters.

    ``params`` has the shape of the sweep's ``parameters`` (nested parameters are dicts).
    """

    number: int
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FinishedTrial:
    """A finished trial as the tenant's store keeps it, for ``Search.restore``.

    ``value`` is the final metric (None if the trial did not report it);
    ``intermediate`` maps steps to the values reported through ``Search.report``, so
    early termination keeps judging new trials against the same rungs after a restart.
    """

    number: int
    params: Mapping[str, Any]
    state: TrialState
    value: float | None = None
    intermediate: Mapping[int, float] = field(default_factory=dict)


class Best(NamedTuple):
    """The best completed trial so far."""

    number: int
    params: dict[str, Any]
    value: float


@dataclass(frozen=True, slots=True)
class _Dim:
    """One searched (or constant) parameter and how Optuna's value becomes the trial's."""

    path: tuple[str, ...]
    name: str  # Optuna's parameter name
    dist: BaseDistribution | None  # None: a constant, not searched
    to_value: Callable[[Any], Any]  # Optuna's value -> the trial's value
    to_internal: Callable[[Any], Any]  # the trial's value -> Optuna's; raises ValueError
    grid: tuple[Any, ...] = ()  # Optuna's values a grid visits, in order


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {v!r}")
    return float(v)


def _index(values: list[Any], v: Any) -> int:
    # Exact type first: True == 1 == 1.0 in Python, but they are different W&B values.
    for i, c in enumerate(values):
        if type(c) is type(v) and c == v:
            return i
    for i, c in enumerate(values):
        if c == v:
            return i
    raise ValueError(f"{v!r} is not one of the values {values!r}")


def _categorical(path: tuple[str, ...], name: str, p: Parameter, method: Method) -> _Dim:
    values = list(p.values or ())
    if p.probabilities is not None and method == "random":
        # Weighted choice through u: value i covers [cum[i-1], cum[i]).
        total = math.fsum(p.probabilities)
        cum = list(itertools.accumulate(x / total for x in p.probabilities))

        def pick(u: float) -> Any:
            return values[min(bisect.bisect_right(cum, u), len(values) - 1)]

        def middle(v: Any) -> float:
            i = _index(values, v)
            lo = cum[i - 1] if i else 0.0
            return (lo + cum[i]) / 2

        return _Dim(path, name, FloatDistribution(0.0, 1.0), pick, middle)
    indices = tuple(range(len(values)))
    return _Dim(
        path,
        name,
        CategoricalDistribution(indices),
        lambda i: values[i],
        lambda v: _index(values, v),
        indices,
    )


def _dim(path: tuple[str, ...], p: Parameter, method: Method) -> _Dim:
    """How one W&B parameter is searched (see the module docstring)."""
    name = " > ".join(path)  # spaces never occur in parameter names: no collisions
    d = p.distribution
    assert d is not None  # leaves() never yields a nested parameters dict
    if d == "constant":
        return _Dim(path, name, None, lambda _: p.value, lambda _: None)
    if d == "categorical":
        return _categorical(path, name, p, method)
    if d == "int_uniform" or (d == "q_uniform" and method == "grid"):
        lo, hi = p.lattice()

        def k_of(v: Any) -> int:
            if d == "int_uniform":
                if type(v) is not int or not lo <= v <= hi:
                    raise ValueError(f"{v!r} is not an integer in [{lo}, {hi}]")
                return v
            assert p.q is not None
            return int(_clamp(round(_number(v) / p.q), lo, hi))

        to_value: Callable[[Any], Any] = (lambda k: k) if d == "int_uniform" else p.multiple
        return _Dim(path, name, IntDistribution(lo, hi), to_value, k_of, tuple(range(lo, hi + 1)))
    if d in ("normal", "q_normal", "log_normal", "q_log_normal"):
        assert p.mu is not None
        assert p.sigma is not None
        normal = NormalDist(p.mu, p.sigma)
        log = d in ("log_normal", "q_log_normal")
        quantized = d.startswith("q_")

        def from_u(u: float) -> Any:
            x = normal.inv_cdf(_clamp(u, _U_EPS, 1 - _U_EPS))
            x = math.exp(x) if log else x
            return p.quantize(x) if quantized else x

        def to_u(v: Any) -> float:
            x = _number(v)
            if log:
                x = math.log(x) if x > 0 else -math.inf
            return _clamp(normal.cdf(x) if math.isfinite(x) else 0.0, _U_EPS, 1 - _U_EPS)

        return _Dim(path, name, FloatDistribution(0.0, 1.0), from_u, to_u)
    if d in ("beta", "q_beta"):
        assert p.a is not None
        assert p.b is not None
        a, b = float(p.a), float(p.b)

        def from_u_beta(u: float) -> Any:
            x = beta_ppf(_clamp(u, _U_EPS, 1 - _U_EPS), a, b)
            return p.quantize(x) if d == "q_beta" else x

        def to_u_beta(v: Any) -> float:
            return _clamp(beta_cdf(_clamp(_number(v), 0.0, 1.0), a, b), _U_EPS, 1 - _U_EPS)

        return _Dim(path, name, FloatDistribution(0.0, 1.0), from_u_beta, to_u_beta)
    # uniform, q_uniform (random, bayes), log_uniform, log_uniform_values, their q_
    # forms, and inv_log_uniform(_values), which are log-uniform too (see the docstring)
    assert p.min is not None
    assert p.max is not None
    lo_f, hi_f = float(p.min), float(p.max)
    if d in ("log_uniform", "q_log_uniform"):
        lo_f, hi_f = math.exp(lo_f), math.exp(hi_f)  # W&B: bounds are exponents of e
    elif d == "inv_log_uniform":
        lo_f, hi_f = math.exp(-hi_f), math.exp(-lo_f)  # W&B: x = exp(-uniform(min, max))
    log = d not in ("uniform", "q_uniform")
    quantized = d.startswith("q_")

    def value(x: float) -> Any:
        return p.quantize(x) if quantized else x

    def internal(v: Any) -> float:
        x = _number(v)
        if not quantized and not lo_f <= x <= hi_f:
            raise ValueError(f"{v!r} is outside [{lo_f}, {hi_f}]")
        return _clamp(x, lo_f, hi_f)  # a quantized value may round past a bound

    return _Dim(path, name, FloatDistribution(lo_f, hi_f, log=log), value, internal)


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b): the beta distribution's CDF.

    Continued fraction evaluated with the modified Lentz method (Press et al.,
    Numerical Recipes, 3rd ed., section 6.4), using the symmetry
    I_x(a, b) = 1 - I_(1-x)(b, a) where the fraction converges slowly.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - beta_cdf(1.0 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_front) * h / a))


def beta_ppf(u: float, a: float, b: float) -> float:
    """The beta distribution's inverse CDF, by bisection on ``beta_cdf`` (monotone).

    W&B samples beta through SciPy's ``beta.ppf``; bisection to 1e-12 is exact enough for
    a hyperparameter and keeps SciPy out of the runtime dependencies.
    """
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if beta_cdf(mid, a, b) < u:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in params.items():
        out[(*prefix, k)] = v
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
    return out


class Search:
    """The search of one sweep: ask for trials, tell outcomes, report progress.

    Deterministic for a given spec, seed and sequence of calls.
    """

    def __init__(self, spec: JobSpec, seed: int = 0) -> None:
        sweep = spec.sweep_config
        self._method: Method = sweep.method
        self._metric = sweep.metric
        self._cap = sweep.trial_cap
        self._dims = [_dim(path, p, sweep.method) for path, p in sweep.leaves()]
        self._space = {d.name: d.dist for d in self._dims if d.dist is not None}
        self._seed = seed
        sampler: optuna.samplers.BaseSampler
        if sweep.method == "bayes":
            sampler = _tpe(seed)
        else:
            # grid never consults it: every grid trial is enqueued with all its values.
            sampler = optuna.samplers.RandomSampler(seed=seed)
        et = sweep.early_terminate
        self._bands: tuple[int, ...] = () if et is None else et.bands()
        self._eta = 3 if et is None else et.eta
        self._study = optuna.create_study(
            study_name=_STUDY_NAME,
            direction=self._metric.goal if self._metric else "minimize",
            sampler=sampler,
            pruner=optuna.pruners.NopPruner(),  # hyperband is W&B's rule, below
        )
        self._running: dict[int, optuna.trial.Trial] = {}
        # Per running trial: step -> (the first value reported there, its prune answer).
        self._decisions: dict[int, dict[int, tuple[float, bool]]] = {}
        # Per trial (running or finished): its finite metric values in step order, signed
        # so that lower is better: W&B's metric history, which hyperband judges.
        self._histories: dict[int, list[tuple[int, float]]] = {}
        self._finished: set[int] = set()
        self._issued = 0  # trials counted toward the cap (restored ones included)
        self._next_number = 0
        self._pristine = True  # no ask and no restore yet
        self._target_hit = False
        searched = [d for d in self._dims if d.dist is not None]
        self._grid_names = [d.name for d in searched]
        self._grid_done: set[tuple[Any, ...]] = set()
        self._grid: Iterator[tuple[Any, ...]] = itertools.product(*(d.grid for d in searched))
        # Points a previous run of the tenant tried (bayes never proposes them again).
        self._restored: set[tuple[Any, ...]] = set()

    # -- state -------------------------------------------------------------------------

    @property
    def trial_cap(self) -> int:
        """Trials this sweep runs at most (see SweepConfig.trial_cap)."""
        return self._cap

    @property
    def issued(self) -> int:
        """Trials handed out so far, restored finished trials included."""
        return self._issued

    @property
    def running(self) -> frozenset[int]:
        """Numbers of trials asked and not yet told."""
        return frozenset(self._running)

    @property
    def finished(self) -> int:
        """Trials told (or restored) so far."""
        return len(self._finished)

    @property
    def exhausted(self) -> bool:
        """True when ``ask`` will return None: cap reached, grid done or target reached."""
        if self._target_hit:
            return True
        # A grid counts points, so a point finished twice (a retry) leaves none out.
        visited = len(self._grid_done) if self._method == "grid" else self._issued
        return visited >= self._cap

    @property
    def done(self) -> bool:
        """True when the search is exhausted and no trial is running."""
        return self.exhausted and not self._running

    # -- the loop ----------------------------------------------------------------------

    def ask(self) -> Trial | None:
        """The next trial to run, or None when the search is exhausted."""
        self._pristine = False
        if self.exhausted:
            return None
        if self._method == "grid":
            point = next((pt for pt in self._grid if pt not in self._grid_done), None)
            if point is None:  # cannot happen: restored points are grid points
                return None
            self._grid_done.add(point)
            self._study.enqueue_trial(dict(zip(self._grid_names, point, strict=True)))
        trial = self._study.ask(self._space)
        for _ in range(_RETRIES):
            if self._method != "bayes" or self._point(trial.params) not in self._restored:
                break
            # A point the run before the restart tried: TPE's stream after a restart is
            # a fresh one, whose first (random) proposals may repeat it.
            self._study.tell(trial, state=_OptunaState.FAIL)
            trial = self._study.ask(self._space)
        number = self._next_number
        self._next_number += 1
        params = self._params(trial.params)
        trial.set_user_attr("number", number)
        trial.set_user_attr("params", copy.deepcopy(params))  # the caller may edit its copy
        self._running[number] = trial
        self._decisions[number] = {}
        self._issued += 1
        return Trial(number, params)

    def tell(
        self, number: int, value: float | None, state: TrialState = TrialState.SUCCEEDED
    ) -> None:
        """Record how trial ``number`` ended.

        A succeeded trial without a finite value (it never printed the metric, or the
        sweep has no metric) teaches the search nothing and is recorded as failed. A
        pruned trial keeps its last reported value, as in Optuna.
        """
        if state not in SEARCH_OUTCOMES:
            raise SearchError(f"unknown trial state {state!r} (not an outcome a search is told)")
        trial = self._running.pop(number, None)
        if trial is None:
            if number in self._finished:
                raise SearchError(f"trial {number} was already told")
            raise SearchError(f"trial {number} was never asked")
        self._decisions.pop(number, None)
        self._finished.add(number)
        if state is TrialState.SUCCEEDED and _finite(value) and self._metric is not None:
            assert value is not None
            self._study.tell(trial, float(value))
            self._check_target(float(value))
        elif state is TrialState.PRUNED:
            self._study.tell(trial, state=_OptunaState.PRUNED)
        else:
            self._study.tell(trial, state=_OptunaState.FAIL)

    def report(self, number: int, step: int, value: float) -> bool:
        """Record an intermediate metric value; True if the trial should stop now.

        Without early_terminate this only records (for restore) and answers False. A
        step reported twice keeps its first value and answer. Reports for a trial
        already told are ignored (False): results and progress may cross on the wire.
        """
        if number in self._finished:
            return False
        trial = self._running.get(number)
        if trial is None:
            raise SearchError(f"trial {number} was never asked")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SearchError(f"a step is a non-negative integer, got {step!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SearchError(f"a reported value is a number, got {value!r}")
        decisions = self._decisions[number]
        if step in decisions:
            return decisions[step][1]
        trial.report(float(value), step)
        prune = self._hyperband(number, step, float(value))
        decisions[step] = (float(value), prune)
        return prune

    def _signed(self, value: float) -> float:
        return -value if self._metric is not None and self._metric.goal == "maximize" else value

    def _hyperband(self, number: int, step: int, value: float) -> bool:
        """W&B's hyperband rule (wandb/sweeps, hyperband_stopping.py), at every report.

        A trial's history is its finite metric values in the order reported; band k is
        judged once a trial has more than ``bands[k]`` values, at index ``bands[k]``. The
        band's threshold is, over every trial of the sweep that reached it (running or
        finished), the value at rank int(n / eta) in sorted order; a running trial stops
        when the best value it has reported so far is worse than the threshold of the
        highest band it has reached. Thresholds move as trials arrive, so a trial is
        checked again at every report, not only when it passes a band. A non-finite
        value stops it at once (W&B would skip it; a diverged trial only costs money).
        """
        if not self._bands:
            return False
        if not math.isfinite(value):
            return True
        history = self._histories.setdefault(number, [])
        bisect.insort(history, (step, self._signed(value)))
        reached = [b for b in self._bands if b < len(history)]
        if not reached:
            return False
        band = reached[-1]
        at_band = sorted(h[band][1] for h in self._histories.values() if len(h) > band)
        threshold = at_band[int(len(at_band) / self._eta)]
        return min(v for _, v in history) > threshold

    def reported(self, number: int) -> dict[int, float]:
        """Step -> value of what running trial ``number`` reported (the first value at
        each step: what the pruner judged), to store for ``restore`` as
        ``FinishedTrial.intermediate``. Empty once the trial is told, or if unknown."""
        return {step: value for step, (value, _) in self._decisions.get(number, {}).items()}

    def best(self) -> Best | None:
        """The best completed trial by the metric's goal, or None (none yet, or no metric)."""
        if self._metric is None:
            return None
        completed = self._study.get_trials(deepcopy=False, states=(_OptunaState.COMPLETE,))
        if not completed:
            return None
        t = self._study.best_trial
        assert t.value is not None
        return Best(t.user_attrs["number"], dict(t.user_attrs["params"]), t.value)

    def restore(
        self,
        finished: Iterable[FinishedTrial],
        next_number: int = 0,
        running: Iterable[Trial] = (),
    ) -> None:
        """Rebuild the search from what a previous run of the tenant stored.

        Call on a fresh Search (same spec and seed), before the first ``ask``.
        ``finished`` trials are never asked again: they count toward the cap, grid goes
        on with the points not yet visited, random and bayes learn from them, and early
        termination keeps their rungs. ``running`` trials (handed out but not finished
        when the tenant stopped) become running again under their own numbers and
        parameters, so the tenant can run them again and ``tell`` and ``report`` them
        as before; a grid does not hand their points out twice. New trials are
        numbered from ``next_number`` or past the highest restored number, whichever is
        larger. Raises SearchError if a stored trial does not fit the spec.
        """
        if not self._pristine:
            raise SearchError("restore a fresh search, before its first ask")
        self._pristine = False
        highest = -1
        for ft in finished:
            self._check_new_number(ft.number)
            internal = self._internal(ft.number, ft.params)
            self._study.add_trial(self._frozen(ft, internal))
            if self._bands:
                self._histories[ft.number] = sorted(
                    (step, self._signed(float(v)))
                    for step, v in ft.intermediate.items()
                    if math.isfinite(v)
                )
            self._finished.add(ft.number)
            self._restored_point(internal)
            highest = max(highest, ft.number)
            if ft.state == TrialState.SUCCEEDED and _finite(ft.value) and self._metric is not None:
                assert ft.value is not None
                self._check_target(float(ft.value))
        for t in running:
            self._check_new_number(t.number)
            internal = self._internal(t.number, t.params)
            self._study.enqueue_trial(internal)
            trial = self._study.ask(self._space)
            trial.set_user_attr("number", t.number)
            trial.set_user_attr("params", self._stored_params(t.params, internal))
            self._running[t.number] = trial
            self._decisions[t.number] = {}
            self._restored_point(internal)
            highest = max(highest, t.number)
        self._next_number = max(next_number, highest + 1)
        self._continue_stream(self._next_number)

    def _continue_stream(self, asked: int) -> None:
        """Go on with the sampler's stream where the run before the restart left it.

        random: the seeded RandomSampler draws one number per searched parameter per
        trial and nothing else, so replaying ``asked`` trials on a scratch study brings
        it to exactly where the uninterrupted run would be: the resumed sweep proposes
        the very points the uninterrupted one would have. bayes: TPE's proposals depend
        on the history as well as its random state, which the store does not keep; it
        gets a fresh stream derived from the seed and ``asked`` (so a resume is
        reproducible) and learns from every restored trial; ``ask`` skips the points
        tried before the restart. grid: ``_grid_done`` already skips visited points.
        """
        if self._method == "random" and self._space:
            scratch = optuna.create_study(sampler=self._study.sampler)
            for _ in range(asked):
                scratch.ask(self._space)
        elif self._method == "bayes" and asked:
            self._study.sampler = _tpe((self._seed * 1_000_003 + asked) % 2**32)

    # -- internals ---------------------------------------------------------------------

    def _params(self, internal: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's parameters, nested as in the spec, from Optuna's values."""
        out: dict[str, Any] = {}
        for d in self._dims:
            node = out
            for key in d.path[:-1]:
                node = node.setdefault(key, {})
            node[d.path[-1]] = d.to_value(internal[d.name] if d.dist is not None else None)
        return out

    def _check_new_number(self, number: int) -> None:
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise SearchError(f"a trial number is a non-negative integer, got {number!r}")
        if number in self._finished or number in self._running:
            raise SearchError(f"trial {number} appears twice")

    def _point(self, internal: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(internal.get(d.name) for d in self._dims if d.dist is not None)

    def _restored_point(self, internal: Mapping[str, Any]) -> None:
        self._issued += 1
        self._restored.add(self._point(internal))
        if self._method == "grid":
            self._grid_done.add(tuple(internal[n] for n in self._grid_names))

    def _internal(self, number: int, params: Mapping[str, Any]) -> dict[str, Any]:
        flat = _flatten(params)
        internal: dict[str, Any] = {}
        for d in self._dims:
            if d.dist is None:
                continue
            if d.path not in flat:
                raise SearchError(f"trial {number} has no value for {'.'.join(d.path)}")
            try:
                internal[d.name] = d.to_internal(flat[d.path])
            except ValueError as e:
                raise SearchError(f"trial {number}, {'.'.join(d.path)}: {e}") from None
        return internal

    def _frozen(self, ft: FinishedTrial, internal: dict[str, Any]) -> optuna.trial.FrozenTrial:
        steps: dict[int, float] = {}
        for step, v in ft.intermediate.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise SearchError(f"trial {ft.number}: step {step!r} is not a non-negative integer")
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise SearchError(f"trial {ft.number}, step {step}: {v!r} is not a number")
            steps[step] = float(v)
        state, value = _OptunaState.FAIL, None
        if ft.state == TrialState.SUCCEEDED and _finite(ft.value) and self._metric is not None:
            state, value = _OptunaState.COMPLETE, float(ft.value)  # type: ignore[arg-type]
        elif ft.state == TrialState.PRUNED:
            state = _OptunaState.PRUNED
            last = steps[max(steps)] if steps else None
            value = last if _finite(last) else None  # Optuna keeps the last reported value
        elif ft.state not in SEARCH_OUTCOMES:
            raise SearchError(f"trial {ft.number}: unknown state {ft.state!r}")
        return optuna.trial.create_trial(
            state=state,
            value=value,
            params=internal,
            distributions={name: self._space[name] for name in internal},
            user_attrs={"number": ft.number, "params": self._stored_params(ft.params, internal)},
            intermediate_values=steps,
        )

    def _stored_params(
        self, stored: Mapping[str, Any], internal: Mapping[str, Any]
    ) -> dict[str, Any]:
        # The stored parameters are what ran; rebuilt only where a constant is missing.
        params = self._params(internal)
        flat = _flatten(stored)
        for d in self._dims:
            if d.dist is not None and d.path in flat:
                node = params
                for key in d.path[:-1]:
                    node = node[key]
                node[d.path[-1]] = flat[d.path]
        return copy.deepcopy(params)

    def _check_target(self, value: float) -> None:
        assert self._metric is not None
        target = self._metric.target
        if target is None:
            return
        if (self._metric.goal == "minimize" and value <= target) or (
            self._metric.goal == "maximize" and value >= target
        ):
            self._target_hit = True


#: Proposals bayes may skip in a row before it accepts a point tried before a restart
#: (a small categorical space can be exhausted).
_RETRIES = 100


def _tpe(seed: int) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def _finite(value: float | None) -> bool:
    return (
        value is not None
        and not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
    )
