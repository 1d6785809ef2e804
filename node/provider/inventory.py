"""The provider's devices: what the config declares, what NVML finds, what adverts say.

The config's ``[[devices]]`` entries are the only thing sold: each names a catalog model,
a count and a price floor. With detection on, a declared NVIDIA model that is not marked
``simulated`` must be backed by that many GPUs of that model found through NVML, and a
declared ``cpu`` count must fit the cores this process may use, so a provider cannot
advertise hardware it does not have by mistake. GPUs found but not declared have no price
and stay unsold (``Inventory.undeclared`` lets the daemon say so). AMD and Graphcore
devices cannot be probed here (no ROCm or Poplar bindings): they are taken on the
operator's word.

Device ids are ``<kind><n>`` ("gpu0", "gpu1", "ipu0", "cpu0"), numbered across groups in
declaration order; they are opaque to tenants.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from market.catalog import DeviceModel, UnknownDeviceModel, lookup, model_for_device_name
from protocol.errors import MercatoError
from protocol.messages import MAX_U63, DeviceGroup, Interconnect

MICRO_PER_CREDIT = 1_000_000
MAX_GROUPS = 64  # protocol.messages.Advert.devices
MAX_GROUP_SIZE = 1024  # protocol.messages.DeviceGroup.ids

FabricKind = Literal["nvlink", "infinity-fabric", "ipu-link", "pcie", "ethernet", "none"]


class InventoryError(MercatoError):
    """The declared devices are inconsistent, or not present on this host."""

    code = "bad_inventory"


_CREDITS = re.compile(r"\s*(\d{1,12}(?:\.\d{1,6})?)\s*credits?\s*", re.IGNORECASE)


def _parse_price(value: Any) -> Any:
    """Accept "2.50 credits" besides integer micro-credits; refuse floats for money."""
    if isinstance(value, str):
        m = _CREDITS.fullmatch(value)
        if m is None:
            raise ValueError(
                "write integer micro-credits per device-hour (2500000) "
                "or a string like '2.50 credits' (at most 6 decimals)"
            )
        return int(Decimal(m[1]) * MICRO_PER_CREDIT)
    if isinstance(value, float):
        raise ValueError(
            "money is never a float: write integer micro-credits (2500000) or '2.50 credits'"
        )
    return value


PriceFloor = Annotated[int, BeforeValidator(_parse_price), Field(ge=0, le=MAX_U63)]
Positive = Annotated[int, Field(ge=1, le=MAX_U63)]


class DeviceDecl(BaseModel):
    """One ``[[devices]]`` entry: identical devices sold at one price floor."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)

    model: str  # catalog name or alias; stored as the canonical catalog name
    count: Annotated[int, Field(ge=1, le=MAX_GROUP_SIZE)]
    price_floor: PriceFloor  # micro-credits per device-hour
    simulated: bool = False  # advertise devices this host does not have (test clusters)
    # Overrides of the catalog figures, e.g. a power-capped card or a larger CPU slot.
    memory_bytes: Positive | None = None
    fp16_flops: Positive | None = None
    memory_bandwidth: Positive | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        try:
            return lookup(value).name
        except UnknownDeviceModel as e:
            raise ValueError(e.reason) from None

    @property
    def catalog(self) -> DeviceModel:
        """The catalog entry this declaration names."""
        return lookup(self.model)


class InterconnectDecl(BaseModel):
    """The ``[interconnect]`` section: the fabric the provider's devices share."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, defer_build=True)

    kind: FabricKind
    bandwidth: Annotated[int, Field(ge=0, le=MAX_U63)] | None = None  # bytes/s per direction
    gang_size: Annotated[int, Field(ge=1, le=1_000_000)] | None = None  # default: all devices
    latency_us: Annotated[int, Field(ge=0, le=1_000_000)] = 0

    @model_validator(mode="after")
    def _none_has_no_bandwidth(self) -> InterconnectDecl:
        if self.kind == "none" and self.bandwidth:
            raise ValueError("bandwidth: a 'none' interconnect has no bandwidth; omit it or 0")
        return self


@dataclass(frozen=True, slots=True)
class DetectedGpu:
    """An NVIDIA GPU as NVML reports it."""

    index: int  # NVML index (PCI bus order)
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    uuid: str  # e.g. "GPU-8f6c...", what CUDA_VISIBLE_DEVICES accepts
    memory_bytes: int
    model: str | None  # catalog name, best effort; None if the catalog lacks it
    minor: int | None = None  # N of its /dev/nvidiaN (NVML minor number); None if unknown


def _text(value: object) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def detect_nvidia() -> list[DetectedGpu]:
    """NVIDIA GPUs on this host through NVML; [] when the library or driver is absent."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return []
    found: list[DetectedGpu] = []
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            except pynvml.NVMLError:
                continue  # a GPU that cannot be queried (fallen off the bus) is not sold
            minor: int | None = None
            with contextlib.suppress(pynvml.NVMLError):
                minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
            model = model_for_device_name(name)
            found.append(
                DetectedGpu(
                    index, name, uuid, memory, model.name if model is not None else None, minor
                )
            )
    except pynvml.NVMLError:
        return found
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return found


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class InventoryGroup:
    """Identical devices sold at one price floor, with their concrete ids."""

    model: DeviceModel
    ids: tuple[str, ...]
    price_floor: int  # micro-credits per device-hour
    simulated: bool
    memory_bytes: int
    fp16_flops: int
    memory_bandwidth: int
    host_uuids: tuple[str, ...] = ()  # NVML UUIDs in id order; empty unless detected
    host_minors: tuple[int | None, ...] = ()  # /dev/nvidiaN numbers, same order as host_uuids

    def device_group(self, free: AbstractSet[str]) -> DeviceGroup:
        """The advert record of this group; ``free`` may hold ids of other groups."""
        return DeviceGroup(
            model=self.model.name,
            kind=self.model.kind,
            ids=list(self.ids),
            free=[i for i in self.ids if i in free],
            memory_bytes=self.memory_bytes,
            fp16_flops=self.fp16_flops,
            memory_bandwidth=self.memory_bandwidth,
            price_floor=self.price_floor,
            simulated=self.simulated,
        )


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything the provider sells and the fabric between it."""

    groups: tuple[InventoryGroup, ...]
    interconnect: Interconnect
    undeclared: tuple[DetectedGpu, ...] = ()  # found through NVML but not in the config

    @property
    def ids(self) -> tuple[str, ...]:
        """Every device id, in group order."""
        return tuple(i for g in self.groups for i in g.ids)

    def group_of(self, device_id: str) -> InventoryGroup:
        """The group holding ``device_id``."""
        for g in self.groups:
            if device_id in g.ids:
                return g
        raise InventoryError(f"no device {device_id!r} in this inventory")

    def device_groups(self, free: AbstractSet[str]) -> list[DeviceGroup]:
        """Advert-ready groups; ``free`` are the ids neither leased nor reserved."""
        unknown = set(free) - set(self.ids)
        if unknown:
            raise InventoryError(f"free ids not in this inventory: {sorted(unknown)}")
        return [g.device_group(free) for g in self.groups]

    def interconnect_message(self) -> Interconnect:
        """The advert's interconnect record."""
        return self.interconnect

    def cuda_visible_devices(self, device_ids: Iterable[str]) -> str:
        """CUDA_VISIBLE_DEVICES for these ids: NVML UUIDs, which unlike indices do not
        depend on CUDA_DEVICE_ORDER. Simulated and non-NVIDIA devices contribute nothing."""
        uuids: list[str] = []
        for device_id in device_ids:
            g = self.group_of(device_id)
            if g.host_uuids:
                uuids.append(g.host_uuids[g.ids.index(device_id)])
        return ",".join(uuids)

    def nvidia_minors(self, device_ids: Iterable[str]) -> list[int | None]:
        """The /dev/nvidiaN numbers of these ids (None where NVML did not say)."""
        minors: list[int | None] = []
        for device_id in device_ids:
            g = self.group_of(device_id)
            if g.host_uuids:
                index = g.ids.index(device_id)
                minors.append(g.host_minors[index] if index < len(g.host_minors) else None)
        return minors


def _found(gpus: Sequence[DetectedGpu]) -> str:
    if not gpus:
        return "no NVIDIA GPU (NVML absent or no driver)"
    names: dict[str, int] = {}
    for g in gpus:
        names[g.model or g.name] = names.get(g.model or g.name, 0) + 1
    return ", ".join(f"{n} x {m}" for m, n in names.items())


def _interconnect(
    decl: InterconnectDecl | None, models: Sequence[DeviceModel], total: int
) -> Interconnect:
    kinds = {m.interconnect for m in models}
    if decl is None:
        if len(kinds) != 1:
            # Different models share no fabric we can vouch for; declare one to offer gangs.
            return Interconnect(kind="none", bandwidth=0, gang_size=1)
        kind = kinds.pop()
        if kind == "none":
            return Interconnect(kind="none", bandwidth=0, gang_size=1)
        bandwidth = min(m.interconnect_bandwidth for m in models)
        return Interconnect(kind=kind, bandwidth=bandwidth, gang_size=total)
    if decl.bandwidth is not None:
        bandwidth = decl.bandwidth
    elif decl.kind == "none":
        bandwidth = 0
    elif kinds == {decl.kind}:
        bandwidth = min(m.interconnect_bandwidth for m in models)
    else:
        usual = ", ".join(sorted(f"{m.name}: {m.interconnect}" for m in models))
        raise InventoryError(
            f"interconnect.bandwidth: required, the catalog has no {decl.kind} figure for "
            f"these devices ({usual})"
        )
    gang_size = (
        decl.gang_size if decl.gang_size is not None else 1 if decl.kind == "none" else total
    )
    if gang_size > total:
        raise InventoryError(
            f"interconnect.gang_size: {gang_size} exceeds the {total} devices declared"
        )
    return Interconnect(
        kind=decl.kind, bandwidth=bandwidth, gang_size=gang_size, latency_us=decl.latency_us
    )


def build_inventory(
    decls: Sequence[DeviceDecl],
    interconnect: InterconnectDecl | None = None,
    *,
    detect: bool = True,
    detected: Sequence[DetectedGpu] | None = None,
) -> Inventory:
    """Concrete devices from the config's declarations.

    With ``detect``, real (not simulated) declarations are checked against this host:
    NVIDIA models against ``detected`` (default: what NVML finds now), ``cpu`` against
    the usable cores. Without ``interconnect``, the fabric is the catalog's for the
    declared models if they all share one kind, else none (no gangs).
    """
    if not decls:
        raise InventoryError("devices: nothing declared; add at least one [[devices]] entry")
    if len(decls) > MAX_GROUPS:
        raise InventoryError(f"devices: {len(decls)} entries, at most {MAX_GROUPS}")
    gpus: list[DetectedGpu] = []
    if detect:
        gpus = list(detected) if detected is not None else detect_nvidia()
    pool = sorted(gpus, key=lambda g: g.index)
    next_number: dict[str, int] = {}
    groups: list[InventoryGroup] = []
    real_cpus = 0
    for n, d in enumerate(decls):
        model = d.catalog
        simulated = d.simulated or model.simulated
        uuids: tuple[str, ...] = ()
        minors: tuple[int | None, ...] = ()
        if detect and not simulated and model.vendor == "NVIDIA":
            matching = [g for g in pool if g.model == model.name]
            if len(matching) < d.count:
                raise InventoryError(
                    f"devices[{n}]: declares {d.count} x {model.name} but this host has "
                    f"{len(matching)} free of that model (found: {_found(gpus)}); set "
                    f"simulated = true to advertise devices the host does not have"
                )
            taken = matching[: d.count]
            pool = [g for g in pool if g not in taken]
            uuids = tuple(g.uuid for g in taken)
            minors = tuple(g.minor for g in taken)
        if not simulated and model.kind == "cpu":
            real_cpus += d.count
        first = next_number.get(model.kind, 0)
        next_number[model.kind] = first + d.count
        groups.append(
            InventoryGroup(
                model=model,
                ids=tuple(f"{model.kind}{first + k}" for k in range(d.count)),
                price_floor=d.price_floor,
                simulated=simulated,
                memory_bytes=d.memory_bytes or model.memory_bytes,
                fp16_flops=d.fp16_flops or model.fp16_flops,
                memory_bandwidth=d.memory_bandwidth or model.memory_bandwidth,
                host_uuids=uuids,
                host_minors=minors,
            )
        )
    if detect and real_cpus > usable_cpus():
        raise InventoryError(
            f"devices: declares {real_cpus} real cpu slots but this process may use "
            f"{usable_cpus()} cores; lower the count or set simulated = true"
        )
    total = sum(d.count for d in decls)
    fabric = _interconnect(interconnect, [d.catalog for d in decls], total)
    return Inventory(groups=tuple(groups), interconnect=fabric, undeclared=tuple(pool))
