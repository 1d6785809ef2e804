"""mercato_trial.diloco with ``overlap=True``: the worker goes on while the outer step travels.

The tenant is played here by the real ``market.diloco.OuterLoop`` writing its answers
into the worker's mailbox, as the provider's daemon does; the "inner step" is a fixed
move of every parameter by -0.1, so each figure below can be checked by hand. DiLoCo's
outer step: Nesterov, lr 0.7, momentum 0.9; the first one moves the parameters by
0.7 x (1 + 0.9) = 1.33 times the averaged pseudo-gradient.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from market.diloco import OuterLoop, decode_blob
from mercato_trial import diloco as helper

torch = pytest.importorskip("torch")


def model() -> Any:
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.bias.copy_(torch.tensor([3.0]))
    return m


def params(m: Any) -> list[float]:
    return [round(float(v), 5) for v in torch.cat([m.weight.reshape(-1), m.bias]).detach()]


def inner_step(m: Any) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.1


def answer(box: Path, seq: int, blob: bytes) -> None:
    """What the provider's daemon does with the tenant's answer: an atomic rename."""
    (box / f".in-{seq}.tmp").write_bytes(blob)
    (box / f".in-{seq}.tmp").rename(box / f"in-{seq}.bin")


def tenant_step(loop: OuterLoop, box: Path, seq: int) -> None:
    blob = decode_blob((box / f"out-{seq}.bin").read_bytes())
    loop.report("w0", blob.values, now_ms=0)
    assert loop.ready({"w0"}, now_ms=0)
    loop.step()
    answer(box, seq, loop.answer())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(helper.INNER_STEPS_ENV, "2")
    monkeypatch.setenv(helper.OUTER_STEPS_ENV, "3")
    (tmp_path / helper.SYNC_DIR).mkdir()
    return tmp_path


class TestOverlap:
    def test_the_worker_goes_on_and_the_answer_rebases_the_steps_in_flight(self, env: Path) -> None:
        box = env / helper.SYNC_DIR
        m = model()
        seen: list[tuple[int, list[float]]] = []
        sync = helper.DiLoCo(
            m,
            root=env,
            overlap=True,
            max_ahead=2,
            on_outer_step=lambda s: seen.append((s, params(m))),
        )
        loop = OuterLoop(total_steps=3, round_timeout_ms=1_000)
        answer(box, 0, loop.join([1.0, 2.0, 3.0]))
        sync.start()
        assert sync.overlap

        # Round 1: two inner steps, then the hand-over returns at once (no answer yet).
        inner_step(m)
        inner_step(m)
        sync.step()
        assert decode_blob((box / "out-1.bin").read_bytes()).values.tolist() == pytest.approx(
            [0.2, 0.2, 0.2]
        )
        assert not sync.done
        inner_step(m)  # round 2 has begun while the outer step travels
        assert not sync.poll()
        assert params(m) == [0.7, 1.7, 2.7]

        # The outer step lands: global = start - 1.33 x 0.2 = start - 0.266; the inner
        # step taken in flight (-0.1) is kept on top of it.
        tenant_step(loop, box, 1)
        assert sync.poll()
        assert seen == [(1, [0.734, 1.734, 2.734])]  # evaluated on exactly the global ones
        assert params(m) == [0.634, 1.634, 2.634]

        # Round 2's pseudo-gradient is measured from the global parameters: both of its
        # inner steps, the one in flight and the one after.
        inner_step(m)
        sync.step()
        assert decode_blob((box / "out-2.bin").read_bytes()).values.tolist() == pytest.approx(
            [0.2, 0.2, 0.2]
        )

        # Round 3 is the last: its answer is waited for, and the job ends on it.
        tenant_step(loop, box, 2)
        inner_step(m)
        inner_step(m)

        def last() -> None:
            while not (box / "out-3.bin").exists():
                time.sleep(0.01)
            tenant_step(loop, box, 3)

        t = threading.Thread(target=last)
        t.start()
        sync.step()
        t.join(10)
        assert sync.done
        assert sync.outer_step == 3
        # b = 0.2, 0.38, 0.542; moves 0.266, 0.3794, 0.48146: 1.12686 in all, and the
        # two inner steps of round 3 live on only through the pseudo-gradient.
        assert params(m) == pytest.approx([-0.12686, 0.87314, 1.87314], abs=1e-5)
        assert [s for s, _ in seen] == [1, 2, 3]
        assert seen[1][1] == pytest.approx([0.3546, 1.3546, 2.3546], abs=1e-5)

    def test_a_worker_waits_once_max_ahead_steps_are_in_flight(self, env: Path) -> None:
        box = env / helper.SYNC_DIR
        m = model()
        sync = helper.DiLoCo(m, root=env, overlap=True, max_ahead=2)
        loop = OuterLoop(total_steps=3, round_timeout_ms=1_000)
        answer(box, 0, loop.join([1.0, 2.0, 3.0]))
        sync.start()
        inner_step(m)
        inner_step(m)
        sync.step()
        inner_step(m)
        assert not sync.poll()  # one step in flight: goes on

        def late() -> None:
            time.sleep(0.2)
            tenant_step(loop, box, 1)

        t = threading.Thread(target=late)
        t.start()
        inner_step(m)
        assert sync.poll()  # the second step in flight: waits for the answer
        t.join(10)
        assert params(m) == [0.534, 1.534, 2.534]  # 1 - 0.266 - 2 x 0.1

    def test_a_worker_that_is_not_told_the_last_step_waits_every_time(
        self, env: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(helper.OUTER_STEPS_ENV)
        sync = helper.DiLoCo(model(), root=env, overlap=True)
        assert not sync.overlap  # it could not know which answer ends the job


class TestDefaultAhead:
    """``max_ahead`` left to its default: a quarter of a round while the job is young,
    half a round after (mercato_trial.diloco.default_ahead)."""

    def ahead_per_round(
        self, env: Path, monkeypatch: pytest.MonkeyPatch, inner: int, outer: int
    ) -> list[int]:
        """How many inner steps the worker took in flight before it waited, per round.

        The tenant (the real OuterLoop) answers only once the worker waits for it, so
        every round runs to the worker's own limit.
        """
        monkeypatch.setenv(helper.INNER_STEPS_ENV, str(inner))
        monkeypatch.setenv(helper.OUTER_STEPS_ENV, str(outer))
        box = env / helper.SYNC_DIR
        m = model()
        sync = helper.DiLoCo(m, root=env, overlap=True)
        loop = OuterLoop(total_steps=outer, round_timeout_ms=1_000)
        answer(box, 0, loop.join([1.0, 2.0, 3.0]))
        sync.start()
        waited_at: list[int] = []
        real_wait = helper.wait_for

        def tenant_answers_when_waited_for(
            seq: int, root: Any = ".", poll_s: float = 0.02
        ) -> bytes:
            if not (box / f"in-{seq}.bin").exists():
                waited_at.append(sync._ahead)
                tenant_step(loop, box, seq)
            return real_wait(seq, root, poll_s)

        monkeypatch.setattr(helper, "wait_for", tenant_answers_when_waited_for)
        while not sync.done:
            for _ in range(sync.inner_steps):
                inner_step(m)
                sync.poll()
            sync.step()
        assert sync.outer_step == outer
        return waited_at

    def test_a_long_job_runs_half_a_round_ahead_after_its_first_rounds(
        self, env: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        waits = self.ahead_per_round(env, monkeypatch, inner=8, outer=12)
        # Rounds 1-3 hand over with 0-2 outer steps landed: a quarter (2 steps). From
        # round 4 on, half (4 steps). Round 12 is the last: handed over and waited for
        # at once (its count is the previous round's).
        assert waits[:-1] == [2, 2, 2] + [4] * 8
        assert len(waits) == 12

    def test_a_short_job_stays_at_a_quarter_of_a_round(
        self, env: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # 3 outer steps, as the int8 end-to-end job: never more than a quarter ahead.
        assert self.ahead_per_round(env, monkeypatch, inner=8, outer=3)[:-1] == [2, 2]

    def test_the_schedule(self) -> None:
        assert [helper.default_ahead(500, 12, k) for k in range(12)] == [125] * 3 + [250] * 9
        assert [helper.default_ahead(500, 20, k) for k in (4, 5)] == [125, 250]
        assert helper.default_ahead(500, None, 100) == 125  # not told the last step
        assert helper.default_ahead(2, 12, 11) == 1  # never 0: a step always fits
