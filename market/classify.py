"""Workload classification: which jobs need a fast fabric, by arithmetic, with the numbers.

For data-parallel training on N devices (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", sec. 2.1: training costs about 6 FLOP per parameter per token):

    compute per step   t_c = 6 * P * T / (F * u)
        P parameters, T tokens per device per step, F device FLOP/s, u utilisation
    bytes per sync     S   = 2 (N-1)/N * P * g
        ring all-reduce (Patarasuk & Yuan 2009): each device sends and receives
        2(N-1)/N of the gradient; g bytes per gradient element (2 for bf16)
    time per sync      t_s = S / B + 2 (N-1) * L
        B per-direction link bandwidth, L link latency (2(N-1) ring steps)
    ratio              r   = t_s / (H * t_c)
        H steps between syncs: 1 for DDP, inner_steps for DiLoCo (Douillard et al.
        2023, "DiLoCo: Distributed Low-Communication Training of Language Models")

DDP overlaps the all-reduce with the backward pass, which is about two thirds of a
step (backward costs twice the forward; Kaplan et al.). A job whose communication
takes at most half of its compute (``OVERLAP_THRESHOLD`` = 0.5) hides it behind the
backward pass with margin; above that, communication shows in the step time and
scaling efficiency falls quickly. So:

* **parallel**: no communication (sweeps, single-device training);
* **loosely coupled**: r <= threshold even over the WAN reference link, so it may be
  spread over several providers (e.g. DiLoCo with many inner steps);
* **bandwidth-bound**: r > threshold over the WAN link: one gang on one provider whose
  advertised interconnect keeps r under the threshold, never split over providers;
* **service**: long-running inference, placed for uptime, not for bandwidth.

The WAN reference is 1 Gb/s per direction with 30 ms latency: a good internet path
between two providers' sites, not a bad one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from market.catalog import DEFAULT_UTILISATION_PCT

OVERLAP_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class Link:
    """A network path: per-direction bandwidth (bytes/s) and one-way latency (s)."""

    name: str
    bandwidth: int
    latency_s: float


#: Reference inter-provider link: 1 Gb/s per direction, 30 ms.
WAN = Link("1 Gb/s WAN between providers", 125_000_000, 0.030)
#: Latency inside one machine's fabric (NVLink, IPU-Link, PCIe): a few microseconds.
FABRIC_LATENCY_S = 5e-6


class WorkloadClass(Enum):
    PARALLEL = "parallel"
    LOOSELY_COUPLED = "loosely_coupled"
    BANDWIDTH_BOUND = "bandwidth_bound"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class TrainingShape:
    """What the arithmetic needs to know about a training job."""

    world_size: int  # devices
    parameters: int
    gradient_bytes: int  # bytes per gradient element
    tokens_per_step: int  # per device
    sync_method: Literal["ddp", "diloco"] = "ddp"
    inner_steps: int = 1  # steps between syncs (DiLoCo); 1 for DDP


@dataclass(frozen=True, slots=True)
class Classification:
    """The class, the figures it rests on, and a paragraph saying why."""

    workload: WorkloadClass
    compute_s: float  # per step, per device
    sync_bytes: int  # per device per sync
    steps_per_sync: int
    wan_ratio: float  # communication / overlapped compute over the WAN reference link
    required_bandwidth: int | None  # per direction, inside a gang; None if not needed
    explanation: str

    @property
    def needs_gang(self) -> bool:
        return self.workload is WorkloadClass.BANDWIDTH_BOUND


def compute_time_s(shape: TrainingShape, device_flops: int, utilisation_pct: int) -> float:
    """6 P T / (F u): seconds of compute per step on one device."""
    return 6 * shape.parameters * shape.tokens_per_step / (device_flops * utilisation_pct / 100)


def sync_bytes(shape: TrainingShape) -> int:
    """Bytes each device sends (and receives) per ring all-reduce: 2 (N-1)/N P g."""
    n = shape.world_size
    return (2 * (n - 1) * shape.parameters * shape.gradient_bytes) // n


def sync_time_s(shape: TrainingShape, link: Link) -> float:
    """S / B + 2 (N-1) L."""
    steps = 2 * (shape.world_size - 1)
    return sync_bytes(shape) / link.bandwidth + steps * link.latency_s


def ratio(
    shape: TrainingShape,
    link: Link,
    device_flops: int,
    utilisation_pct: int = DEFAULT_UTILISATION_PCT,
) -> float:
    """Communication time over compute time it overlaps, per sync."""
    steps = max(1, shape.inner_steps)
    return sync_time_s(shape, link) / (steps * compute_time_s(shape, device_flops, utilisation_pct))


def required_bandwidth(
    shape: TrainingShape,
    device_flops: int,
    utilisation_pct: int = DEFAULT_UTILISATION_PCT,
    latency_s: float = FABRIC_LATENCY_S,
    threshold: float = OVERLAP_THRESHOLD,
) -> int | None:
    """Least per-direction bandwidth keeping the ratio under ``threshold``; None if none can.

    From S / B + 2(N-1) L <= threshold * H * t_c.
    """
    budget = (
        threshold * max(1, shape.inner_steps) * compute_time_s(shape, device_flops, utilisation_pct)
    )
    budget -= 2 * (shape.world_size - 1) * latency_s
    if budget <= 0:
        return None
    return int(-(-sync_bytes(shape) // budget))


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def classify_training(
    shape: TrainingShape,
    device_flops: int,
    *,
    utilisation_pct: int = DEFAULT_UTILISATION_PCT,
    wan: Link = WAN,
    threshold: float = OVERLAP_THRESHOLD,
) -> Classification:
    """Classify a training job for devices of ``device_flops`` FP16 FLOP/s."""
    t_c = compute_time_s(shape, device_flops, utilisation_pct)
    steps = max(1, shape.inner_steps) if shape.sync_method == "diloco" else 1
    effective = TrainingShape(
        shape.world_size,
        shape.parameters,
        shape.gradient_bytes,
        shape.tokens_per_step,
        shape.sync_method,
        steps,
    )
    if shape.world_size <= 1:
        return Classification(
            WorkloadClass.PARALLEL,
            t_c,
            0,
            steps,
            0.0,
            None,
            f"Training on one device exchanges no gradients: {t_c:.3g} s of compute per "
            "step and nothing to synchronise, so any single fitting device will do.",
        )
    s = sync_bytes(effective)
    r_wan = ratio(effective, wan, device_flops, utilisation_pct)
    need = required_bandwidth(effective, device_flops, utilisation_pct, threshold=threshold)
    every = "every step (DDP)" if steps == 1 else f"every {steps} steps ({shape.sync_method})"
    base = (
        f"Each step computes for {t_c:.3g} s per device (6 x {shape.parameters:.3g} parameters "
        f"x {shape.tokens_per_step} tokens at {device_flops / 1e12:.4g} TFLOP/s and "
        f"{utilisation_pct}% utilisation). A ring all-reduce over {shape.world_size} devices "
        f"moves {_gb(s)} per device {every}, which takes "
        f"{sync_time_s(effective, wan):.3g} s over the {wan.name}: "
        f"{r_wan:.3g} x the compute it can hide behind (threshold {threshold})."
    )
    if r_wan <= threshold:
        return Classification(
            WorkloadClass.LOOSELY_COUPLED,
            t_c,
            s,
            steps,
            r_wan,
            None,
            base + " Communication hides behind compute even across providers, so the "
            "job is loosely coupled and may span several providers.",
        )
    if need is None:
        tail = (
            " Even an infinitely fast fabric could not hide the ring's latency: the job "
            "cannot scale to this many devices at this batch size."
        )
    else:
        tail = (
            f" It is bandwidth-bound: it must run as one gang of {shape.world_size} devices "
            f"on one provider whose interconnect gives at least {_gb(need)}/s per direction, "
            "and is never split across providers."
        )
    return Classification(WorkloadClass.BANDWIDTH_BOUND, t_c, s, steps, r_wan, need, base + tail)


def classify_sweep(trials: int | None) -> Classification:
    n = "an unknown number of" if trials is None else str(trials)
    return Classification(
        WorkloadClass.PARALLEL,
        0.0,
        0,
        1,
        0.0,
        None,
        f"A sweep runs {n} independent trials that never communicate: embarrassingly "
        "parallel, so each trial goes to whichever fitting device is cheapest per unit of "
        "work, on any provider.",
    )


def classify_service() -> Classification:
    return Classification(
        WorkloadClass.SERVICE,
        0.0,
        0,
        1,
        0.0,
        None,
        "A service runs for a long time and is judged by availability more than by peak "
        "speed: it is placed on providers with the best uptime record, restarted on failure.",
    )


def gang_fits(
    c: Classification, gang_size: int, interconnect_bandwidth: int, world_size: int
) -> bool:
    """Could one provider with this fabric host the job as a gang?"""
    if c.workload is not WorkloadClass.BANDWIDTH_BOUND:
        return True
    return (
        gang_size >= world_size
        and c.required_bandwidth is not None
        and interconnect_bandwidth >= c.required_bandwidth
    )
