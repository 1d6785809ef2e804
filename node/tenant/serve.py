"""``mercato serve``: a service's replicas across providers behind one local gateway.

Each replica is a lease on one provider (distinct providers unless ``spread: false``)
running the service's command in the sandbox; the provider publishes its socket at
``<provider>/svc/<lease_id>/`` (node.provider.endpoint) to holders of this tenant's
capability tokens. The runner:

* leases the replicas, uploads the workspace, starts the service with
  ``$MERCATO_SERVICE_SOCKET`` set, and probes its health path through the provider
  until it answers 2xx (market.serving.ReplicaHealth decides READY, UNHEALTHY, LOST);
* runs a gateway (aiohttp, loopback) that sends each request to the least busy READY
  replica and sends it again to another one when it failed before reaching the service,
  or when it is idempotent (market.serving.retryable);
* replaces a replica whose provider stops answering heartbeats, whose task ends or
  whose health stays bad: the lease is released, the provider is not used again by this
  serve and counts a failure in reputation (uptime feeds ranking), a new lease is made
  and waited for, up to ``service.restarts`` replacements per replica;
* writes ``serve.json`` in the job directory every second (replicas, readiness,
  requests, errors, latency) for ``mercato status``, and stops, releasing every lease,
  on ``mercato cancel``, SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from market.bidding import LeaseState
from market.jobspec import JobSpec, spec_hash
from market.lifecycle import JobState
from market.placement import plan
from market.serving import ReplicaHealth, ReplicaState, exclusions, pick, retryable
from node.net.node import wall_clock_ms
from node.provider.work import SOCKET_ENV
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from protocol import capability
from protocol.errors import MercatoError
from protocol.messages import TaskAssign

log = logging.getLogger("mercato.serve")

DEFAULT_MAX_PRICE = 10_000_000
SERVICE_TIMEOUT_MS = 7 * 24 * 3_600_000
TOKEN_TTL_MS = 3_600_000
MAX_BODY = 16 << 20
PROBE_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
LATENCY_WINDOW = 1024
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the gateway sets itself.
_DROP = frozenset(
    h.lower()
    for h in (
        "Authorization",
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)


@dataclass
class Replica:
    """One lease serving the service, and what the gateway saw of it."""

    index: int
    lease: LeaseRow
    health: ReplicaHealth
    generation: int  # 1 for the first lease of this slot, +1 per replacement
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    latency_ms: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.lease.lease_id

    @property
    def url(self) -> str:
        return f"{self.lease.provider_address}/svc/{self.lease.lease_id}"

    def observe(self, ms: float, ok: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.latency_ms.append(ms)
        if len(self.latency_ms) > LATENCY_WINDOW:
            del self.latency_ms[: len(self.latency_ms) - LATENCY_WINDOW]

    def view(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        return {
            "replica": self.index,
            "generation": self.generation,
            "provider": self.lease.provider,
            "lease_id": self.lease.lease_id,
            "url": self.url,
            "state": self.health.state.value,
            "why": self.health.why,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "p50_ms": round(lat[len(lat) // 2], 2) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else None,
        }


class ServeRunner:
    """Keeps ``service.replicas`` replicas up and serves them at one local address."""

    def __init__(
        self,
        tenant: Tenant,
        store: Store,
        spec: JobSpec,
        workspace: bytes,
        workspace_hash: str,
        *,
        peer: str,
        state_path: Path,
        log_dir: Path,
        on_event: Callable[[str], None] | None = None,
        on_ready: Callable[[str], None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        job_id: str | None = None,
        bid_window_ms: int = 1_500,
        heartbeat_interval_ms: int = 1_000,
        probe_interval_s: float = 0.5,
    ) -> None:
        assert spec.service is not None
        self.tenant = tenant
        self.store = store
        self.spec = spec
        self.service = spec.service
        self.workspace = workspace
        self.workspace_hash = workspace_hash
        self.peer = peer
        self.state_path = state_path
        self.log_dir = log_dir
        self.on_event = on_event or (lambda _m: None)
        self.on_ready = on_ready or (lambda _u: None)
        self.host, self.port = host, port
        self.job_id = job_id
        self.bid_window_ms = bid_window_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.probe_interval_s = probe_interval_s
        self.replicas: dict[int, Replica] = {}
        self.replaced: list[dict[str, Any]] = []  # views of replicas lost and replaced
        self.failed_providers: list[str] = []
        self.restarts: dict[int, int] = {}
        self.gateway_url = ""
        self.totals = {"requests": 0, "retries": 0, "failed": 0, "no_replica": 0}
        self._stop = asyncio.Event()
        self._tokens: dict[str, tuple[str, int]] = {}
        self._rr = itertools.count()
        self._lease_lock = asyncio.Lock()  # one auction at a time: spread needs the others'
        self._announced = False
        self._session: aiohttp.ClientSession | None = None

    def stop(self) -> None:
        self._stop.set()

    # --- tokens ---------------------------------------------------------------------

    def token(self, lease_id: str, *, ttl_ms: int = TOKEN_TTL_MS) -> str:
        """This tenant's capability token for one lease, reissued at half its life."""
        now = self.tenant.clock()
        cached = self._tokens.get(lease_id)
        if cached is not None and cached[1] - now > ttl_ms // 2:
            return cached[0]
        exp = now + ttl_ms
        tok = capability.issue(
            self.tenant.identity,
            lease_id,
            exp,
            methods=("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"),
            sub="gateway",
        )
        self._tokens[lease_id] = (tok, exp)
        return tok

    # --- the whole serve ------------------------------------------------------------

    async def run(self) -> str:
        """Serve until stopped or every replica gave up; the final state, as a job's."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), auto_decompress=False
        )
        runner = web.AppRunner(self._gateway_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        self.gateway_url = f"http://{self.host}:{port}"
        self.on_event(f"gateway listening on {self.gateway_url}")
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write_state_loop())
                # A slot returns when we stop or when it gave up; the others keep serving.
                slots = [tg.create_task(self._keep(i)) for i in range(self.service.replicas)]
                await asyncio.gather(*slots)
                writer.cancel()
        finally:
            await runner.cleanup()
            await self._session.close()
            self._write_state()
        return "cancelled" if self._stop.is_set() else "failed"

    async def _keep(self, index: int) -> None:
        """Keep replica slot ``index`` served: lease, start, watch, replace."""
        generation, backoff_s = 0, 1.0
        while not self._stop.is_set():
            if generation > self.service.restarts:
                self.on_event(f"replica {index}: gave up after {generation} leases")
                return
            lease = await self._lease(index)
            if lease is None:  # nobody free yet: ask again later, the others keep serving
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)
                continue
            generation, backoff_s = generation + 1, 1.0
            health = ReplicaHealth(
                started_ms=self.tenant.clock(), ready_timeout_ms=self.service.ready_timeout_ms
            )
            replica = Replica(index, lease, health, generation)
            self.replicas[index] = replica
            self.on_event(
                f"replica {index}: leased {lease.model} on {lease.provider[:12]} ({lease.lease_id})"
            )
            try:
                await self._run_replica(replica)
            except MercatoError as e:
                health.lost(self.tenant.clock(), f"could not start: {e.reason}")
            finally:
                if self._stop.is_set():
                    health.stop(self.tenant.clock())
                await self._release(replica)
            if health.state is ReplicaState.LOST:
                self.replaced.append(replica.view())
                self.failed_providers.append(lease.provider)
                self.store.record_outcome(lease.provider, "failed")
                self.on_event(
                    f"replica {index} on {lease.provider[:12]} lost ({health.why}): replacing"
                )
            self.restarts[index] = generation

    async def _lease(self, index: int) -> LeaseRow | None:
        async with self._lease_lock:
            await self.tenant.refresh(self.peer)
            live = [
                r.lease.provider
                for i, r in self.replicas.items()
                if i != index and not r.health.final
            ]
            exclude = exclusions(live, self.failed_providers, self.service.spread)
            p = plan(
                self.spec,
                [a for a in self.tenant.adverts() if a.provider not in exclude],
                reputation=self.tenant.reputation(),
                now_ms=self.tenant.clock(),
            )
            if p.missing is not None:
                self.on_event(f"replica {index}: {p.missing}")
                return None
            auction = await self.tenant.auction(
                p.requirement,
                p.units,
                self.spec.budget.max_price or DEFAULT_MAX_PRICE,
                job_spec_hash=spec_hash(self.spec),
                workload="service",
                lease_ms=24 * 3_600_000,
                bid_window_ms=self.bid_window_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                exclude=exclude,
                k=len(p.candidates) or 8,
            )
            if len(auction.leases) != 1:
                for extra in auction.leases:
                    row = self.store.get_lease(extra.lease_id)
                    if row is not None:
                        with contextlib.suppress(MercatoError):
                            await self.tenant.release(row)
                self.on_event(f"replica {index}: no lease ({auction.failure or 'none'})")
                return None
            lease_id = auction.leases[0].lease_id
            if self.job_id is not None:
                self.store.set_lease_job(lease_id, self.job_id)
            return self.store.get_lease(lease_id)

    async def _run_replica(self, replica: Replica) -> None:
        """Start the service on the lease; return when it is lost or we stop."""
        lease = replica.lease
        client = TaskClient(self.tenant, lease)
        await client.upload(self.workspace, self.workspace_hash)
        task_id = f"{lease.lease_id[:50]}.serve"
        await client.assign(
            TaskAssign(
                lease_id=lease.lease_id,
                task_id=task_id,
                job_spec_hash=spec_hash(self.spec),
                workspace_hash=self.workspace_hash,
                command=list(self.service.command),
                env={SOCKET_ENV: self.service.listen.socket},
                timeout_ms=SERVICE_TIMEOUT_MS,
                max_output_bytes=self.spec.limits.max_output_bytes,
            )
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"replica{replica.index}.log"
        with log_path.open("a") as logf:

            def on_log(text: str) -> None:
                logf.write(text)
                logf.flush()

            follow = asyncio.ensure_future(client.follow(task_id, on_log))
            beat = asyncio.ensure_future(
                self.tenant.heartbeat_until_lost(lease, self.heartbeat_interval_ms)
            )
            probe = asyncio.ensure_future(self._probe_loop(replica))
            stop = asyncio.ensure_future(self._stop.wait())
            watched = {follow, beat, probe, stop}
            try:
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                now = self.tenant.clock()
                if stop in done:
                    with contextlib.suppress(MercatoError):
                        await client.cancel(task_id, "stopped by the tenant")
                elif follow in done:
                    try:
                        result = follow.result()
                        why = f"the service {result.state} (exit {result.exit_code})"
                    except MercatoError as e:
                        why = f"lost contact with the provider ({e.code})"
                    replica.health.lost(now, why)
                elif beat in done:
                    replica.health.lost(now, "the provider stopped answering heartbeats")
                    self.store.set_lease_state(lease.lease_id, LeaseState.LOST, now)
            finally:
                for f in watched:
                    f.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MercatoError):
                        await f

    async def _probe_loop(self, replica: Replica) -> None:
        """Probe the health path through the provider; return once the replica is LOST."""
        while True:
            ok, why = await self._probe(replica)
            state = replica.health.probe(ok, self.tenant.clock(), why)
            if state is ReplicaState.READY and not self._announced and self._all_ready():
                self._announced = True
                self.on_ready(self.gateway_url)
            if replica.health.final:
                return
            ready = state is ReplicaState.READY
            await asyncio.sleep(self.probe_interval_s * (4 if ready else 1))

    def _all_ready(self) -> bool:
        return len(self.replicas) == self.service.replicas and all(
            r.health.state is ReplicaState.READY for r in self.replicas.values()
        )

    async def _probe(self, replica: Replica) -> tuple[bool, str]:
        assert self._session is not None
        try:
            async with self._session.get(
                replica.url + self.service.health,
                headers={"Authorization": f"Mercato {self.token(replica.key)}"},
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            ) as r:
                await r.read()
                return 200 <= r.status < 300, f"health answered {r.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return False, f"health probe failed: {type(e).__name__}"

    async def _release(self, replica: Replica) -> None:
        row = self.store.get_lease(replica.lease.lease_id)
        if row is None or row.state != "active":
            return
        try:
            await self.tenant.release(row)
        except MercatoError as e:
            log.info("release of %s failed: %s", row.lease_id, e)
            lost = replica.health.state is ReplicaState.LOST
            self.store.set_lease_state(
                row.lease_id, LeaseState.LOST if lost else LeaseState.ENDED, self.tenant.clock()
            )

    # --- the gateway ----------------------------------------------------------------

    def _gateway_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _ready(self) -> list[Replica]:
        ready = [r for r in self.replicas.values() if r.health.state is ReplicaState.READY]
        if ready:
            shift = next(self._rr) % len(ready)
            ready = ready[shift:] + ready[:shift]
        return ready

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.totals["requests"] += 1
        body = await request.read()
        path = request.rel_url.raw_path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        tried: list[str] = []
        last_error = "no replica is ready"
        while True:
            ready = {r.key: r for r in self._ready()}
            key = pick(list(ready), {k: r.in_flight for k, r in ready.items()}, tried)
            if key is None:
                self.totals["failed" if tried else "no_replica"] += 1
                return web.json_response(
                    {"error": {"code": "unavailable", "reason": last_error}}, status=503
                )
            if tried:
                self.totals["retries"] += 1
            tried.append(key)
            replica = ready[key]
            replica.in_flight += 1
            started = time.monotonic()
            sent = True
            try:
                async with self._session.request(
                    request.method,
                    replica.url + path,
                    headers={**headers, "Authorization": f"Mercato {self.token(key)}"},
                    data=body,
                    allow_redirects=False,
                ) as answer:
                    payload = await answer.read()
                    status = answer.status
                    out_headers = [
                        (k, v) for k, v in answer.headers.items() if k.lower() not in _DROP
                    ]
            except aiohttp.ClientConnectorError as e:
                sent, status, last_error = False, 0, f"replica unreachable: {e}"
            except (aiohttp.ClientError, TimeoutError) as e:
                status, last_error = 0, f"replica failed: {type(e).__name__}"
            finally:
                replica.in_flight -= 1
            elapsed = (time.monotonic() - started) * 1000
            if status == 0 or (status in (502, 503, 504) and _provider_error(payload)):
                replica.observe(elapsed, ok=False)
                # Out of the rotation at once; probes bring it back if it was a blip.
                replica.health.probe(False, self.tenant.clock(), last_error)
                replica.health.probe(False, self.tenant.clock(), last_error)
                if status == 503:
                    sent = False  # the provider answered "no service running": not sent
                if status:
                    last_error = f"replica answered {status}"
                if retryable(request.method, sent):
                    continue
                self.totals["failed"] += 1
                return web.json_response(
                    {"error": {"code": "unavailable", "reason": last_error}}, status=502
                )
            replica.observe(elapsed, ok=status < 500)
            response = web.Response(status=status, body=payload)
            for k, v in out_headers:
                response.headers.add(k, v)
            return response

    # --- the state file ---------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """What ``mercato status`` shows of this serve."""
        return {
            "job_id": self.job_id,
            "gateway": self.gateway_url,
            "replicas_wanted": self.service.replicas,
            "ready": sum(1 for r in self.replicas.values() if r.health.state is ReplicaState.READY),
            "replicas": [self.replicas[i].view() for i in sorted(self.replicas)],
            "replaced": list(self.replaced),
            "failed_providers": list(self.failed_providers),
            "updated_ms": wall_clock_ms(),
            **self.totals,
        }

    def _write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.view(), indent=2))
        tmp.replace(self.state_path)

    async def _write_state_loop(self) -> None:
        while True:
            self._write_state()
            await asyncio.sleep(1.0)


def _provider_error(payload: bytes) -> bool:
    """Whether a 502/503/504 came from the provider (a Mercato error), not the service."""
    try:
        data = json.loads(payload)
    except ValueError:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("error"), dict)
        and data["error"].get("code") in ("busy", "peer_unavailable", "peer_timeout", "not_found")
    )


# --- `mercato serve` ------------------------------------------------------------------


def serve(path: Path, *, peer: str, host: str, port: int, as_json: bool) -> str:
    """Run ``mercato serve JOB.yaml`` until cancelled; the job's final state.

    The job is stored like any other (``mercato jobs``, ``cancel``, ``status``); the
    gateway's address is printed on stdout once every replica is ready (a JSON line
    with ``--json``) and kept in ``serve.json`` in the job's directory.
    """
    import secrets
    import signal
    import sys

    from node.net.transport import tenant_transport
    from node.store.job_store import JobRow, JobStore
    from node.tenant import jobs
    from node.workspace import pack

    spec, text = jobs.load_job_file(path)
    if spec.service is None:
        raise MercatoError(f"{path}: `mercato serve` runs kind: service jobs (use submit)")
    ws = pack(path.resolve().parent)
    home = jobs.tenant_home()
    job_id = jobs.new_job_id(spec)
    d = jobs.job_dir(home, job_id)
    d.mkdir(parents=True, exist_ok=True)
    archive = d / "workspace.tar"
    archive.write_bytes(ws.data)
    now = wall_clock_ms()

    def event(message: str) -> None:
        print(f"[{job_id}] {message}", file=sys.stderr, flush=True)

    def ready(url: str) -> None:
        if as_json:
            print(json.dumps({"job_id": job_id, "gateway": url}), flush=True)
        else:
            print(f"serving {spec.name} at {url} (job {job_id})", flush=True)

    with Store(home.store_path) as store, jobs.runner_lock(d / "runner.lock"):
        job_store = JobStore(store)
        job_store.create_job(
            JobRow(
                job_id=job_id,
                name=spec.name,
                spec_yaml=text,
                spec_hash=spec_hash(spec),
                workspace_hash=ws.sha256,
                workspace_path=str(archive),
                state=JobState.RUNNING,
                detail="",
                seed=secrets.randbelow(2**31),
                created_ms=now,
                updated_ms=now,
            )
        )
        event(f"{ws.files} files ({len(ws.data)} bytes) from {path.parent}")

        async def main() -> str:
            transport = tenant_transport(peer)
            tenant = Tenant(home.load_or_create_identity(), store, transport)
            runner = ServeRunner(
                tenant,
                store,
                spec,
                ws.data,
                ws.sha256,
                peer=peer,
                state_path=d / "serve.json",
                log_dir=d / "logs",
                on_event=event,
                on_ready=ready,
                host=host,
                port=port,
                job_id=job_id,
            )

            async def watch_cancel() -> None:
                while not runner._stop.is_set():
                    await asyncio.sleep(1.0)
                    current = job_store.get_job(job_id)
                    if current is not None and current.state == "cancelled":
                        runner.stop()

            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, runner.stop)
            loop.add_signal_handler(signal.SIGTERM, runner.stop)
            try:
                async with asyncio.TaskGroup() as tg:
                    watcher = tg.create_task(watch_cancel())
                    state = await runner.run()
                    watcher.cancel()
            finally:
                await tenant.close()
                await transport.close()
            return state

        state = asyncio.run(main())
        job_store.set_job_state(
            job_id,
            JobState.CANCELLED if state == "cancelled" else JobState.FAILED,
            wall_clock_ms(),
            "stopped by the tenant" if state == "cancelled" else "every replica gave up",
        )
        event(f"stopped: {state}; every lease released")
        return state


def serve_view(job_dir: Path) -> dict[str, Any] | None:
    """The last ``serve.json`` of a served job (None for other jobs)."""
    try:
        data: dict[str, Any] = json.loads((job_dir / "serve.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def issue_tokens(
    job_dir: Path,
    identity: Any,
    *,
    ttl_ms: int,
    methods: tuple[str, ...],
    path: str,
    sub: str,
    now_ms: int,
) -> list[dict[str, Any]]:
    """Tokens for someone the tenant authorises: one per live replica of a served job.

    Each opens one replica's ``/svc/<lease_id>/`` on its provider, for ``methods``
    under ``path``, until ``now_ms + ttl_ms``; a replacement replica needs a new one.
    """
    view = serve_view(job_dir)
    if view is None:
        raise MercatoError(f"{job_dir.name} is not a served job (no serve.json)")
    out = []
    for r in view["replicas"]:
        if r["state"] in ("lost", "stopped"):
            continue
        token = capability.issue(
            identity, r["lease_id"], now_ms + ttl_ms, methods=methods, path=path, sub=sub
        )
        out.append({"replica": r["replica"], "url": r["url"], "token": token})
    return out
