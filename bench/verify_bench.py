"""What spot-check replication costs and what it catches (issue 16), by simulation.

The rule is the real one (market/verification.py: rate per provider from its streak of
checked-valid results, the deterministic draw, the best check, majority of three); the
market around it is a model. A tenant runs ``--sweeps`` sweeps of ``--trials`` trials
(24: the digits sweep) one after another; for each it leases ``--leased`` providers drawn
from a market of ``--providers``, assigns trials round-robin (while a proven provider is
leased a newcomer gets NEWCOMER_TRIALS of them: market.verification.may_take_trial), and
checks results as the sweep runner does (the providers leased are chosen as
market/asking.py asks: proven first, a quarter of the places for newcomers): a sampled
result is re-run on another
leased provider, a mismatch is decided by a third, the minority is dropped (never
leased again by this tenant) and its results of the sweep are run again elsewhere.
Before the sweep ends, its best is re-run unless checked or from a provider with a
streak of ``TRUSTED_STREAK``.

Every trial run costs one unit; verification's extra spend is (check runs + re-runs of
discarded results) / trials. A fabricator answers a value better than any honest one
(drawn at random, so two fabricators do not agree); honest values are exact.

Reported:

* honest market: extra spend of the first sweep (every provider new) and over all sweeps;
* with ``--dishonest`` (10 %) fabricating providers: the share of fabricators that were
  caught by their 20th result (among those that returned 20 or were caught), how many
  were leased at all, the most results one returned, and how many sweeps reported a
  fabricated best.

    python bench/verify_bench.py                # both, default seed
    python bench/verify_bench.py --seeds 1 2 3  # several seeds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass, field

from market.verification import (
    MAX_VOTES,
    Tolerance,
    Trust,
    Verdict,
    best_needs_check,
    compare,
    liars,
    may_take_trial,
    proven,
    should_check,
)

TOL = Tolerance()
#: The tenant's draw key (node.store.verify_store.VerifyStore.draw_secret), fixed here so
#: a run replays exactly.
SECRET = hashlib.sha256(b"verify_bench tenant").digest()


@dataclass
class Market:
    honest: list[str]
    fabricators: set[str]
    trust: dict[str, Trust] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    results: dict[str, int] = field(default_factory=dict)  # results returned, per provider
    caught_at: dict[str, int] = field(default_factory=dict)  # n-th result when caught

    def value(self, provider: str, true: float, rng: random.Random) -> float:
        if provider in self.fabricators:
            return -1.0 - rng.random()  # "better" than any honest (non-negative) loss
        return true

    def t(self, p: str) -> Trust:
        return self.trust.get(p, Trust())


def run_sweep(m: Market, s: int, trials: int, leased: int, rng: random.Random) -> dict[str, int]:
    pool = [p for p in m.honest + sorted(m.fabricators) if p not in m.dropped]
    # As the tenant asks (market/asking.py): proven providers first (most checked-valid
    # results), a quarter of the places (at least one) for a newcomer drawn at random.
    record = sorted((p for p in pool if m.t(p).verified), key=lambda p: -m.t(p).verified)
    n_new = max(1, leased // 4, leased - len(record))
    lease = record[: leased - n_new]
    rest = [p for p in pool if p not in lease]
    lease += rng.sample(rest, min(n_new, len(rest)))
    truth = {n: rng.random() for n in range(trials)}
    owner: dict[int, str] = {}
    value: dict[int, float] = {}
    checked: set[int] = set()
    cost = {"trials": trials, "extra": 0}
    queue = list(range(trials))
    i = 0

    def run(n: int, p: str) -> float:
        m.results[p] = m.results.get(p, 0) + 1
        return m.value(p, truth[n], rng)

    def check(n: int) -> None:
        original = owner[n]
        others = [p for p in lease if p != original and p not in m.dropped]
        if not others:
            return
        checker = rng.choice(others)
        cost["extra"] += 1
        v2 = run(n, checker)
        checked.add(n)
        if compare(value[n], v2, TOL) is Verdict.AGREED:
            m.trust[original] = m.t(original).valid()
            m.trust[checker] = m.t(checker).valid()
            return
        voters, values = [original, checker], [value[n], v2]
        bad = liars(values, TOL)
        while bad is None and len(voters) < MAX_VOTES:  # as Verifier._judge: ask another
            deciders = [p for p in others if p not in voters]
            if not deciders:
                return
            voters.append(rng.choice(deciders))
            cost["extra"] += 1
            values.append(run(n, voters[-1]))
            bad = liars(values, TOL)
        if bad is None:
            return  # unresolved: nobody blamed
        honest = [k for k in range(len(voters)) if k not in bad]
        for k in honest:
            m.trust[voters[k]] = m.t(voters[k]).valid()
        for k in bad:
            caught(n, voters[k], (values[honest[0]], voters[honest[0]]) if k == 0 else None)

    def caught(n: int, liar: str, replacement: tuple[float, str] | None) -> None:
        m.trust[liar] = m.t(liar).lied()
        m.dropped.add(liar)
        m.caught_at.setdefault(liar, m.results[liar])
        if replacement is not None:
            value[n], owner[n] = replacement
        for k, p in list(owner.items()):
            if p == liar and k != n:
                del owner[k], value[k]
                queue.append(k)  # run again elsewhere: paid again
                cost["extra"] += 1

    taken: dict[str, int] = {}
    while queue:
        n = queue.pop(0)
        live = [p for p in lease if p not in m.dropped]
        if not live:
            break
        # Round-robin over the leases that may take a trial (market/verification.py
        # may_take_trial: an unproven provider gets NEWCOMER_TRIALS while a proven one
        # is leased), as the sweep runner assigns.
        any_proven = any(proven(m.t(q)) for q in live)
        open_ = [
            q for q in live if may_take_trial(m.t(q), taken.get(q, 0), proven_leased=any_proven)
        ]
        p = open_[i % len(open_)]
        i += 1
        taken[p] = taken.get(p, 0) + 1
        owner[n], value[n] = p, run(n, p)
        if should_check(m.t(p).rate, f"{s}:{n}:{i}:{p}", SECRET):
            check(n)
        if not queue:  # the end of the sweep: the best is checked unless trusted
            for _ in range(trials):
                if not value:
                    break
                best = min(value, key=lambda k: value[k])
                if best in checked or not best_needs_check(m.t(owner[best])):
                    break
                check(best)
                if best in checked and owner.get(best) is not None:
                    break
    # Extra spend counts only what a tenant without checks would not have paid: a
    # fabricated result it re-runs would otherwise have been paid for once, and wrong.
    best = min(value, key=lambda k: value[k]) if value else None
    cost["fabricated_best"] = int(best is not None and owner[best] in m.fabricators)
    return cost


def simulate(
    seed: int, providers: int, dishonest: float, sweeps: int, trials: int, leased: int
) -> dict[str, object]:
    rng = random.Random(seed)
    names = [f"p{i:03d}" for i in range(providers)]
    fab = set(rng.sample(names, round(providers * dishonest)))
    m = Market([p for p in names if p not in fab], fab)
    per_sweep = [run_sweep(m, s, trials, leased, rng) for s in range(sweeps)]
    extra = [c["extra"] / c["trials"] for c in per_sweep]
    out: dict[str, object] = {
        "seed": seed,
        "providers": providers,
        "fabricators": len(fab),
        "sweeps": sweeps,
        "trials_per_sweep": trials,
        "first_sweep_extra_pct": round(100 * extra[0], 1),
        "mean_extra_pct": round(100 * sum(extra) / len(extra), 2),
        "last_10_sweeps_extra_pct": round(100 * sum(extra[-10:]) / len(extra[-10:]), 2),
        "fabricated_best_reported": sum(c["fabricated_best"] for c in per_sweep),
    }
    if fab:
        reached = [p for p in fab if m.results.get(p, 0) >= 20 or p in m.caught_at]
        by20 = [p for p in reached if m.caught_at.get(p, 10**9) <= 20]
        out["fabricators_caught_by_20th"] = f"{len(by20)}/{len(reached)}"
        out["fabricators_caught"] = f"{len(m.caught_at.keys() & fab)}/{len(fab)}"
        out["fabricators_leased"] = sum(1 for p in fab if m.results.get(p, 0))
        # What a fabricator could spoil: its results up to and including the one that
        # got it caught (the caught one is discarded with the rest).
        out["fabricator_results_max"] = max((m.results.get(p, 0) for p in fab), default=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--providers", type=int, default=100)
    ap.add_argument("--dishonest", type=float, default=0.10)
    ap.add_argument("--sweeps", type=int, default=200)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--leased", type=int, default=4)
    a = ap.parse_args()
    for seed in a.seeds:
        honest = simulate(seed, a.providers, 0.0, a.sweeps, a.trials, a.leased)
        print(json.dumps({"market": "honest", **honest}))
        mixed = simulate(seed, a.providers, a.dishonest, a.sweeps, a.trials, a.leased)
        print(json.dumps({"market": f"{a.dishonest:.0%} fabricating", **mixed}))


if __name__ == "__main__":
    main()
