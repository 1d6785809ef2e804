"""Placement plans: which providers could host a job now, what it would take and cost.

Pure: the directory's adverts and (optionally) the tenant's reputation record come in,
a plan goes out. ``mercato plan`` prints it without spending anything, and the runners
use the same plan to build their orders, so what is planned is what is ordered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from market.catalog import DEFAULT_UTILISATION_PCT, lookup
from market.classify import (
    FABRIC_LATENCY_S,
    Classification,
    Link,
    TrainingShape,
    WorkloadClass,
    classify_service,
    classify_sweep,
    classify_training,
    compute_time_s,
    required_bandwidth,
    sync_time_s,
)
from market.diloco import Offer, Split, choose_split
from market.jobspec import JobSpec
from market.matching import describe, matching_groups
from market.reputation import NEUTRAL, Reputation
from market.settlement import format_credits
from protocol.messages import Advert, Requirement

#: Devices compared when the job names no model: the classification needs some FLOP/s.
REFERENCE_MODEL = "H100-SXM"
#: Share of a step that all-reduce can overlap with (the backward pass, ~2/3; Kaplan 2020).
BACKWARD_SHARE = 2 / 3


@dataclass(frozen=True, slots=True)
class Candidate:
    provider: str
    address: str
    model: str
    free: int  # matching free devices
    interconnect: str
    bandwidth: int
    gang_size: int
    price: int  # floor, micro-credits per device-hour
    success: float  # tenant's reputation estimate
    fits: bool
    why_not: str = ""
    runtime_s: float | None = None
    cost: int | None = None  # micro-credits for the whole job, at the floor price


@dataclass
class Plan:
    kind: str
    classification: Classification
    requirement: Requirement
    units: int
    candidates: list[Candidate] = field(default_factory=list)
    missing: str | None = None
    #: Loosely coupled DiLoCo jobs: the workers, each a gang on one provider.
    split: Split | None = None

    @property
    def placeable(self) -> bool:
        return self.missing is None

    @property
    def best(self) -> Candidate | None:
        fits = [c for c in self.candidates if c.fits]
        return fits[0] if fits else None


def training_shape(spec: JobSpec) -> TrainingShape:
    t = spec.training
    assert t is not None, "a training job has a training section"
    return TrainingShape(
        world_size=t.world_size,
        parameters=t.model.parameters,
        gradient_bytes=t.model.gradient_bytes,
        tokens_per_step=t.tokens,
        sync_method=t.sync.method,
        inner_steps=t.sync.inner_steps,
    )


def reference_flops(spec: JobSpec) -> tuple[str, int]:
    """The device the headline classification assumes: the job's model or an H100."""
    acc = spec.resources.accelerator
    try:
        m = lookup(acc)
    except KeyError:
        m = lookup(REFERENCE_MODEL)
    return m.name, m.fp16_flops


def step_time_s(shape: TrainingShape, device_flops: int, link: Link, util: int) -> float:
    """Compute plus the part of communication the backward pass cannot hide, per step."""
    t_c = compute_time_s(shape, device_flops, util)
    if shape.world_size <= 1:
        return t_c
    exposed = max(0.0, sync_time_s(shape, link) / max(1, shape.inner_steps) - BACKWARD_SHARE * t_c)
    return t_c + exposed


def plan(
    spec: JobSpec,
    adverts: Iterable[Advert],
    *,
    reputation: Mapping[str, Reputation] | None = None,
    now_ms: int = 0,
    utilisation_pct: int = DEFAULT_UTILISATION_PCT,
) -> Plan:
    """Classify ``spec`` and list the providers that could host it now, best first."""
    reputation = reputation or {}
    live = [a for a in adverts if a.expires_ms > now_ms]
    if spec.kind == "training":
        return _plan_training(spec, live, reputation, utilisation_pct)
    req = spec.requirement()
    c = (
        classify_service()
        if spec.kind == "service"
        else classify_sweep(spec.sweep_config.trial_cap if spec.sweep is not None else None)
    )
    out = Plan(spec.kind, c, req, units=1)
    for a in live:
        groups = [g for g in matching_groups(req, a) if g.free]
        free = sum(len(g.free) for g in groups)
        rep = reputation.get(a.provider, NEUTRAL)
        if not groups:
            continue
        g = min(groups, key=lambda g: (g.price_floor * 10**15 // max(g.fp16_flops, 1), g.model))
        fits = free >= req.devices_per_unit and (
            spec.budget.max_price is None or g.price_floor <= spec.budget.max_price
        )
        out.candidates.append(
            Candidate(
                a.provider,
                a.address,
                g.model,
                free,
                a.interconnect.kind,
                a.interconnect.bandwidth,
                a.interconnect.gang_size,
                g.price_floor,
                float(rep.success()),
                fits,
                "" if fits else "above the budget's max price or too few free devices",
            )
        )
    if spec.kind == "service":
        out.candidates.sort(key=lambda c: (not c.fits, -c.success, c.price, c.provider))
    else:
        out.candidates.sort(
            key=lambda c: (not c.fits, c.price * 10**15 // max(_flops(c, live), 1), c.provider)
        )
    if not any(c.fits for c in out.candidates):
        out.missing = f"no provider advertises a free {describe(req)}" + _budget(spec)
    return out


def _flops(c: Candidate, adverts: list[Advert]) -> int:
    for a in adverts:
        if a.provider == c.provider:
            for g in a.devices:
                if g.model == c.model:
                    return g.fp16_flops
    return 1


def _budget(spec: JobSpec) -> str:
    if spec.budget.max_price is None:
        return ""
    return f" at or below {format_credits(spec.budget.max_price)} credits per device-hour"


def _plan_training(
    spec: JobSpec, live: list[Advert], reputation: Mapping[str, Reputation], util: int
) -> Plan:
    shape = training_shape(spec)
    t = spec.training
    assert t is not None
    ref_name, ref_flops = reference_flops(spec)
    c = classify_training(shape, ref_flops, utilisation_pct=util)
    n = shape.world_size
    base = spec.requirement()
    if shape.sync_method == "diloco" and n > 1:
        # A DiLoCo trainer waits for its outer steps, so it always runs under the
        # tenant's coordinator: across providers when loosely coupled, else as one
        # worker on one fast fabric (never split).
        return _plan_diloco(spec, shape, c, live, reputation, util)
    gang = c.workload is WorkloadClass.BANDWIDTH_BOUND or n > 1
    req = Requirement(
        kind=base.kind,
        model=base.model,
        min_memory_bytes=base.min_memory_bytes,
        min_fp16_flops=base.min_fp16_flops,
        devices_per_unit=n,
        min_interconnect=c.required_bandwidth or 0,
        gang=gang,
    )
    out = Plan("training", c, req, units=1)
    for a in live:
        groups = matching_groups(base, a)
        if not groups:
            continue
        g = max(groups, key=lambda g: len(g.free))
        free = len(g.free)
        ic = a.interconnect
        need = (
            required_bandwidth(shape, g.fp16_flops, util)
            if c.workload is WorkloadClass.BANDWIDTH_BOUND
            else 0
        )
        reasons = []
        if free < n:
            reasons.append(f"{free} of {n} devices free")
        if n > 1 and ic.gang_size < n:
            reasons.append(f"fabric joins {ic.gang_size} devices, not {n}")
        if need is None:
            reasons.append("no fabric could hide the ring's latency")
        elif need and ic.bandwidth < need:
            reasons.append(f"{ic.kind} gives {ic.bandwidth / 1e9:.3g} GB/s, needs {need / 1e9:.3g}")
        if spec.budget.max_price is not None and g.price_floor > spec.budget.max_price:
            reasons.append("floor above the budget's max price")
        link = Link(ic.kind, max(ic.bandwidth, 1), FABRIC_LATENCY_S)
        runtime = None
        cost = None
        if t.steps is not None and not reasons:
            runtime = t.steps * step_time_s(shape, g.fp16_flops, link, util)
            cost = -(-int(g.price_floor * n * runtime * 1000) // 3_600_000)
        rep = reputation.get(a.provider, NEUTRAL)
        out.candidates.append(
            Candidate(
                a.provider,
                a.address,
                g.model,
                free,
                ic.kind,
                ic.bandwidth,
                ic.gang_size,
                g.price_floor,
                float(rep.success()),
                not reasons,
                "; ".join(reasons),
                runtime,
                cost,
            )
        )
    out.candidates.sort(
        key=lambda c: (not c.fits, c.cost if c.cost is not None else c.price, c.provider)
    )
    if not any(x.fits for x in out.candidates):
        need = c.required_bandwidth
        fabric = (
            f" on one fabric with at least {need / 1e9:.3g} GB/s per direction"
            if c.workload is WorkloadClass.BANDWIDTH_BOUND and need
            else " on one provider"
        )
        out.missing = (
            f"no provider advertises {n} free {describe(base)} devices{fabric}"
            f"{_budget(spec)} (classified with {ref_name} figures)"
        )
    return out


def _plan_diloco(
    spec: JobSpec,
    shape: TrainingShape,
    c: Classification,
    live: list[Advert],
    reputation: Mapping[str, Reputation],
    util: int,
) -> Plan:
    """A loosely coupled job as W workers (each a gang on one provider), cheapest split.

    The order asks for W units of k devices without ``gang``: the auction may split
    the units over providers, as a sweep's, while each unit stays on one fabric.
    """
    t = spec.training
    assert t is not None
    base = spec.requirement()
    bound = c.workload is WorkloadClass.BANDWIDTH_BOUND
    need = c.required_bandwidth or 0
    offers: list[Offer] = []
    candidates: list[Candidate] = []
    for a in live:
        groups = matching_groups(base, a)
        if not groups:
            continue
        g = max(groups, key=lambda g: len(g.free))
        ic = a.interconnect
        over = spec.budget.max_price is not None and g.price_floor > spec.budget.max_price
        slow = bound and ic.bandwidth < need
        if not over and not slow and g.free:
            offers.append(
                Offer(
                    a.provider,
                    a.address,
                    g.model,
                    len(g.free),
                    ic.gang_size,
                    ic.bandwidth,
                    g.fp16_flops,
                    g.price_floor,
                )
            )
        rep = reputation.get(a.provider, NEUTRAL)
        why = (
            "floor above the budget's max price"
            if over
            else f"{ic.kind} gives {ic.bandwidth / 1e9:.3g} GB/s, needs {need / 1e9:.3g}"
            if slow
            else ("" if g.free else "no free device")
        )
        candidates.append(
            Candidate(
                a.provider,
                a.address,
                g.model,
                len(g.free),
                ic.kind,
                ic.bandwidth,
                ic.gang_size,
                g.price_floor,
                float(rep.success()),
                not why,
                why,
            )
        )
    split = choose_split(
        shape,
        offers,
        steps=t.steps,
        util=util,
        workers=1 if bound else t.sync.workers,
        compression=t.sync.compression,
    )
    k = split.devices_per_worker if split is not None else shape.world_size // (t.sync.workers or 1)
    units = shape.world_size // max(1, k)
    req = Requirement(
        kind=base.kind,
        model=base.model,
        min_memory_bytes=base.min_memory_bytes,
        min_fp16_flops=base.min_fp16_flops,
        devices_per_unit=max(1, k),
        min_interconnect=need if bound else 0,
        gang=False,
    )
    out = Plan("training", c, req, units=units, split=split)
    if split is not None:
        chosen = {w.provider for w in split.workers}
        candidates.sort(key=lambda x: (not x.fits, x.provider not in chosen, x.price, x.provider))
        for i, x in enumerate(candidates):
            if x.provider in chosen and split.runtime_s is not None:
                mine = sum(1 for w in split.workers if w.provider == x.provider)
                cost = -(-int(x.price * k * mine * split.runtime_s * 1000) // 3_600_000)
                candidates[i] = replace(x, runtime_s=split.runtime_s, cost=cost)
    out.candidates = candidates
    if split is None:
        fixed = f"{t.sync.workers} workers" if t.sync.workers else "any split"
        out.missing = (
            f"no {fixed} of {shape.world_size} {describe(base)} devices into DiLoCo workers "
            f"(each a gang on one provider) fits the free devices now{_budget(spec)}"
        )
    return out
