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

Early termination (``early_terminate: {type: hyperband}``) is asynchronous successive
halving (Optuna's SuccessiveHalvingPruner), which is what W&B's hyperband does: rungs
at min_iter * eta**k reported steps, and at each rung a trial goes on only while it is
in the best 1/eta of the trials that reached that rung.

W&B distributions map to Optuna's: int_uniform -> IntDistribution; q_uniform -> an
IntDistribution over multiples of q; uniform -> FloatDistribution; log_uniform_values
(and log_uniform, whose bounds are exponents of e) -> FloatDistribution(log=True), with
q applied to the sampled value for the q_ forms; categorical -> CategoricalDistribution
over the values' indices; constant -> fixed, not searched. The normal family and
categorical values with ``probabilities`` (random search) are sampled through a
uniform variable u in [0, 1] and the inverse CDF.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState as _OptunaState

from market.jobspec import JobSpec, Method, Parameter
from protocol.errors import MercatoError

# Optuna logs every finished trial at INFO; the tenant has its own log.
optuna.logging.set_verbosity(optuna.logging.WARNING)

TrialState = Literal["completed", "failed", "pruned"]

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
    if d in ("int_uniform", "q_uniform"):
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
    # uniform, log_uniform, log_uniform_values and their q_ forms
    assert p.min is not None
    assert p.max is not None
    lo_f, hi_f = float(p.min), float(p.max)
    if d in ("log_uniform", "q_log_uniform"):
        lo_f, hi_f = math.exp(lo_f), math.exp(hi_f)  # W&B: bounds are exponents of e
    log = d != "uniform"
    quantized = d.startswith("q_")

    def value(x: float) -> Any:
        return p.quantize(x) if quantized else x

    def internal(v: Any) -> float:
        x = _number(v)
        if not quantized and not lo_f <= x <= hi_f:
            raise ValueError(f"{v!r} is outside [{lo_f}, {hi_f}]")
        return _clamp(x, lo_f, hi_f)  # a quantized value may round past a bound

    return _Dim(path, name, FloatDistribution(lo_f, hi_f, log=log), value, internal)


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
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
        self._rung_base: tuple[int, int] | None = None
        if sweep.early_terminate is not None:
            self._rung_base = (sweep.early_terminate.min_resource, sweep.early_terminate.eta)
            pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=sweep.early_terminate.min_resource,
                reduction_factor=sweep.early_terminate.eta,
            )
        self._study = optuna.create_study(
            study_name=_STUDY_NAME,
            direction=self._metric.goal if self._metric else "minimize",
            sampler=sampler,
            pruner=pruner,
        )
        self._running: dict[int, optuna.trial.Trial] = {}
        # Per running trial: step -> (the first value reported there, its prune answer).
        self._decisions: dict[int, dict[int, tuple[float, bool]]] = {}
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

    def tell(self, number: int, value: float | None, state: TrialState = "completed") -> None:
        """Record how trial ``number`` ended.

        A completed trial without a finite value (it never printed the metric, or the
        sweep has no metric) teaches the search nothing and is recorded as failed. A
        pruned trial keeps its last reported value, as in Optuna.
        """
        if state not in ("completed", "failed", "pruned"):
            raise SearchError(f"unknown trial state {state!r}")
        trial = self._running.pop(number, None)
        if trial is None:
            if number in self._finished:
                raise SearchError(f"trial {number} was already told")
            raise SearchError(f"trial {number} was never asked")
        self._decisions.pop(number, None)
        self._finished.add(number)
        if state == "completed" and _finite(value) and self._metric is not None:
            assert value is not None
            self._study.tell(trial, float(value))
            self._check_target(float(value))
        elif state == "pruned":
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
        prune = trial.should_prune()
        decisions[step] = (float(value), prune)
        return prune

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
            self._finished.add(ft.number)
            self._restored_point(internal)
            highest = max(highest, ft.number)
            if ft.state == "completed" and _finite(ft.value) and self._metric is not None:
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
        if ft.state == "completed" and _finite(ft.value) and self._metric is not None:
            state, value = _OptunaState.COMPLETE, float(ft.value)  # type: ignore[arg-type]
        elif ft.state == "pruned":
            state = _OptunaState.PRUNED
            last = steps[max(steps)] if steps else None
            value = last if _finite(last) else None  # Optuna keeps the last reported value
        elif ft.state not in ("completed", "failed"):
            raise SearchError(f"trial {ft.number}: unknown state {ft.state!r}")
        return optuna.trial.create_trial(
            state=state,
            value=value,
            params=internal,
            distributions={name: self._space[name] for name in internal},
            user_attrs={"number": ft.number, "params": self._stored_params(ft.params, internal)},
            system_attrs=self._rungs(steps, pruned=ft.state == "pruned"),
            intermediate_values=steps,
        )

    def _rungs(self, steps: Mapping[int, float], pruned: bool) -> dict[str, float]:
        """The rung values Optuna's SuccessiveHalvingPruner had recorded for a trial.

        The pruner keeps, per trial, the value it judged at each rung under the system
        attribute ``completed_rung_<k>`` and compares new trials with those, not with the
        intermediate values. ``report`` asks it at every step, so a rung's value is the
        one reported at the first step at or past the rung; a pruned trial stopped at
        the first rung of its last step. Replaying this keeps decisions after a restart
        the same as before it (TestRestore pins it against Optuna's implementation).
        """
        if self._rung_base is None:
            return {}
        base, eta = self._rung_base
        out: dict[str, float] = {}
        rung = 0
        ordered = sorted(steps)
        for step in ordered:
            value = steps[step]
            while step >= base * eta**rung and not math.isnan(value):
                out[f"completed_rung_{rung}"] = value
                rung += 1
                if pruned and step == ordered[-1]:
                    return out
        return out

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
