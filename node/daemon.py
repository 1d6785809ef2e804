"""The daemon: an aiohttp server in front of a Node, with its home, store and metrics.

Endpoints (docs/protocol.md, "HTTP transport"):

* ``POST /p2p``: one sealed envelope in, a sealed reply (or 204) out. The body size is
  capped before it is read, and its arrival has a deadline (``[http] body_timeout_s``);
  every rejection answers 4xx JSON ``{"error": {code, reason}}`` and is counted in
  ``mercato_rejections_total{code}``.

Every connection passes node.net.edge's gate first (per-address and total caps), and one
whose request head does not arrive within ``[http] header_timeout_s`` is closed.
* ``GET /healthz``: JSON with the node id, role, address, peers, adverts, devices.
* ``GET /metrics``: Prometheus text format.
* ``/svc/<lease_id>/...`` (providers): a lease's service, for holders of the tenant's
  capability token (node.provider.endpoint).
* ``GET /``, ``GET /status.json``, ``POST /control/prices``: the operator's status
  page, its data, and price floors (node.operator.status_page; loopback unless configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from market.bidding import BidEngine, FloorPlusUtilisation, LeaseState, devices_from_groups
from market.directory import Entry
from node.config import NodeConfig
from node.home import READY_FILE, NodeHome, resolve_home
from node.net.addresses import AddressPolicy
from node.net.edge import ConnectionGate, EdgeLimits
from node.net.http import error_response, read_capped
from node.net.metrics import NodeMetrics, content_type
from node.net.node import Node, NodeSettings, Peer, wall_clock_ms
from node.net.transport import ENVELOPE_CONTENT_TYPE, P2P_PATH, HttpTransport
from node.operator.prices import PriceFloors
from node.operator.source import StatusSource, local_url
from node.operator.status_page import add_routes
from node.provider.endpoint import EndpointService
from node.provider.executor import ResourceLimits
from node.provider.inventory import Inventory, build_inventory
from node.provider.sandbox import NVIDIA_CONTROL_NODES, WORK_DIR, SandboxExecutor
from node.provider.service import ProviderService
from node.provider.sync import SyncService
from node.provider.work import WorkService
from node.store.node_store import Store
from node.views import advert_summary
from protocol.errors import MercatoError, RequestTimeoutError, TooLargeError

if TYPE_CHECKING:
    # Imported where executor = "slurm" is configured: an idle daemon of any other
    # kind never loads them (tests/node/test_idle_imports.py).
    from node.provider.slurm import SlurmExecutor, SlurmInventory, SlurmTools

log = logging.getLogger("mercato.daemon")

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
INFO_KEY: web.AppKey[dict[str, Any]] = web.AppKey("info")
BODY_TIMEOUT_KEY: web.AppKey[float] = web.AppKey("body_timeout_s", float)


class DaemonError(MercatoError):
    """The daemon cannot start (port taken, no devices, ...)."""

    code = "daemon_error"


async def handle_p2p(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    try:
        try:
            # A sender that stops half-way would otherwise hold this handler forever.
            async with asyncio.timeout(request.app[BODY_TIMEOUT_KEY]):
                data = await read_capped(request, node.limits.max_size)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {request.app[BODY_TIMEOUT_KEY]} s"
            ) from None
        reply = await node.handle(data, request.remote or "")
    except (TooLargeError, RequestTimeoutError) as e:
        node.metrics.rejections.labels(e.code).inc()
        return error_response(e)
    except MercatoError as e:  # already counted by the node
        return error_response(e)
    if not reply:
        return web.Response(status=204)
    return web.Response(body=reply, content_type=ENVELOPE_CONTENT_TYPE)


async def handle_healthz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    base: dict[str, Any] = request.app[INFO_KEY]
    info = dict(base)
    now = node.clock()
    devices: list[dict[str, Any]] = []
    if node.capacity is not None:
        groups, _ = node.capacity()
        devices = [
            {"model": g.model, "kind": g.kind, "count": len(g.ids), "free": len(g.free)}
            for g in groups
        ]
    info.update(
        status="ok",
        peers=len(node.peers),
        adverts=sum(1 for _ in node.directory.live(now)),
        devices=devices,
    )
    return web.json_response(info)


async def handle_directory(request: web.Request) -> web.Response:
    """Read-only summary of the live directory (for people and the local cluster)."""
    node = request.app[NODE_KEY]
    now = node.clock()
    entries = list(node.directory.live(now))
    return web.json_response(
        {
            "providers": [e.provider for e in entries],
            "adverts": [advert_summary(e.advert, now) for e in entries],
        }
    )


async def handle_metrics(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.Response(body=node.metrics.render(), headers={"Content-Type": content_type()})


def build_app(
    node: Node,
    info: dict[str, Any],
    status: StatusSource | None = None,
    *,
    body_timeout_s: float = 30.0,
) -> web.Application:
    app = web.Application(client_max_size=node.limits.max_size)
    app[NODE_KEY] = node
    app[INFO_KEY] = info
    app[BODY_TIMEOUT_KEY] = body_timeout_s
    app.router.add_post(P2P_PATH, handle_p2p)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/directory.json", handle_directory)
    add_routes(app, status or StatusSource(node=node, info=info))
    return app


def settings_from_config(config: NodeConfig, address: str) -> NodeSettings:
    g, a, lim = config.gossip, config.advert, config.limits
    return NodeSettings(
        role=config.node.role,
        address=address,
        bootstrap=list(config.node.bootstrap),
        gossip_interval_s=g.interval_s,
        fanout=g.fanout,
        request_timeout_s=g.request_timeout_s,
        max_peer_failures=g.max_peer_failures,
        max_peers=g.max_peers,
        advert_ttl_s=a.ttl_s,
        advert_refresh_fraction=a.refresh_fraction,
        max_message_bytes=lim.max_message_bytes,
        rate_per_s=lim.rate_per_s,
        burst=lim.burst,
        replay_window_ms=lim.replay_window_s * 1000,
        clock_skew_ms=lim.clock_skew_s * 1000,
    )


@dataclass
class Daemon:
    """A running daemon: start with ``Daemon.start(config)``, stop with ``close()``."""

    node: Node
    runner: web.AppRunner
    store: Store
    home: NodeHome
    address: str
    transport: HttpTransport
    listener: asyncio.Server
    gate: ConnectionGate
    provider: ProviderService | None = None  # None for a bootstrap node
    work: WorkService | None = None  # None for a bootstrap node
    endpoint: EndpointService | None = None  # services published at /svc/<lease_id>/
    slurm: SlurmExecutor | None = None  # executor = "slurm"

    #: Undoes every step of ``start`` in reverse order (``close`` runs it).
    _steps: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @classmethod
    async def start(cls, config: NodeConfig, home: NodeHome | None = None) -> Daemon:
        """Open the store, bind, build the services and serve, one undoable step at a time.

        Each step that holds something (the store, the socket, the transport, the node,
        the HTTP runner, the listener, the ready file) registers its undo on an
        AsyncExitStack as it succeeds: a failure in any later step undoes the earlier
        ones, so a daemon that failed to start leaves its port free and its store closed.
        """
        async with contextlib.AsyncExitStack() as steps:
            daemon = await cls._start(config, home, steps)
            daemon._steps = steps.pop_all()  # started: now close() owns the undo
        return daemon

    @classmethod
    async def _start(
        cls, config: NodeConfig, home: NodeHome | None, steps: contextlib.AsyncExitStack
    ) -> Daemon:
        home = home or NodeHome(config.node.home or resolve_home())
        identity = home.load_or_create_identity(codec_in_child=True)
        store = Store(home.store_path)
        steps.callback(store.close)
        inventory: Inventory | None = None
        slurm_inv: SlurmInventory | None = None
        slurm_tools: SlurmTools | None = None
        if config.node.role == "provider" and config.executor == "slurm":
            from node.provider.slurm import load_slurm_inventory

            # What is sold is what the cluster has (node.provider.slurm); asked once, at start.
            slurm_tools, slurm_inv = load_slurm_inventory(config.slurm)
            inventory = slurm_inv.inventory
        elif config.node.role == "provider":
            inventory = build_inventory(
                config.devices, config.interconnect, detect=config.detect_gpus
            )
        metrics = NodeMetrics()
        # Bind first (port 0 picks a free port), then tell the node its real address.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        steps.callback(sock.close)  # also closed by the listener; twice is harmless
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.node.listen_host, config.node.listen_port))
        except OSError as e:
            raise DaemonError(
                f"cannot listen on {config.node.listen_host}:{config.node.listen_port}: "
                f"{e.strerror}"
            ) from e
        port = sock.getsockname()[1]
        address = config.node.public_address or f"http://{config.node.listen_host}:{port}"
        address = address.rstrip("/")
        policy = AddressPolicy.for_node(
            address, config.node.allow_loopback_peers, config.node.allow_private_peers
        )
        transport = HttpTransport(max_reply_bytes=config.limits.max_message_bytes, policy=policy)
        steps.push_async_callback(transport.close)
        node = Node(
            identity,
            settings_from_config(config, address),
            transport,
            metrics=metrics,
            on_advert=lambda e: _persist_advert(store, e),
            on_peer=lambda p: _persist_peer(store, p, wall_clock_ms()),
        )
        slurm: SlurmExecutor | None = None
        local: SandboxExecutor | None = None

        async def close_slurm() -> None:
            if slurm is not None:  # after the node: give back every allocation leases held
                await slurm.close()
            if local is not None:  # after the node (its trials ended): idle warm sandboxes
                await local.close()

        steps.push_async_callback(close_slurm)
        # Registered before the node starts (closing an unstarted node is a no-op), so
        # the undo runs after the listener's: no request reaches a stopped node.
        steps.push_async_callback(node.close)
        provider: ProviderService | None = None
        work: WorkService | None = None
        endpoint: EndpointService | None = None
        floors: PriceFloors | None = None
        if inventory is not None:
            all_ids = set(inventory.ids)
            engine = BidEngine(
                identity.node_id,
                devices_from_groups(inventory.device_groups(free=all_ids)),
                inventory.interconnect_message(),
                bid_ttl_ms=int(config.market.bid_ttl_s * 1000),
                strategy=FloorPlusUtilisation(surge_pct=config.market.surge_pct),
                max_reserved_pct=config.market.max_reserved_pct,
                heartbeat_bounds_ms=(
                    int(config.market.min_heartbeat_s * 1000),
                    int(config.market.max_heartbeat_s * 1000),
                ),
            )
            floors = PriceFloors(engine, store)
            floors.restore()  # the operator's floors from `mercato provider prices --set`
            provider = ProviderService(node, engine, store, config.settlement.policy())
            provider.start()  # reads the store's leases; takes the sell-side messages
            sb = config.sandbox
            executor: SandboxExecutor
            if slurm_inv is not None and slurm_tools is not None:
                from node.provider.slurm import SlurmExecutor

                slurm = SlurmExecutor(
                    home.path / "sandbox",
                    config.slurm,
                    slurm_tools,
                    slurm_inv.devices,
                    identity.node_id,
                    allow_unsandboxed=sb.allow_unsandboxed,
                    allow_network=sb.allow_network,
                    hidden_paths=[home.path],
                    trial_uid=sb.trial_uid,
                )
                executor = slurm
            else:
                executor = SandboxExecutor(
                    home.path / "sandbox",
                    allow_unsandboxed=sb.allow_unsandboxed,
                    allow_network=sb.allow_network,
                    hidden_paths=[home.path],
                    trial_uid=sb.trial_uid,
                    warm=sb.warm,
                    warm_preload=sb.warm_preload,
                )
                local = executor
            inv = inventory

            def device_env(ids: tuple[str, ...]) -> dict[str, str]:
                return {
                    "MERCATO_DEVICES": ",".join(ids),
                    "CUDA_VISIBLE_DEVICES": inv.cuda_visible_devices(ids),
                }

            work = WorkService(
                node,
                provider,
                executor,
                home.path / "work",
                device_env=device_env,
                device_nodes=lambda ids: nvidia_device_nodes(inv, ids),
                limits=ResourceLimits(
                    memory_bytes=sb.memory_bytes,
                    max_processes=sb.max_processes,
                    max_file_bytes=sb.max_file_bytes,
                    cpu_seconds=sb.cpu_seconds,
                    tmp_bytes=sb.tmp_bytes,
                    shm_bytes=sb.shm_bytes,
                    trial_memory_bytes=sb.trial_memory_bytes,
                    disk_bytes=sb.disk_bytes,
                    open_files=sb.open_files,
                ),
                max_workspace_bytes=sb.max_workspace_bytes,
                allow_network=sb.allow_network,
                workspaces=config.workspaces,
            )
            work.start()  # scans its workspaces; takes the work messages
            sandbox_root = executor.root_dir
            endpoint = EndpointService(
                node,
                provider,
                work,
                lambda run_id: sandbox_root / run_id / WORK_DIR,
                body_timeout_s=config.http.body_timeout_s,
            )
            SyncService(node, work, executor)
        info: dict[str, Any] = {"node_id": identity.node_id, "role": config.node.role}
        status = StatusSource(
            node=node,
            info=info,
            store=store,
            provider=provider,
            work=work,
            endpoint=endpoint,
            floors=floors,
            allow_from=tuple(config.status.allow_from),
            refresh_s=config.status.refresh_s,
            cluster=slurm.status if slurm is not None else None,
        )
        http = config.http
        app = build_app(node, info, status, body_timeout_s=http.body_timeout_s)
        if endpoint is not None:
            endpoint.add_routes(app)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            # Also closes a connection whose request head has not arrived in this time
            # (aiohttp runs the timer from the connection's start): no slowloris.
            keepalive_timeout=http.header_timeout_s,
        )
        await runner.setup()
        steps.push_async_callback(runner.cleanup)
        gate = ConnectionGate(
            EdgeLimits(
                max_total=_connection_cap(http.max_connections),
                max_per_peer=http.max_connections_per_peer,
            ),
            on_event=lambda code: metrics.rejections.labels(code).inc(),
        )
        assert runner.server is not None
        listener = await asyncio.get_running_loop().create_server(
            gate.protocol_factory(runner.server), sock=sock, backlog=128
        )
        steps.callback(listener.close)  # accept no more; the runner closes open connections
        # The operator's CLI talks to this node over loopback whatever address it advertises.
        control = local_url(config.node.listen_host, port)
        info.update(address=address, pid=os.getpid(), control_url=control)
        _restore(node, store)
        await node.start()
        if slurm is not None and provider is not None:
            await slurm.reap_orphans()  # allocations a killed earlier run left behind
            node.spawn(slurm.watch(_withhold_unavailable(slurm, provider)))
        # Atomic: whoever polls for this file never reads it half-written.
        ready = home.path / READY_FILE
        steps.callback(_remove_ready, ready)
        tmp = home.path / (READY_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(info))
            tmp.replace(ready)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise DaemonError(f"cannot write {ready}: {e.strerror or e}") from e
        log.info("%s %s listening on %s", config.node.role, identity.node_id, address)
        return cls(
            node,
            runner,
            store,
            home,
            address,
            transport,
            listener,
            gate,
            provider,
            work,
            endpoint,
            slurm,
        )

    async def close(self) -> None:
        """Stop serving, stop every task, close the store: ``start``'s steps undone in
        reverse order. Idempotent."""
        await self._steps.aclose()


def _remove_ready(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


#: Descriptors kept free for everything else (store, trials' pipes, outgoing requests).
FD_RESERVE = 256


def _connection_cap(configured: int) -> int:
    """``configured``, lowered to stay under the process's open-file limit.

    At the limit accept() fails and the loop stops serving everyone; below it, the gate
    refuses or evicts and keeps serving.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - FD_RESERVE >= configured:
        return configured
    cap = max(16, soft - FD_RESERVE)
    log.warning("open-file limit %d: serving at most %d connections, not %d", soft, cap, configured)
    return cap


def nvidia_device_nodes(
    inventory: Inventory, ids: tuple[str, ...], dev_root: Path | str = "/dev"
) -> list[str]:
    """Device files CUDA needs inside the sandbox, for leases of real NVIDIA GPUs.

    Only the leased GPUs' own ``/dev/nvidiaN`` (N is NVML's minor number) and the
    control nodes every CUDA process opens: CUDA_VISIBLE_DEVICES alone would not keep
    a trial off the other GPUs, since the trial can unset it. A GPU whose minor
    number NVML did not give gets no node (its trial fails rather than see every
    GPU). Paths are as the trial sees them (``/dev/...``); ``dev_root`` is where they
    are looked for on the host (tests use a directory of fake nodes).
    """
    minors = inventory.nvidia_minors(ids)
    if not minors:
        return []
    if None in minors:
        log.warning("no NVML minor number for some of %s: their /dev/nvidiaN stay hidden", ids)
    names = [f"nvidia{m}" for m in minors if m is not None]
    names += list(NVIDIA_CONTROL_NODES)
    root = Path(dev_root)
    return [f"/dev/{n}" for n in names if (root / n).exists() and not (root / n).is_dir()]


def _withhold_unavailable(slurm: SlurmExecutor, provider: ProviderService) -> Callable[[], None]:
    """After each poll: devices on drained or down nodes are not sold until they return.

    They leave the engine's free set (a lease already on them runs on: Slurm lets a
    draining node finish its jobs) and come back once the node takes jobs again.
    """
    withheld: set[str] = set()

    def update() -> None:
        engine = provider.engine
        now_down = slurm.unavailable_devices()
        held = {
            d
            for lease in engine.leases.values()
            if lease.state is LeaseState.ACTIVE
            for d in lease.devices
        }
        held |= {d for r in engine.reservations.values() for d in r.devices}
        back = withheld - now_down
        changed = bool(back) or bool(now_down & engine.free)
        engine.free -= now_down
        engine.free |= {d for d in back if d not in held}
        withheld.clear()
        withheld.update(now_down)
        if changed:
            provider.node.capacity_changed()

    return update


def _persist_advert(store: Store, entry: Entry) -> None:
    a = entry.advert
    store.put_advert(a.provider, a.seq, a.expires_ms, entry.received_ms, entry.envelope)


def _persist_peer(store: Store, peer: Peer, now_ms: int) -> None:
    if peer.node_id is not None:
        store.upsert_peer(peer.node_id, peer.address, peer.role, now_ms)


def _restore(node: Node, store: Store) -> None:
    """Reload live adverts (re-verified) and peers from the store after a restart."""
    for stored in store.get_adverts(node.clock()):
        node.ingest_advert(stored.envelope)
    for p in store.list_peers():
        node.learn_peer(p.address, p.node_id, p.role)


def _return_startup_memory() -> None:
    """Hand the heap that imports and start-up freed back to the system (glibc only).

    Building modules and validators leaves megabytes of freed but still resident heap;
    an idle daemon would hold it for its lifetime (docs/benchmarks.md, idle RSS).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def run_daemon(config: NodeConfig, home: NodeHome | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = await Daemon.start(config, home)
    _return_startup_memory()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await daemon.close()


def setup_logging(home: Path, verbose: bool = False) -> None:
    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(log_dir / "node.log")
    file_handler.setFormatter(fmt)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [file_handler, stream]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
