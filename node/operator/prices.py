"""Price control: the operator's floors over the config's, and ``POST /control/prices``.

A ``price_update`` envelope sealed with the node's *own* key (the operator's CLI reads
``<home>/identity.pem``) sets floors per model. New floors apply to the next bids and
advert at once and are kept in the store (meta ``price_floors``), so they survive a
restart, until the config's floor for that model changes: then the config, the newer
decision, wins. The HTTP glue (allow list, body cap) is node.operator.status_page.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from market.bidding import BidEngine
from market.settlement import format_credits
from protocol.envelope import open_envelope
from protocol.errors import NotFoundError, SenderMismatchError, UnexpectedMessageError
from protocol.messages import PriceUpdate

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.net.node import Node
    from node.store.node_store import Store

log = logging.getLogger("mercato.status")

PRICES_PATH = "/control/prices"
FLOORS_META_KEY = "price_floors"
#: A price update is a few hundred bytes; nothing bigger is read.
MAX_CONTROL_BYTES = 64 * 1024


class PriceView(BaseModel):
    """A model's price floor in the status document (node.operator.document).

    Defined here, not with the document's other parts: the daemon holds a PriceFloors
    from its start, the document only once someone asks for it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    model: str
    floor: int
    config_floor: int | None
    override: bool


class SavedFloor(BaseModel):
    """An operator's floor for a model, with the config floors it replaced."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    floor: NonNegativeInt
    config: list[int]


class PricesAnswer(BaseModel):
    """What ``POST /control/prices`` answers: the floors in effect after the update."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    floors: dict[str, int]
    prices: list[PriceView]


class PriceFloors:
    """The operator's price floors over the config's, applied to the BidEngine.

    ``engine.devices`` hold the floor in effect. The config's floor of each device is
    remembered, so an update can be undone (``reset``), and each saved override
    records the config floors it replaced: after the config changes, the config wins.
    """

    def __init__(self, engine: BidEngine, store: Store) -> None:
        self.engine = engine
        self.store = store
        self._config_of_device = {d.id: d.price_floor for d in engine.devices.values()}
        self.config: dict[str, list[int]] = {}
        for d in engine.devices.values():
            floors = self.config.setdefault(d.model, [])
            if d.price_floor not in floors:
                floors.append(d.price_floor)
                floors.sort()
        self.overrides: dict[str, int] = {}

    @property
    def models(self) -> list[str]:
        return sorted(self.config)

    def restore(self) -> None:
        """Apply the floors saved by earlier updates, unless the config changed since."""
        for model, entry in load_saved_floors(self.store).items():
            if model not in self.config:
                log.info("saved price floor for %s dropped: no longer sold here", model)
            elif entry.config != self.config[model]:
                log.info(
                    "saved price floor for %s dropped: the config's floor changed since "
                    "(now %s credits)",
                    model,
                    "/".join(format_credits(f) for f in self.config[model]),
                )
            else:
                self.overrides[model] = entry.floor
        self._apply()
        self._save()
        for model, floor in sorted(self.overrides.items()):
            log.info(
                "price floor of %s is %s credits (set by the operator)",
                model,
                format_credits(floor),
            )

    def update(self, floors: Mapping[str, int], reset: bool = False) -> None:
        """Set floors per model (all devices of the model); ``reset`` drops old updates."""
        unknown = sorted(set(floors) - set(self.config))
        if unknown:
            raise NotFoundError(
                f"no devices of model {', '.join(unknown)} here "
                f"(this provider sells {', '.join(self.models) or 'nothing'})"
            )
        if reset:
            self.overrides.clear()
        for model, floor in floors.items():
            if [floor] == self.config[model]:
                self.overrides.pop(model, None)  # the config's floor is no override
            else:
                self.overrides[model] = floor
        self._apply()
        self._save()

    def current(self) -> dict[str, int]:
        """The floor in effect per model (the highest, if the config mixes floors)."""
        out: dict[str, int] = {}
        for d in self.engine.devices.values():
            out[d.model] = max(out.get(d.model, 0), d.price_floor)
        return out

    def rows(self) -> list[PriceView]:
        """The prices part of the status document."""
        now = self.current()
        return [
            PriceView(
                model=m,
                floor=now[m],
                config_floor=max(self.config[m]),
                override=m in self.overrides,
            )
            for m in self.models
        ]

    def _apply(self) -> None:
        devices = self.engine.devices
        for device_id, d in list(devices.items()):
            want = self.overrides.get(d.model, self._config_of_device[device_id])
            if d.price_floor != want:
                devices[device_id] = dataclasses.replace(d, price_floor=want)

    def _save(self) -> None:
        saved = {m: {"floor": f, "config": self.config[m]} for m, f in self.overrides.items()}
        self.store.set_meta(FLOORS_META_KEY, json.dumps(saved, sort_keys=True))


def load_saved_floors(store: Store) -> dict[str, SavedFloor]:
    """The saved overrides per model; an entry that does not parse is dropped."""
    raw = store.get_meta(FLOORS_META_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("store meta %s is not JSON; ignored", FLOORS_META_KEY)
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for model, entry in data.items():
        try:
            out[str(model)] = SavedFloor.model_validate(entry, strict=True)
        except ValidationError:
            log.warning("saved price floor for %s is malformed; ignored", model)
    return out


def config_floors(config: NodeConfig) -> dict[str, list[int]]:
    """The config's floors per model, sorted (one model may be sold at several)."""
    out: dict[str, list[int]] = {}
    for decl in config.devices:
        floors = out.setdefault(decl.model, [])
        if decl.price_floor not in floors:
            floors.append(decl.price_floor)
            floors.sort()
    return out


def apply_price_update(node: Node, floors: PriceFloors | None, data: bytes) -> PricesAnswer:
    """Open a sealed ``price_update`` and apply it; typed errors say why not.

    Only the node's own key may sign it: an address in ``allow_from`` alone cannot
    change prices.
    """
    env = open_envelope(
        data,
        now_ms=node.clock(),
        replay=node.guard,
        recipient=node.node_id,
        limits=node.limits,
    )
    if env.sender != node.node_id:
        raise SenderMismatchError("price updates must be signed with this node's own key")
    update = env.body
    if not isinstance(update, PriceUpdate):
        raise UnexpectedMessageError(f"{PRICES_PATH} takes price_update, not {env.type}")
    if floors is None:
        raise UnexpectedMessageError("this node sells nothing, so it has no prices")
    before = floors.current()
    floors.update(update.floors, reset=update.reset)
    after = floors.current()
    for model in sorted(after):
        if after[model] != before.get(model):
            log.info(
                "price floor of %s: %s -> %s credits per device-hour (operator)",
                model,
                format_credits(before.get(model, 0)),
                format_credits(after[model]),
            )
    node.capacity_changed()  # re-advertise now, with the new floors
    return PricesAnswer(floors=after, prices=floors.rows())
