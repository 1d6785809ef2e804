"""The status document: what an operator may know about a node, typed, in one place.

Built here from the daemon's state (:func:`collect`) or, while the daemon is down, from
its store (:func:`offline_status`). Everything else of the operator view reads only
this document: ``/status.json`` is its JSON (``StatusDocument.model_dump``), the page
(node.operator.page) and the plots (node.operator.plots) render it, and ``mercato
provider status`` prints it (node.operator.console) after validating the daemon's
answer against the same models. docs/operators.md describes the fields.

Tasks live in the daemon's memory: the running and queued ones, and the finished
tasks of ended leases it keeps without their logs (node.provider.work
``MAX_FINISHED_KEPT``). Leases, receipts and earnings come from the store, so each
lease row says what ran under it and what was paid for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, JsonValue

from market.bidding import BidEngine, LeaseState
from market.settlement import amount_owed
from node.home import READY_FILE
from node.operator.prices import PriceView
from node.operator.source import STATUS_PATH as STATUS_PATH
from node.operator.source import StatusSource
from protocol import codec
from protocol.errors import MercatoError
from protocol.messages import TaskResult

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.provider.slurm import ClusterStatus
    from node.provider.work import Task, WorkService
    from node.store.node_store import ReceiptRow, Store

#: Task rows kept in the document; plots use every finished task listed.
MAX_TASKS = 1000
MAX_LEASES = 200
#: Tasks listed per lease (its counts cover them all).
MAX_LEASE_HISTORY = 100
#: Plots per sweep: metrics x (1 + numeric parameters), bounded so the page stays small.
MAX_PLOT_METRICS = 4
MAX_PLOT_PARAMS = 6

#: The value of a metric a trial reported (node.provider.executor keeps numbers only).
Metric = int | float


class View(BaseModel):
    """A part of the document: frozen, and a field nobody declared is an error.

    defer_build: built when a status is first asked for, not by an idle daemon.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class PeerView(View):
    address: str
    node_id: str | None
    role: str
    failures: int
    last_seen_ms: int | None


class AdvertDevices(View):
    model: str
    count: int
    free: int
    price_floor: int


class AdvertView(View):
    provider: str
    address: str
    seq: int
    free_units: int
    expires_in_ms: int
    devices: list[AdvertDevices]


#: ``unavailable``: free but withheld from sale (its cluster node is drained or down).
DeviceState = Literal["free", "reserved", "leased", "unavailable", "offline"]


class DeviceView(View):
    """One device (``id`` set) or, offline, one ``[[devices]]`` entry (``count`` set)."""

    id: str | None
    model: str
    state: DeviceState
    price_floor: int
    kind: str | None = None
    lease_id: str | None = None
    bid_id: str | None = None
    task_id: str | None = None
    simulated: bool | None = None
    count: int | None = None


class TaskView(View):
    task_id: str
    lease_id: str
    tenant: str
    job: str
    state: str
    devices: list[str]
    argv: list[str]
    params: dict[str, JsonValue]
    metrics: dict[str, Metric]
    detail: str
    started_ms: int | None = None
    finished_ms: int | None = None
    exit_code: int | None = None
    wall_ms: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ("running", "queued")


class LeaseTask(View):
    """How one task under a lease ended (the full row is in ``tasks``)."""

    task_id: str
    state: str
    exit_code: int | None
    wall_ms: int | None
    finished_ms: int | None


class LeaseView(View):
    lease_id: str
    tenant: str
    model: str
    units: int
    devices: list[str]
    price: int
    state: str
    start_ms: int
    end_ms: int
    updated_ms: int
    accruing: int
    #: Tasks this daemon ran under the lease (while it keeps them), by outcome.
    tasks: int = 0
    outcomes: dict[str, int] = {}
    history: list[LeaseTask] = []
    #: Micro-credits of the lease's receipts: countersigned (paid) and not yet.
    paid: int = 0
    awaiting: int = 0


class Earnings(View):
    earned: int
    pending: int
    accruing: int
    receipts: int
    countersigned: int


class ExecutorView(View):
    """How trials run here: the backend, its sandbox and the limits every trial gets."""

    kind: str
    sandboxed: bool | None
    allow_network: bool
    limits: dict[str, int | None]
    queued: int
    running: int
    finished_kept: int


class SweepView(View):
    """The finished trials of one job spec here (task ids in finish order), plotted
    by each numeric metric over the trials and against each numeric parameter."""

    job: str
    trials: list[str]
    running: int
    metrics: list[str]
    params: list[str]


class ServiceView(View):
    """A service published at ``/svc/<lease_id>/`` (node.provider.endpoint)."""

    lease_id: str
    requests: int
    errors: int
    refused: int
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None
    live: bool


class ClusterNodeView(View):
    """A cluster node with devices sold here (node.provider.slurm ``ClusterNode``)."""

    name: str
    state: str
    slurm_state: str
    reason: str
    cpus: int
    cpus_alloc: int
    gpus_sold: int


class AllocationView(View):
    """A lease's allocation on the cluster (node.provider.slurm ``ClusterAllocation``)."""

    lease_id: str
    job_id: int | None
    node: str
    state: str
    reason: str
    gpus: int
    steps: int


class ClusterView(View):
    """The cluster behind the executor (``executor = "slurm"``): its nodes and the
    leases' allocations, as of the executor's last poll."""

    executor: str
    partition: str | None
    polled_ms: int | None
    error: str
    nodes: list[ClusterNodeView]
    allocations: list[AllocationView]
    pending: int
    running: int
    steps: int


class StatusDocument(View):
    """``/status.json``: the node, and on a provider its devices, leases and tasks."""

    source: Literal["daemon", "store"] = "daemon"
    daemon: str | None = None  # source "store": why the daemon did not answer
    node_id: str | None = None
    role: str | None = None
    address: str | None = None
    pid: int | None = None
    now_ms: int = 0
    started_ms: int | None = None
    peers: list[PeerView] = []
    adverts: list[AdvertView] = []
    devices: list[DeviceView] = []
    prices: list[PriceView] = []
    leases: list[LeaseView] = []
    tasks: list[TaskView] = []
    earnings: Earnings | None = None
    executor: ExecutorView | None = None
    sweeps: list[SweepView] = []
    services: list[ServiceView] = []
    cluster: ClusterView | None = None

    def json_body(self) -> dict[str, JsonValue]:
        """The document as ``/status.json`` serves it."""
        return self.model_dump(mode="json")


# --- building it ------------------------------------------------------------------


def collect(source: StatusSource) -> StatusDocument:
    """The status document of a running daemon."""
    node = source.node
    now = node.clock()
    tasks = _tasks(source.work) if source.work is not None else []
    leases: list[LeaseView] = []
    earnings = None
    if source.store is not None:
        receipts = [r for r in source.store.list_receipts() if r.provider == node.node_id]
        leases = _leases(source.store, node.node_id, now, receipts, tasks)
        earnings = _earnings(source.store, receipts, leases)
    return StatusDocument(
        source="daemon",
        node_id=node.node_id,
        role=node.settings.role,
        address=node.settings.address,
        pid=os.getpid(),
        now_ms=now,
        started_ms=source.started_ms,
        peers=[
            PeerView(
                address=p.address,
                node_id=p.node_id,
                role=p.role,
                failures=p.failures,
                last_seen_ms=p.last_seen_ms,
            )
            for p in sorted(node.peers.values(), key=lambda p: p.address)
        ],
        adverts=[
            AdvertView(
                provider=e.provider,
                address=e.advert.address,
                seq=e.seq,
                free_units=e.advert.free_units,
                expires_in_ms=e.advert.expires_ms - now,
                devices=[
                    AdvertDevices(
                        model=g.model,
                        count=len(g.ids),
                        free=len(g.free),
                        price_floor=g.price_floor,
                    )
                    for g in e.advert.devices
                ],
            )
            for e in sorted(node.directory.live(now), key=lambda e: e.provider)
        ],
        devices=_devices(source.provider.engine, source.work) if source.provider else [],
        prices=source.floors.rows() if source.floors is not None else [],
        leases=leases,
        tasks=tasks[:MAX_TASKS],
        earnings=earnings,
        executor=_executor(source.work) if source.work is not None else None,
        sweeps=sweeps(tasks[:MAX_TASKS]),
        services=[
            ServiceView(**dataclasses.asdict(x))
            for x in (source.endpoint.snapshot() if source.endpoint is not None else [])
        ],
        cluster=_cluster(source.cluster()) if source.cluster is not None else None,
    )


def _cluster(status: ClusterStatus) -> ClusterView:
    # Same field names on both sides: a field one side lacks fails here, not silently.
    return ClusterView.model_validate(dataclasses.asdict(status))


def parse_params(
    argv: Sequence[str], files: Mapping[str, str] | None = None
) -> dict[str, JsonValue]:
    """A trial's parameters from its W&B-style argv (``--key=value``, ``${args_json}``)
    and any JSON object file it was given (``${args_json_file}``)."""
    params: dict[str, JsonValue] = {}
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


def _json_object(text: str) -> dict[str, JsonValue]:
    with contextlib.suppress(ValueError, RecursionError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    return {}


def _scalar(text: str) -> JsonValue:
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


def _result(sealed: bytes | None) -> TaskResult | None:
    """Our own sealed task result (started, finished, exit code, usage), if any."""
    if not sealed:
        return None
    try:
        body = codec.decode(sealed)["body"]
        return TaskResult.model_validate(body)
    except (MercatoError, KeyError, TypeError, ValueError):
        return None


_TASK_ORDER = {"running": 0, "queued": 1}


def _task_view(t: Task) -> TaskView:
    a = t.assign
    result = _result(t.result)
    return TaskView(
        task_id=a.task_id,
        lease_id=a.lease_id,
        tenant=t.tenant,
        job=a.job_spec_hash,
        state=t.state,
        devices=list(t.devices),
        argv=list(a.command),
        params=parse_params(a.command, a.files),
        metrics=dict(t.metrics),
        detail=t.cancel_reason,
        started_ms=None if result is None else result.started_ms,
        finished_ms=None if result is None else result.finished_ms,
        exit_code=None if result is None else result.exit_code,
        wall_ms=None if result is None else result.usage.wall_ms,
    )


def _tasks(work: WorkService) -> list[TaskView]:
    """Live tasks and the kept finished ones: running and queued first, then the most
    recently finished."""
    rows = [_task_view(t) for t in (*work.tasks.values(), *work.finished)]
    rows.sort(key=lambda r: (_TASK_ORDER.get(r.state, 2), -(r.finished_ms or 0)))
    return rows


def _executor(work: WorkService) -> ExecutorView:
    ex = work.executor
    limits = {
        k: v if isinstance(v, int) else None for k, v in dataclasses.asdict(work.limits).items()
    }
    sandboxed = getattr(ex, "sandboxed", None)  # not every backend has a local sandbox
    return ExecutorView(
        kind=type(ex).__name__,
        sandboxed=sandboxed if isinstance(sandboxed, bool) else None,
        allow_network=work.allow_network,
        limits=limits,
        queued=sum(1 for t in work.tasks.values() if t.state == "queued"),
        running=sum(1 for t in work.tasks.values() if t.state == "running"),
        finished_kept=len(work.finished),
    )


def _devices(engine: BidEngine, work: WorkService | None) -> list[DeviceView]:
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
        state: DeviceState = (
            "leased" if d.id in leased else "reserved" if d.id in reserved else "free"
        )
        if state == "free" and d.id not in engine.free:
            state = "unavailable"  # withheld from sale (a drained cluster node)
        out.append(
            DeviceView(
                id=d.id,
                model=d.model,
                kind=d.kind,
                state=state,
                lease_id=leased.get(d.id),
                bid_id=reserved.get(d.id),
                task_id=running.get(d.id),
                price_floor=d.price_floor,
                simulated=d.simulated,
            )
        )
    return out


def _natural(text: str) -> tuple[str, int]:
    head = text.rstrip("0123456789")
    tail = text[len(head) :]
    return head, int(tail) if tail else -1


def _leases(
    store: Store,
    node_id: str,
    now_ms: int | None,
    receipts: Sequence[ReceiptRow],
    tasks: Sequence[TaskView],
) -> list[LeaseView]:
    """The provider's leases, newest active first, each with its tasks and receipts.

    ``now_ms`` None: the daemon is not running, so nothing accrues.
    """
    by_lease: dict[str, list[TaskView]] = {}
    for t in tasks:
        by_lease.setdefault(t.lease_id, []).append(t)
    paid: dict[str, int] = {}
    awaiting: dict[str, int] = {}
    for r in receipts:
        into = awaiting if r.countersign is None else paid
        into[r.lease_id] = into.get(r.lease_id, 0) + r.amount
    rows = []
    for x in store.list_leases():
        if x.side != "provider" or x.provider != node_id:
            continue
        ran = by_lease.get(x.lease_id, [])
        outcomes: dict[str, int] = {}
        for t in ran:
            outcomes[t.state] = outcomes.get(t.state, 0) + 1
        accruing = 0
        if now_ms is not None and x.state == "active":
            accruing = amount_owed(len(x.devices) * max(0, now_ms - x.start_ms), x.price)
        rows.append(
            LeaseView(
                lease_id=x.lease_id,
                tenant=x.tenant,
                model=x.model,
                units=x.units,
                devices=list(x.devices),
                price=x.price,
                state=x.state,
                start_ms=x.start_ms,
                end_ms=x.end_ms,
                updated_ms=x.updated_ms,
                accruing=accruing,
                tasks=len(ran),
                outcomes=dict(sorted(outcomes.items())),
                history=[
                    LeaseTask(
                        task_id=t.task_id,
                        state=t.state,
                        exit_code=t.exit_code,
                        wall_ms=t.wall_ms,
                        finished_ms=t.finished_ms,
                    )
                    for t in ran[:MAX_LEASE_HISTORY]
                ],
                paid=paid.get(x.lease_id, 0),
                awaiting=awaiting.get(x.lease_id, 0),
            )
        )
    rows.sort(key=lambda r: (r.state != "active", -r.start_ms))
    return rows[:MAX_LEASES]


def _earnings(
    store: Store, receipts: Sequence[ReceiptRow], leases: Iterable[LeaseView]
) -> Earnings:
    return Earnings(
        # Money moves only through countersigned receipts (node.store): that is earned.
        earned=store.ledger_balance(),
        pending=sum(r.amount for r in receipts if r.countersign is None),
        accruing=sum(x.accruing for x in leases),
        receipts=len(receipts),
        countersigned=sum(1 for r in receipts if r.countersign is not None),
    )


def metric_value(value: object) -> float | None:
    """A finite number to plot, or None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def sweeps(tasks: Iterable[TaskView]) -> list[SweepView]:
    """Finished tasks with metrics, grouped by job spec, each in finish order, newest
    sweep first; ``running`` counts the job's running and queued tasks."""
    groups: dict[str, list[TaskView]] = {}
    active: dict[str, int] = {}
    for t in tasks:
        if t.active:
            active[t.job] = active.get(t.job, 0) + 1
        elif t.finished_ms is not None and t.metrics:
            groups.setdefault(t.job, []).append(t)
    out = []
    for job, trials in groups.items():
        trials.sort(key=lambda t: (t.finished_ms or 0, t.task_id))
        metrics: dict[str, None] = {}
        params: dict[str, None] = {}
        for t in trials:
            metrics.update((k, None) for k, v in t.metrics.items() if metric_value(v) is not None)
            params.update((k, None) for k, v in t.params.items() if metric_value(v) is not None)
        out.append(
            SweepView(
                job=job,
                trials=[t.task_id for t in trials],
                running=active.get(job, 0),
                metrics=list(metrics)[:MAX_PLOT_METRICS],
                params=list(params)[:MAX_PLOT_PARAMS],
            )
        )
    out.sort(key=lambda s: -max((t.finished_ms or 0) for t in groups[s.job]))
    return out


# --- while the daemon is down ---------------------------------------------------------


def offline_status(home: Path, config: NodeConfig | None, why: str) -> StatusDocument:
    """What the store knows while the daemon is down: leases, receipts, earnings, floors."""
    from node.home import NodeHome
    from node.operator.prices import config_floors, load_saved_floors
    from node.store.node_store import Store

    store_path = NodeHome(home).store_path
    if not store_path.exists():
        raise MercatoError(
            f"no node at {home}: the daemon is not running ({why}) and there is no store; "
            "pass --config of the provider (or --home of its MERCATO_HOME)"
        )
    node_id = _node_id_of(home)
    now = time.time_ns() // 1_000_000
    leases: list[LeaseView] = []
    earnings = None
    with Store(store_path) as store:
        if node_id:
            receipts = [r for r in store.list_receipts() if r.provider == node_id]
            # The daemon is not running: nothing accrues and no lease is really active.
            leases = _leases(store, node_id, None, receipts, [])
            earnings = _earnings(store, receipts, leases)
        saved = load_saved_floors(store)
    prices: list[PriceView] = []
    devices: list[DeviceView] = []
    if config is not None:
        for model, floors in sorted(config_floors(config).items()):
            entry = saved.get(model)
            override = entry is not None and entry.config == floors
            prices.append(
                PriceView(
                    model=model,
                    floor=entry.floor if entry is not None and override else max(floors),
                    config_floor=max(floors),
                    override=override,
                )
            )
        floor_now = {p.model: p.floor for p in prices}
        devices = [
            DeviceView(
                id=None,
                model=decl.model,
                count=decl.count,
                state="offline",
                price_floor=floor_now.get(decl.model, decl.price_floor),
            )
            for decl in config.devices
        ]
    else:
        prices = [
            PriceView(model=m, floor=e.floor, config_floor=None, override=True)
            for m, e in sorted(saved.items())
        ]
    return StatusDocument(
        source="store",
        daemon=why,
        node_id=node_id,
        role=None if config is None else config.node.role,
        now_ms=now,
        devices=devices,
        prices=prices,
        leases=leases,
        earnings=earnings,
    )


def _node_id_of(home: Path) -> str | None:
    """The node id of ``home`` from daemon.json or its key, without creating a key."""
    info = ready_info(home)
    if info.get("node_id"):
        return str(info["node_id"])
    from node.home import NodeHome

    h = NodeHome(home)
    if not h.key_path.exists():
        return None
    return h.load_or_create_identity().node_id


def ready_info(home: Path) -> dict[str, JsonValue]:
    """The daemon's ``daemon.json`` (its pid, address, control URL), or ``{}``."""
    try:
        data = json.loads((home / READY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
