"""The provider carries DiLoCo outer steps between its trials and their tenant.

A trial has no network: a DiLoCo worker leaves its blob in its work directory
(``.mercato-sync/out-<seq>.bin``, see mercato_trial.diloco) and waits for
``in-<seq>.bin``. The tenant starts every exchange (it may sit behind NAT): it
long-polls ``sync_query`` and gets the worker's blob in ``sync_chunk`` replies, then
sends the new global parameters as ``sync_chunk`` requests, which land in the mailbox
only once their SHA-256 matches ``blob_hash``.

The work directory belongs to untrusted code, so every file is opened relative to
the mailbox's directory descriptor with ``O_NOFOLLOW``: a trial that plants a link
to the provider's key gets ``bad_blob``, never the key's bytes to its tenant. Sizes
are capped before anything is read or buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from node.net.node import Node
from node.provider.work import Task, WorkService
from protocol.envelope import Envelope
from protocol.errors import (
    BadBlobError,
    NotFoundError,
    TooLargeError,
    UnexpectedMessageError,
)
from protocol.messages import Body, SyncChunk, SyncQuery, SyncStatus

log = logging.getLogger("mercato.sync")

#: Directory of the mailbox inside a trial's work directory (mercato_trial.diloco).
SYNC_DIR = ".mercato-sync"
#: Largest blob this provider carries either way (operator-visible: docs/operators.md).
DEFAULT_MAX_BLOB_BYTES = 256 << 20
CHUNK = 512 * 1024
POLL_S = 0.05


@runtime_checkable
class HasWorkDir(Protocol):
    def work_dir(self, task_id: str) -> Path: ...


@dataclass
class _Outgoing:
    """A worker's blob read once, hashed, held until the tenant has taken it."""

    data: bytes
    digest: str


@dataclass
class _Incoming:
    """Global parameters arriving for a worker, buffered until complete and verified."""

    total: int
    digest: str
    data: bytearray = field(default_factory=bytearray)


class SyncService:
    """Handlers for ``sync_query`` and ``sync_chunk`` (docs/protocol.md, section 7)."""

    def __init__(
        self,
        node: Node,
        work: WorkService,
        executor: object,
        *,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    ) -> None:
        self.node = node
        self.work = work
        self.executor = executor
        self.max_blob_bytes = max_blob_bytes
        self._out: dict[tuple[str, str, int], _Outgoing] = {}
        self._in: dict[tuple[str, str, int], _Incoming] = {}
        node.handlers.update({SyncQuery.TYPE: self._on_query, SyncChunk.TYPE: self._on_chunk})
        work.provider.on_lease_end.append(self._lease_ended)

    def _lease_ended(self, lease: object) -> None:
        """Drop the blobs of tasks that are gone or under the lease that ended."""
        lease_id = getattr(lease, "lease_id", None)
        for d in (self._out, self._in):
            for key in list(d):
                task = self.work.tasks.get(key[:2])
                if task is None or task.assign.lease_id == lease_id:
                    del d[key]

    def _task(self, tenant: str, lease_id: str, task_id: str) -> Task:
        self.work._lease(lease_id, tenant)  # not found / not active, as for tasks
        task = self.work.tasks.get((tenant, task_id))
        if task is None or task.assign.lease_id != lease_id:
            raise NotFoundError(f"no task {task_id} under lease {lease_id}")
        return task

    def _mailbox(self, task: Task) -> Path:
        ex = self.executor
        if not isinstance(ex, HasWorkDir):
            raise UnexpectedMessageError("this provider's executor cannot carry outer steps")
        return ex.work_dir(task.run_id) / SYNC_DIR

    def _forget(self, tenant: str, task_id: str, below: int) -> None:
        """Drop blobs of this worker older than ``below``: the worker has moved on."""
        for key in [k for k in self._out if k[:2] == (tenant, task_id) and k[2] < below]:
            del self._out[key]
        for key in [k for k in self._in if k[:2] == (tenant, task_id) and k[2] < below]:
            del self._in[key]

    # --- worker -> tenant -------------------------------------------------------

    def _read(self, box: Path, seq: int) -> bytes | None:
        """The worker's blob ``seq``, read without following links; None if not there yet."""
        try:
            dfd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: the mailbox itself is a link
            raise BadBlobError(f"the worker's mailbox is not a directory: {e.strerror}") from e
        try:
            try:
                fd = os.open(
                    f"out-{seq}.bin", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd
                )
            except FileNotFoundError:
                return None
            except OSError as e:
                raise BadBlobError(f"the worker's blob {seq} is not a regular file") from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise BadBlobError(f"the worker's blob {seq} is not a regular file")
                if st.st_size > self.max_blob_bytes:
                    raise TooLargeError(
                        f"the worker's blob of {st.st_size} bytes exceeds this provider's "
                        f"{self.max_blob_bytes}"
                    )
                with os.fdopen(fd, "rb", closefd=False) as f:
                    data = f.read(self.max_blob_bytes + 1)
                if len(data) > self.max_blob_bytes:
                    raise TooLargeError("the worker's blob grew past this provider's cap")
                return data
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    async def _on_query(self, env: Envelope) -> Body | bytes | None:
        q = env.body
        assert isinstance(q, SyncQuery)
        task = self._task(env.sender, q.lease_id, q.task_id)
        key = (env.sender, q.task_id, q.seq)
        out = self._out.get(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + q.wait_ms / 1000
        while out is None:
            data = await asyncio.to_thread(self._read, self._mailbox(task), q.seq)
            if data is not None:
                if not data:
                    raise BadBlobError(f"the worker's blob {q.seq} is empty")
                out = _Outgoing(data, hashlib.sha256(data).hexdigest())
                self._forget(env.sender, q.task_id, q.seq)
                self._out[key] = out
                break
            if task.result is not None or loop.time() >= deadline:
                return SyncStatus(
                    lease_id=q.lease_id, task_id=q.task_id, seq=q.seq, received=0, complete=False
                )
            await asyncio.sleep(POLL_S)
        total = len(out.data)
        offset = min(q.offset, total - 1)
        return SyncChunk(
            lease_id=q.lease_id,
            task_id=q.task_id,
            seq=q.seq,
            blob_hash=out.digest,
            offset=offset,
            total_size=total,
            data=out.data[offset : offset + CHUNK],
        )

    # --- tenant -> worker -------------------------------------------------------

    async def _on_chunk(self, env: Envelope) -> Body | bytes | None:
        c = env.body
        assert isinstance(c, SyncChunk)
        task = self._task(env.sender, c.lease_id, c.task_id)
        if task.result is not None:
            raise UnexpectedMessageError(f"task {c.task_id} has ended")
        if c.total_size > self.max_blob_bytes:
            raise TooLargeError(
                f"a blob of {c.total_size} bytes exceeds this provider's {self.max_blob_bytes}"
            )
        key = (env.sender, c.task_id, c.seq)

        def status(received: int, complete: bool) -> SyncStatus:
            return SyncStatus(
                lease_id=c.lease_id,
                task_id=c.task_id,
                seq=c.seq,
                received=received,
                complete=complete,
            )

        inc = self._in.get(key)
        if inc is None or inc.total != c.total_size or inc.digest != c.blob_hash:
            if c.offset != 0:
                return status(0, False)
            inc = self._in[key] = _Incoming(c.total_size, c.blob_hash)
        if c.offset == len(inc.data):
            inc.data += c.data
        if len(inc.data) < inc.total:
            return status(len(inc.data), False)
        del self._in[key]
        data = bytes(inc.data)
        if hashlib.sha256(data).hexdigest() != c.blob_hash:
            raise BadBlobError(f"blob {c.seq} for {c.task_id} does not match its blob_hash")
        await asyncio.to_thread(self._write, self._mailbox(task), c.seq, data)
        self._out.pop(key, None)  # the worker's blob has been answered
        return status(len(data), True)

    def _write(self, box: Path, seq: int, data: bytes) -> None:
        """Write ``in-<seq>.bin`` atomically, never through a link the trial planted."""
        try:
            dfd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise BadBlobError(f"the worker's mailbox is gone or not a directory: {e}") from e
        tmp = f".in-{seq}.{os.getpid()}.tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd
            )
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, f"in-{seq}.bin", src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
