"""Tenant side of running one task under a lease: upload, assign, follow, cancel.

Every exchange is a request the tenant starts (it may sit behind NAT); a task is
followed by long-polling ``task_query`` until the provider's signed ``task_result``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from node.store.node_store import LeaseRow
from node.tenant.client import Tenant
from protocol.errors import BusyError, MercatoError, RateLimitedError
from protocol.messages import (
    Body,
    Cancel,
    TaskAssign,
    TaskQuery,
    TaskResult,
    TaskStatus,
    WorkspaceChunk,
    WorkspaceStatus,
)

CHUNK = 512 * 1024
UNPACK_POLL_S = 0.25
#: First and longest wait after a provider answers a query with 429 (rate_limited).
RATE_LIMIT_BACKOFF_S = 0.1
MAX_RATE_LIMIT_BACKOFF_S = 2.0


class TaskClientError(MercatoError):
    code = "task_client_error"


class TaskClient:
    """Talks to the provider of one lease about its tasks."""

    def __init__(self, tenant: Tenant, lease: LeaseRow) -> None:
        self.tenant = tenant
        self.lease = lease
        self._timeouts: dict[str, int] = {}  # task_id -> timeout_ms, for queued tasks
        #: The signed envelope of the last reply (a task_result kept as evidence).
        self.last_envelope: bytes = b""

    async def send(self, body: Body, timeout_s: float | None = None) -> Any:
        """Request/response with the lease's provider; the reply must be signed by it."""
        reply = await self.tenant.node.request(
            self.tenant.peer_of(self.lease), body, timeout_s=timeout_s
        )
        if reply is None:
            return None
        if reply.sender != self.lease.provider:
            raise TaskClientError("reply signed by another node than the lease's provider")
        self.last_envelope = reply.raw
        return reply.body

    async def upload(self, data: bytes, digest: str) -> None:
        """Send the workspace unless the provider holds it already (resumes a partial one)."""
        total = len(data)
        status = await self.send(
            WorkspaceChunk(
                lease_id=self.lease.lease_id,
                workspace_hash=digest,
                offset=0,
                total_size=total,
                data=b"",
            )
        )
        while isinstance(status, WorkspaceStatus) and not status.complete:
            off = status.received
            if off >= total:  # all there; the provider is still unpacking it: ask again
                await asyncio.sleep(UNPACK_POLL_S)
            status = await self.send(
                WorkspaceChunk(
                    lease_id=self.lease.lease_id,
                    workspace_hash=digest,
                    offset=off,
                    total_size=total,
                    data=data[off : off + CHUNK],
                )
            )

    async def assign(self, assign: TaskAssign) -> None:
        while True:
            try:
                await self.send(assign)
            except BusyError:
                await asyncio.sleep(0.2)
            else:
                # From here the lease is paid only while this task's result can be on time.
                self.tenant.task_assigned(self.lease, assign.task_id, assign.timeout_ms)
                self._timeouts[assign.task_id] = assign.timeout_ms
                return

    async def follow(
        self,
        task_id: str,
        on_log: Callable[[str], None] | None = None,
        wait_ms: int = 10_000,
        on_status: Callable[[TaskStatus], None] | None = None,
    ) -> TaskResult:
        """Long-poll a task to its signed result, passing its log on as it arrives.

        ``on_status`` sees every status: whether the provider runs the task or still
        queues it (the sweep starts its own clock on a trial when it first runs)."""
        offset = 0
        backoff = RATE_LIMIT_BACKOFF_S
        while True:
            try:
                body = await self.send(
                    TaskQuery(
                        lease_id=self.lease.lease_id,
                        task_id=task_id,
                        log_offset=offset,
                        wait_ms=wait_ms,
                    ),
                    timeout_s=wait_ms / 1000 + 10,
                )
            except RateLimitedError:
                # 429 asks for "later", and a query is safe to repeat: slow down.
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_RATE_LIMIT_BACKOFF_S)
                continue
            backoff = RATE_LIMIT_BACKOFF_S
            if isinstance(body, TaskResult):
                if body.task_id != task_id or body.lease_id != self.lease.lease_id:
                    raise TaskClientError("result names another task")
                self.tenant.task_finished(self.lease, task_id)
                return body
            if not isinstance(body, TaskStatus):
                raise TaskClientError(f"unexpected answer to task_query: {type(body).__name__}")
            if body.state == "queued" and task_id in self._timeouts:
                self.tenant.task_queued(self.lease, task_id, self._timeouts[task_id])
            if on_status is not None:
                on_status(body)
            if body.log and on_log is not None:
                on_log(body.log)
            offset = body.log_offset

    async def cancel(self, task_id: str | None, reason: str) -> None:
        await self.send(Cancel(lease_id=self.lease.lease_id, task_id=task_id, reason=reason))
