"""The job file: YAML text in, one validated, frozen job spec out.

A job file names what to run and on what, and what it may cost::

    name: digits-svm              # optional; default: the program's name
    kind: sweep                   # sweep (default); training and service come later
    sweep:                        # a Weights & Biases sweep, unchanged
      program: train.py
      method: bayes
      metric: {name: val_loss, goal: minimize}
      run_cap: 24
      early_terminate: {type: hyperband, min_iter: 3, eta: 3}
      parameters:
        C: {distribution: log_uniform_values, min: 0.001, max: 100}
        kernel: {values: [rbf, linear]}
    resources: {accelerator: gpu, devices_per_trial: 1, min_memory: 16GB}
    budget: {max_price: 2.5 credits/device-hour, max_spend: 10 credits}
    limits: {trial_timeout: 10m, max_output: 10MB, retries: 2, network: false}

A plain W&B sweep file (``method``, ``parameters``, ``program`` ... at the top, no
``sweep:`` key) is accepted as it is; ``resources``, ``budget`` and ``limits`` may be
added next to its keys. W&B's ``name`` names the job; ``description``, ``project``,
``entity``, ``controller`` and ``apiVersion`` are kept but do nothing here
(``JobSpec.notes`` says so). W&B Launch keys (``job``, ``image_uri``, ``scheduler``)
and multi-objective ``metrics`` are refused.

Units. People write credits, durations and sizes; the spec holds integers:
``budget.max_price`` in micro-credits per device-hour and ``budget.max_spend`` in
micro-credits (a bare number in the file is credits; absent, the cap is
``DEFAULT_MAX_SPEND``; 0 is refused), ``limits.trial_timeout_ms`` (a
bare number in the file, ``limits.trial_timeout``, is seconds), sizes in bytes
(``resources.min_memory_bytes``, ``limits.max_output_bytes``). A spec is built from a
file by ``parse_job`` only; its dump is for hashing and display, not for re-reading.

YAML. Parsed with PyYAML's safe loader, as W&B does, with four changes: ``1e-3`` is a
float (YAML 1.2; YAML 1.1 made it a string, a classic trap in sweep files), dates
stay strings, a repeated key is an error rather than silently the last one, and
aliases (``*name``) are refused so a small file cannot expand into a huge one.

Every problem found is reported at once, each under its dotted path as written in
the file (``sweep.parameters.C.min``), in one ``JobError`` raised before anything is
spent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Hashable, Iterator, Mapping
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from market.catalog import UnknownDeviceModel, lookup
from market.serving import SOCKET_NAME
from market.settlement import MICRO_PER_CREDIT
from protocol.codec import encode
from protocol.errors import MercatoError
from protocol.messages import MAX_U63, Requirement

if TYPE_CHECKING:
    import yaml

#: A job file larger than this is refused unread (a sweep file is a few hundred bytes).
MAX_JOB_FILE_BYTES = 1 << 20

#: Trials of a random or bayes sweep without ``run_cap``. W&B runs such a sweep until
#: someone stops it; a market that spends credits must stop on its own. 60 random
#: trials land in the best 5% of the search space with 95% probability
#: (1 - 0.95**60 = 0.954; Bergstra and Bengio 2012, "Random Search for
#: Hyper-Parameter Optimization", JMLR 13:281-305, section 2.1).
DEFAULT_RUN_CAP = 60

#: Largest grid accepted: the search keeps every point in memory.
MAX_GRID_POINTS = 100_000

#: The W&B default command (wandb/sdk/launch/sweeps/utils.py, DEFAULT_SWEEP_COMMAND).
DEFAULT_COMMAND: tuple[str, ...] = ("${env}", "${interpreter}", "${program}", "${args}")

#: Command macros, expanded by ``render_command`` as the W&B agent does: an item that
#: is exactly ``${name}`` is replaced by zero or more items; ``${envvar:NAME}`` is
#: replaced wherever it occurs; anything else stays.
MACROS = frozenset(
    {
        "env",
        "interpreter",
        "program",
        "args",
        "args_no_equals",
        "args_no_hyphens",
        "args_no_boolean_flags",
        "args_json",
        "args_json_file",
        "seed",
    }
)

_MACRO_LIST = ", ".join("${" + m + "}" for m in sorted(MACROS | {"envvar:NAME"}))

#: ``${envvar:NAME}`` anywhere in a command item (W&B expands it inside longer items too).
_ENVVAR_ANY = re.compile(r"\$\{envvar:([^}]*)\}")
_ENVVAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# ``${name}`` inside a longer item, which W&B leaves as it is (``--lr=${lr}``).
_LITERAL_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.:/-]*)\}")
#: Macros that pass the parameters on the command line.
ARGS_MACROS = frozenset(m for m in MACROS if m.startswith("args"))
#: Environment variable holding the path of the trial's parameters as a JSON object:
#: a program reads its parameters from it whatever its command (W&B: ``wandb.config``).
PARAMS_FILE_ENV = "MERCATO_PARAMS_FILE"
#: Environment variable holding the trial's seed (market.verification.trial_seed): the
#: same on every provider that runs the trial, so a spot check can reproduce it.
SEED_ENV = "MERCATO_SEED"

DEFAULT_TRIAL_TIMEOUT_MS = 3_600_000
#: ``budget.max_spend`` when the job file gives none: a sweep always has a cap.
DEFAULT_MAX_SPEND = 100 * MICRO_PER_CREDIT
#: ``limits.max_failures`` when the job file gives none (market/sweepguard.py).
DEFAULT_MAX_FAILURES = 5
MAX_TRIAL_TIMEOUT_MS = 7 * 24 * 3_600_000  # protocol.messages.TaskAssign.timeout_ms
DEFAULT_MAX_OUTPUT_BYTES = 10 << 20  # protocol.messages.TaskAssign.max_output_bytes
MAX_OUTPUT_BYTES = 1 << 30

Method = Literal["grid", "random", "bayes"]
JobKind = Literal["sweep", "training", "service"]
Distribution = Literal[
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform",
    "q_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "beta",
    "q_beta",
]

#: Distributions a grid can enumerate (as W&B's grid search, wandb/sweeps grid_search.py).
GRID_DISTRIBUTIONS = frozenset({"constant", "categorical", "int_uniform", "q_uniform"})

#: Keys each distribution takes besides ``distribution`` (W&B's schema.json, which
#: refuses any other key per distribution).
_DIST_KEYS: Mapping[str, frozenset[str]] = {
    "constant": frozenset({"value"}),
    "categorical": frozenset({"values", "probabilities"}),
    "int_uniform": frozenset({"min", "max"}),
    "uniform": frozenset({"min", "max"}),
    "log_uniform": frozenset({"min", "max"}),
    "log_uniform_values": frozenset({"min", "max"}),
    "q_uniform": frozenset({"min", "max", "q"}),
    "q_log_uniform": frozenset({"min", "max", "q"}),
    "q_log_uniform_values": frozenset({"min", "max", "q"}),
    "normal": frozenset({"mu", "sigma"}),
    "log_normal": frozenset({"mu", "sigma"}),
    "q_normal": frozenset({"mu", "sigma", "q"}),
    "q_log_normal": frozenset({"mu", "sigma", "q"}),
    "inv_log_uniform": frozenset({"min", "max"}),
    "inv_log_uniform_values": frozenset({"min", "max"}),
    "beta": frozenset({"a", "b"}),
    "q_beta": frozenset({"a", "b", "q"}),
}
_REQUIRED_KEYS: Mapping[str, tuple[str, ...]] = {
    "constant": ("value",),
    "categorical": ("values",),
    **{d: ("min", "max") for d in _DIST_KEYS if "min" in _DIST_KEYS[d]},
}

# W&B's parameter-name pattern (schema.json), plus "/" which real sweep files use for
# paths into nested configs.
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")
# exp() of a log_uniform bound must stay a positive finite float.
_MAX_EXPONENT = 700.0


# --- errors -----------------------------------------------------------------------


class Problem(NamedTuple):
    """One thing wrong with a job file: where (dotted path as in the file) and what."""

    path: str
    message: str


class JobError(MercatoError):
    """The job file is not valid; ``problems`` lists every problem found."""

    code = "bad_job"
    http_status = 400

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems: tuple[Problem, ...] = tuple(dict.fromkeys(problems))
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {p.path}: {p.message}" for p in self.problems]
        super().__init__("\n".join(lines))


def _problems(*items: tuple[tuple[str | int, ...], str]) -> PydanticCustomError:
    """Problems under sub-paths of the model being validated, as one pydantic error."""
    return PydanticCustomError("job_problems", "job problems", {"problems": list(items)})


# --- units ------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"
_CREDITS = re.compile(
    rf"{_NUMBER}\s*(?:credits?|cr)?\s*(?P<rate>(?:/|\bper\b)\s*(?:device[-_ ]?)?(?:hours?|h))?",
    re.IGNORECASE,
)
_SIZE = re.compile(rf"{_NUMBER}\s*(?P<unit>[kmgtp]i?b?|b)?", re.IGNORECASE)
# k, kb = 10**3 (SI); ki, kib = 2**10 (IEC); and so on up to peta.
_SIZE_FACTORS = {"": 1, "b": 1} | {
    prefix + suffix: (1024 if "i" in suffix else 1000) ** power
    for power, prefix in enumerate("kmgtp", start=1)
    for suffix in ("", "b", "i", "ib")
}
# Longest units first, so "10min" is not read as "10m" followed by "in".
_DURATION_PART = re.compile(rf"{_NUMBER}\s*(ms|min|sec|s|m|h|d)", re.IGNORECASE)
_DURATION = re.compile(rf"(?:\s*{_NUMBER}\s*(?:ms|min|sec|s|m|h|d)\s*)+", re.IGNORECASE)
_DURATION_MS = {"ms": 1, "s": 1000, "sec": 1000, "m": 60_000, "min": 60_000}
_DURATION_MS |= {"h": 3_600_000, "d": 86_400_000}


def _decimal(value: object, what: str) -> Decimal:
    """An exact decimal for a YAML number; bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected {what}, got {value!r}")
    # repr() of a float is the shortest text that reads back as it: 2.5 stays 2.5.
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def parse_credits(value: object, *, rate: bool) -> int:
    """Micro-credits from ``2.5``, ``"2.5 credits"`` or (``rate``) ``"2.5 credits/device-hour"``.

    A bare number is credits. At most 6 decimals (one micro-credit); never negative.
    Raises ValueError with a message for people.
    """
    example = "'2.5 credits/device-hour'" if rate else "'10 credits'"
    if isinstance(value, str):
        m = _CREDITS.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"cannot read {value!r} as credits; write e.g. {example} or 2.5")
        if m["rate"] and not rate:
            raise ValueError(f"{value!r} is a rate; this is a total, e.g. {example}")
        amount = Decimal(m[1])
    else:
        amount = _decimal(value, f"credits, e.g. {example}")
    if amount < 0:
        raise ValueError("must not be negative")
    micro = amount * MICRO_PER_CREDIT
    if micro != micro.to_integral_value():
        raise ValueError(f"{value!r}: credits have at most 6 decimals (one micro-credit)")
    if micro > MAX_U63:
        raise ValueError(f"{value!r} is too large")
    return int(micro)


def parse_duration_ms(value: object) -> int:
    """Milliseconds from seconds (``600``, ``1.5``) or text (``"10m"``, ``"1h30m"``, ``"500ms"``).

    Rounded up to a whole millisecond; must be positive. Raises ValueError.
    """
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(_NUMBER, text):
            total = Decimal(text) * 1000
        elif _DURATION.fullmatch(text):
            total = sum(
                (Decimal(n) * _DURATION_MS[u.lower()] for n, u in _DURATION_PART.findall(text)),
                Decimal(0),
            )
        else:
            raise ValueError(
                f"cannot read {value!r} as a duration; write e.g. '10m', '1h30m', '90s' "
                "or a number of seconds"
            )
    else:
        total = _decimal(value, "a duration, e.g. '10m' or a number of seconds") * 1000
    if total <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def parse_size(value: object) -> int:
    """Bytes from an integer or text: ``"16GB"`` (10**9), ``"16GiB"`` (2**30), ``"512 MB"``.

    Raises ValueError.
    """
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"cannot read {value!r} as a size; write e.g. '16GB' or '512MiB'")
        size = Decimal(m[1]) * _SIZE_FACTORS[(m["unit"] or "").lower()]
    else:
        if isinstance(value, float):
            raise ValueError(f"a size is a whole number of bytes or text like '16GB', got {value}")
        size = _decimal(value, "a size, e.g. '16GB'")
    if size < 0:
        raise ValueError("must not be negative")
    if size != size.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def _none_or(parse: Any) -> Any:
    def before(value: object) -> object:
        return None if value is None else parse(value)

    return before


# --- models -----------------------------------------------------------------------


class _Model(BaseModel):
    # defer_build: validators built on first use. A provider daemon imports this module
    # for a few constants and the checks of specs it is sent; an idle one builds none.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)


def _number(value: object) -> object:
    """A finite int or float (not a bool): one clear message instead of a union's two."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


Number = Annotated[int | float, BeforeValidator(_number)]


class Parameter(_Model):
    """One W&B sweep parameter, with its distribution made explicit.

    As in W&B: ``values`` means categorical, ``value`` constant, integer ``min``/``max``
    int_uniform and other numbers uniform; ``q`` defaults to 1, ``mu`` to 0, ``sigma``
    to 1. ``parameters`` nests parameters (the trial sees a dict).
    """

    distribution: Distribution | None = None  # None only for a nested ``parameters`` dict
    value: Any = None
    values: list[Any] | None = None
    probabilities: list[Number] | None = None
    min: Number | None = None
    max: Number | None = None
    q: Number | None = None
    mu: Number | None = None
    sigma: Number | None = None
    a: Number | None = None  # beta's shape parameters
    b: Number | None = None
    parameters: dict[str, Parameter] | None = None

    @model_validator(mode="before")
    @classmethod
    def _infer(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        keys = set(data)
        if "parameters" in keys:
            if keys - {"parameters"}:
                others = ", ".join(sorted(keys - {"parameters"}))
                raise _problems(((), f"a nested 'parameters' takes no other key (got {others})"))
            return data
        dist = data.get("distribution")
        if dist == "categorical_w_probabilities":  # W&B's internal name for the same thing
            dist = "categorical"
        if dist is None:
            if "values" in keys:
                dist = "categorical"
            elif "value" in keys:
                dist = "constant"
            elif {"min", "max"} <= keys:
                ints = all(type(data[k]) is int for k in ("min", "max"))
                dist = "int_uniform" if ints else "uniform"
            else:
                raise _problems(((), "needs 'value', 'values', 'min' and 'max', or 'parameters'"))
        if not isinstance(dist, str) or dist not in _DIST_KEYS:
            return data  # the Literal check names the allowed distributions
        problems: list[tuple[tuple[str | int, ...], str]] = []
        known = set(_DIST_KEYS["categorical"]) | {"value", "min", "max", "q", "mu", "sigma"}
        known |= {"a", "b"}
        for key in sorted((keys & known) - _DIST_KEYS[dist]):
            problems.append(((key,), f"does not apply to a {dist} parameter"))
        for key in _REQUIRED_KEYS.get(dist, ()):
            if key not in keys:
                problems.append(((key,), f"required for a {dist} parameter"))
        if problems:
            raise _problems(*problems)
        out = dict(data, distribution=dist)
        if "q" in _DIST_KEYS[dist]:
            out.setdefault("q", 1)
        if "mu" in _DIST_KEYS[dist]:
            out.setdefault("mu", 0)
            out.setdefault("sigma", 1)
        if "a" in _DIST_KEYS[dist]:  # W&B's defaults: beta(1, 1) is uniform on [0, 1]
            out.setdefault("a", 1)
            out.setdefault("b", 1)
        return out

    @field_validator("parameters")
    @classmethod
    def _names(cls, value: dict[str, Parameter] | None) -> dict[str, Parameter] | None:
        if value is not None:
            _check_names(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Parameter:
        p: list[tuple[tuple[str | int, ...], str]] = []
        d = self.distribution
        lo, hi = self.min, self.max
        if d == "int_uniform":
            for key, v in (("min", lo), ("max", hi)):
                if type(v) is not int:
                    p.append(((key,), f"int_uniform needs an integer, got {v!r}"))
        if lo is not None and hi is not None and lo > hi:
            p.append((("min",), f"must be <= max (got min {lo} > max {hi})"))
        if (
            d in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values")
            and lo is not None
            and lo <= 0
        ):
            p.append((("min",), f"{d} needs min > 0 (a logarithm), got {lo}"))
        if d in ("log_uniform", "q_log_uniform", "inv_log_uniform"):
            # W&B's log_uniform takes exponents: the value is exp(uniform(min, max)).
            for key, v in (("min", lo), ("max", hi)):
                if v is not None and abs(v) > _MAX_EXPONENT:
                    p.append(
                        ((key,), f"{d} takes exponents of e; {v} is out of range (|x| <= 700)")
                    )
        if self.q is not None and self.q <= 0:
            p.append((("q",), f"must be > 0, got {self.q}"))
        if self.sigma is not None and self.sigma <= 0:
            p.append((("sigma",), f"must be > 0, got {self.sigma}"))
        for key, v in (("a", self.a), ("b", self.b)):
            if v is not None and not 0 < v <= 1e6:
                p.append(((key,), f"beta's {key} must be > 0 (and at most 1e6), got {v}"))
        if d == "categorical":
            values = self.values or []
            if not values:
                p.append((("values",), "needs at least one value"))
            probs = self.probabilities
            if probs is not None:
                if len(probs) != len(values):
                    p.append(
                        (
                            ("probabilities",),
                            f"has {len(probs)} entries for {len(values)} values",
                        )
                    )
                elif any(x < 0 for x in probs):
                    p.append((("probabilities",), "must not be negative"))
                elif abs(math.fsum(probs) - 1) > 1e-6:
                    p.append((("probabilities",), f"must sum to 1, got {math.fsum(probs):g}"))
        if self.parameters is not None and not self.parameters:
            p.append((("parameters",), "needs at least one parameter"))
        if p:
            raise _problems(*p)
        return self

    # -- helpers used by the search (pure arithmetic on the spec) ----------------------

    @property
    def nested(self) -> bool:
        return self.parameters is not None

    def lattice(self) -> tuple[int, int]:
        """Inclusive integer range behind an int_uniform or q_uniform parameter.

        For q_uniform it is the multiples k of q with k*q = round(x/q)*q for some x in
        [min, max]: W&B's value set for random search (``params.py``, Q_UNIFORM).
        """
        assert self.min is not None
        assert self.max is not None
        if self.distribution == "int_uniform":
            return int(self.min), int(self.max)
        assert self.q is not None
        return round(self.min / self.q), round(self.max / self.q)

    def quantize(self, x: float) -> int | float:
        """W&B's quantisation round(x/q)*q; an int when q is an int (W&B does the same)."""
        assert self.q is not None
        return self.multiple(round(x / self.q))

    def multiple(self, k: int) -> int | float:
        """k * q, exact in decimal (3 * 0.1 is 0.3, not 0.30000000000000004)."""
        q = self.q
        assert q is not None
        if type(q) is int:
            return k * q
        return float(Decimal(repr(q)) * k)

    def point_count(self) -> int:
        """Points a grid search visits for this (leaf) parameter."""
        if self.distribution == "constant":
            return 1
        if self.distribution == "categorical":
            return len(self.values or ())
        lo, hi = self.lattice()
        return max(0, hi - lo + 1)


def _check_names(params: Mapping[str, Parameter]) -> None:
    bad = [n for n in params if not _PARAM_NAME.match(n)]
    if bad:
        raise _problems(
            *(
                (
                    (n,),
                    "a parameter name starts with a letter or _ and holds letters, digits, "
                    "_ . / : - (at most 128)",
                )
                for n in bad
            )
        )


class Metric(_Model):
    """What a trial is judged by: the name it reports and which way is better."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    goal: Literal["minimize", "maximize"] = "minimize"
    target: Number | None = None  # the sweep stops once a trial reaches it
    impute: Literal["latest", "best", "worst"] | None = None  # W&B bayes only; ignored
    impute_while_running: Literal["latest", "best", "worst", "false"] | None = None  # ignored


class EarlyTerminate(_Model):
    """W&B's hyperband early termination: ``min_iter``, or ``max_iter`` with ``s``.

    Judged as W&B's sweeps library does (``hyperband_stopping.py``), at the *bands*
    given by ``bands()``: numbers of metric values a trial has logged (its printed
    ``step`` plays no part). See ``market.search.Search`` for the rule at each band.
    """

    type: Literal["hyperband"]
    min_iter: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None
    max_iter: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None
    s: Annotated[int, Field(ge=1, le=64)] | None = None
    eta: Annotated[int, Field(ge=2, le=1000)] = 3
    strict: bool = True  # W&B option; W&B's own stopping code does not read it either

    @model_validator(mode="after")
    def _bounds(self) -> EarlyTerminate:
        if self.min_iter is None and (self.max_iter is None or self.s is None):
            raise _problems((("min_iter",), "give min_iter, or max_iter and s"))
        if not self.bands():
            raise _problems(
                (("s",), f"max_iter / eta is below 1 ({self.max_iter} / {self.eta}): no band")
            )
        return self

    def bands(self) -> tuple[int, ...]:
        """W&B's bands, ascending: with ``max_iter`` and ``s``, int(max_iter / eta**k) for
        k = 1..s while at least 1 (max_iter itself is not a band); otherwise
        min_iter * eta**k for k = 0, 1, ... (W&B lists 100; those past 10**12 values,
        which no trial logs, are left out)."""
        if self.max_iter is not None and self.s is not None:
            out: list[int] = []
            band = float(self.max_iter)
            for _ in range(self.s):
                band /= self.eta
                if band < 1:
                    break
                out.append(int(band))
            return tuple(sorted(out))
        assert self.min_iter is not None
        out = []
        band_i = self.min_iter
        while band_i <= 10**12 and len(out) < 100:
            out.append(band_i)
            band_i *= self.eta
        return tuple(out)

    @property
    def min_resource(self) -> int:
        """The first band (in logged values)."""
        return self.bands()[0]


def _command_items(value: object) -> object:
    # W&B takes any scalar in a command list and str()s it.
    if isinstance(value, list):
        return [str(v) if isinstance(v, int | float | bool) else v for v in value]
    return value


_UNSUPPORTED_SWEEP_KEYS = {
    "job": "W&B Launch jobs are not supported: give 'program' (and 'command')",
    "image_uri": "W&B Launch images are not supported: give 'program' (and 'command')",
    "scheduler": "W&B custom schedulers are not supported: use method grid, random or bayes",
    "metrics": "multi-objective sweeps are not supported: give one 'metric'",
}


class SweepConfig(_Model):
    """A Weights & Biases sweep configuration (the subset Mercato runs)."""

    program: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    command: (
        Annotated[
            list[Annotated[str, Field(max_length=4096)]],
            BeforeValidator(_command_items),
            Field(min_length=1, max_length=256),
        ]
        | None
    ) = None
    method: Method
    metric: Metric | None = None
    run_cap: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    early_terminate: EarlyTerminate | None = None
    parameters: Annotated[dict[str, Parameter], Field(min_length=1)]
    # W&B keys kept for display; they change nothing here (JobSpec.notes).
    name: str | None = None
    description: str | None = None
    project: str | None = None
    entity: str | None = None
    api_version: str | None = Field(default=None, validation_alias="apiVersion")
    kind: Literal["sweep"] | None = None
    controller: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_launch_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = [k for k in _UNSUPPORTED_SWEEP_KEYS if k in data]
            if found:
                raise _problems(*(((k,), _UNSUPPORTED_SWEEP_KEYS[k]) for k in found))
            if data.get("method") == "custom":
                raise _problems(
                    (
                        ("method",),
                        "custom (W&B Launch schedulers) is not supported; "
                        "use grid, random or bayes",
                    )
                )
        return data

    @field_validator("parameters")
    @classmethod
    def _names(cls, value: dict[str, Parameter]) -> dict[str, Parameter]:
        _check_names(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        p: list[tuple[tuple[str | int, ...], str]] = []
        if self.method == "bayes" and self.metric is None:
            p.append((("metric",), "bayes search needs a metric to optimise: {name, goal}"))
        if self.early_terminate is not None and self.metric is None:
            p.append((("metric",), "early_terminate needs a metric to compare trials by"))
        command = self.command or list(DEFAULT_COMMAND)
        for i, item in enumerate(command):
            for m in _ENVVAR_ANY.finditer(item):
                if not _ENVVAR_NAME.fullmatch(m[1]):
                    p.append(
                        (
                            ("command", i),
                            f"{m[0]}: an environment variable name is letters, digits and _",
                        )
                    )
            if item.startswith("${") and item.endswith("}") and "${" not in item[2:]:
                macro = item[2:-1]
                if macro not in MACROS and not macro.startswith("envvar:"):
                    p.append((("command", i), f"unknown macro {item}; known: {_MACRO_LIST}"))
        if "${program}" in command and self.program is None:
            p.append((("program",), "required: the command runs ${program}"))
        if self.method == "grid":
            total = 1
            for path, param in self.leaves():
                where = ("parameters", *_param_loc(path))
                if param.distribution not in GRID_DISTRIBUTIONS:
                    p.append(
                        (
                            where,
                            f"grid search needs a finite set of values, and {param.distribution} "
                            "is continuous: use values: [...], int_uniform or q_uniform, "
                            "or method random or bayes",
                        )
                    )
                elif param.probabilities is not None:
                    p.append(
                        (
                            (*where, "probabilities"),
                            "grid search runs every value; remove probabilities",
                        )
                    )
                else:
                    total *= param.point_count()
            if total > MAX_GRID_POINTS:
                p.append((("parameters",), f"{total} grid points; at most {MAX_GRID_POINTS}"))
        if p:
            raise _problems(*p)
        return self

    def leaves(self) -> list[tuple[tuple[str, ...], Parameter]]:
        """Every non-nested parameter with its path, sorted by path (W&B's order)."""
        out: list[tuple[tuple[str, ...], Parameter]] = []

        def walk(prefix: tuple[str, ...], params: Mapping[str, Parameter]) -> None:
            for name, param in params.items():
                if param.parameters is not None:
                    walk((*prefix, name), param.parameters)
                else:
                    out.append(((*prefix, name), param))

        walk((), self.parameters)
        return sorted(out, key=lambda item: item[0])

    def grid_size(self) -> int:
        """Points in the full grid (the product over parameters); meaningful for grid."""
        return math.prod(p.point_count() for _, p in self.leaves())

    @property
    def trial_cap(self) -> int:
        """Trials the sweep runs at most: run_cap, the grid's size, or DEFAULT_RUN_CAP."""
        if self.method == "grid":
            size = self.grid_size()
            return size if self.run_cap is None else min(size, self.run_cap)
        return self.run_cap if self.run_cap is not None else DEFAULT_RUN_CAP


def _param_loc(path: tuple[str, ...]) -> tuple[str, ...]:
    """('opt', 'lr') -> ('opt', 'parameters', 'lr'): where a nested leaf sits in the file."""
    out: list[str] = []
    for i, name in enumerate(path):
        if i:
            out.append("parameters")
        out.append(name)
    return tuple(out)


AcceleratorKind = Literal["gpu", "ipu", "cpu", "any"]
_KINDS: Mapping[str, AcceleratorKind] = {"any": "any", "gpu": "gpu", "ipu": "ipu", "cpu": "cpu"}


class Resources(_Model):
    """What one trial runs on."""

    accelerator: str = "any"  # any, gpu, ipu, cpu, or a catalog model (canonical name)
    devices_per_trial: Annotated[int, Field(ge=1, le=1024)] = 1
    min_memory_bytes: Annotated[
        int, BeforeValidator(_none_or(parse_size)), Field(ge=0, le=MAX_U63)
    ] = Field(default=0, validation_alias="min_memory")

    @field_validator("accelerator")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.strip().lower() in _KINDS:
            return value.strip().lower()
        try:
            return lookup(value).name
        except UnknownDeviceModel as e:
            hint = (
                f"did you mean {', '.join(e.suggestions)}?"
                if e.suggestions
                else ("use any, gpu, ipu, cpu or a device model such as H100-SXM or RTX-4090")
            )
            raise ValueError(f"unknown accelerator {value!r}; {hint}") from None

    def requirement(self) -> Requirement:
        """The order's per-unit requirement (one unit = one trial)."""
        kind: AcceleratorKind
        model: str | None = None
        if self.accelerator in _KINDS:
            kind = _KINDS[self.accelerator]
        else:
            entry = lookup(self.accelerator)
            kind, model = entry.kind, entry.name
        return Requirement(
            kind=kind,
            model=model,
            min_memory_bytes=self.min_memory_bytes,
            devices_per_unit=self.devices_per_trial,
        )


class Budget(_Model):
    """What the tenant will pay: micro-credits per device-hour, and in total (None: no cap)."""

    max_price: (
        Annotated[
            int, BeforeValidator(_none_or(lambda v: parse_credits(v, rate=True))), Field(ge=0)
        ]
        | None
    ) = None
    max_spend: (
        Annotated[
            int, BeforeValidator(_none_or(lambda v: parse_credits(v, rate=False))), Field(ge=0)
        ]
        | None
    ) = None

    @field_validator("max_spend")
    @classmethod
    def _spend_something(cls, value: int | None) -> int | None:
        # 0 once meant "no cap"; a cap of nothing would run nothing: neither is wanted.
        if value == 0:
            raise ValueError(
                "0 would allow no spending at all; give a positive amount, or leave "
                f"max_spend out for the default of {DEFAULT_MAX_SPEND // MICRO_PER_CREDIT} credits"
            )
        return value

    @property
    def spend_cap(self) -> int:
        """The cap a sweep keeps: max_spend, or DEFAULT_MAX_SPEND when the file has none."""
        return DEFAULT_MAX_SPEND if self.max_spend is None else self.max_spend


class VerifyTolerance(_Model):
    """How far a re-run's metric may be from the original's and still agree."""

    abs: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-6
    rel: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1e-3


def _verify_shorthand(value: object) -> object:
    """``verify: off`` (YAML false) and ``verify: on`` stand for the whole section."""
    if isinstance(value, bool):
        return {"enabled": value}
    return value


class Verify(_Model):
    """Spot-check replication of trial results (market/verification.py): on by default.

    ``rate`` fixes the probability a result is re-run on another provider; left out,
    it adapts to each provider's record (1/4 for newcomers down to 1/100). ``best``
    re-runs the result about to be reported best unless it is already checked.
    ``canary`` runs a keyed computation on a provider's first lease with the tenant
    before any trial (market.verification.canary_answer): a wrong answer drops it.
    """

    enabled: bool = True
    rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    tolerance: VerifyTolerance = VerifyTolerance()
    best: bool = True
    #: A keyed, timed canary on each provider's first lease with this tenant.
    canary: bool = True


class Limits(_Model):
    """Per-trial limits the provider enforces, and how often a lost trial is retried."""

    trial_timeout_ms: Annotated[
        int, BeforeValidator(_none_or(parse_duration_ms)), Field(ge=1, le=MAX_TRIAL_TIMEOUT_MS)
    ] = Field(default=DEFAULT_TRIAL_TIMEOUT_MS, validation_alias="trial_timeout")
    max_output_bytes: Annotated[
        int, BeforeValidator(_none_or(parse_size)), Field(ge=0, le=MAX_OUTPUT_BYTES)
    ] = Field(default=DEFAULT_MAX_OUTPUT_BYTES, validation_alias="max_output")
    retries: Annotated[int, Field(ge=0, le=100)] = 2
    network: bool = False
    #: Trials failed in a row before a sweep stops (market/sweepguard.py).
    max_failures: Annotated[int, Field(ge=1, le=1_000_000)] = DEFAULT_MAX_FAILURES


_DISPLAY_KEYS = (
    ("description", "description"),
    ("project", "project"),
    ("entity", "entity"),
    ("controller", "controller"),
    ("apiVersion", "api_version"),
)


Argv = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=4096)]],
    BeforeValidator(_command_items),
    Field(min_length=1, max_length=256),
]


def _count(value: object) -> object:
    """Counts like 1e9 parameters may be written as floats; they must be whole."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_count), Field(ge=1, le=10**15)]


class ModelShape(_Model):
    """What the classifier needs to know about the model being trained."""

    parameters: Count
    gradient_bytes: Annotated[int, Field(ge=1, le=8)] = 2  # bytes per element, 2 = bf16


class SyncConfig(_Model):
    """How often replicas synchronise: every step (DDP) or every inner_steps (DiLoCo)."""

    method: Literal["ddp", "diloco"] = "ddp"
    inner_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    #: DiLoCo only: how many workers (None: the planner picks the cheapest split).
    workers: Annotated[int, Field(ge=1, le=1024)] | None = None
    #: DiLoCo only: how the outer step's blobs travel (market/diloco.py).
    compression: Literal["fp32", "fp16", "int8"] = "fp32"
    #: DiLoCo only: how long an outer step waits for late workers once one reported.
    round_timeout_ms: Annotated[
        int, BeforeValidator(_none_or(parse_duration_ms)), Field(ge=1, le=24 * 3_600_000)
    ] = Field(default=120_000, validation_alias="round_timeout")
    #: DiLoCo only: workers replaced after their provider is lost.
    replacements: Annotated[int, Field(ge=0, le=100)] = 2

    @model_validator(mode="after")
    def _ddp_syncs_every_step(self) -> SyncConfig:
        if self.method == "ddp" and self.inner_steps != 1:
            raise ValueError("ddp synchronises every step: inner_steps belongs to diloco")
        if self.method == "ddp" and (self.workers is not None or self.compression != "fp32"):
            raise ValueError("workers and compression belong to diloco")
        return self


class TrainingConfig(_Model):
    """A distributed training job, launched with torchrun on one provider's gang."""

    world_size: Annotated[int, Field(ge=1, le=1024)]
    model: ModelShape
    tokens_per_step: Count | None = None  # per device
    batch_size: Count | None = None  # per device, with sequence_length
    sequence_length: Count | None = None
    sync: SyncConfig = SyncConfig()
    steps: Count | None = None  # total steps, for runtime and cost estimates
    command: Argv  # run as `torchrun --standalone --nproc_per_node=<world_size> <command>`
    metric: Metric | None = None  # the final value reported, e.g. {name: loss, goal: minimize}

    @model_validator(mode="after")
    def _tokens(self) -> TrainingConfig:
        if self.tokens_per_step is None and (
            self.batch_size is None or self.sequence_length is None
        ):
            raise ValueError("give tokens_per_step, or batch_size and sequence_length")
        if self.tokens_per_step is not None and self.batch_size is not None:
            raise ValueError("give tokens_per_step or batch_size/sequence_length, not both")
        return self

    @property
    def tokens(self) -> int:
        if self.tokens_per_step is not None:
            return self.tokens_per_step
        assert self.batch_size is not None
        assert self.sequence_length is not None
        return self.batch_size * self.sequence_length


#: A health path the provider probes: absolute, printable, no query tricks.
HEALTH_PATH = re.compile(r"^/[A-Za-z0-9_./~-]{0,255}$")
MAX_REPLICAS = 16


def _socket_name(value: object) -> object:
    if not isinstance(value, str) or not SOCKET_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            "a file name in the work directory (letters, digits, _ . -, at most 64), "
            "not a path: the service listens there, inside its sandbox"
        )
    return value


def _health_path(value: object) -> object:
    if not isinstance(value, str) or not HEALTH_PATH.fullmatch(value) or ".." in value:
        raise ValueError("an absolute URL path such as /healthz (letters, digits, _ . / ~ -)")
    return value


class ListenConfig(_Model):
    """Where the service listens inside its sandbox.

    The sandbox has no network (not even one shared with the provider), so a service
    listens on a Unix socket in its work directory, which the provider's daemon
    reaches from outside and publishes under the lease (docs/protocol.md, section
    "Service endpoints"). A TCP port would live in the sandbox's own network
    namespace, out of the daemon's reach: ``port`` is refused with that reason.
    """

    socket: Annotated[str, BeforeValidator(_socket_name)] = "service.sock"
    port: int | None = None

    @model_validator(mode="after")
    def _no_port(self) -> ListenConfig:
        if self.port is not None:
            raise _problems(
                (
                    ("port",),
                    "a sandboxed service has no network, so a port cannot be reached; "
                    "listen on the Unix socket $MERCATO_SERVICE_SOCKET (listen.socket)",
                )
            )
        return self


class ServiceConfig(_Model):
    """A long-running process (inference): kept up, restarted when it dies.

    ``listen`` and ``health`` make it reachable: the provider publishes its socket at
    ``/svc/<lease_id>/`` and ``mercato serve`` probes ``health`` through it (a 2xx
    answer is ready). ``replicas`` leases that many providers (distinct by default:
    ``spread``), each restarted up to ``restarts`` times in all.
    """

    command: Argv
    restarts: Annotated[int, Field(ge=0, le=1000)] = 5
    listen: ListenConfig = ListenConfig()
    health: Annotated[str, BeforeValidator(_health_path)] = "/healthz"
    replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1
    spread: bool = True  # replicas on distinct providers
    ready_timeout_ms: Annotated[
        int, BeforeValidator(_none_or(parse_duration_ms)), Field(ge=1_000, le=3_600_000)
    ] = Field(default=120_000, validation_alias="ready_timeout")


class JobSpec(_Model):
    """A validated job file. Build it with ``parse_job``."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    kind: JobKind = "sweep"
    sweep: SweepConfig | None = None
    training: TrainingConfig | None = None
    service: ServiceConfig | None = None
    resources: Resources = Resources()
    budget: Budget = Budget()
    limits: Limits = Limits()
    verify: Annotated[Verify, BeforeValidator(_verify_shorthand)] = Verify()

    @model_validator(mode="after")
    def _section_for_kind(self) -> JobSpec:
        sections = {"sweep": self.sweep, "training": self.training, "service": self.service}
        if sections[self.kind] is None:
            what = {
                "sweep": "the W&B sweep to run",
                "training": "world_size, model, tokens_per_step and the command",
                "service": "the command to keep running",
            }[self.kind]
            raise _problems(((self.kind,), f"required for kind {self.kind}: {what}"))
        extra = [k for k, v in sections.items() if v is not None and k != self.kind]
        if extra:
            raise _problems(
                ((extra[0],), f"a {self.kind} job has no {extra[0]} section (set kind?)")
            )
        return self

    @property
    def sweep_config(self) -> SweepConfig:
        """The sweep section (always present in a valid sweep job)."""
        assert self.sweep is not None
        return self.sweep

    def requirement(self) -> Requirement:
        """Per-trial requirement for the order."""
        return self.resources.requirement()

    def notes(self) -> list[str]:
        """Things in the file that Mercato reads differently from W&B, for the user to see."""
        s = self.sweep_config
        out = [
            f"W&B key '{key}' is kept for display and does nothing here"
            for key, attr in _DISPLAY_KEYS
            if getattr(s, attr) is not None
        ]
        if s.run_cap is None and s.method != "grid":
            out.append(
                f"no run_cap: the {s.method} search stops after {DEFAULT_RUN_CAP} trials "
                "(set sweep.run_cap to change this)"
            )
        if s.metric is not None:
            for key in ("impute", "impute_while_running"):
                if getattr(s.metric, key) is not None:
                    out.append(f"metric.{key} is ignored: failed trials teach the search nothing")
        if s.early_terminate is not None and "strict" in s.early_terminate.model_fields_set:
            out.append(
                "early_terminate.strict is ignored, as W&B's own stopping code ignores it: "
                "a trial stops when its best value is worse than the band's threshold"
            )
        command = s.command or list(DEFAULT_COMMAND)
        macros = {item[2:-1] for item in command if item.startswith("${") and item.endswith("}")}
        if not macros & ARGS_MACROS and any(p.distribution != "constant" for _, p in s.leaves()):
            out.append(
                "the command passes no parameters (it has no ${args...} macro): W&B hands "
                f"them over through wandb.config; here the program reads ${PARAMS_FILE_ENV}, "
                "the path of a JSON file holding them"
            )
        for item in command:
            literal = [
                m[0]
                for m in _LITERAL_REF.finditer(item)
                if not m[1].startswith("envvar:") and m[0] != item
            ]
            if literal:
                out.append(
                    f"command item {item!r} is passed as written: {', '.join(literal)} is "
                    "not expanded (W&B expands only whole-item macros such as ${args}, and "
                    f"${{envvar:NAME}}); use ${{args}} or read ${PARAMS_FILE_ENV}"
                )
        for name in envvars(spec=self):
            out.append(
                f"${{envvar:{name}}} is taken from the tenant's environment at submit and "
                "sent to providers in the trial's command"
            )
        if s.method == "bayes" and any(p.probabilities for _, p in s.leaves()):
            out.append("probabilities are used by random search only; bayes ignores them")
        return out


# --- parsing ----------------------------------------------------------------------

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
# YAML 1.2 floats; YAML 1.1 (PyYAML) needs a dot, so it reads 1e-3 as a string.
_FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)$")


@functools.cache
def _loader() -> type[yaml.SafeLoader]:
    """The job file's YAML loader, built on first use.

    PyYAML is imported here, not at the top: a provider daemon imports this module to
    check the specs it is sent but never parses a YAML file, and an idle daemon holds
    every module it imports (docs/benchmarks.md, "Idle provider RSS").
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        """SafeLoader without aliases, timestamps or repeated keys, and with YAML 1.2 floats."""

        def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()  # type: ignore[no-untyped-call]
                mark: yaml.Mark | None = event.start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a job file", mark
                )
            return super().compose_node(parent, index)

        def construct_mapping(
            self, node: yaml.MappingNode, deep: bool = False
        ) -> dict[Hashable, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} appears twice", key_node.start_mark
                    )
                if isinstance(key, Hashable):
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    _Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))
    return _Loader


# W&B sweep keys that mark a file as a plain W&B sweep (no ``sweep:`` section).
_WANDB_KEYS = frozenset(
    {
        "program",
        "command",
        "method",
        "metric",
        "metrics",
        "run_cap",
        "early_terminate",
        "parameters",
        "description",
        "project",
        "entity",
        "apiVersion",
        "controller",
        "job",
        "image_uri",
        "scheduler",
    }
)
_JOB_KEYS = ("name", "kind", "sweep", "training", "service", "resources", "budget", "limits")


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # _loader() is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        what = " ".join(x for x in (e.context, e.problem) if x) or "not valid YAML"
        lines = text.splitlines()
        if mark and mark.line < len(lines) and "${" in lines[mark.line]:
            # W&B's command macros open a flow mapping inside [ ... ].
            what += "; inside [ ] quote command macros ('${env}') or use a '- ${env}' list"
        raise _FileProblem(Problem(where, f"YAML: {what}")) from None
    except yaml.YAMLError as e:
        raise _FileProblem(Problem("(file)", f"YAML: {e}")) from None
    except RecursionError:
        raise _FileProblem(Problem("(file)", "YAML nests too deeply")) from None


class _FileProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


# Containers nested deeper than this are refused; the canonical codec stops at 64.
_MAX_DEPTH = 32


def _plain(value: Any, path: tuple[str | int, ...], out: list[Problem]) -> None:
    """Collect values the canonical codec cannot encode (and W&B would not accept)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, path)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, dict | list) and len(at) >= _MAX_DEPTH:
            out.append(Problem(_dotted(at), f"nests deeper than {_MAX_DEPTH} levels"))
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    out.append(Problem(_dotted(at), f"keys must be text, got {k!r}"))
                else:
                    stack.append((item, (*at, k)))
        elif isinstance(v, list):
            stack.extend((item, (*at, i)) for i, item in enumerate(v))
        elif isinstance(v, float):
            if not math.isfinite(v):
                out.append(Problem(_dotted(at), f"expected a finite number, got {v}"))
        elif not (v is None or isinstance(v, str | int)):
            out.append(Problem(_dotted(at), f"unsupported YAML value of type {type(v).__name__}"))


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(file)"


def _default_name(section: Any) -> str:
    program = section.get("program") if isinstance(section, dict) else None
    command = section.get("command") if isinstance(section, dict) else None
    if program is None and isinstance(command, list) and command:
        program = next((c for c in command if isinstance(c, str) and c.endswith(".py")), None)
    if isinstance(program, str) and program.strip():
        stem = program.strip().rstrip("/").rsplit("/", 1)[-1]
        stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
        if stem:
            return stem[:64]
    return "sweep"


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """File keys accepted at the mapping that holds ``loc``'s last key."""
    model: Any = JobSpec
    for part in loc[:-1]:
        if model is Parameter and isinstance(part, str) and part != "parameters":
            continue  # a parameter's name inside a ``parameters`` dict
        fields = {f.validation_alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None:
            return []
        model = next((m for m in _models_in(field.annotation) if issubclass(m, BaseModel)), None)
        if model is None:
            return []
    return sorted(str(f.validation_alias or name) for name, f in model.model_fields.items())


def _models_in(annotation: Any) -> Iterator[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _models_in(arg)


def _from_validation_error(error: ValidationError) -> list[Problem]:
    import difflib

    out: list[Problem] = []
    for err in error.errors(include_url=False):
        loc: tuple[str | int, ...] = tuple(err["loc"])
        kind = err["type"]
        if kind == "job_problems":
            for sub, message in err["ctx"]["problems"]:
                out.append(Problem(_dotted((*loc, *sub)), message))
            continue
        message = err["msg"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = "unknown key"
            if close:
                message += f"; did you mean {close[0]!r}?"
            elif allowed:
                message += f"; expected one of {', '.join(allowed)}"
        elif kind == "missing":
            message = "required"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind == "assertion_error":
            message = message.removeprefix("Assertion failed, ")
        else:
            shown = repr(err.get("input"))
            message += f" (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        out.append(Problem(_dotted(loc), message))
    return out


def parse_job(text: str, source: str = "job file") -> JobSpec:
    """Validate job file text (YAML) into a JobSpec, or raise JobError listing every problem.

    ``source`` names the file in messages. Reads no file: the caller passes the text.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_JOB_FILE_BYTES:
        raise JobError(source, [Problem("(file)", f"larger than {MAX_JOB_FILE_BYTES} bytes")])
    try:
        raw = _load_yaml(text)
    except _FileProblem as e:
        raise JobError(source, [e.problem]) from None
    if raw is None:
        raise JobError(source, [Problem("(file)", "the job file is empty")])
    if not isinstance(raw, dict):
        raise JobError(
            source,
            [Problem("(file)", f"expected a mapping of {', '.join(_JOB_KEYS)}")],
        )
    problems: list[Problem] = []
    _plain(raw, (), problems)
    if problems:
        raise JobError(source, problems)
    flat = (
        "sweep" not in raw
        and "training" not in raw
        and "service" not in raw
        and any(k in raw for k in _WANDB_KEYS)
    )
    if flat:
        # A plain W&B sweep file: everything that is not ours belongs to the sweep.
        doc: dict[str, Any] = {k: raw[k] for k in _JOB_KEYS if k in raw}
        doc["sweep"] = {k: v for k, v in raw.items() if k not in _JOB_KEYS or k in ("name",)}
        if isinstance(doc.get("name"), str):
            doc["name"] = doc["name"][:64]
    else:
        doc = dict(raw)
    section = doc.get("sweep") or doc.get("training") or doc.get("service")
    if "name" not in doc and isinstance(section, dict) and isinstance(section.get("name"), str):
        doc["name"] = section["name"][:64]  # W&B's sweep name names the job
    doc.setdefault("name", _default_name(section))
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as e:
        problems = _from_validation_error(e)
    if flat:
        problems = [
            Problem(p.path.removeprefix("sweep."), p.message) if p.path != "sweep" else p
            for p in problems
        ]
    raise JobError(source, problems)


# --- hashing and commands ---------------------------------------------------------


def spec_hash(spec: JobSpec) -> str:
    """SHA-256 (hex) of the spec's canonical encoding: what an order's job_spec_hash holds."""
    return hashlib.sha256(encode(spec.model_dump(mode="python"))).hexdigest()


def _flag_value(value: Any) -> str:
    # W&B formats flags with Python's str() (wandb/sdk/launch/sweeps/utils.py,
    # create_sweep_command_args): True is "True", a nested dict is its repr.
    return str(value)


def args_json(params: Mapping[str, Any]) -> str:
    """The ``${args_json}`` text, also the content of the ``${args_json_file}`` file."""
    return json.dumps({k: params[k] for k in sorted(params)})


def uses_args_json_file(spec: JobSpec) -> bool:
    """Whether the node must write ``args_json(params)`` to a file for the command."""
    return "${args_json_file}" in (spec.sweep_config.command or DEFAULT_COMMAND)


def envvars(spec: JobSpec) -> list[str]:
    """Names of the ``${envvar:NAME}`` the sweep's command reads, in order, once each."""
    command = spec.sweep_config.command or DEFAULT_COMMAND
    return list(dict.fromkeys(m[1] for item in command for m in _ENVVAR_ANY.finditer(item)))


def missing_envvars(spec: JobSpec, environ: Mapping[str, str]) -> list[str]:
    """The ``${envvar:NAME}`` of the command that ``environ`` does not set."""
    return [name for name in envvars(spec) if name not in environ]


def render_command(
    spec: JobSpec,
    params: Mapping[str, Any],
    interpreter: str,
    args_json_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    seed: int = 0,
) -> list[str]:
    """The trial's argv: the sweep's command with W&B's macros expanded for ``params``.

    ``${env}`` is /usr/bin/env, ``${interpreter}`` the given interpreter, ``${program}``
    the sweep's program, ``${args}`` one ``--key=value`` per parameter (sorted by name),
    ``${args_no_hyphens}`` ``key=value``, ``${args_no_equals}`` ``--key value``,
    ``${args_no_boolean_flags}`` ``--key`` for true and nothing for false booleans,
    ``${args_json}`` one JSON object, ``${args_json_file}`` the path given (the node
    writes ``args_json(params)`` there), ``${seed}`` the trial's seed (also
    ``$MERCATO_SEED``). ``${envvar:NAME}`` is replaced by
    ``environ[NAME]`` wherever it occurs in an item, as the W&B agent does with its own
    environment. Raises ValueError if the command needs a JSON file path and none is
    given, or an environment variable ``environ`` does not set.
    """
    sweep = spec.sweep_config
    items = sorted(params.items())
    no_bool: list[str] = []
    for k, v in items:
        if isinstance(v, bool):
            no_bool += [f"--{k}"] if v else []
        else:
            no_bool.append(f"--{k}={_flag_value(v)}")
    expansions: dict[str, list[str]] = {
        "env": ["/usr/bin/env"],
        "interpreter": [interpreter],
        "program": [sweep.program] if sweep.program is not None else [],
        "args": [f"--{k}={_flag_value(v)}" for k, v in items],
        "args_no_hyphens": [f"{k}={_flag_value(v)}" for k, v in items],
        "args_no_equals": [x for k, v in items for x in (f"--{k}", _flag_value(v))],
        "args_no_boolean_flags": no_bool,
        "args_json": [args_json(params)],
        "seed": [str(seed)],
    }
    env = environ or {}

    def expand_env(m: re.Match[str]) -> str:
        if m[1] not in env:
            raise ValueError(f"the command uses {m[0]} and {m[1]} is not set")
        return env[m[1]]

    out: list[str] = []
    for item in sweep.command or DEFAULT_COMMAND:
        if "${envvar:" in item:
            out.append(_ENVVAR_ANY.sub(expand_env, item))
        elif item.startswith("${") and item.endswith("}"):
            macro = item[2:-1]
            if macro == "args_json_file":
                if args_json_file is None:
                    raise ValueError("the command uses ${args_json_file}: give its path")
                out.append(args_json_file)
            else:
                out.extend(expansions[macro])
        else:
            out.append(item)
    return out
