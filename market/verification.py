"""Whether to trust a provider's trial result: spot checks, comparison, disputes.

A provider can answer "succeeded, loss 1e-06" without running anything, and the
signature on its result only proves who said it. The tenant therefore re-runs a
sample of finished trials on a *different* provider, with the same parameters, the
same workspace and the same seed (``trial_seed``), and compares the metric within
the tolerance the job declares. On a mismatch a third provider decides: whoever is
in the minority lied (or runs a broken machine, which is the same to the tenant).

How often to check follows BOINC's adaptive replication (Anderson, "BOINC: a platform
for volunteer computing", 2019, section 6.2): a host earns trust by a streak of
results that were *checked and found valid*, and is then checked with probability
1/streak. Two changes for a market of strangers:

* the streak counts checked results only. A provider that fabricates every result
  never extends it, so it stays at the newcomer rate ``UNKNOWN_RATE`` = 1/4 until
  caught: P(caught by its n-th result) = 1 - (3/4)^n, which is 0.9968 at n = 20
  (the goal is 0.99; 1/5 would give only 0.9885);
* the rate never falls below ``FLOOR_RATE`` = 1/100, so a provider that turns
  dishonest after a long honest streak is still caught, on average within 100
  results (BOINC has no floor).

Everything here is pure: the draw is an HMAC of the trial and the provider under the
tenant's secret key, so a run and its resume decide alike and the bench can replay the
rule, while the provider, who sees the job id, the trial number and the task id,
cannot tell which of its results will be re-run (were it keyed by those alone, a
provider could run exactly the trials about to be checked and fabricate the rest,
never caught: tests/node/tenant/test_verify_e2e.py::TestPredictedChecks).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

#: Probability a result of a provider with no checked result yet is re-run.
UNKNOWN_RATE = Fraction(1, 4)
#: The lowest check probability, however long a provider's streak.
FLOOR_RATE = Fraction(1, 100)


def check_rate(
    streak: int, *, initial: Fraction = UNKNOWN_RATE, floor: Fraction = FLOOR_RATE
) -> Fraction:
    """P(re-run a result) of a provider with ``streak`` consecutive checked-valid results.

    ``initial`` until 1/streak is lower (streak 5 with the defaults), then 1/streak,
    never below ``floor``.
    """
    if streak <= 0:
        return initial
    return max(floor, min(initial, Fraction(1, streak)))


#: Bytes of the tenant's draw key: 256 bits, as HMAC-SHA256's own block of security.
DRAW_SECRET_BYTES = 32


def draw(key: str, secret: bytes) -> Fraction:
    """A uniform number in [0, 1) from ``key`` under ``secret``: the same key always
    draws the same, and without ``secret`` nobody can tell what it draws."""
    if len(secret) < DRAW_SECRET_BYTES:
        raise ValueError(f"a draw secret needs {DRAW_SECRET_BYTES} bytes, got {len(secret)}")
    digest = hmac.new(secret, key.encode(), hashlib.sha256).digest()
    return Fraction(int.from_bytes(digest[:8], "big"), 1 << 64)


def should_check(rate: Fraction, key: str, secret: bytes) -> bool:
    """Whether the result named by ``key`` is re-run at probability ``rate``."""
    return draw(key, secret) < rate


def trial_seed(job_seed: int, number: int) -> int:
    """The seed a trial gets (``$MERCATO_SEED``, ``${seed}``): fixed by job and trial, so
    every provider running trial ``number`` gets the same one. 31 bits: fits any RNG."""
    digest = hashlib.sha256(f"mercato-seed:{job_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Two metric values agree if they differ by at most ``abs`` or ``rel`` x the larger."""

    abs: float = 1e-6
    rel: float = 1e-3

    def agree(self, a: float, b: float) -> bool:
        """Whether ``a`` and ``b`` are the same result (NaN agrees only with NaN)."""
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if math.isinf(a) or math.isinf(b):
            return a == b
        return abs(a - b) <= max(self.abs, self.rel * max(abs(a), abs(b)))


class Verdict(enum.StrEnum):
    """What a comparison of results came to."""

    AGREED = "agreed"  # the check matches the original: both are right
    ORIGINAL_LIED = "original_lied"  # the decider sides with the check
    CHECK_LIED = "check_lied"  # the decider sides with the original
    BOTH_LIED = "both_lied"  # a fourth vote sided with the first decider
    UNRESOLVED = "unresolved"  # no two of MAX_VOTES answers agree: not reproducible


def compare(original: float, check: float, tolerance: Tolerance) -> Verdict | None:
    """AGREED, or None: a third provider must decide."""
    return Verdict.AGREED if tolerance.agree(original, check) else None


def verdict_of(bad: Sequence[int]) -> Verdict:
    """What :func:`liars`' answer ``bad`` (indices of the votes that lied; 0 is the
    original) comes to: AGREED when nobody lied."""
    if not bad:
        return Verdict.AGREED
    if 0 not in bad:
        return Verdict.CHECK_LIED
    return Verdict.BOTH_LIED if len(bad) > 1 else Verdict.ORIGINAL_LIED


#: Votes on one trial (the original, the check, then deciders) before it is called
#: unreproducible. Three answers that all differ come from a program that ignores its
#: seed, or from two liars among three providers (two fabricators rarely agree on a
#: made-up value); a fourth vote tells them apart: if it agrees with one of the three,
#: the other two lied. Without it both liars walked away and kept the original's result.
MAX_VOTES = 4


def liars(values: Sequence[float], tolerance: Tolerance) -> tuple[int, ...] | None:
    """Which votes lied, once two of ``values`` agree; None while no two agree.

    The first two votes that agree (in voting order) are the truth; a vote that agrees
    with neither of them lied. ``()``: nobody did.
    """
    for i, a in enumerate(values):
        for j in range(i + 1, len(values)):
            b = values[j]
            if tolerance.agree(a, b):
                return tuple(
                    k
                    for k, v in enumerate(values)
                    if not (tolerance.agree(v, a) or tolerance.agree(v, b))
                )
    return None


@dataclass(frozen=True, slots=True)
class Trust:
    """What one tenant learnt by checking one provider's results."""

    streak: int = 0  # consecutive results checked and found valid
    verified: int = 0  # results checked and found valid, ever
    caught: int = 0  # results found false by a third provider

    @property
    def rate(self) -> Fraction:
        return check_rate(self.streak)

    def valid(self) -> Trust:
        return replace(self, streak=self.streak + 1, verified=self.verified + 1)

    def lied(self) -> Trust:
        return replace(self, streak=0, caught=self.caught + 1)


#: A sweep's best result is re-run before it is reported unless its provider has at
#: least this many consecutive checked-valid results (BOINC trusts a host after 10).
TRUSTED_STREAK = 10


def best_needs_check(trust: Trust) -> bool:
    """Whether the result about to be reported best must be re-run first.

    A provider that fabricates never reaches ``TRUSTED_STREAK`` (its streak stays 0), so
    a fabricated best is always checked; a proven provider's best is checked only at its
    sampling rate, which keeps the overhead of an honest market low.
    """
    return trust.streak < TRUSTED_STREAK


#: A provider is *proven* to a tenant from this streak on: 1/streak is then below the
#: newcomer rate, so its results stop costing a quarter of a re-run each.
PROVEN_STREAK = 5
#: Results of one sweep an unproven provider may return while a proven provider is
#: leased to take the rest (room for newcomers measured in trials, not lease places).
NEWCOMER_TRIALS = 1


def proven(trust: Trust) -> bool:
    """Whether ``trust`` has left the newcomer rate (``PROVEN_STREAK`` checked-valid)."""
    return trust.streak >= PROVEN_STREAK


def may_take_trial(trust: Trust, taken: int, *, proven_leased: bool) -> bool:
    """Whether a provider that returned ``taken`` trials of this sweep may get another.

    Why: every result of an unproven provider is re-run with probability 1/4 (it must
    be, to catch a fabricator by its 20th result), so what verification costs a sweep
    is about a quarter of the results unproven providers return. A newcomer therefore
    gets ``NEWCOMER_TRIALS`` trials per sweep while a proven provider is leased to run
    the rest: it still earns its streak (its results, and the checks it runs for
    others), at a fixed cost of about NEWCOMER_TRIALS x 1/4 = 0.25 re-runs per sweep,
    and a fabricator spoils at most that many results of a sweep (its fabricated best
    is re-run anyway: ``best_needs_check``). The catch guarantee is per result, so it
    is unchanged: 1 - (3/4)^20 by its 20th, however the 20 are spread over sweeps.
    With no proven provider leased (a tenant's first sweep) nobody is held back: the
    sweep must run, and then pays the newcomer rate on every result.
    """
    return proven(trust) or not proven_leased or taken < NEWCOMER_TRIALS


def catch_probability(results: int, rate: Fraction = UNKNOWN_RATE) -> float:
    """P(a provider fabricating every result is caught by its ``results``-th), if every
    check of a fabricated result finds it out (a fabricator never extends its streak)."""
    return 1.0 - float((1 - rate) ** results)


# --- measured speed ---------------------------------------------------------------

#: Rounds of the alternating fit in ``slowness``: each halves the remaining error on the
#: small, well-connected tables a tenant has; 30 leave nothing visible.
FIT_ROUNDS = 30


def slowness(durations: Sequence[tuple[str, str, int]]) -> dict[str, float]:
    """Each provider's relative slowness from measured trial durations.

    ``durations`` holds (provider, trial, milliseconds) as the *tenant* timed them. The
    model is ``log d = a[provider] + b[trial]``: a trial's own size cancels out, so
    providers are compared on the same trials (a spot check runs one trial on two or
    three of them) and, through shared ones, across the whole table. Fitted by
    alternating means (least squares in log space), normalised so the geometric mean
    over providers is 1; a provider with no shared trial is compared through the trials
    it ran alone only by their size, which the fit takes as average.
    """
    rows = [(p, t, math.log(max(ms, 1))) for p, t, ms in durations]
    if not rows:
        return {}
    a = {p: 0.0 for p, _, _ in rows}
    b = {t: 0.0 for _, t, _ in rows}
    for _ in range(FIT_ROUNDS):
        sums: dict[str, list[float]] = {}
        for p, t, y in rows:
            sums.setdefault(t, []).append(y - a[p])
        b = {t: sum(v) / len(v) for t, v in sums.items()}
        sums = {}
        for p, t, y in rows:
            sums.setdefault(p, []).append(y - b[t])
        a = {p: sum(v) / len(v) for p, v in sums.items()}
        mean = sum(a.values()) / len(a)
        a = {p: v - mean for p, v in a.items()}
    return {p: math.exp(v) for p, v in a.items()}


def measured_flops(declared: Mapping[str, int], slow: Mapping[str, float]) -> dict[str, int]:
    """FLOP/s to rank providers by, once measured: declared figures are only the prior.

    Measured speeds are relative, so they are anchored to the declared figures of the
    measured providers as a whole (their geometric mean of declared x slowness): a
    provider that claims ten times its real speed moves the anchor by a tenth of that
    among ten, and its own figure falls to what it delivers. Providers not measured
    keep their declared figure.
    """
    both = [p for p in slow if declared.get(p, 0) > 0]
    if not both:
        return dict(declared)
    anchor = math.exp(sum(math.log(declared[p] * slow[p]) for p in both) / len(both))
    out = dict(declared)
    for p in both:
        out[p] = max(1, int(anchor / slow[p]))
    return out


# --- canary -----------------------------------------------------------------------

#: The metric a canary reports: the first 48 bits of its last hash (exact in a float).
CANARY_METRIC = "mercato_canary"
#: SHA-256 rounds of a canary: about 0.2 s of one CPU core in CPython, a second or two
#: in a sandbox with interpreter start; long enough to time, short enough to be free.
CANARY_ROUNDS = 300_000
#: The canary program, run with the nonce (hex) and the rounds as arguments.
CANARY_PROGRAM = (
    "import hashlib, json, sys\n"
    "h = bytes.fromhex(sys.argv[1])\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    h = hashlib.sha256(h).digest()\n"
    f"print(json.dumps({{'{CANARY_METRIC}': int.from_bytes(h[:6], 'big')}}))\n"
)


def canary_command(nonce: bytes, rounds: int = CANARY_ROUNDS) -> list[str]:
    """The argv of a canary keyed by ``nonce`` (the tenant's secret until it is sent)."""
    return ["python3", "-c", CANARY_PROGRAM, nonce.hex(), str(rounds)]


def canary_answer(nonce: bytes, rounds: int = CANARY_ROUNDS) -> int:
    """What an honest canary prints: iterated SHA-256 cannot be skipped or precomputed
    without the nonce, so a right answer proves the provider ran code, and its time
    how fast (the tenant times it itself)."""
    h = nonce
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()
    return int.from_bytes(h[:6], "big")
