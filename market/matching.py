"""Matchmaking: which advertised providers can serve an order, and which K to ask.

Like HTCondor's ClassAds, a tenant evaluates Requirements (a hard filter) and Rank (an
ordering) locally against the directory; only the best-ranked K providers receive the
order, so an order costs O(K) messages, not O(network).

Rank is the **expected cost to complete**: price x expected runtime on that hardware,
divided by the provider's success probability from the tenant's own reputation record.
The price used here is the advertised floor (the bid may be higher; bids are ranked
again with their real price in market.auction).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from market.catalog import DEFAULT_UTILISATION_PCT
from market.reputation import NEUTRAL, Reputation
from market.settlement import expected_cost
from protocol.messages import Advert, DeviceGroup, Requirement

#: Work assumed per unit when the order does not say (1 PFLOP): it scales every cost
#: by the same factor, so the ranking, which is all it is used for, does not depend on it.
REFERENCE_FLOP = 10**15


def describe(req: Requirement) -> str:
    """A requirement in words: '2x gpu (H100-SXM) >= 40 GB per unit, on one fabric'."""
    what = req.model or (req.kind if req.kind != "any" else "device")
    parts = [f"{req.devices_per_unit}x {what}" if req.devices_per_unit > 1 else what]
    if req.min_memory_bytes:
        parts.append(f">= {req.min_memory_bytes / 1e9:g} GB")
    if req.min_fp16_flops:
        parts.append(f">= {req.min_fp16_flops / 1e12:g} TFLOP/s")
    if req.min_interconnect:
        parts.append(f"interconnect >= {req.min_interconnect / 1e9:g} GB/s")
    if req.gang:
        parts.append("all units on one provider")
    return ", ".join(parts)


def group_matches(req: Requirement, group: DeviceGroup) -> bool:
    """Requirements of one unit against one device group (ignores free count)."""
    if req.kind != "any" and req.kind != group.kind:
        return False
    if req.model is not None and req.model.lower() != group.model.lower():
        return False
    return group.memory_bytes >= req.min_memory_bytes and group.fp16_flops >= req.min_fp16_flops


def matching_groups(req: Requirement, advert: Advert) -> list[DeviceGroup]:
    return [g for g in advert.devices if group_matches(req, g)]


def servable_units(req: Requirement, advert: Advert) -> int:
    """How many units of ``req`` this provider could serve from its free devices now.

    A unit's devices must sit on one provider and, when the unit has several devices or
    the order asks for a fabric, on an interconnect at least ``min_interconnect`` fast
    and large enough for the gang.
    """
    groups = matching_groups(req, advert)
    free = sum(len(g.free) for g in groups)
    ic = advert.interconnect
    if req.min_interconnect and ic.bandwidth < req.min_interconnect:
        return 0
    units = free // req.devices_per_unit
    if req.devices_per_unit > 1 and ic.gang_size < req.devices_per_unit:
        return 0
    return units


@dataclass(frozen=True, slots=True)
class Candidate:
    """A provider worth asking, with the figures it was ranked by."""

    provider: str
    address: str
    model: str
    units: int  # servable now
    floor: int  # micro-credits per device-hour of the cheapest matching group
    fp16_flops: int
    expected_cost: int  # micro-credits per unit at the floor price, before reputation
    score: Fraction  # expected_cost / P(success): lower is better


def rank(
    req: Requirement,
    units: int,
    max_price: int,
    adverts: Iterable[Advert],
    *,
    expected_flop: int = 0,
    reputation: Mapping[str, Reputation] | None = None,
    k: int | None = None,
    utilisation_pct: int = DEFAULT_UTILISATION_PCT,
    measured_flops: Mapping[str, int] | None = None,
) -> list[Candidate]:
    """The providers that can serve at least one unit (all units for a gang), best first.

    ``measured_flops`` (provider -> FLOP/s per device, market.verification) replaces a
    provider's advertised figure once the tenant has timed its trials: the advert is
    only the prior. Ties are broken by provider id so that the same inputs always give
    the same list.
    """
    measured = measured_flops or {}
    reputation = reputation or {}
    flop = expected_flop or REFERENCE_FLOP
    out: list[Candidate] = []
    for advert in adverts:
        can = servable_units(req, advert)
        if can <= 0:
            continue
        # A gang is all of its devices on one fabric, as the provider's bid engine demands.
        if req.gang and (
            can < units or advert.interconnect.gang_size < units * req.devices_per_unit
        ):
            continue
        groups = [g for g in matching_groups(req, advert) if g.free and g.price_floor <= max_price]
        if not groups:
            continue
        # The cheapest group per delivered FLOP/s is what this provider would be for us.
        best = min(
            groups,
            key=lambda g: (Fraction(g.price_floor, max(g.fp16_flops, 1)), g.model),
        )
        flops = measured.get(advert.provider, best.fp16_flops)
        cost = (
            expected_cost(
                best.price_floor,
                req.devices_per_unit,
                flop,
                max(flops, 1),
                utilisation_pct,
            )
            * req.devices_per_unit
        )
        rep = reputation.get(advert.provider, NEUTRAL)
        out.append(
            Candidate(
                provider=advert.provider,
                address=advert.address,
                model=best.model,
                units=can,
                floor=best.price_floor,
                fp16_flops=flops,
                expected_cost=cost,
                score=Fraction(cost) / rep.success(),
            )
        )
    out.sort(key=lambda c: (c.score, c.provider))
    return out if k is None else out[:k]
