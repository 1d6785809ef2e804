"""Workload classification: the issue's reference cases and the arithmetic behind them."""

from __future__ import annotations

import pytest

from market.catalog import lookup
from market.classify import (
    OVERLAP_THRESHOLD,
    WAN,
    Link,
    TrainingShape,
    WorkloadClass,
    classify_service,
    classify_sweep,
    classify_training,
    compute_time_s,
    gang_fits,
    ratio,
    required_bandwidth,
    sync_bytes,
)

H100 = lookup("H100-SXM")
ONE_B_BF16 = TrainingShape(world_size=8, parameters=10**9, gradient_bytes=2, tokens_per_step=8192)
NVLINK = Link("NVLink", H100.interconnect_bandwidth, 5e-6)
ONE_GBIT = Link("1 Gb/s", 125_000_000, 0.030)


class TestReferenceCases:
    def test_1b_bf16_on_8_h100_is_bandwidth_bound_and_fits_one_nvlink_gang(self) -> None:
        c = classify_training(ONE_B_BF16, H100.fp16_flops)
        assert c.workload is WorkloadClass.BANDWIDTH_BOUND
        assert c.needs_gang
        assert c.required_bandwidth is not None
        # NVLink's 450 GB/s per direction keeps the ratio under the threshold ...
        assert ratio(ONE_B_BF16, NVLINK, H100.fp16_flops) < OVERLAP_THRESHOLD
        assert gang_fits(
            c, gang_size=8, interconnect_bandwidth=H100.interconnect_bandwidth, world_size=8
        )
        # ... a PCIe Gen4 box (32 GB/s) or a gang of 4 does not host it.
        assert not gang_fits(c, gang_size=8, interconnect_bandwidth=32 * 10**9, world_size=8)
        assert not gang_fits(c, gang_size=4, interconnect_bandwidth=450 * 10**9, world_size=8)

    def test_the_same_over_1_gbit_between_providers_is_not_placeable_across_them(self) -> None:
        c = classify_training(ONE_B_BF16, H100.fp16_flops)
        assert ratio(ONE_B_BF16, ONE_GBIT, H100.fp16_flops) > 100 * OVERLAP_THRESHOLD
        assert c.wan_ratio > OVERLAP_THRESHOLD
        assert "never split across providers" in c.explanation
        assert c.required_bandwidth is not None
        assert c.required_bandwidth > ONE_GBIT.bandwidth * 100

    def test_the_same_with_diloco_500_inner_steps_is_loosely_coupled(self) -> None:
        shape = TrainingShape(8, 10**9, 2, 8192, sync_method="diloco", inner_steps=500)
        c = classify_training(shape, H100.fp16_flops)
        assert c.workload is WorkloadClass.LOOSELY_COUPLED
        assert c.wan_ratio <= OVERLAP_THRESHOLD
        assert c.steps_per_sync == 500
        assert not c.needs_gang

    def test_a_sweep_is_parallel(self) -> None:
        c = classify_sweep(24)
        assert c.workload is WorkloadClass.PARALLEL
        assert "24 independent trials" in c.explanation

    def test_single_device_training_is_parallel(self) -> None:
        c = classify_training(TrainingShape(1, 10**9, 2, 8192), H100.fp16_flops)
        assert c.workload is WorkloadClass.PARALLEL
        assert c.sync_bytes == 0

    def test_a_service_is_placed_for_uptime(self) -> None:
        assert classify_service().workload is WorkloadClass.SERVICE
        assert "uptime" in classify_service().explanation


class TestArithmetic:
    def test_compute_time_is_six_p_t_over_f_u(self) -> None:
        t = compute_time_s(ONE_B_BF16, 10**15, 50)
        assert t == pytest.approx(6 * 10**9 * 8192 / (10**15 * 0.5))

    def test_ring_all_reduce_moves_2_n_minus_1_over_n_of_the_gradient(self) -> None:
        assert sync_bytes(ONE_B_BF16) == 2 * 7 * 10**9 * 2 // 8
        two = TrainingShape(2, 1000, 4, 1)
        assert sync_bytes(two) == 4000  # 2 (N-1)/N = 1 for N = 2

    def test_required_bandwidth_puts_the_ratio_exactly_at_the_threshold(self) -> None:
        need = required_bandwidth(ONE_B_BF16, H100.fp16_flops)
        assert need is not None
        at = Link("just enough", need, 5e-6)
        assert ratio(ONE_B_BF16, at, H100.fp16_flops) <= OVERLAP_THRESHOLD
        below = Link("a bit less", int(need * 0.9), 5e-6)
        assert ratio(ONE_B_BF16, below, H100.fp16_flops) > OVERLAP_THRESHOLD

    def test_latency_alone_can_make_a_job_unplaceable(self) -> None:
        tiny = TrainingShape(64, 10**6, 2, 1)  # almost no compute to hide 126 ring steps
        assert required_bandwidth(tiny, H100.fp16_flops, latency_s=WAN.latency_s) is None

    def test_more_inner_steps_lower_the_ratio_proportionally(self) -> None:
        a = TrainingShape(8, 10**9, 2, 8192, "diloco", 10)
        b = TrainingShape(8, 10**9, 2, 8192, "diloco", 100)
        assert ratio(a, WAN, H100.fp16_flops) == pytest.approx(10 * ratio(b, WAN, H100.fp16_flops))
