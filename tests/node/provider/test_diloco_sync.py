"""DiLoCo outer steps through a real provider daemon and the real bwrap sandbox.

A worker (a trial with no network) hands a blob over through mercato_trial.diloco; the
tenant pulls it with sync_query, pushes an answer with sync_chunk, and the worker reads
it. Hostile cases: a trial that plants a link to a provider file in its mailbox, and a
blob whose bytes do not match its hash.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from market.diloco import decode_blob, encode_blob
from mercato_trial import diloco as helper
from protocol.errors import BadBlobError
from protocol.messages import SyncChunk, SyncQuery, SyncStatus
from tests.node.provider.test_hostile_work import (
    Buyer,
    Market,
    assign,
    start_market,
    stop_market,
    workspace,
)

pytestmark = pytest.mark.skipif(
    not __import__("node.provider.sandbox", fromlist=["probe_bwrap"]).probe_bwrap().ok,
    reason="needs bubblewrap",
)


@pytest.fixture
async def market(tmp_path: Path) -> AsyncIterator[Market]:
    m = await start_market(tmp_path)
    try:
        yield m
    finally:
        await stop_market(m)


WORKER = """
from mercato_trial.diloco import exchange, decode
answer = exchange(0, bytes.fromhex({blob!r}))
values, step, done = decode(answer)
print("GOT", values, step, done, flush=True)
"""


async def start_worker(buyer: Buyer, tmp: Path, task_id: str, code: str) -> None:
    data, digest = workspace(tmp)
    await buyer.client.upload(data, digest)
    await buyer.client.assign(assign(buyer, digest, task_id, code))


async def query(buyer: Buyer, task_id: str, seq: int = 0, **kw: Any) -> Any:
    return await buyer.client.send(
        SyncQuery(lease_id=buyer.lease.lease_id, task_id=task_id, seq=seq, wait_ms=5_000, **kw)
    )


async def pull(buyer: Buyer, task_id: str, seq: int = 0) -> bytes:
    for _ in range(20):
        body = await query(buyer, task_id, seq)
        if isinstance(body, SyncChunk):
            assert body.offset == 0
            assert body.total_size == len(body.data)
            assert hashlib.sha256(body.data).hexdigest() == body.blob_hash
            return body.data
        assert isinstance(body, SyncStatus)
    raise AssertionError("the worker never handed its blob over")


def push(buyer: Buyer, task_id: str, data: bytes, digest: str | None = None) -> SyncChunk:
    return SyncChunk(
        lease_id=buyer.lease.lease_id,
        task_id=task_id,
        seq=0,
        blob_hash=digest or hashlib.sha256(data).hexdigest(),
        offset=0,
        total_size=len(data),
        data=data,
    )


class TestOuterStepRelay:
    async def test_a_blob_goes_worker_to_tenant_and_the_answer_comes_back(
        self, market: Market, tmp_path: Path
    ) -> None:
        buyer = await market.buyer()
        mine = encode_blob([1.0, 2.0, 3.0])
        await start_worker(buyer, tmp_path, "w0", WORKER.format(blob=mine.hex()))
        got = await asyncio.wait_for(pull(buyer, "w0"), 60)
        assert got == mine
        answer = encode_blob([0.5, -0.5], outer_step=3, done=True)
        status = await buyer.client.send(push(buyer, "w0", answer))
        assert isinstance(status, SyncStatus)
        assert status.complete
        logs: list[str] = []
        result = await asyncio.wait_for(buyer.client.follow("w0", logs.append, 2_000), 60)
        assert result.state == "succeeded", "".join(logs)
        assert "GOT [0.5, -0.5] 3 True" in "".join(logs)

    def test_the_trial_helper_writes_what_the_tenant_reads(self) -> None:
        torch = pytest.importorskip("torch")
        values = [0.25, -1.5, 3.0]
        for compression in ("fp32", "fp16", "int8"):
            from_list = decode_blob(helper.encode(values, compression))
            from_torch = decode_blob(helper.encode(torch.tensor(values), compression))
            assert list(from_list.values) == pytest.approx(values, abs=0.02)
            assert list(from_torch.values) == list(from_list.values)
        assert helper.decode(encode_blob(values, outer_step=2)) == (values, 2, False)


class TestHostileWorker:
    async def test_a_link_in_the_mailbox_never_carries_a_provider_file_to_the_tenant(
        self, market: Market, tmp_path: Path
    ) -> None:
        secret = tmp_path / "provider-secret.key"
        secret.write_bytes(b"MDL1" + b"the provider's private key" * 10)
        buyer = await market.buyer()
        code = (
            "import os, time\n"
            "os.makedirs('.mercato-sync', exist_ok=True)\n"
            f"os.symlink({str(secret)!r}, '.mercato-sync/out-0.bin')\n"
            "time.sleep(30)\n"
        )
        await start_worker(buyer, tmp_path, "w0", code)

        async def until_refused() -> None:
            for _ in range(20):
                body = await query(buyer, "w0")
                assert not isinstance(body, SyncChunk), "the provider's file was sent"

        with pytest.raises(BadBlobError, match="not a regular file"):
            await until_refused()
        await buyer.client.cancel("w0", "done")

    async def test_a_blob_that_fails_its_hash_never_reaches_the_worker(
        self, market: Market, tmp_path: Path
    ) -> None:
        buyer = await market.buyer()
        code = WORKER.format(blob=encode_blob([1.0]).hex())
        await start_worker(buyer, tmp_path, "w0", code)
        await asyncio.wait_for(pull(buyer, "w0"), 60)
        good = encode_blob([7.0])
        with pytest.raises(BadBlobError, match="blob_hash"):
            await buyer.client.send(push(buyer, "w0", good, digest="0" * 64))
        # Nothing was written: the worker still waits; the right blob then gets through.
        status = await buyer.client.send(push(buyer, "w0", good))
        assert status.complete
        logs: list[str] = []
        result = await asyncio.wait_for(buyer.client.follow("w0", logs.append, 2_000), 60)
        assert result.state == "succeeded"
        assert "GOT [7.0] 0 False" in "".join(logs)
        rejected = market.daemon.node.metrics.rejection_counts()
        assert rejected.get("bad_blob", 0) >= 1
