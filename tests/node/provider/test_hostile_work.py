"""Hostile trials and hostile workspaces against a real provider daemon (hostile-input suite).

A provider sells to strangers: whatever a trial prints and whatever a workspace holds,
the task ends with a signed result, the daemon keeps answering, nothing leaks, and one
tenant never sees or squats on another's workspaces or task ids. Every test here runs a
real daemon on loopback port 0, real tenants over HTTP, and trials in the real bwrap
sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from market.lifecycle import LeaseState
from node.config import NodeConfig, NodeSection, SandboxSection, WorkspacesSection
from node.daemon import Daemon
from node.net.ratelimit import RateLimiter
from node.net.transport import HttpTransport
from node.provider.executor import (
    MAX_METRIC_RECORDS_PER_S,
    OutputCollector,
    TrialOutcome,
    TrialSpec,
)
from node.provider.inventory import DeviceDecl
from node.provider.sandbox import READY_DIR, SandboxExecutor, probe_bwrap
from node.provider.work import STATUS_EVERY_S, WorkService
from node.store.node_store import LeaseRow, Store
from node.tenant.client import Tenant
from node.tenant.taskclient import TaskClient
from node.workspace import pack
from protocol.errors import BusyError, MercatoError, NotFoundError
from protocol.identity import Identity
from protocol.messages import Requirement, TaskAssign, TaskResult, WorkspaceChunk

pytestmark = pytest.mark.skipif(not probe_bwrap().ok, reason="needs bubblewrap")

SPEC = "ab" * 32


def make_config(home: Path, workspaces: dict[str, Any] | None = None, **sandbox: Any) -> NodeConfig:
    return NodeConfig(
        node=NodeSection(listen_port=0, home=home),
        sandbox=SandboxSection(**sandbox),
        workspaces=WorkspacesSection(**(workspaces or {})),
        devices=[DeviceDecl(model="RTX-4090", count=4, price_floor=350_000, simulated=True)],
        detect_gpus=False,
    )


@dataclass
class Buyer:
    """A tenant with a lease of ``units`` devices on the provider."""

    tenant: Tenant
    lease: LeaseRow
    client: TaskClient

    @property
    def node_id(self) -> str:
        return self.tenant.node.identity.node_id


@dataclass
class Market:
    daemon: Daemon
    transport: HttpTransport
    tmp: Path
    stores: list[Store]
    beats: list[asyncio.Task[None]]

    @property
    def work(self) -> WorkService:
        work = self.daemon.work
        assert work is not None
        return work

    async def buyer(self, units: int = 1, same_as: Buyer | None = None) -> Buyer:
        """A new tenant with a lease, or one more lease for the tenant of ``same_as``."""
        if same_as is None:
            store = Store(self.tmp / f"tenant{len(self.stores)}.sqlite")
            self.stores.append(store)
            tenant = Tenant(Identity.generate(), store, self.transport)
        else:
            tenant, store = same_as.tenant, same_as.tenant.store
        held = {lease.lease_id for lease in store.list_leases(LeaseState.ACTIVE)}
        await tenant.refresh(self.daemon.address)
        report = await tenant.auction(Requirement(kind="gpu"), units, 1_000_000, job_spec_hash=SPEC)
        assert [x.units for x in report.leases] == [units], report.failure
        (lease,) = [x for x in store.list_leases(LeaseState.ACTIVE) if x.lease_id not in held]
        self.beats.append(asyncio.create_task(self._beat(tenant, lease)))
        return Buyer(tenant, lease, TaskClient(tenant, lease))

    @staticmethod
    async def _beat(tenant: Tenant, lease: LeaseRow) -> None:
        """Keep the lease alive as a tenant's sweep does (every 2 s, the default)."""
        seq = 0
        while True:
            await asyncio.sleep(1.0)
            seq += 1
            with contextlib.suppress(MercatoError):
                await tenant.heartbeat(lease, seq)


async def start_market(
    tmp: Path, workspaces: dict[str, Any] | None = None, **sandbox: Any
) -> Market:
    daemon = await Daemon.start(make_config(tmp / "provider", workspaces, **sandbox))
    return Market(daemon, HttpTransport(), tmp, [], [])


async def stop_market(market: Market) -> None:
    for beat in market.beats:
        beat.cancel()
    await asyncio.gather(*market.beats, return_exceptions=True)
    await market.transport.close()
    await market.daemon.close()
    for store in market.stores:
        store.close()


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    m = await start_market(tmp_path)
    try:
        yield m
    finally:
        await stop_market(m)


def workspace(tmp: Path, files: dict[str, str] | None = None) -> tuple[bytes, str]:
    root = tmp / f"ws-{time.monotonic_ns()}"
    root.mkdir()
    for name, text in (files or {"README": "hi\n"}).items():
        (root / name).write_text(text)
    ws = pack(root)
    return ws.data, ws.sha256


def assign(buyer: Buyer, digest: str, task_id: str, code: str, **kw: Any) -> TaskAssign:
    return TaskAssign(
        lease_id=buyer.lease.lease_id,
        task_id=task_id,
        job_spec_hash=SPEC,
        workspace_hash=digest,
        command=[sys.executable, "-c", code],
        timeout_ms=kw.pop("timeout_ms", 60_000),
        **kw,
    )


async def run_trial(
    buyer: Buyer, tmp: Path, task_id: str, code: str, **kw: Any
) -> tuple[TaskResult, str]:
    data, digest = workspace(tmp)
    await buyer.client.upload(data, digest)
    await buyer.client.assign(assign(buyer, digest, task_id, code, **kw))
    logs: list[str] = []
    result = await asyncio.wait_for(buyer.client.follow(task_id, logs.append, 2_000), 60)
    return result, "".join(logs)


# --- hostile trial output ------------------------------------------------------------

HOSTILE_LINES = {
    "nan": '{"loss": NaN}',
    "infinity": '{"loss": Infinity}',
    "minus_infinity": '{"loss": -Infinity}',
    "int_past_u64": '{"loss": 18446744073709551616}',
    "int_past_i64": '{"loss": 9223372036854775808}',
    "name_too_long": json.dumps({"l" * 65: 1.0}),
    "empty_name": '{"": 1.0}',
}


class TestHostileTrialOutput:
    @pytest.mark.parametrize("kind", sorted(HOSTILE_LINES))
    async def test_a_hostile_metric_line_never_wedges_the_task(
        self, market: Market, tmp_path: Path, kind: str
    ) -> None:
        """The bad value is dropped with a reason; the task ends and its directory goes."""
        buyer = await market.buyer()
        line = HOSTILE_LINES[kind]
        code = (
            f"import time; print({line!r}, flush=True); time.sleep(0.5); "
            "print('{\"acc\": 0.5}', flush=True)"
        )
        result, log = await run_trial(buyer, tmp_path, "t-hostile", code)
        assert result.state == "succeeded", log
        assert result.metrics == {"acc": 0.5}
        assert "[mercato] dropped 1 metric value" in log, log
        sandbox = market.daemon.home.path / "sandbox" / "t-hostile"
        for _ in range(100):  # removed off the event loop right after the result
            if not sandbox.exists():
                break
            await asyncio.sleep(0.05)
        assert not sandbox.exists()
        # The lease is free for the next task, and the provider bills no idle task.
        assert next(iter(market.work.tasks.values())).state == "succeeded"

    async def test_a_flood_of_empty_records_leaves_healthz_answering(
        self, market: Market, tmp_path: Path
    ) -> None:
        """Two trials print ``{}`` as fast as they can; the provider keeps answering."""
        buyer = await market.buyer(units=4)
        data, digest = workspace(tmp_path)
        await buyer.client.upload(data, digest)
        code = "import sys\nwhile True:\n    sys.stdout.write('{}\\n' * 20000)"
        follows = []
        for task_id in ("flood-a", "flood-b", "flood-c", "flood-d"):
            await buyer.client.assign(assign(buyer, digest, task_id, code, timeout_ms=6_000))
            follows.append(asyncio.ensure_future(buyer.client.follow(task_id, wait_ms=1_000)))
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1.0)  # every trial is flooding by now
            for _ in range(20):
                # Generous: an idle provider answers in milliseconds; the flood used to
                # hold its event loop for seconds.
                timeout = aiohttp.ClientTimeout(total=1.5)
                async with http.get(f"{market.daemon.address}/healthz", timeout=timeout) as r:
                    assert r.status == 200
                await asyncio.sleep(0.1)
        results = await asyncio.wait_for(asyncio.gather(*follows), 60)
        assert {r.state for r in results} == {"timed_out"}
        assert all(len(r.metrics) == 0 for r in results)

    async def test_a_chatty_trial_does_not_drive_its_tenant_into_the_rate_limit(
        self, market: Market, tmp_path: Path
    ) -> None:
        """New output is coalesced per task: a trial printing without pause gets a
        status at most every STATUS_EVERY_S, so the tenant's long poll stays far below
        the provider's per-peer rate limit (it once polled back to back into it)."""
        buyer = await market.buyer()
        data, digest = workspace(tmp_path)
        await buyer.client.upload(data, digest)
        # A line every millisecond: the tenant keeps up, so every line could answer a poll.
        code = "import time\nwhile True:\n    print('x' * 100, flush=True); time.sleep(0.001)"
        await buyer.client.assign(assign(buyer, digest, "chatty", code, timeout_ms=3_000))
        statuses = 0

        def count(_: object) -> None:
            nonlocal statuses
            statuses += 1

        result = await asyncio.wait_for(
            buyer.client.follow("chatty", wait_ms=1_000, on_status=count), 60
        )
        assert result.state == "timed_out"
        # About 3 s of output at most 10 statuses a second, plus the start.
        assert statuses <= 3 / STATUS_EVERY_S + 5, statuses

    async def test_a_rate_limited_tenant_slows_down_and_still_gets_its_result(
        self, market: Market, tmp_path: Path
    ) -> None:
        """A 429 on a long poll means "later", not "failed": the query is repeated."""
        buyer = await market.buyer()
        data, digest = workspace(tmp_path)
        await buyer.client.upload(data, digest)
        code = "import time\nfor i in range(30):\n    print(i, flush=True); time.sleep(0.05)"
        await buyer.client.assign(assign(buyer, digest, "limited", code))
        # From now on a provider far stricter than the default.
        market.daemon.node.limiter = RateLimiter(5.0, 5)
        logs: list[str] = []
        result = await asyncio.wait_for(buyer.client.follow("limited", logs.append, 1_000), 60)
        assert result.state == "succeeded"
        assert "".join(logs).split() == [str(i) for i in range(30)]

    async def test_a_trial_printing_endless_new_keys_is_capped(
        self, market: Market, tmp_path: Path
    ) -> None:
        """100,000 distinct names: the provider keeps 256 and says it dropped the rest."""
        buyer = await market.buyer()
        code = (
            "import json, time\n"
            "for i in range(0, 100_000, 500):\n"
            "    print(json.dumps({f'k{j}': j for j in range(i, i + 500)}), flush=True)\n"
            "    time.sleep(0.001)\n"
            "print('done', flush=True)\n"
            "time.sleep(1)\n"
        )
        data, digest = workspace(tmp_path)
        await buyer.client.upload(data, digest)
        await buyer.client.assign(assign(buyer, digest, "keys", code))
        held = 0

        async def watch() -> None:
            nonlocal held
            while True:
                held = max(held, len(market.work.tasks[(buyer.node_id, "keys")].metrics))
                await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        logs: list[str] = []
        try:
            result = await asyncio.wait_for(buyer.client.follow("keys", logs.append, 1_000), 60)
        finally:
            watcher.cancel()
        log = "".join(logs)
        assert result.state == "succeeded"
        assert len(result.metrics) == 256
        assert 0 < held <= 256
        assert "too_many_keys" in log, log[-500:]

    async def test_a_result_that_cannot_be_built_fails_the_task_and_cleans_up(
        self, market: Market, tmp_path: Path
    ) -> None:
        """Defence in depth: a backend that hands back an invalid outcome never wedges a task.

        ``NaNBackend`` is the real bwrap executor whose outcome then carries a NaN
        metric, as a third-party backend that skipped the OutputCollector would.
        """
        real = market.work.executor
        assert isinstance(real, SandboxExecutor)

        class NaNBackend(SandboxExecutor):
            async def run(self, spec: TrialSpec, *args: Any, **kw: Any) -> TrialOutcome:
                outcome = await real.run(spec, *args, **kw)
                return dataclasses.replace(outcome, metrics={"loss": float("nan")})

        backend = NaNBackend.__new__(NaNBackend)
        backend.__dict__.update(real.__dict__)
        market.work.executor = backend
        buyer = await market.buyer()
        result, log = await run_trial(buyer, tmp_path, "t-broken", "print('hello')")
        assert result.state == "failed"
        assert result.metrics == {}
        assert "could not build this task's result" in log
        assert "hello" in log
        for _ in range(100):
            if not (market.daemon.home.path / "sandbox" / "t-broken").exists():
                break
            await asyncio.sleep(0.05)
        assert not (market.daemon.home.path / "sandbox" / "t-broken").exists()
        # The lease's device is free: the next task runs.
        result, _ = await run_trial(buyer, tmp_path, "t-next", "print('{\"acc\": 1}')")
        assert result.state == "failed"  # the same broken backend, but it ended again


class TestQueuedTaskCopies:
    """A queued task's work dir is copied while the task before it runs (the provider's
    ``prepare``): the running trial never sees it, and a copy that will not be used goes."""

    async def test_a_queued_tasks_copy_is_unseen_used_and_removed_when_cancelled(
        self, market: Market, tmp_path: Path
    ) -> None:
        executor = market.work.executor
        assert isinstance(executor, SandboxExecutor)
        ready = executor.root_dir / READY_DIR
        secret = "the-next-tasks-parameters-51f0"
        waits = (
            "import os, sys, time\n"
            "while not os.path.exists('go'): time.sleep(0.01)\n"
            "print({'beside': sorted(os.listdir('..')), 'ready': os.path.exists(sys.argv[1])})\n"
        )
        looks = (
            "import os\n"
            "slot = os.path.dirname(os.getcwd())\n"
            "print(open('params.json').read(), os.path.basename(slot), sorted(os.listdir(slot)))\n"
        )
        buyer = await market.buyer()
        data, digest = workspace(tmp_path)
        await buyer.client.upload(data, digest)
        first = assign(buyer, digest, "q1", waits)
        await buyer.client.assign(
            first.model_copy(update={"command": [*first.command, str(ready)]})
        )
        params = {"params.json": secret}
        await buyer.client.assign(assign(buyer, digest, "q2", looks, files=params))
        # q2 waits in the lease's queue; its copy is made meanwhile, then it is cancelled.
        # Until the copy is whole: its directory is made first, its files written after.
        for _ in range(500):
            made = list(ready.iterdir()) if ready.exists() else []
            done = [m / "params.json" for m in made if (m / "params.json").exists()]
            if len(made) == 1 and done and done[0].read_text() == secret:
                break
            await asyncio.sleep(0.02)
        ((copy,),) = [list(ready.iterdir())]
        assert (copy / "params.json").read_text() == secret
        await buyer.client.cancel("q2", "changed my mind")
        for _ in range(200):
            if not list(ready.iterdir()):
                break
            await asyncio.sleep(0.02)
        assert list(ready.iterdir()) == []
        # q3 is queued, copied, and runs after q1 in the same sandbox, with its copy.
        await buyer.client.assign(assign(buyer, digest, "q3", looks, files=params))
        for _ in range(200):
            if len(list(ready.iterdir())) == 1:
                break
            await asyncio.sleep(0.02)
        run_id = f"{buyer.node_id}.q1"
        slot = executor.warm_slot(run_id)
        assert slot is not None
        (executor.work_dir(run_id) / "go").write_text("")
        seen: list[str] = []
        q1 = await asyncio.wait_for(buyer.client.follow("q1", seen.append, 1_000), 60)
        logs: list[str] = []
        q3 = await asyncio.wait_for(buyer.client.follow("q3", logs.append, 1_000), 60)
        assert (q1.state, q3.state) == ("succeeded", "succeeded")
        # While q3's copy waited, q1 saw only its own work dir in its slot, no ready dir.
        assert "".join(seen) == f"{{'beside': ['{run_id}'], 'ready': False}}\n"
        # q3 started in the same sandbox with its parameters, nothing of q1 beside it.
        assert "".join(logs) == f"{secret} {slot} ['{buyer.node_id}.q3']\n"
        assert list(ready.iterdir()) == []


# --- hostile workspaces --------------------------------------------------------------


def many_files_tar(count: int) -> tuple[bytes, str]:
    """A tar of ``count`` empty files, as a hostile tenant sends it (not via pack)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"f{i:06d}"))
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def sparse_tar(tmp: Path, fmt: str) -> tuple[bytes, str]:
    """A few KB of GNU tar holding a 256 MiB sparse file (``--sparse``, gnu or pax)."""
    src = tmp / f"sparse-{fmt}"
    src.mkdir()
    with (src / "big").open("wb") as f:
        f.truncate(256 << 20)
        f.seek(128 << 20)
        f.write(b"x")
    out = tmp / f"sparse-{fmt}.tar"
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(src), "big"],
        check=True,
    )
    data = out.read_bytes()
    assert len(data) < 64 * 1024
    return data, hashlib.sha256(data).hexdigest()


async def healthz_answers(market: Market, until: asyncio.Future[Any]) -> int:
    """GET /healthz every 0.1 s until ``until`` is done; each must answer within 1.5 s."""
    answered = 0
    async with aiohttp.ClientSession() as http:
        while not until.done():
            # Generous: an idle provider answers in milliseconds.
            timeout = aiohttp.ClientTimeout(total=1.5)
            async with http.get(f"{market.daemon.address}/healthz", timeout=timeout) as r:
                assert r.status == 200
            answered += 1
            await asyncio.sleep(0.1)
    return answered


class TestHostileWorkspaces:
    async def test_a_workspace_of_50000_files_is_refused_by_default(self, market: Market) -> None:
        # Built in a thread: the daemon shares this event loop.
        data, digest = await asyncio.to_thread(many_files_tar, 50_000)
        buyer = await market.buyer()
        with pytest.raises(MercatoError) as err:
            await buyer.client.upload(data, digest)
        assert err.value.code == "bad_workspace"
        assert "more than 10000 entries" in err.value.reason
        # Nothing of it stays on disk, and asking again gives the reason at once.
        assert not list((market.daemon.home.path / "work" / "workspaces").rglob("f0*"))
        with pytest.raises(MercatoError, match="more than 10000 entries"):
            await buyer.client.upload(data, digest)

    async def test_unpacking_50000_files_never_blocks_other_tenants(self, tmp_path: Path) -> None:
        """Allowed by the operator, the unpack runs off the loop: others keep being served."""
        market = await start_market(tmp_path, {"max_files": 100_000})
        try:
            data, digest = await asyncio.to_thread(many_files_tar, 50_000)
            heavy, other = await market.buyer(), await market.buyer()
            upload = asyncio.ensure_future(heavy.client.upload(data, digest))
            answered = await healthz_answers(market, upload)
            await upload  # it did unpack, in the end
            assert answered > 0
            result, log = await run_trial(other, tmp_path, "t-other", "print('still here')")
            assert result.state == "succeeded"
            assert "still here" in log
            ws = market.daemon.home.path / "work" / "workspaces"
            assert len(list((ws / heavy.node_id / digest).iterdir())) == 50_000
        finally:
            await stop_market(market)

    @pytest.mark.parametrize("fmt", ["gnu", "pax"])
    async def test_a_sparse_member_is_refused(
        self, market: Market, tmp_path: Path, fmt: str
    ) -> None:
        """A few KB that would unpack to 256 MiB of disk in every trial's copy."""
        buyer = await market.buyer()
        data, digest = sparse_tar(tmp_path, fmt)
        with pytest.raises(MercatoError) as err:
            await buyer.client.upload(data, digest)
        assert err.value.code == "bad_workspace"
        assert "sparse" in err.value.reason
        assert not list((market.daemon.home.path / "work").rglob("big"))


class TestTenantScope:
    async def test_a_workspace_hash_gives_another_tenant_nothing(
        self, market: Market, tmp_path: Path
    ) -> None:
        alice, bob = await market.buyer(), await market.buyer()
        data, digest = workspace(tmp_path, {"secret.txt": "alice's secret\n"})
        await alice.client.upload(data, digest)
        probe = await bob.client.send(
            WorkspaceChunk(
                lease_id=bob.lease.lease_id,
                workspace_hash=digest,
                offset=0,
                total_size=len(data),
                data=b"",
            )
        )
        assert (probe.complete, probe.received) == (False, 0)
        code = "print(open('secret.txt').read())"
        with pytest.raises(NotFoundError, match="was not uploaded"):
            await bob.client.assign(assign(bob, digest, "peek", code))
        # Bob with the same bytes gets his own copy, and Alice's trial still runs.
        await bob.client.upload(data, digest)
        await bob.client.assign(assign(bob, digest, "peek", code))
        result = await asyncio.wait_for(bob.client.follow("peek", wait_ms=1_000), 60)
        assert result.state == "succeeded"
        tenants = sorted(
            p.name for p in (market.daemon.home.path / "work" / "workspaces").iterdir()
        )
        assert tenants == sorted([alice.node_id, bob.node_id])

    async def test_another_tenant_cannot_squat_a_task_id(
        self, market: Market, tmp_path: Path
    ) -> None:
        """Both tenants name their first trial ``trial-0``; each gets its own."""
        alice, bob = await market.buyer(), await market.buyer()
        code = "import os, time; time.sleep(1); print('{\"who\": %d}' % len(os.environ['W']))"
        runs = []
        for buyer, who in ((alice, "a"), (bob, "bob")):
            data, digest = workspace(tmp_path)
            await buyer.client.upload(data, digest)
            await buyer.client.assign(assign(buyer, digest, "trial-0", code, env={"W": who}))
        for buyer in (alice, bob):
            runs.append(buyer.client.follow("trial-0", wait_ms=1_000))
        a, b = await asyncio.wait_for(asyncio.gather(*runs), 60)
        assert (a.state, b.state) == ("succeeded", "succeeded")
        assert (a.metrics, b.metrics) == ({"who": 1}, {"who": 3})


class TestWorkspaceLifetime:
    async def test_unfinished_uploads_and_unused_workspaces_expire(self, tmp_path: Path) -> None:
        market = await start_market(tmp_path, {"ttl_s": 1.0, "partial_ttl_s": 1.0})
        try:
            buyer = await market.buyer()
            root = market.daemon.home.path / "work" / "workspaces"
            mine = root / buyer.node_id
            done, done_hash = workspace(tmp_path, {"a": "done\n"})
            await buyer.client.upload(done, done_hash)
            big, big_hash = workspace(tmp_path, {"b": os.urandom(700_000).hex()})
            await buyer.client.send(
                WorkspaceChunk(
                    lease_id=buyer.lease.lease_id,
                    workspace_hash=big_hash,
                    offset=0,
                    total_size=len(big),
                    data=big[:100_000],
                )
            )
            assert sorted(p.name for p in mine.iterdir()) == sorted([done_hash, f"{big_hash}.part"])
            await asyncio.sleep(1.5)
            # The unfinished upload expired; the unpacked one is held by its live lease.
            fresh, fresh_hash = workspace(tmp_path, {"c": "fresh\n"})
            await buyer.client.upload(fresh, fresh_hash)  # any upload sweeps the expired
            assert sorted(p.name for p in mine.iterdir()) == sorted([done_hash, fresh_hash])
            # Once the lease ends, an unused workspace expires too.
            await buyer.tenant.release(buyer.lease)
            again = await market.buyer(same_as=buyer)
            await asyncio.sleep(1.5)
            last, last_hash = workspace(tmp_path, {"d": "last\n"})
            await again.client.upload(last, last_hash)
            assert [p.name for p in mine.iterdir()] == [last_hash]
        finally:
            await stop_market(market)

    async def test_a_tenant_cannot_fill_the_providers_disk(self, tmp_path: Path) -> None:
        market = await start_market(tmp_path, {"tenant_bytes": 3_000_000})
        try:
            hog, other = await market.buyer(), await market.buyer()
            hog2 = await market.buyer(same_as=hog)  # the hog's second lease

            def chunk(buyer: Buyer, data: bytes, digest: str) -> WorkspaceChunk:
                return WorkspaceChunk(
                    lease_id=buyer.lease.lease_id,
                    workspace_hash=digest,
                    offset=0,
                    total_size=len(data),
                    data=data[:1000],
                )

            blobs = [workspace(tmp_path, {"x": os.urandom(500_000).hex()}) for _ in range(4)]
            first, second, third, fourth = blobs  # about 1 MB each
            await hog.client.upload(*first)  # unpacked, held by its lease while it lives
            await hog.tenant.release(hog.lease)  # now idle: it may be evicted for room
            await hog2.client.send(chunk(hog2, *second))  # unfinished: each holds its room
            await hog2.client.send(chunk(hog2, *third))
            mine = market.daemon.home.path / "work" / "workspaces" / hog.node_id
            assert first[1] not in [p.name for p in mine.iterdir()]  # evicted for the third
            with pytest.raises(BusyError, match="budget per tenant"):
                await hog2.client.send(chunk(hog2, *fourth))
            # Another tenant is not held back by the hog.
            await other.client.upload(*fourth)
        finally:
            await stop_market(market)


class TestMetricBoundaryInMemory:
    """The OutputCollector's rules on their own (pure logic, a stepped clock)."""

    def test_the_record_budget_skips_floods_but_the_latest_record_counts(self) -> None:
        now = [0.0]
        collector = OutputCollector(io.BytesIO(), 1 << 30, clock=lambda: now[0])
        flood = b"".join(b'{"step": %d}\n' % i for i in range(5_000))
        collector.feed(flood)
        assert collector.metrics == {"step": MAX_METRIC_RECORDS_PER_S - 1}
        collector.close()  # the end of output: the latest record is parsed
        assert collector.metrics == {"step": 4_999}
        assert collector.dropped == {"rate_limited": 5_000 - MAX_METRIC_RECORDS_PER_S - 1}

    def test_the_budget_refills_with_time(self) -> None:
        now = [0.0]
        collector = OutputCollector(io.BytesIO(), 1 << 30, clock=lambda: now[0])
        collector.feed(b'{"a": 1}\n' * MAX_METRIC_RECORDS_PER_S + b'{"a": 2}\n')
        assert collector.metrics == {"a": 1}
        now[0] += 1.0
        collector.feed(b'{"a": 3}\n')
        assert collector.metrics == {"a": 3}  # the deferred 2 first, then 3: print order
        assert "rate_limited" not in collector.dropped

    def test_values_that_do_not_fit_a_result_are_counted_by_reason(self) -> None:
        collector = OutputCollector(io.BytesIO(), 1 << 30)
        for line in HOSTILE_LINES.values():
            collector.feed(line.encode() + b"\n")
        collector.feed(b'{"ok": 1, "flag": true, "note": "x", "big": -9223372036854775808}\n')
        collector.close()
        assert collector.metrics == {"ok": 1, "big": -(2**63)}
        assert collector.dropped == {
            "not_finite": 3,
            "int_out_of_range": 2,
            "bad_name": 2,
        }
        TaskResult(  # whatever was kept fits the wire
            lease_id="l1",
            task_id="t1",
            state="succeeded",
            exit_code=0,
            metrics=collector.metrics,
            usage={"wall_ms": 1, "cpu_ms": 1, "device_ms": 1},
            started_ms=0,
            finished_ms=1,
        )
