"""The provider's bid engine: price, reserve, award, lease, release. Pure; time passed in.

One BidEngine owns all of a provider's device state, and the node calls it from one
task, so a reservation has exactly one owner and two concurrent orders can never both
get the same device: whatever is reserved for a bid is removed from ``free`` at once,
and comes back only when the bid expires, is released, or its lease ends.

Device states::

    free --bid--> reserved --award+accept--> leased --end/expiry--> free
                     |                                  ^
                     +----- bid expiry / release -------+
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from market.matching import describe, group_matches
from protocol.messages import (
    MAX_ITEMS,
    Accept,
    Award,
    Bid,
    Decline,
    DeviceGroup,
    Interconnect,
    NoBid,
    NoBidReason,
    Order,
    Release,
    Requirement,
)


@dataclass(frozen=True, slots=True)
class Device:
    """One sellable device."""

    id: str
    model: str
    kind: str
    memory_bytes: int
    fp16_flops: int
    memory_bandwidth: int
    price_floor: int  # micro-credits per device-hour
    simulated: bool = False


class PricingStrategy(Protocol):
    """Decides the price per device-hour of a bid (None: do not bid at this price)."""

    def price(self, floor: int, utilisation_pct: int, order: Order) -> int | None: ...


@dataclass(frozen=True)
class FloorPlusUtilisation:
    """The operator's floor, raised linearly with how busy the provider is.

    price = floor x (100 + surge_pct x utilisation_pct / 100) / 100, rounded up. With the
    default surge of 50 %, an idle provider bids its floor and a fully booked one bids
    1.5 x floor: scarce capacity goes to whoever values it most, cheap capacity sells.
    """

    surge_pct: int = 50

    def price(self, floor: int, utilisation_pct: int, order: Order) -> int | None:
        return -((-floor * (10_000 + self.surge_pct * utilisation_pct)) // 10_000)


class LeaseState(StrEnum):
    """A lease's state; its moves are market.lifecycle.LEASE (the stored words)."""

    ACTIVE = "active"
    ENDED = "ended"  # released by the tenant or ran to its end
    LOST = "lost"  # the tenant stopped sending heartbeats


@dataclass
class Reservation:
    """Devices held for a bid until it expires, is released, or becomes a lease."""

    bid: Bid
    tenant: str
    job_spec_hash: str
    devices: tuple[str, ...]
    closes_ms: int = 0  # when the tenant's auction closes (the order's deadline, capped)


@dataclass
class ProviderLease:
    lease_id: str
    order_id: str
    tenant: str
    job_spec_hash: str
    devices: tuple[str, ...]
    price: int
    start_ms: int
    end_ms: int
    heartbeat_interval_ms: int
    last_heartbeat_ms: int
    units: int = 1  # the lease's devices split evenly into this many units
    state: LeaseState = LeaseState.ACTIVE


@dataclass
class EngineCounters:
    bids: int = 0
    no_bids: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    declined: int = 0
    released: int = 0
    expired: int = 0


class BidEngine:
    """All of one provider's sell-side state."""

    #: A lease is lost after this many heartbeat intervals without a heartbeat.
    MISSED_HEARTBEATS = 3

    def __init__(
        self,
        provider: str,
        devices: Sequence[Device],
        interconnect: Interconnect,
        *,
        strategy: PricingStrategy | None = None,
        bid_ttl_ms: int = 10_000,
        max_reserved_pct: int = 100,
        heartbeat_bounds_ms: tuple[int, int] = (100, 3_600_000),
    ) -> None:
        """``max_reserved_pct``: share of the devices one tenant may hold in unawarded
        bids (see ``tenant_allowance``). ``heartbeat_bounds_ms``: the heartbeat intervals
        an award may ask for; the defaults are the protocol's range (the daemon passes
        the operator's, 1-60 s unless configured)."""
        ids = [d.id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique")
        self.provider = provider
        self.devices = {d.id: d for d in devices}
        self.interconnect = interconnect
        self.strategy: PricingStrategy = strategy or FloorPlusUtilisation()
        self.bid_ttl_ms = bid_ttl_ms
        self.free: set[str] = set(ids)
        self.reservations: dict[str, Reservation] = {}  # bid_id ->
        self.leases: dict[str, ProviderLease] = {}  # lease_id ->
        self.counters = EngineCounters()
        self._bid_seq = 0
        self.draining = False
        if not 1 <= max_reserved_pct <= 100:
            raise ValueError("max_reserved_pct must be 1-100")
        self.max_reserved_pct = max_reserved_pct
        self._hoarders: dict[str, int] = {}  # tenant -> until (ms): see tenant_allowance
        self.heartbeat_bounds_ms = heartbeat_bounds_ms

    # --- views ------------------------------------------------------------------

    def utilisation_pct(self) -> int:
        total = len(self.devices)
        return 0 if total == 0 else (total - len(self.free)) * 100 // total

    def device_groups(self) -> list[DeviceGroup]:
        """Advert-ready groups (model, figures, floor) with the currently free ids."""
        groups: dict[tuple[str, int], list[Device]] = {}
        for d in self.devices.values():
            groups.setdefault((d.model, d.price_floor), []).append(d)
        out = []
        for devs in groups.values():
            d0 = devs[0]
            out.append(
                DeviceGroup(
                    model=d0.model,
                    kind=d0.kind,  # type: ignore[arg-type]
                    ids=[d.id for d in devs],
                    free=[d.id for d in devs if d.id in self.free],
                    memory_bytes=d0.memory_bytes,
                    fp16_flops=d0.fp16_flops,
                    memory_bandwidth=d0.memory_bandwidth,
                    price_floor=d0.price_floor,
                    simulated=d0.simulated,
                )
            )
        return out

    def reserved_for(self, tenant: str) -> int:
        """Devices ``tenant`` holds in unawarded bids."""
        return sum(len(r.devices) for r in self.reservations.values() if r.tenant == tenant)

    def hoarding(self, tenant: str, now_ms: int) -> bool:
        """Whether ``tenant`` recently let a bid lapse unawarded (see ``tenant_allowance``)."""
        return self._hoarders.get(tenant, 0) > now_ms

    def tenant_allowance(self, tenant: str, piece: int, now_ms: int) -> int:
        """Devices ``tenant`` may still reserve, for an order whose smallest part is ``piece``.

        Bids are free to ask for and every bid holds devices until it expires, so one
        identity ordering twice a second kept every device reserved and other tenants
        got only ``all_reserved``. Two bounds, neither of which an honest tenant meets
        (it awards or releases its bids when its auction closes):

        * a tenant already holding ``max_reserved_pct`` of the devices in unawarded bids
          gets no further bid; below that, a bid may be as large as its order;
        * a tenant that let a bid lapse (it expired, or was released more than half a
          bid TTL after its auction closed) is a hoarder for two bid TTLs: its bids
          together stay within the share, or one indivisible piece of its order (a
          unit, or a whole gang) when that is larger and it holds nothing else.

        So a hoarder holds at most the share after its first lapsed bid, and the rest
        stays biddable for others. Leases do not count: those are paid for. Keys are
        free, so this bounds one identity, not one person: prices and reputation do the
        rest.
        """
        held = self.reserved_for(tenant)
        share = len(self.devices) * self.max_reserved_pct // 100
        if self.hoarding(tenant, now_ms):
            return max(0, max(share, piece) - held)
        if held > 0 and held >= share:
            return 0
        return len(self.devices)

    def _lapsed(self, res: Reservation, now_ms: int) -> None:
        """Note a bid that ended unawarded; late endings mark the tenant a hoarder."""
        if now_ms > res.closes_ms + self.bid_ttl_ms // 2:
            self._hoarders[res.tenant] = now_ms + 2 * self.bid_ttl_ms

    def held_by(self, lease_id: str) -> tuple[str, ...]:
        lease = self.leases.get(lease_id)
        return () if lease is None else lease.devices

    # --- orders -----------------------------------------------------------------

    def refuse(self, order: Order, reason: NoBidReason, detail: str) -> NoBid:
        """A no-bid decided outside the engine (e.g. settlement), counted like the others."""
        return self._no_bid(order, reason, detail)

    def end(self, lease_id: str) -> ProviderLease | None:
        """End an active lease for a reason of the node's (a lapsed debit note)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.state is not LeaseState.ACTIVE:
            return None
        self._end(lease, LeaseState.ENDED)
        return lease

    def _no_bid(self, order: Order, reason: NoBidReason, detail: str) -> NoBid:
        self.counters.no_bids[reason] = self.counters.no_bids.get(reason, 0) + 1
        return NoBid(order_id=order.order_id, provider=self.provider, reason=reason, detail=detail)

    def on_order(self, order: Order, tenant: str, now_ms: int) -> Bid | NoBid:
        """Bid for as many units as can be served, reserving concrete devices; or say why not."""
        self.expire(now_ms)
        req = order.requirement
        if self.draining:
            return self._no_bid(order, "draining", "provider is shutting down")
        if order.bid_deadline_ms <= now_ms:
            return self._no_bid(order, "deadline_passed", "the bid deadline has passed")
        matching = [d for d in self.devices.values() if group_matches(req, _as_group(d))]
        if not matching:
            return self._no_bid(order, "no_matching_devices", _describe(req))
        per_unit = req.devices_per_unit
        if per_unit > 1 or req.gang:
            need = per_unit * (order.units if req.gang else 1)
            if len(matching) < need or self.interconnect.gang_size < need:
                return self._no_bid(
                    order,
                    "gang_too_small",
                    f"needs {need} devices on one fabric, has "
                    f"{min(len(matching), self.interconnect.gang_size)}",
                )
            if self.interconnect.bandwidth < req.min_interconnect:
                return self._no_bid(
                    order,
                    "interconnect_too_slow",
                    f"needs {req.min_interconnect} B/s, fabric gives {self.interconnect.bandwidth}",
                )
        affordable = [d for d in matching if d.price_floor <= order.max_price]
        if not affordable:
            cheapest = min(d.price_floor for d in matching)
            return self._no_bid(
                order,
                "price_below_floor",
                f"max price {order.max_price} is below the floor {cheapest} per device-hour",
            )
        free = [d for d in affordable if d.id in self.free]
        units = min(order.units, len(free) // per_unit)
        if units == 0 or (req.gang and units < order.units):
            return self._no_bid(
                order, "all_reserved", f"{len(free)} of {len(affordable)} matching devices free"
            )
        piece = per_unit * (order.units if req.gang else 1)
        allowance = self.tenant_allowance(tenant, piece, now_ms)
        units = min(units, allowance // per_unit)
        if units == 0 or (req.gang and units < order.units):
            return self._no_bid(
                order,
                "tenant_limit",
                f"this tenant already holds {self.reserved_for(tenant)} of {len(self.devices)} "
                f"devices in unawarded bids (limit {self.max_reserved_pct}%): award or "
                "release them first",
            )
        # One model per bid (a bid names concrete hardware): the model with the most free
        # devices that the bid can fill, cheapest floor first.
        by_model: dict[str, list[Device]] = {}
        for d in sorted(free, key=lambda d: (d.price_floor, d.id)):
            by_model.setdefault(d.model, []).append(d)
        model, pool = min(
            by_model.items(),
            key=lambda kv: (-min(len(kv[1]) // per_unit, order.units), kv[1][0].price_floor),
        )
        # A bid lists its devices, and a list holds at most MAX_ITEMS (the codec's limit).
        units = min(units, len(pool) // per_unit, MAX_ITEMS // per_unit)
        if req.gang and units < order.units:
            return self._no_bid(order, "gang_too_small", "no single model fills the gang")
        chosen = tuple(d.id for d in pool[: units * per_unit])
        price = self.strategy.price(
            max(d.price_floor for d in pool[: len(chosen)]), self.utilisation_pct(), order
        )
        if price is None or price > order.max_price:
            return self._no_bid(
                order, "price_below_floor", f"would bid {price}, above max price {order.max_price}"
            )
        self._bid_seq += 1
        bid = Bid(
            order_id=order.order_id,
            bid_id=f"{self.provider[:8]}.{order.order_id[:32]}.b{self._bid_seq}",
            provider=self.provider,
            units=units,
            devices=list(chosen),
            model=model,
            price=price,
            # Alive until the auction closes (its deadline) plus one TTL for the award round
            # trip; the wait for the deadline is capped at one TTL, so an order with a far
            # deadline cannot hold devices for longer than two.
            expires_ms=min(order.bid_deadline_ms, now_ms + self.bid_ttl_ms) + self.bid_ttl_ms,
        )
        self.free.difference_update(chosen)
        closes = min(order.bid_deadline_ms, now_ms + self.bid_ttl_ms)
        self.reservations[bid.bid_id] = Reservation(
            bid, tenant, order.job_spec_hash, chosen, closes
        )
        self.counters.bids += 1
        return bid

    # --- awards -----------------------------------------------------------------

    def on_award(self, award: Award, tenant: str, award_hash: str, now_ms: int) -> Accept | Decline:
        """Turn the reservation into a lease (Accept), or Decline with the reason."""
        self.expire(now_ms)
        res = self.reservations.get(award.bid_id)
        decline = None
        if res is None:
            decline = "no such bid, or it expired"
        elif res.tenant != tenant or res.bid.order_id != award.order_id:
            decline = "the bid was made to another tenant or order"
        elif award.units > res.bid.units or award.units < 1:
            decline = f"award of {award.units} units does not fit the bid of {res.bid.units}"
        elif award.price != res.bid.price:
            decline = f"award price {award.price} differs from the bid price {res.bid.price}"
        elif award.lease_id in self.leases:
            decline = "lease id already in use"
        elif not (
            self.heartbeat_bounds_ms[0]
            <= award.heartbeat_interval_ms
            <= self.heartbeat_bounds_ms[1]
        ):
            low, high = self.heartbeat_bounds_ms
            decline = (
                f"heartbeat interval {award.heartbeat_interval_ms} ms is outside this "
                f"provider's bounds {low}-{high} ms"
            )
        if decline is not None or res is None:
            self.counters.declined += 1
            return Decline(lease_id=award.lease_id, order_id=award.order_id, reason=decline or "")
        per_unit = len(res.devices) // res.bid.units
        keep = res.devices[: award.units * per_unit]
        self.free.update(res.devices[len(keep) :])  # a partial award frees the rest at once
        del self.reservations[award.bid_id]
        self.leases[award.lease_id] = ProviderLease(
            lease_id=award.lease_id,
            order_id=award.order_id,
            tenant=tenant,
            job_spec_hash=res.job_spec_hash,
            devices=keep,
            price=award.price,
            start_ms=now_ms,
            end_ms=award.lease_end_ms,
            heartbeat_interval_ms=award.heartbeat_interval_ms,
            last_heartbeat_ms=now_ms,
            units=award.units,
        )
        self.counters.accepted += 1
        return Accept(
            lease_id=award.lease_id, order_id=award.order_id, award_hash=award_hash, start_ms=now_ms
        )

    def on_release(self, release: Release, tenant: str, now_ms: int) -> bool:
        """Free a bid's reservation or end a lease early; only its tenant may. True if freed."""
        freed = False
        if release.bid_id is not None:
            res = self.reservations.get(release.bid_id)
            if res is not None and res.tenant == tenant:
                del self.reservations[release.bid_id]
                self.free.update(res.devices)
                self._lapsed(res, now_ms)
                freed = True
        if release.lease_id is not None:
            lease = self.leases.get(release.lease_id)
            if lease is not None and lease.tenant == tenant and lease.state is LeaseState.ACTIVE:
                self._end(lease, LeaseState.ENDED)
                freed = True
        if freed:
            self.counters.released += 1
        return freed

    def restore(self, lease: ProviderLease, now_ms: int) -> bool:
        """Hold an active lease again after a restart (the provider's store has it).

        The tenant gets a fresh heartbeat grace from ``now_ms``: it could not reach us
        while we were down. False, and nothing held, if the lease is already known, ran
        past its end, or names devices this engine does not have free.
        """
        if lease.lease_id in self.leases or now_ms >= lease.end_ms:
            return False
        if not lease.devices or not set(lease.devices) <= self.free:
            return False
        lease.state = LeaseState.ACTIVE
        lease.last_heartbeat_ms = max(lease.last_heartbeat_ms, now_ms)
        self.free.difference_update(lease.devices)
        self.leases[lease.lease_id] = lease
        return True

    def on_heartbeat(self, lease_id: str, tenant: str, now_ms: int) -> bool:
        lease = self.leases.get(lease_id)
        if lease is None or lease.tenant != tenant or lease.state is not LeaseState.ACTIVE:
            return False
        lease.last_heartbeat_ms = now_ms
        return True

    def _end(self, lease: ProviderLease, state: LeaseState) -> None:
        lease.state = state
        self.free.update(lease.devices)

    def expire(self, now_ms: int) -> list[str]:
        """Release expired reservations and end leases past their end or heartbeats.

        Returns the ids (bid or lease) that changed, so the node can persist and
        re-advertise.
        """
        changed: list[str] = []
        for bid_id, res in list(self.reservations.items()):
            if res.bid.expires_ms <= now_ms:
                del self.reservations[bid_id]
                self.free.update(res.devices)
                self.counters.expired += 1
                self._lapsed(res, now_ms)
                changed.append(bid_id)
        for tenant, until in list(self._hoarders.items()):
            if until <= now_ms:
                del self._hoarders[tenant]
        for lease in self.leases.values():
            if lease.state is not LeaseState.ACTIVE:
                continue
            silent = now_ms - lease.last_heartbeat_ms
            if silent > self.MISSED_HEARTBEATS * lease.heartbeat_interval_ms:
                self._end(lease, LeaseState.LOST)
                changed.append(lease.lease_id)
            elif now_ms >= lease.end_ms:
                self._end(lease, LeaseState.ENDED)
                changed.append(lease.lease_id)
        return changed

    def next_deadline(self) -> int | None:
        """The earliest time ``expire`` could change something (aioquic's get_timer)."""
        times: list[int] = [r.bid.expires_ms for r in self.reservations.values()]
        for lease in self.leases.values():
            if lease.state is LeaseState.ACTIVE:
                times.append(lease.end_ms)
                times.append(
                    lease.last_heartbeat_ms
                    + self.MISSED_HEARTBEATS * lease.heartbeat_interval_ms
                    + 1
                )
        return min(times) if times else None

    def check_invariants(self) -> None:
        """No device is in two places at once; every device is somewhere. For tests/sims."""
        reserved = [d for r in self.reservations.values() for d in r.devices]
        leased = [
            d
            for lease in self.leases.values()
            if lease.state is LeaseState.ACTIVE
            for d in lease.devices
        ]
        held = reserved + leased
        if len(held) != len(set(held)):
            raise AssertionError("a device is reserved or leased twice")
        if set(held) & self.free:
            raise AssertionError("a held device is also free")
        if set(held) | self.free != set(self.devices):
            raise AssertionError("a device is neither free nor held")


def _as_group(d: Device) -> DeviceGroup:
    return DeviceGroup(
        model=d.model,
        kind=d.kind,  # type: ignore[arg-type]
        ids=[d.id],
        free=[d.id],
        memory_bytes=d.memory_bytes,
        fp16_flops=d.fp16_flops,
        memory_bandwidth=d.memory_bandwidth,
        price_floor=d.price_floor,
        simulated=d.simulated,
    )


def _describe(req: Requirement) -> str:
    return f"no device here is {describe(req)}"


def devices_from_groups(groups: Iterable[DeviceGroup]) -> list[Device]:
    """Flatten advert-style groups into sellable devices."""
    return [
        Device(
            id=i,
            model=g.model,
            kind=g.kind,
            memory_bytes=g.memory_bytes,
            fp16_flops=g.fp16_flops,
            memory_bandwidth=g.memory_bandwidth,
            price_floor=g.price_floor,
            simulated=g.simulated,
        )
        for g in groups
        for i in g.ids
    ]
