"""Tenant runners for training (one gang, torchrun) and service (kept up) jobs.

Training: the plan's requirement asks for ``world_size`` devices as ONE unit on one
provider (``gang``), with at least the interconnect bandwidth the classification
requires, so a bandwidth-bound job is never split across providers, however cheap a
split would be. The provider launches ``torchrun --standalone --nproc_per_node=N`` in
the same sandbox as trials; its log and final metrics come back as a trial's do. A
failed run is retried on another provider up to ``limits.retries``.

Service: one unit placed preferring the best uptime record (reputation); the task is
long-polled as its health check, restarted (on another provider if its lease was lost)
when it dies, up to ``service.restarts``, and stopped by ``mercato cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from market.jobspec import JobSpec, spec_hash
from market.lifecycle import RUN_OUTCOMES, LeaseState, TrialState
from market.placement import Plan, plan
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from protocol.errors import MercatoError
from protocol.messages import TaskAssign, TaskResult

log = logging.getLogger("mercato.gang")

DEFAULT_MAX_PRICE = 10_000_000
SERVICE_TIMEOUT_MS = 7 * 24 * 3_600_000


@dataclass
class RunReport:
    """What a training or service job came to."""

    state: TrialState  # one of RUN_OUTCOMES
    attempts: int = 0
    provider: str | None = None
    lease: LeaseRow | None = None
    result: TaskResult | None = None
    message: str = ""
    providers_tried: list[str] = field(default_factory=list)
    spend: int = 0

    def __post_init__(self) -> None:
        if self.state not in RUN_OUTCOMES:
            raise ValueError(f"a run does not end {self.state}")


def torchrun_command(spec: JobSpec) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N <command>`` (one node, N processes)."""
    t = spec.training
    assert t is not None
    cmd = list(t.command)
    if cmd[0] in ("python", "python3", "${interpreter}"):
        cmd = cmd[1:]
    return ["torchrun", "--standalone", f"--nproc_per_node={t.world_size}", *cmd]


class GangRunner:
    """Lease one gang, run one long task on it, retry or restart elsewhere on failure."""

    def __init__(
        self,
        tenant: Tenant,
        store: Store,
        spec: JobSpec,
        workspace: bytes,
        workspace_hash: str,
        *,
        peer: str,
        log_path: Path,
        on_event: Callable[[str], None] | None = None,
        bid_window_ms: int = 1_500,
        heartbeat_interval_ms: int = 1_000,
        job_id: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.tenant = tenant
        self.store = store
        self.spec = spec
        self.workspace = workspace
        self.workspace_hash = workspace_hash
        self.peer = peer
        self.log_path = log_path
        self.on_event = on_event or (lambda _m: None)
        self.bid_window_ms = bid_window_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._cancelled = asyncio.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    async def plan(self) -> Plan:
        await self.tenant.refresh(self.peer)
        return plan(
            self.spec,
            self.tenant.adverts(),
            reputation=self.tenant.reputation(),
            now_ms=self.tenant.clock(),
        )

    async def run(self) -> RunReport:
        report = RunReport(state=TrialState.FAILED)
        budget = (
            self.spec.service.restarts
            if self.spec.service is not None
            else self.spec.limits.retries
        )
        tried: list[str] = []
        while report.attempts <= budget and not self._cancelled.is_set():
            p = await self.plan()
            if p.missing is not None:
                report.message = p.missing
                self.on_event(p.missing)
                return report
            lease = await self._lease(p, exclude=tried)
            if lease is None:
                report.message = "no provider accepted the order"
                return report
            report.attempts += 1
            report.provider, report.lease = lease.provider, lease
            tried.append(lease.provider)
            report.providers_tried = list(tried)
            self.on_event(
                f"leased {lease.units}x{len(lease.devices)} {lease.model} "
                f"on {lease.provider[:12]} ({lease.lease_id})"
            )
            try:
                result = await self._run_on(lease, report.attempts)
            finally:
                with contextlib.suppress(MercatoError):
                    receipt = await self.tenant.release(lease)
                    report.spend += receipt.amount
            report.result = result
            if self._cancelled.is_set():
                report.state = TrialState.CANCELLED
                return report
            succeeded = result is not None and result.state == TrialState.SUCCEEDED.value
            if succeeded and self.spec.kind == "training":
                report.state = TrialState.SUCCEEDED
                return report
            why = "lease lost" if result is None else f"{result.state} (exit {result.exit_code})"
            self.on_event(f"attempt {report.attempts} on {lease.provider[:12]}: {why}")
            report.message = why
        return report

    async def _lease(self, p: Plan, exclude: list[str]) -> LeaseRow | None:
        max_price = self.spec.budget.max_price or DEFAULT_MAX_PRICE
        auction = await self.tenant.auction(
            p.requirement,
            p.units,
            max_price,
            job_spec_hash=spec_hash(self.spec),
            workload="training" if self.spec.kind == "training" else "service",
            lease_ms=24 * 3_600_000,
            bid_window_ms=self.bid_window_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            exclude=exclude,
            k=len(p.candidates) or 8,
        )
        if not auction.leases:
            self.on_event(f"no lease: {auction.failure or auction.explanation}")
            return None
        if len(auction.leases) != 1:  # a gang is one lease; anything else is a bug
            raise MercatoError("a gang order produced several leases")
        lease_id = auction.leases[0].lease_id
        if self.job_id is not None:
            self.store.set_lease_job(lease_id, self.job_id)
        return self.store.get_lease(lease_id)

    async def _run_on(self, lease: LeaseRow, attempt: int) -> TaskResult | None:
        client = TaskClient(self.tenant, lease)
        await client.upload(self.workspace, self.workspace_hash)
        if self.spec.kind == "training":
            command, timeout = torchrun_command(self.spec), self.spec.limits.trial_timeout_ms
        else:
            assert self.spec.service is not None
            command, timeout = list(self.spec.service.command), SERVICE_TIMEOUT_MS
        task_id = f"{lease.lease_id[:50]}.run{attempt}"
        await client.assign(
            TaskAssign(
                lease_id=lease.lease_id,
                task_id=task_id,
                job_spec_hash=spec_hash(self.spec),
                workspace_hash=self.workspace_hash,
                command=command,
                timeout_ms=timeout,
                max_output_bytes=self.spec.limits.max_output_bytes,
                network=self.spec.limits.network,
            )
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as logf:

            def on_log(text: str) -> None:
                logf.write(text)
                logf.flush()

            # Owned here: the first to finish decides, the finally block ends the others.
            follow = asyncio.create_task(client.follow(task_id, on_log))
            beat = asyncio.create_task(
                self.tenant.heartbeat_until_lost(lease, self.heartbeat_interval_ms)
            )
            stop = asyncio.create_task(self._cancelled.wait())
            try:
                done, _ = await asyncio.wait(
                    {follow, beat, stop}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    with contextlib.suppress(MercatoError):
                        await client.cancel(task_id, "cancelled by the tenant")
                    with contextlib.suppress(MercatoError, asyncio.TimeoutError):
                        return await asyncio.wait_for(follow, 15)
                    return None
                if follow in done:
                    try:
                        return follow.result()
                    except MercatoError as e:
                        log.warning("lost the task on %s: %s", lease.provider[:8], e)
                        self.store.record_outcome(lease.provider, "failed")
                        return None
                # Heartbeats stopped: the provider is gone.
                self.store.record_outcome(lease.provider, "failed")
                self.store.set_lease_state(lease.lease_id, LeaseState.LOST, self.tenant.clock())
                return None
            finally:
                for f in (follow, beat, stop):
                    f.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MercatoError):
                        await f
