"""Which workers a DiLoCo round waits for (node.tenant.diloco.waited_for), pure logic.

In-memory Worker records (no lease, no client: nothing here talks to a provider) and
the real market.diloco.OuterLoop. Over real daemons, tests/node/tenant/test_diloco_e2e.py
kills a provider and sees the round go on without it.
"""

from __future__ import annotations

from typing import Any, cast

from market.diloco import OuterLoop
from node.tenant.diloco import Worker, waited_for


def worker(name: str, **kw: Any) -> Worker:
    return Worker(name, 0, cast(Any, None), f"task-{name}", cast(Any, None), **kw)


def round_steps_at(workers: list[Worker], reported: list[str]) -> int | None:
    """When the round steps (ms after its first report), None if not within a minute."""
    loop = OuterLoop(total_steps=10, round_timeout_ms=20_000)
    loop.join([0.0, 0.0])
    for name in reported:
        loop.report(name, cast(Any, [0.1, 0.1]), now_ms=0)
    for now in range(0, 60_000, 100):
        if loop.ready(waited_for(workers), now):
            return now
    return None


class TestWaitedFor:
    def test_a_round_does_not_wait_for_a_worker_whose_provider_refused(self) -> None:
        ws = [worker("w0", seq=3), worker("w1", seq=3), worker("w2", seq=3)]
        assert round_steps_at(ws, ["w0", "w2"]) == 20_000  # w1 missing: the deadline
        ws[1].suspect = True  # its provider refused the last connection
        assert waited_for(ws) == {"w0", "w2"}
        assert round_steps_at(ws, ["w0", "w2"]) == 0  # at once

    def test_a_replacement_is_not_waited_for_until_its_first_round_is_answered(self) -> None:
        ws = [worker("w0", seq=5), worker("w2", seq=5)]
        w3 = worker("w3", replacement=True, seq=1)  # joined mid-round
        ws.append(w3)
        # Its first pseudo-gradient comes H inner steps after the join: the survivors'
        # round does not wait for it, and it counts if it is in.
        assert round_steps_at(ws, ["w0", "w2"]) == 0
        w3.seq = 2  # its first pseudo-gradient was answered: it is in step now
        assert waited_for(ws) == {"w0", "w2", "w3"}

    def test_a_replacement_started_at_a_round_boundary_is_waited_for_at_once(self) -> None:
        # Its join was held until the round closed (OuterLoop.join_due): its first
        # pseudo-gradient belongs to the round the others are in, so the round waits
        # for it instead of closing a few inner steps before it comes.
        ws = [worker("w0", seq=5), worker("w2", seq=5)]
        w3 = worker("w3", replacement=True, seq=1, aligned=True)
        ws.append(w3)
        assert waited_for(ws) == {"w0", "w2", "w3"}
        assert round_steps_at(ws, ["w0", "w2"]) == 20_000  # the deadline, if it never comes

    def test_lost_workers_are_not_waited_for(self) -> None:
        ws = [worker("w0", seq=2), worker("w1", seq=2, alive=False)]
        assert waited_for(ws) == {"w0"}
