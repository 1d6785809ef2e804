"""What an operator sees and controls: the status page, ``/status.json``, price floors.

The daemon serves three operator endpoints on its listen address (docs/operators.md):

* ``GET /``: a read-only HTML page (node, peers, adverts, devices, leases, tasks, and
  for each sweep whose trials ran here a plot of every metric over the trials and
  against each numeric parameter). Plots are inline SVG drawn here; the page loads
  nothing else and runs no script (its Content-Security-Policy forbids both), and a
  ``<meta refresh>`` reloads it every few seconds.
* ``GET /status.json``: the same data for ``mercato provider status``.
* ``POST /control/prices``: a ``price_update`` envelope sealed with the node's *own*
  key (the operator's CLI reads ``<home>/identity.pem``). New floors apply to the next
  bids and advert at once and are kept in the store (meta ``price_floors``), so they
  survive a restart, until the config's floor for that model changes: then the
  config, the newer decision, wins.

All three answer 403 ``forbidden`` to clients outside ``[status] allow_from``
(loopback by default): the page shows tenants' commands, parameters and metrics, which
are theirs, not the public's. The control endpoint also needs the node's signature,
so an address in ``allow_from`` alone cannot change prices.

When the daemon is down, :func:`read_status` builds what it can from the store (leases,
receipts, earnings, saved floors) so ``mercato provider status`` still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html
import ipaddress
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from market.bidding import BidEngine, LeaseState
from market.settlement import amount_owed, format_credits
from protocol import codec
from protocol.envelope import open_envelope, seal
from protocol.errors import (
    ForbiddenError,
    MercatoError,
    NotFoundError,
    SenderMismatchError,
    TooLargeError,
    UnexpectedMessageError,
    error_from_code,
    http_status,
)
from protocol.messages import PriceUpdate

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.net.node import Node
    from node.provider.service import ProviderService
    from node.provider.work import WorkService
    from node.store.node_store import Store

log = logging.getLogger("mercato.status")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Loopback only: what ``[status] allow_from`` defaults to.
LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)
STATUS_PATH = "/status.json"
PRICES_PATH = "/control/prices"
READY_FILE = "daemon.json"  # node.daemon.READY_FILE (not imported: daemon imports us)
FLOORS_META_KEY = "price_floors"
#: A price update is a few hundred bytes; nothing bigger is read.
MAX_CONTROL_BYTES = 64 * 1024
#: Rows kept in /status.json and on the page; plots use every finished task listed.
MAX_TASKS = 1000
#: Task rows drawn on the page (the plots still use every finished task of the document).
MAX_TASK_ROWS = 200
MAX_LEASES = 200
#: Plots per sweep: metrics x (1 + numeric parameters), bounded so the page stays small.
MAX_PLOT_METRICS = 4
MAX_PLOT_PARAMS = 6
ENVELOPE_CONTENT_TYPE = "application/x-mercato-envelope"  # node.net.transport
# No script, no external resource of any kind: the page is text and inline SVG.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DaemonUnreachableError(MercatoError):
    """The operator CLI could not reach the daemon's control endpoint."""

    code = "daemon_unreachable"


# --- price floors -----------------------------------------------------------------


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
            elif entry.get("config") != self.config[model]:
                log.info(
                    "saved price floor for %s dropped: the config's floor changed since "
                    "(now %s credits)",
                    model,
                    "/".join(format_credits(f) for f in self.config[model]),
                )
            else:
                self.overrides[model] = int(entry["floor"])
        self._apply()
        self._save()
        for model, floor in sorted(self.overrides.items()):
            log.info("price floor of %s is %s credits (set by the operator)", model, _cr(floor))

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

    def rows(self) -> list[dict[str, Any]]:
        now = self.current()
        return [
            {
                "model": m,
                "floor": now[m],
                "config_floor": max(self.config[m]),
                "override": m in self.overrides,
            }
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


def load_saved_floors(store: Store) -> dict[str, dict[str, Any]]:
    """The saved overrides: ``{model: {"floor": int, "config": [int, ...]}}``."""
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
    return {
        str(m): e
        for m, e in data.items()
        if isinstance(e, dict) and isinstance(e.get("floor"), int) and e["floor"] >= 0
    }


# --- the status document ----------------------------------------------------------


@dataclass
class StatusSource:
    """Everything the operator endpoints read; the daemon builds one."""

    node: Node
    info: dict[str, Any]
    store: Store | None = None
    provider: ProviderService | None = None
    work: WorkService | None = None
    floors: PriceFloors | None = None
    allow_from: Sequence[Network] = LOOPBACK
    refresh_s: int = 5
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    # What the cluster behind the executor is doing (node.provider.slurm.SlurmExecutor.status).
    cluster: Callable[[], dict[str, Any]] | None = None


def parse_params(argv: Sequence[str], files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A trial's parameters from its W&B-style argv (``--key=value``, ``${args_json}``)
    and any JSON object file it was given (``${args_json_file}``)."""
    params: dict[str, Any] = {}
    for text in (files or {}).values():
        params.update(_json_object(text))
    for arg in argv[1:]:
        if arg.startswith("{"):
            params.update(_json_object(arg))
        elif arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            if key:
                params[key] = _scalar(value)
    return params


def _json_object(text: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError, RecursionError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    return {}


def _scalar(text: str) -> Any:
    """W&B writes flags with str(): "0.1", "3", "True", "rbf"."""
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def _result_fields(sealed: bytes | None) -> dict[str, Any]:
    """started_ms, finished_ms, exit_code and usage of our own sealed task result."""
    if not sealed:
        return {}
    try:
        body = codec.decode(sealed)["body"]
    except (MercatoError, KeyError, TypeError):
        return {}
    usage = body.get("usage") or {}
    return {
        "started_ms": body.get("started_ms"),
        "finished_ms": body.get("finished_ms"),
        "exit_code": body.get("exit_code"),
        "wall_ms": usage.get("wall_ms"),
    }


_TASK_ORDER = {"running": 0, "queued": 1}


def _tasks(work: WorkService) -> list[dict[str, Any]]:
    rows = []
    for t in work.tasks.values():
        a = t.assign
        row: dict[str, Any] = {
            "task_id": a.task_id,
            "lease_id": a.lease_id,
            "tenant": t.tenant,
            "job": a.job_spec_hash,
            "state": t.state,
            "devices": list(t.devices),
            "argv": list(a.command),
            "params": parse_params(a.command, a.files),
            "metrics": dict(t.metrics),
            "detail": t.cancel_reason,
            "started_ms": None,
            "finished_ms": None,
            "exit_code": None,
            "wall_ms": None,
        }
        row.update(_result_fields(t.result))
        rows.append(row)
    # Running and queued first, then the most recently finished.
    rows.sort(key=lambda r: (_TASK_ORDER.get(r["state"], 2), -(r["finished_ms"] or 0)))
    return rows[:MAX_TASKS]


def _devices(engine: BidEngine, work: WorkService | None) -> list[dict[str, Any]]:
    reserved = {d: bid for bid, r in engine.reservations.items() for d in r.devices}
    leased = {
        d: lease.lease_id
        for lease in engine.leases.values()
        if lease.state is LeaseState.ACTIVE
        for d in lease.devices
    }
    running: dict[str, str] = {}
    if work is not None:
        for t in work.tasks.values():
            if t.state == "running":
                running.update(dict.fromkeys(t.devices, t.assign.task_id))
    out = []
    for d in sorted(engine.devices.values(), key=lambda d: _natural(d.id)):
        state = "leased" if d.id in leased else "reserved" if d.id in reserved else "free"
        if state == "free" and d.id not in engine.free:
            state = "unavailable"  # withheld from sale (a drained cluster node)
        out.append(
            {
                "id": d.id,
                "model": d.model,
                "kind": d.kind,
                "state": state,
                "lease_id": leased.get(d.id),
                "bid_id": reserved.get(d.id),
                "task_id": running.get(d.id),
                "price_floor": d.price_floor,
                "simulated": d.simulated,
            }
        )
    return out


def _natural(text: str) -> tuple[str, int]:
    head = text.rstrip("0123456789")
    tail = text[len(head) :]
    return head, int(tail) if tail else -1


def _lease_rows(store: Store, node_id: str, now_ms: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for x in store.list_leases():
        if x.side != "provider" or x.provider != node_id:
            continue
        rows.append(
            {
                "lease_id": x.lease_id,
                "tenant": x.tenant,
                "model": x.model,
                "units": x.units,
                "devices": list(x.devices),
                "price": x.price,
                "state": x.state,
                "start_ms": x.start_ms,
                "end_ms": x.end_ms,
                "updated_ms": x.updated_ms,
                "accruing": amount_owed(len(x.devices) * max(0, now_ms - x.start_ms), x.price)
                if x.state == "active"
                else 0,
            }
        )
    rows.sort(key=lambda r: (r["state"] != "active", -r["start_ms"]))
    return rows[:MAX_LEASES]


def _earnings(store: Store, node_id: str, leases: Iterable[dict[str, Any]]) -> dict[str, Any]:
    receipts = [r for r in store.list_receipts() if r.provider == node_id]
    return {
        # Money moves only through countersigned receipts (node.store): that is earned.
        "earned": store.ledger_balance(),
        "pending": sum(r.amount for r in receipts if r.countersign is None),
        "accruing": sum(x["accruing"] for x in leases),
        "receipts": len(receipts),
        "countersigned": sum(1 for r in receipts if r.countersign is not None),
    }


def collect(source: StatusSource) -> dict[str, Any]:
    """The /status.json document of a running daemon."""
    node = source.node
    now = node.clock()
    doc: dict[str, Any] = {
        "source": "daemon",
        "node_id": node.node_id,
        "role": node.settings.role,
        "address": node.settings.address,
        "pid": os.getpid(),
        "now_ms": now,
        "started_ms": source.started_ms,
        "peers": [
            {
                "address": p.address,
                "node_id": p.node_id,
                "role": p.role,
                "failures": p.failures,
                "last_seen_ms": p.last_seen_ms,
            }
            for p in sorted(node.peers.values(), key=lambda p: p.address)
        ],
        "adverts": [
            {
                "provider": e.provider,
                "address": e.advert.address,
                "seq": e.seq,
                "free_units": e.advert.free_units,
                "expires_in_ms": e.advert.expires_ms - now,
                "devices": [
                    {
                        "model": g.model,
                        "count": len(g.ids),
                        "free": len(g.free),
                        "price_floor": g.price_floor,
                    }
                    for g in e.advert.devices
                ],
            }
            for e in sorted(node.directory.live(now), key=lambda e: e.provider)
        ],
        "devices": [],
        "prices": [],
        "leases": [],
        "tasks": [],
        "earnings": None,
    }
    if source.provider is not None:
        doc["devices"] = _devices(source.provider.engine, source.work)
    if source.floors is not None:
        doc["prices"] = source.floors.rows()
    if source.store is not None:
        doc["leases"] = _lease_rows(source.store, node.node_id, now)
        doc["earnings"] = _earnings(source.store, node.node_id, doc["leases"])
    if source.work is not None:
        doc["tasks"] = _tasks(source.work)
        per_lease: dict[str, int] = {}
        for t in source.work.tasks.values():
            per_lease[t.assign.lease_id] = per_lease.get(t.assign.lease_id, 0) + 1
        for x in doc["leases"]:
            x["tasks"] = per_lease.get(x["lease_id"], 0)
    if source.cluster is not None:
        doc["cluster"] = source.cluster()
    return doc


def offline_status(home: Path, config: NodeConfig | None, why: str) -> dict[str, Any]:
    """What the store knows while the daemon is down: leases, receipts, earnings, floors."""
    from node.home import NodeHome
    from node.store.node_store import Store

    store_path = NodeHome(home).store_path
    if not store_path.exists():
        raise MercatoError(
            f"no node at {home}: the daemon is not running ({why}) and there is no store; "
            "pass --config of the provider (or --home of its MERCATO_HOME)"
        )
    node_id = _node_id_of(home)
    now = time.time_ns() // 1_000_000
    with Store(store_path) as store:
        leases = _lease_rows(store, node_id, now) if node_id else []
        # The daemon is not running: nothing accrues and no lease is really active.
        for x in leases:
            x["accruing"] = 0
        earnings = _earnings(store, node_id or "", leases) if node_id else None
        saved = load_saved_floors(store)
    prices: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    if config is not None:
        config_floors: dict[str, list[int]] = {}
        for decl in config.devices:
            floors = config_floors.setdefault(decl.model, [])
            if decl.price_floor not in floors:
                floors.append(decl.price_floor)
                floors.sort()
        for model, floors in sorted(config_floors.items()):
            entry = saved.get(model)
            override = entry is not None and entry.get("config") == floors
            prices.append(
                {
                    "model": model,
                    "floor": int(entry["floor"]) if entry is not None and override else max(floors),
                    "config_floor": max(floors),
                    "override": override,
                }
            )
        floor_now = {p["model"]: p["floor"] for p in prices}
        for decl in config.devices:
            devices.append(
                {
                    "id": None,
                    "model": decl.model,
                    "count": decl.count,
                    "state": "offline",
                    "price_floor": floor_now.get(decl.model, decl.price_floor),
                }
            )
    else:
        prices = [
            {"model": m, "floor": int(e["floor"]), "config_floor": None, "override": True}
            for m, e in sorted(saved.items())
        ]
    return {
        "source": "store",
        "daemon": why,
        "node_id": node_id,
        "role": None if config is None else config.node.role,
        "address": None,
        "now_ms": now,
        "peers": [],
        "adverts": [],
        "devices": devices,
        "prices": prices,
        "leases": leases,
        "tasks": [],
        "earnings": earnings,
    }


def _node_id_of(home: Path) -> str | None:
    """The node id of ``home`` from daemon.json or its key, without creating a key."""
    info = _ready_info(home)
    if info.get("node_id"):
        return str(info["node_id"])
    from node.home import NodeHome

    h = NodeHome(home)
    if not h.key_path.exists():
        return None
    return h.load_or_create_identity().node_id


def _ready_info(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / READY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- operator client (the CLI side) ------------------------------------------------


def control_url(home: Path) -> tuple[str, dict[str, Any]]:
    """The running daemon's control base URL and its daemon.json, or raise."""
    info = _ready_info(home)
    if not info:
        raise DaemonUnreachableError(f"the daemon is not running (no {home / READY_FILE})")
    pid = info.get("pid")
    if isinstance(pid, int) and not _pid_alive(pid):
        raise DaemonUnreachableError(f"the daemon is not running (pid {pid} is gone)")
    url = info.get("control_url") or info.get("address")
    if not isinstance(url, str) or not url:
        raise DaemonUnreachableError(f"{home / READY_FILE} names no address")
    return url.rstrip("/"), info


def local_url(listen_host: str, port: int) -> str:
    """How a process on this host reaches a daemon listening on ``listen_host``."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (the daemon runs as another user)
        return True
    return True


def _http(url: str, data: bytes | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET (or POST ``data`` as an envelope) and decode the JSON answer; typed errors."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", ENVELOPE_CONTENT_TYPE)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            raise error_from_code(str(err["code"]), str(err["reason"])) from None
        except (ValueError, KeyError, TypeError):
            raise DaemonUnreachableError(f"{url} answered HTTP {e.code}") from None
    except (OSError, ValueError) as e:
        raise DaemonUnreachableError(f"cannot reach the daemon at {url}: {e}") from e
    if not isinstance(out, dict):
        raise DaemonUnreachableError(f"{url} did not answer a JSON object")
    return out


def read_status(home: Path, config: NodeConfig | None = None) -> dict[str, Any]:
    """The daemon's /status.json, or what the store knows when the daemon is down."""
    try:
        url, _ = control_url(home)
        return _http(url + STATUS_PATH)
    except DaemonUnreachableError as e:
        return offline_status(home, config, e.reason)


def send_price_update(home: Path, floors: Mapping[str, int], reset: bool = False) -> dict[str, Any]:
    """Seal a price_update with the node's own key and POST it to its daemon."""
    from node.home import NodeHome

    try:
        url, info = control_url(home)
    except DaemonUnreachableError as e:
        raise DaemonUnreachableError(
            f"{e.reason}: prices are set on the running daemon; start it, or change "
            "price_floor under [[devices]] in its config"
        ) from None
    h = NodeHome(home)
    if not h.key_path.exists():
        raise MercatoError(f"no identity key at {h.key_path}: is {home} the daemon's home?")
    identity = h.load_or_create_identity()
    if info.get("node_id") and info["node_id"] != identity.node_id:
        raise MercatoError(
            f"the key in {home} is node {identity.node_id}, but the daemon there runs as "
            f"{info['node_id']}"
        )
    sealed = seal(
        identity,
        PriceUpdate(floors=dict(floors), reset=reset),
        now_ms=time.time_ns() // 1_000_000,
        nonce=os.urandom(16),
        to=identity.node_id,
    )
    return _http(url + PRICES_PATH, sealed)


# --- HTTP handlers -------------------------------------------------------------------

STATUS_KEY: web.AppKey[StatusSource] = web.AppKey("status", StatusSource)


def _error(error: MercatoError) -> web.Response:
    return web.json_response(
        {"error": {"code": error.code, "reason": error.reason}}, status=http_status(error)
    )


def _check_allowed(source: StatusSource, request: web.Request) -> None:
    try:
        ip = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        raise ForbiddenError("unknown client address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not any(ip in net for net in source.allow_from):
        raise ForbiddenError(
            f"{ip} is not in [status] allow_from of this node's config (see docs/operators.md)"
        )


async def handle_page(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    try:
        _check_allowed(source, request)
    except ForbiddenError as e:
        return web.Response(status=403, text=e.reason + "\n")
    # Drawing a page of a thousand trials takes a while: not on the event loop.
    body = await asyncio.to_thread(render_page, collect(source), refresh_s=source.refresh_s)
    return web.Response(
        text=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def handle_status_json(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    try:
        _check_allowed(source, request)
    except ForbiddenError as e:
        return _error(e)
    return web.json_response(collect(source), headers={"Cache-Control": "no-store"})


async def _read_capped(request: web.Request, cap: int) -> bytes:
    if request.content_length is not None and request.content_length > cap:
        raise TooLargeError(f"Content-Length {request.content_length} exceeds {cap}")
    data = bytearray()
    while chunk := await request.content.read(16 * 1024):
        data += chunk
        if len(data) > cap:
            raise TooLargeError(f"body exceeds {cap} bytes")
    return bytes(data)


async def handle_prices(request: web.Request) -> web.Response:
    source = request.app[STATUS_KEY]
    node = source.node
    try:
        _check_allowed(source, request)
        data = await _read_capped(request, MAX_CONTROL_BYTES)
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
        if source.floors is None:
            raise UnexpectedMessageError("this node sells nothing, so it has no prices")
        before = source.floors.current()
        source.floors.update(update.floors, reset=update.reset)
    except MercatoError as e:
        node.metrics.rejections.labels(e.code).inc()
        log.info("price update refused: %s", e)
        return _error(e)
    after = source.floors.current()
    for model in sorted(after):
        if after[model] != before.get(model):
            log.info(
                "price floor of %s: %s -> %s credits per device-hour (operator)",
                model,
                _cr(before.get(model, 0)),
                _cr(after[model]),
            )
    node.capacity_changed()  # re-advertise now, with the new floors
    return web.json_response({"floors": after, "prices": source.floors.rows()})


def add_routes(app: web.Application, source: StatusSource) -> None:
    """Serve the operator endpoints of ``source`` on ``app``."""
    app[STATUS_KEY] = source
    app.router.add_get("/", handle_page)
    app.router.add_get(STATUS_PATH, handle_status_json)
    app.router.add_post(PRICES_PATH, handle_prices)


# --- plots -------------------------------------------------------------------------


def _cr(micro: int) -> str:
    return format_credits(micro)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Point:
    """One finished trial in a plot."""

    x: float
    y: float
    label: str


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def svg_plot(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    metric: str,
    x_key: str,
    connect: bool = False,
    width: int = 340,
    height: int = 210,
) -> str:
    """A scatter plot as inline SVG: one ``circle.point`` per point, with a tooltip.

    The x axis is logarithmic when every x is positive and they span two decades or
    more (learning rates, regularisation strengths).
    """
    left, right, top, bottom = 52, 12, 24, 36
    pw, ph = width - left - right, height - top - bottom
    xs = [p.x for p in points]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 100

    def tx(v: float) -> float:
        return math.log10(v) if log_x else v

    x0, x1 = _range([tx(v) for v in xs]) if xs else (0.0, 1.0)
    y0, y1 = _range([p.y for p in points]) if points else (0.0, 1.0)

    def sx(v: float) -> float:
        return left + (tx(v) - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    e = html.escape
    parts = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'data-metric="{e(metric)}" data-x="{e(x_key)}" data-points="{len(points)}">',
        f"<title>{e(title)}</title>",
        f'<text x="{left}" y="15" class="t">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    ys = [p.y for p in points]
    y_ticks = sorted({min(ys), (min(ys) + max(ys)) / 2, max(ys)}) if ys else []
    for v in y_ticks:  # the data's lowest, middle and highest value
        y = sy(v)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" class="yt">{e(_fmt(v))}</text>')
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>')
    if xs:
        lo, hi = min(xs), max(xs)
        ticks = [lo] if lo == hi else [lo, hi]
        for v in ticks:
            parts.append(
                f'<text x="{sx(v):.1f}" y="{top + ph + 14}" class="xt">{e(_fmt(v))}</text>'
            )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 4}" class="xl">'
        f"{e(x_label)}{' (log)' if log_x else ''}</text>"
    )
    parts.append(
        f'<text x="12" y="{top + ph / 2:.1f}" class="yl" '
        f'transform="rotate(-90 12 {top + ph / 2:.1f})">{e(y_label)}</text>'
    )
    if connect and len(points) > 1:
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in points)
        parts.append(f'<polyline points="{path}" class="line"/>')
    for p in points:
        parts.append(
            f'<circle class="point" cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="4">'
            f"<title>{e(p.label)}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass
class Sweep:
    """The finished trials of one job spec that ran on this provider, in finish order."""

    job: str
    trials: list[dict[str, Any]]

    @property
    def metrics(self) -> list[str]:
        keys: dict[str, None] = {}
        for t in self.trials:
            for k, v in t["metrics"].items():
                if _num(v) is not None:
                    keys.setdefault(k, None)
        return list(keys)[:MAX_PLOT_METRICS]

    @property
    def params(self) -> list[str]:
        keys: dict[str, None] = {}
        for t in self.trials:
            for k, v in t["params"].items():
                if _num(v) is not None:
                    keys.setdefault(k, None)
        return list(keys)[:MAX_PLOT_PARAMS]

    def plots(self) -> list[str]:
        out = []
        for metric in self.metrics:
            order = [
                Point(i + 1, y, _label(t, metric))
                for i, t in enumerate(self.trials)
                if (y := _num(t["metrics"].get(metric))) is not None
            ]
            out.append(
                svg_plot(
                    order,
                    title=f"{metric} by trial",
                    x_label="trial (finish order)",
                    y_label=metric,
                    metric=metric,
                    x_key="order",
                    connect=True,
                )
            )
            for param in self.params:
                pts = [
                    Point(x, y, _label(t, metric))
                    for t in self.trials
                    if (x := _num(t["params"].get(param))) is not None
                    and (y := _num(t["metrics"].get(metric))) is not None
                ]
                out.append(
                    svg_plot(
                        pts,
                        title=f"{metric} vs {param}",
                        x_label=param,
                        y_label=metric,
                        metric=metric,
                        x_key=param,
                    )
                )
        return out


def _label(t: dict[str, Any], metric: str) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(t["params"].items()))
    return f"{t['task_id']}: {metric}={_fmt(float(t['metrics'][metric]))} ({params})"


def sweeps(tasks: Iterable[dict[str, Any]]) -> list[Sweep]:
    """Finished tasks with metrics, grouped by job spec, each in finish order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        if t.get("finished_ms") is None or not t["metrics"]:
            continue
        groups.setdefault(t["job"], []).append(t)
    out = []
    for job, trials in groups.items():
        trials.sort(key=lambda t: (t["finished_ms"], t["task_id"]))
        out.append(Sweep(job, trials))
    out.sort(key=lambda s: -s.trials[-1]["finished_ms"])
    return out


# --- the page ----------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#1c1c1c;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
code,.mono{font-family:ui-monospace,monospace;font-size:.92em}
table{border-collapse:collapse;margin:.2em 0 .6em;background:#fff}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}.num{text-align:right}
.summary span{display:inline-block;margin-right:1.6em}
.state-running,.state-leased,.state-active{color:#0a6}
.state-failed,.state-timed_out,.state-lost{color:#c30}
.state-reserved,.state-queued{color:#a60}
.plots{display:flex;flex-wrap:wrap;gap:.8em}
svg.plot{background:#fff;border:1px solid #ddd}
svg .frame{fill:none;stroke:#999}svg .g{stroke:#eee}
svg .t{font-size:12px;font-weight:600}svg .xt,svg .xl{font-size:10px;text-anchor:middle}
svg .yt{font-size:10px;text-anchor:end}svg .yl{font-size:10px;text-anchor:middle}
svg .point{fill:#2464c8;fill-opacity:.8}svg .line{fill:none;stroke:#9ab;stroke-width:1}
.muted{color:#777}
"""


def _ago(now_ms: int, then_ms: int | None) -> str:
    if not then_ms:
        return ""
    s = max(0, now_ms - then_ms) // 1000
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def _table(
    table_id: str,
    headers: Sequence[str],
    rows: Sequence[tuple[str, Sequence[str]]],
    empty: str,
) -> str:
    """A table whose rows carry ``data-state``; cells are already escaped HTML."""
    if not rows:
        return f'<p class="muted" id="{table_id}-empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        f'<tr class="row state-{html.escape(state)}" data-state="{html.escape(state)}">'
        + "".join(f"<td>{c}</td>" for c in cells)
        + "</tr>"
        for state, cells in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _short(node_id: str | None) -> str:
    if not node_id:
        return ""
    return f'<span class="mono" title="{html.escape(node_id)}">{html.escape(node_id[:12])}</span>'


def render_page(doc: Mapping[str, Any], refresh_s: int = 5) -> str:
    """The status page for a /status.json document (every value is escaped)."""
    e = html.escape
    now = int(doc.get("now_ms") or 0)
    role = str(doc.get("role") or "")
    tasks: list[dict[str, Any]] = list(doc.get("tasks") or [])
    running = [t for t in tasks if t["state"] in ("running", "queued")]
    finished = [t for t in tasks if t["state"] not in ("running", "queued")]
    earnings = doc.get("earnings")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s > 0 else "",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Mercato {e(role)} {e(str(doc.get('node_id') or '')[:12])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Mercato {e(role)}</h1>",
        '<p class="summary">',
        f'<span>node <code id="node-id">{e(str(doc.get("node_id") or ""))}</code></span>',
        f'<span>address <code id="address">{e(str(doc.get("address") or ""))}</code></span>',
        f"<span>up {e(_ago(now, doc.get('started_ms')).removesuffix(' ago'))}</span>",
        "</p>",
        '<p class="summary">',
        f'<span>peers <b id="peer-count">{len(doc.get("peers") or [])}</b></span>',
        f'<span>adverts <b id="advert-count">{len(doc.get("adverts") or [])}</b></span>',
    ]
    if role == "provider":
        devices = doc.get("devices") or []
        free = sum(1 for d in devices if d["state"] == "free")
        active = sum(1 for x in doc.get("leases") or [] if x["state"] == "active")
        out += [
            f'<span>devices free <b id="free-count">{free}</b> of {len(devices)}</span>',
            f'<span>active leases <b id="lease-count">{active}</b></span>',
            f'<span>tasks running <b id="running-count">'
            f"{sum(1 for t in tasks if t['state'] == 'running')}</b>, finished "
            f'<b id="finished-count">{len(finished)}</b></span>',
        ]
        if earnings:
            out.append(
                f'<span>earned <b id="earned">{_cr(earnings["earned"])}</b> credits'
                f" (+{_cr(earnings['pending'])} awaiting countersignature,"
                f" +{_cr(earnings['accruing'])} accruing)</span>"
            )
    out.append("</p>")
    if role == "provider":
        out += _provider_sections(doc, now, running, finished)
    out.append("<h2>Peers</h2>")
    out.append(
        _table(
            "peers",
            ["address", "node", "role", "failures", "last seen"],
            [
                (
                    "peer",
                    [
                        f"<code>{e(p['address'])}</code>",
                        _short(p.get("node_id")),
                        e(p["role"]),
                        str(p["failures"]),
                        e(_ago(now, p.get("last_seen_ms"))),
                    ],
                )
                for p in doc.get("peers") or []
            ],
            "no peers yet",
        )
    )
    out.append("<h2>Directory</h2>")
    out.append(
        _table(
            "adverts",
            ["provider", "address", "devices", "free", "expires in"],
            [
                (
                    "advert",
                    [
                        _short(a["provider"]),
                        f"<code>{e(a['address'])}</code>",
                        e(
                            ", ".join(
                                f"{d['count']}x {d['model']} @ {_cr(d['price_floor'])}"
                                for d in a.get("devices") or []
                            )
                        ),
                        str(a["free_units"]),
                        f"{a['expires_in_ms'] / 1000:.0f} s",
                    ],
                )
                for a in doc.get("adverts") or []
            ],
            "no live adverts",
        )
    )
    out.append(
        f'<p class="muted">Refreshes every {int(refresh_s)} s. Same data as JSON: '
        f'<a href="{STATUS_PATH}">{STATUS_PATH}</a>. Metrics: <a href="/metrics">/metrics</a>.'
        "</p></body></html>"
    )
    return "\n".join(x for x in out if x)


def _provider_sections(
    doc: Mapping[str, Any],
    now: int,
    running: list[dict[str, Any]],
    finished: list[dict[str, Any]],
) -> list[str]:
    e = html.escape
    out = _cluster_section(doc.get("cluster"))
    out.append("<h2>Devices</h2>")
    out.append(
        _table(
            "devices",
            ["device", "model", "state", "lease", "task", "floor (cr/device-h)"],
            [
                (
                    d["state"],
                    [
                        f"<code>{e(str(d.get('id') or ''))}</code>",
                        e(d["model"]),
                        e(d["state"]),
                        f"<code>{e(d.get('lease_id') or '')}</code>",
                        f"<code>{e(d.get('task_id') or '')}</code>",
                        f'<span class="num">{_cr(d.get("price_floor") or 0)}</span>',
                    ],
                )
                for d in doc.get("devices") or []
            ],
            "no devices",
        )
    )
    out.append("<h2>Leases</h2>")
    out.append(
        _table(
            "leases",
            ["lease", "tenant", "devices", "price (cr/device-h)", "state", "started", "tasks"],
            [
                (
                    x["state"],
                    [
                        f"<code>{e(x['lease_id'])}</code>",
                        _short(x["tenant"]),
                        e(f"{len(x['devices'])}x {x['model']}"),
                        f'<span class="num">{_cr(x["price"])}</span>',
                        e(x["state"]),
                        e(_ago(now, x["start_ms"])),
                        str(x.get("tasks", "")),
                    ],
                )
                for x in doc.get("leases") or []
            ],
            "no leases yet",
        )
    )
    out.append("<h2>Tasks</h2>")
    out.append(
        _table(
            "tasks",
            ["task", "state", "lease", "devices", "parameters", "metrics", "finished", "exit"],
            [
                (
                    t["state"],
                    [
                        f'<code class="task-id">{e(t["task_id"])}</code>',
                        e(t["state"])
                        + (f" <small>{e(t['detail'])}</small>" if t["detail"] else ""),
                        f"<code>{e(t['lease_id'])}</code>",
                        e(",".join(t["devices"])),
                        e(" ".join(f"{k}={v}" for k, v in sorted(t["params"].items())))
                        or f'<code title="{e(" ".join(t["argv"]))}">'
                        f"{e(' '.join(t['argv'])[:80])}</code>",
                        e(
                            ", ".join(
                                f"{k}={_fmt(v) if _num(v) is not None else v}"
                                for k, v in list(t["metrics"].items())[:6]
                            )
                        ),
                        e(_ago(now, t.get("finished_ms"))),
                        "" if t.get("exit_code") is None else str(t["exit_code"]),
                    ],
                )
                for t in (running + finished)[:MAX_TASK_ROWS]
            ],
            "no tasks yet",
        )
    )
    if len(running) + len(finished) > MAX_TASK_ROWS:
        out.append(
            f'<p class="muted">the {MAX_TASK_ROWS} most recent of '
            f"{len(running) + len(finished)} tasks; all are in "
            f'<a href="{STATUS_PATH}">{STATUS_PATH}</a></p>'
        )
    groups = sweeps(finished)
    out.append("<h2>Sweeps</h2>")
    if not groups:
        out.append('<p class="muted" id="sweeps-empty">no finished trials with metrics yet</p>')
    for s in groups:
        job_running = sum(1 for t in running if t["job"] == s.job)
        out.append(
            f'<section class="sweep" data-job="{e(s.job)}"><h3>job spec '
            f'<code title="{e(s.job)}">{e(s.job[:12])}</code>: {len(s.trials)} finished '
            f"trials here, {job_running} running</h3>"
        )
        out.append('<div class="plots">' + "".join(s.plots()) + "</div></section>")
    return out


# --- the CLI's view ----------------------------------------------------------------


def _cluster_section(cluster: Mapping[str, Any] | None) -> list[str]:
    """The cluster behind the executor (Slurm): its nodes and the leases' allocations."""
    if not cluster:
        return []
    e = html.escape
    out = [f"<h2>Cluster ({e(str(cluster.get('executor') or ''))})</h2>"]
    if cluster.get("error"):
        out.append(f'<p class="summary">cannot read the cluster: {e(str(cluster["error"]))}</p>')
    out.append(
        '<p class="summary">'
        f'<span>allocations running <b id="alloc-running">{int(cluster.get("running") or 0)}'
        "</b></span>"
        f'<span>pending <b id="alloc-pending">{int(cluster.get("pending") or 0)}</b></span>'
        f'<span>steps <b id="step-count">{int(cluster.get("steps") or 0)}</b></span></p>'
    )
    out.append(
        _table(
            "cluster-nodes",
            ["node", "state", "reason", "CPUs in use", "GPUs sold"],
            [
                (
                    str(n.get("state") or ""),
                    [
                        f"<code>{e(str(n.get('name') or ''))}</code>",
                        e(str(n.get("state") or "")),
                        e(str(n.get("reason") or "")),
                        f"{int(n.get('cpus_alloc') or 0)}/{int(n.get('cpus') or 0)}",
                        str(int(n.get("gpus_sold") or 0)),
                    ],
                )
                for n in cluster.get("nodes") or []
            ],
            "no nodes read yet",
        )
    )
    out.append(
        _table(
            "allocations",
            ["lease", "job", "node", "state", "reason", "GPUs", "steps"],
            [
                (
                    str(a.get("state") or ""),
                    [
                        f"<code>{e(str(a.get('lease_id') or ''))}</code>",
                        e(str(a.get("job_id") or "")),
                        e(str(a.get("node") or "")),
                        e(str(a.get("state") or "")),
                        e(str(a.get("reason") or "")),
                        str(int(a.get("gpus") or 0)),
                        str(int(a.get("steps") or 0)),
                    ],
                )
                for a in cluster.get("allocations") or []
            ],
            "no allocations",
        )
    )
    return out


def print_status(doc: Mapping[str, Any], console: Any) -> None:
    """``mercato provider status`` for people (Rich tables)."""
    from rich.table import Table

    if doc.get("source") == "store":
        console.print(f"[yellow]{doc.get('daemon')}: showing what the store knows[/]")
    console.print(
        f"node {doc.get('node_id') or '?'}  role {doc.get('role') or '?'}  "
        f"address {doc.get('address') or '-'}  peers {len(doc.get('peers') or [])}  "
        f"adverts {len(doc.get('adverts') or [])}"
    )
    devices = doc.get("devices") or []
    if devices:
        t = Table(title="Devices")
        for col in ("device", "model", "state", "lease", "task", "floor (cr/dev-h)"):
            t.add_column(col)
        for d in devices:
            t.add_row(
                str(d.get("id") or f"{d.get('count', '')}x"),
                d["model"],
                d["state"],
                d.get("lease_id") or "",
                d.get("task_id") or "",
                _cr(d["price_floor"]) if d.get("price_floor") is not None else "",
            )
        console.print(t)
    cluster = doc.get("cluster")
    if cluster:
        t = Table(
            title=f"Cluster ({cluster.get('executor')}): {cluster.get('running', 0)} allocations "
            f"running, {cluster.get('pending', 0)} pending, {cluster.get('steps', 0)} steps"
        )
        for col in ("node", "state", "reason", "CPUs in use", "GPUs sold"):
            t.add_column(col)
        for n in cluster.get("nodes") or []:
            t.add_row(
                str(n.get("name")),
                str(n.get("state")),
                str(n.get("reason") or ""),
                f"{n.get('cpus_alloc', 0)}/{n.get('cpus', 0)}",
                str(n.get("gpus_sold", 0)),
            )
        console.print(t)
        for a in cluster.get("allocations") or []:
            console.print(
                f"  lease {a.get('lease_id')}: Slurm job {a.get('job_id')} on {a.get('node')} "
                f"{a.get('state')} {a.get('reason') or ''} ({a.get('steps', 0)} steps)"
            )
        if cluster.get("error"):
            console.print(f"[red]cannot read the cluster: {cluster['error']}[/]")
    leases = doc.get("leases") or []
    t = Table(title=f"Leases ({len(leases)})")
    for col in ("lease", "tenant", "devices", "price (cr/dev-h)", "state", "tasks"):
        t.add_column(col)
    for x in leases:
        t.add_row(
            x["lease_id"],
            x["tenant"][:12],
            f"{len(x['devices'])}x {x['model']}",
            _cr(x["price"]),
            x["state"],
            str(x.get("tasks", "")),
        )
    console.print(t)
    tasks = doc.get("tasks") or []
    if tasks:
        t = Table(title=f"Tasks ({len(tasks)})")
        for col in ("task", "state", "lease", "parameters", "metrics"):
            t.add_column(col)
        for task in tasks[:50]:
            t.add_row(
                task["task_id"],
                task["state"],
                task["lease_id"],
                " ".join(f"{k}={v}" for k, v in sorted(task["params"].items())),
                ", ".join(f"{k}={v}" for k, v in list(task["metrics"].items())[:4]),
            )
        console.print(t)
    earnings = doc.get("earnings")
    if earnings:
        console.print(
            f"earned {_cr(earnings['earned'])} credits "
            f"({earnings['countersigned']} countersigned receipts); "
            f"{_cr(earnings['pending'])} awaiting countersignature; "
            f"{_cr(earnings['accruing'])} accruing on active leases"
        )


def print_prices(rows: Sequence[Mapping[str, Any]], console: Any) -> None:
    """``mercato provider prices`` for people."""
    from rich.table import Table

    t = Table(title="Price floors (credits per device-hour)")
    for col in ("model", "floor", "config", "set by"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["model"],
            _cr(r["floor"]),
            "?" if r.get("config_floor") is None else _cr(r["config_floor"]),
            "operator" if r["override"] else "config",
        )
    console.print(t)
