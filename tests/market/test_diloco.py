"""DiLoCo through the market, the pure parts: the split into workers over providers, the
traffic per outer step against DDP, the blob format and the Nesterov outer step.
Adverts are built in memory (tests/market/test_matching.py's helpers)."""

from __future__ import annotations

import math
from array import array

import pytest

from market.classify import WAN
from market.diloco import (
    HEADER_BYTES,
    OUTER_LR,
    OUTER_MOMENTUM,
    BlobError,
    OuterLoop,
    OuterOptimizer,
    decode_blob,
    encode_blob,
    outer_traffic,
)
from market.jobspec import parse_job
from market.placement import plan
from protocol.messages import Interconnect
from tests.market.test_matching import GB, PCIE, advert, group, node

DILOCO_JOB = """
name: diloco
kind: training
training:
  world_size: 6
  model: {parameters: 1e9, gradient_bytes: 2}
  tokens_per_step: 8192
  sync: {method: diloco, inner_steps: 500}
  steps: 5000
  command: [train.py]
resources:
  accelerator: gpu
"""


def small_providers(n: int = 3, devices: int = 2) -> list:
    """The common market: many providers with 1-2 consumer GPUs each."""
    return [
        advert(node(letter), group(n=devices, price=300_000 + 10_000 * i))
        for i, letter in enumerate("abcdefgh"[:n])
    ]


class TestSplitAcrossProviders:
    def test_a_diloco_job_too_big_for_any_provider_is_split_over_three(self) -> None:
        p = plan(parse_job(DILOCO_JOB), small_providers(3, 2))
        assert p.placeable, p.missing
        assert p.split is not None
        assert p.split.devices_per_worker == 2
        assert len(p.split.workers) == 3
        assert p.split.providers == sorted(node(x) for x in "abc")
        # The order: 3 units of 2 devices, not a gang (units may go to several providers).
        assert p.units == 3
        assert p.requirement.devices_per_unit == 2
        assert not p.requirement.gang

    def test_the_same_job_under_ddp_cannot_be_placed_on_small_providers(self) -> None:
        ddp = DILOCO_JOB.replace("{method: diloco, inner_steps: 500}", "{method: ddp}")
        assert not plan(parse_job(ddp), small_providers(3, 2)).placeable

    def test_the_cheapest_providers_are_chosen(self) -> None:
        p = plan(parse_job(DILOCO_JOB), small_providers(5, 2))
        assert p.split is not None
        # Floors rise with the letter: the three cheapest are a, b, c.
        assert p.split.providers == sorted(node(x) for x in "abc")
        assert p.split.cost is not None
        assert p.split.cost > 0
        chosen = [c for c in p.candidates if c.cost is not None]
        assert {c.provider for c in chosen} == {node(x) for x in "abc"}

    def test_one_provider_that_hosts_it_all_more_cheaply_wins(self) -> None:
        # A big cheap box with 6 free devices: one worker, no WAN traffic at all.
        big = advert(node("z"), group(n=6, price=100_000), interconnect=PCIE)
        p = plan(parse_job(DILOCO_JOB), [*small_providers(3, 2), big])
        assert p.split is not None
        assert len(p.split.workers) == 1
        assert p.split.workers[0].provider == node("z")

    def test_a_fixed_worker_count_is_kept(self) -> None:
        job = DILOCO_JOB.replace("inner_steps: 500}", "inner_steps: 500, workers: 6}")
        p = plan(parse_job(job), small_providers(3, 2))
        assert p.split is not None
        assert len(p.split.workers) == 6
        assert p.split.devices_per_worker == 1

    def test_a_bandwidth_bound_diloco_job_stays_one_worker_on_one_fast_fabric(self) -> None:
        job = DILOCO_JOB.replace("inner_steps: 500", "inner_steps: 5")
        nvlink = Interconnect(kind="nvlink", bandwidth=450 * GB, gang_size=8)
        box = advert(node("z"), group(n=6, price=900_000), interconnect=nvlink)
        p = plan(parse_job(job), [*small_providers(3, 2), box])
        assert p.classification.workload.value == "bandwidth_bound"
        assert p.split is not None
        assert [w.provider for w in p.split.workers] == [node("z")]
        assert p.requirement.devices_per_unit == 6
        assert p.requirement.min_interconnect > 0
        assert not plan(parse_job(job), small_providers(3, 2)).placeable

    def test_not_enough_free_devices_says_so(self) -> None:
        p = plan(parse_job(DILOCO_JOB), small_providers(2, 2))
        assert not p.placeable
        assert p.missing is not None
        assert "DiLoCo workers" in p.missing

    def test_a_provider_above_the_budget_is_left_out(self) -> None:
        job = DILOCO_JOB + "budget:\n  max_price: 0.31 credits\n"
        p = plan(parse_job(job), small_providers(4, 2))
        # Floors 0.30, 0.31, 0.32, 0.33: only two within budget, too few for 6 devices
        # in 2-device workers; 1-device workers need 6 slots, only 4 are free.
        assert not p.placeable


class TestTraffic:
    def test_a_worker_sends_h_times_less_than_ddp_at_the_same_precision(self) -> None:
        t = outer_traffic(10**9, 3, 500, 6, gradient_bytes=4, compression="fp32")
        # DDP: 2 (N-1)/N P g per device per step, 500 steps per outer step.
        assert t.ddp_bytes_per_step == 2 * 5 * 10**9 * 4 // 6
        assert t.ddp_bytes_per_outer_step == 500 * t.ddp_bytes_per_step
        assert t.bytes_per_worker == 4 * 10**9 + HEADER_BYTES
        assert t.reduction > 500  # 500 x 5/3
        assert t.tenant_bytes == 3 * t.bytes_per_worker
        assert t.bytes_down_per_worker == 4 * 10**9 + HEADER_BYTES
        both = t.tenant_bytes + 3 * t.bytes_down_per_worker
        assert t.time_s == pytest.approx(both / WAN.bandwidth + 2 * WAN.latency_s)

    def test_int8_sends_a_quarter_of_fp32(self) -> None:
        f = outer_traffic(10**6, 3, 100, 3, 4, "fp32")
        q = outer_traffic(10**6, 3, 100, 3, 4, "int8")
        assert q.bytes_per_worker - HEADER_BYTES == (f.bytes_per_worker - HEADER_BYTES) // 4

    def test_the_plan_shows_the_traffic_against_ddp(self) -> None:
        p = plan(parse_job(DILOCO_JOB), small_providers(3, 2))
        assert p.split is not None
        text = p.split.traffic.summary()
        assert "every 500 steps" in text
        assert "DDP" in text
        assert "less" in text


class TestBlob:
    def test_fp32_round_trip_is_exact(self) -> None:
        values = [0.5, -1.25, 3.0, 0.0]
        b = decode_blob(encode_blob(values, outer_step=7, done=True))
        assert list(b.values) == values
        assert b.outer_step == 7
        assert b.done

    @pytest.mark.parametrize(("compression", "tolerance"), [("fp16", 1e-3), ("int8", 0.01)])
    def test_compression_stays_close(self, compression: str, tolerance: float) -> None:
        values = [math.sin(i) for i in range(1000)]
        blob = encode_blob(values, compression=compression)  # type: ignore[arg-type]
        back = decode_blob(blob).values
        assert max(abs(a - b) for a, b in zip(values, back, strict=True)) < tolerance
        assert len(blob) < len(encode_blob(values))

    def test_truncated_blob_is_refused(self) -> None:
        blob = encode_blob([1.0, 2.0])
        with pytest.raises(BlobError, match="payload bytes"):
            decode_blob(blob[:-1])

    def test_bad_magic_is_refused(self) -> None:
        with pytest.raises(BlobError, match="magic"):
            decode_blob(b"XXXX" + encode_blob([1.0])[4:])

    def test_nan_is_refused(self) -> None:
        with pytest.raises(BlobError, match="finite"):
            decode_blob(encode_blob([float("nan")]))

    def test_too_many_parameters_are_refused_before_reading_them(self) -> None:
        with pytest.raises(BlobError, match="exceed"):
            decode_blob(encode_blob([1.0] * 10), max_parameters=5)


class TestOuterOptimizer:
    def test_matches_torch_sgd_with_nesterov(self) -> None:
        torch = pytest.importorskip("torch")
        start = [1.0, -2.0, 0.5]
        rounds = [[[0.1, 0.2, -0.3], [0.3, 0.0, -0.1]], [[0.05, -0.1, 0.2], [0.15, 0.1, 0.0]]]
        ours = OuterOptimizer(array("f", start))
        p = torch.nn.Parameter(torch.tensor(start))
        opt = torch.optim.SGD([p], lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
        for grads in rounds:
            ours.step(grads)
            p.grad = torch.tensor(grads).mean(0)
            opt.step()
        assert list(ours.params) == pytest.approx(p.detach().tolist(), rel=1e-5)

    def test_averages_the_workers(self) -> None:
        opt = OuterOptimizer(array("f", [0.0]), lr=1.0, momentum=0.0)
        opt.step([[1.0], [3.0]])
        assert list(opt.params) == [-2.0]

    def test_a_wrong_length_is_refused(self) -> None:
        with pytest.raises(ValueError, match="values for"):
            OuterOptimizer(array("f", [0.0, 1.0])).step([[1.0]])


class TestOuterLoop:
    def test_the_first_join_sets_the_global_parameters_a_later_one_gets_them(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=1000)
        assert list(decode_blob(loop.join([1.0, 2.0])).values) == [1.0, 2.0]
        # A replacement with other starting parameters starts from the global ones.
        assert list(decode_blob(loop.join([9.0, 9.0])).values) == [1.0, 2.0]

    def test_steps_when_every_live_worker_reported(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=1000)
        loop.join([0.0])
        loop.report("a", array("f", [1.0]), now_ms=0)
        assert not loop.ready({"a", "b"}, now_ms=10)
        loop.report("b", array("f", [3.0]), now_ms=20)
        assert loop.ready({"a", "b"}, now_ms=20)
        assert loop.step() == ["a", "b"]
        assert loop.outer_step == 1
        assert decode_blob(loop.answer()).outer_step == 1

    def test_a_lost_worker_does_not_stop_the_round_after_the_deadline(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=1000)
        loop.join([0.0])
        loop.report("a", array("f", [1.0]), now_ms=5000)
        assert not loop.ready({"a", "b"}, now_ms=5999)
        assert loop.ready({"a", "b"}, now_ms=6000)
        assert loop.step() == ["a"]
        assert loop.history == [(1, 1)]

    def test_the_last_answer_says_done(self) -> None:
        loop = OuterLoop(total_steps=1, round_timeout_ms=1000)
        loop.join([0.0])
        loop.report("a", array("f", [1.0]), now_ms=0)
        loop.step()
        assert loop.done
        assert decode_blob(loop.answer()).done
        assert not loop.ready({"a"}, now_ms=0)

    def test_a_pseudo_gradient_of_the_wrong_size_is_refused(self) -> None:
        loop = OuterLoop(total_steps=1, round_timeout_ms=1000)
        loop.join([0.0, 0.0])
        with pytest.raises(BlobError, match="parameters"):
            loop.report("a", array("f", [1.0]), now_ms=0)


class TestStartTogether:
    """The first lease's workers take their first inner step together: a worker whose
    sandbox started early would otherwise finish round 1 alone and wait for the last
    one (bench/diloco_bench.py measured 0.76-0.98 utilisation from that start skew)."""

    def test_the_join_answer_waits_until_every_first_worker_has_joined(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=20_000)
        loop.join([0.0], worker="a", now_ms=1_000)
        loop.join([0.0], worker="b", now_ms=2_500)
        assert not loop.started({"a", "b", "c"}, now_ms=4_000)
        loop.join([0.0], worker="c", now_ms=4_200)
        assert loop.started({"a", "b", "c"}, now_ms=4_200)

    def test_a_worker_that_never_joins_holds_the_start_one_round_timeout_at_most(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=20_000)
        loop.join([0.0], worker="a", now_ms=1_000)
        assert not loop.started({"a", "b"}, now_ms=20_999)
        assert loop.started({"a", "b"}, now_ms=21_000)

    def test_a_replacement_joining_mid_round_starts_at_the_next_boundary(self) -> None:
        # Answered at once it trained from older parameters, and its first
        # pseudo-gradient landed in the next round, which it then waited for.
        loop = OuterLoop(total_steps=5, round_timeout_ms=20_000)
        loop.join([0.0], worker="a", now_ms=0)
        loop.report("a", array("f", [1.0]), now_ms=500)
        loop.step()
        joined_at = loop.outer_step
        loop.join([5.0], worker="r", now_ms=900)
        assert not loop.join_due(joined_at, 900, 5_000, others_running=True)
        loop.report("a", array("f", [1.0]), now_ms=6_000)
        loop.step()
        assert loop.join_due(joined_at, 900, 6_000, others_running=True)

    def test_a_held_join_is_answered_when_nobody_could_close_the_round(self) -> None:
        loop = OuterLoop(total_steps=5, round_timeout_ms=20_000)
        loop.join([0.0], worker="a", now_ms=0)
        loop.report("a", array("f", [1.0]), now_ms=500)
        loop.step()
        assert loop.join_due(1, 900, 900, others_running=False)  # the others are gone
        assert not loop.join_due(1, 900, 20_899, others_running=True)
        assert loop.join_due(1, 900, 20_900, others_running=True)  # a round's timeout
        loop.total_steps = 1  # the job is done: nothing to wait for
        assert loop.join_due(1, 900, 901, others_running=True)

    def test_a_replacement_joining_mid_run_does_not_wait(self) -> None:
        loop = OuterLoop(total_steps=3, round_timeout_ms=20_000)
        loop.join([0.0], worker="a", now_ms=0)
        loop.report("a", array("f", [1.0]), now_ms=500)
        loop.step()
        loop.join([5.0], worker="r", now_ms=900)
        assert loop.started({"a", "b"}, now_ms=900)
