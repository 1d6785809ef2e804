"""DiLoCo through the market: the split into workers, the traffic, and the outer step.

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models") trains W replicas ("workers") independently for H inner steps, then
averages their pseudo-gradients (parameters at the start of the round minus parameters
after H steps) and applies an outer optimizer, Nesterov momentum with lr 0.7 and
momentum 0.9 (their sec. 3). Communication happens once per H steps instead of every
step, which is what lets a job span providers joined only by the internet.

In Mercato each worker is a gang of ``k`` devices on one provider (DDP inside it, as a
gang job), the workers may sit on different providers, and the outer step runs at the
tenant: every pseudo-gradient travels worker -> provider daemon -> tenant in signed
``sync_chunk`` messages and the new global parameters travel back the same way.

Everything here is pure: the planner's split (by expected cost to complete), the
bytes and time per outer step against DDP's per-step all-reduce, the blob format a
worker's parameters travel in, and the outer optimizer on plain float arrays.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from market.classify import (
    FABRIC_LATENCY_S,
    WAN,
    Link,
    TrainingShape,
    compute_time_s,
    sync_bytes,
    sync_time_s,
)

#: Outer optimizer of DiLoCo (Douillard et al. 2023, sec. 3 and Table 5): Nesterov
#: momentum, learning rate 0.7, momentum 0.9.
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9

Compression = Literal["fp32", "fp16", "int8"]
#: Bytes per parameter on the wire for each compression of the outer-step blobs.
WIRE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
_DTYPE_CODE = {"fp32": 0, "fp16": 1, "int8": 2}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}

#: Blob header: magic, dtype code, flags (bit 0: training is done), 2 spare bytes,
#: element count, outer step, int8 scale. Little-endian, 20 bytes. The same layout is
#: written by mercato_trial.diloco inside the sandbox (tested to agree).
BLOB_MAGIC = b"MDL1"
_HEADER = struct.Struct("<4sBBHIIf")
HEADER_BYTES = _HEADER.size
FLAG_DONE = 1
#: Most parameters one blob may carry (2^28 fp32 = 1 GiB): a bound on what a peer can
#: make the tenant or a provider hold.
MAX_BLOB_PARAMETERS = 1 << 28


class BlobError(ValueError):
    """A blob that is not a well-formed DiLoCo parameter blob; says why."""


@dataclass(frozen=True, slots=True)
class Blob:
    """Flat float32 values with the outer step they belong to."""

    values: array[float]
    outer_step: int = 0
    done: bool = False


def encode_blob(
    values: Sequence[float] | array[float],
    *,
    compression: Compression = "fp32",
    outer_step: int = 0,
    done: bool = False,
) -> bytes:
    """Serialise flat parameters; fp16 and int8 (one absmax scale) shrink them 2x / 4x."""
    n = len(values)
    if n > MAX_BLOB_PARAMETERS:
        raise BlobError(f"{n} parameters exceed {MAX_BLOB_PARAMETERS}")
    flags = FLAG_DONE if done else 0
    scale = 0.0
    if compression == "fp32":
        body = array("f", values)
        payload = body.tobytes()
    elif compression == "fp16":
        payload = struct.pack(f"<{n}e", *(_clamp16(v) for v in values))
    else:
        peak = max((abs(v) for v in values), default=0.0)
        scale = peak / 127 if peak > 0 else 1.0
        q = array("b", (max(-127, min(127, round(v / scale))) for v in values))
        payload = q.tobytes()
    if compression == "fp32" and struct.pack("=i", 1) != struct.pack("<i", 1):
        body.byteswap()
        payload = body.tobytes()
    header = _HEADER.pack(BLOB_MAGIC, _DTYPE_CODE[compression], flags, 0, n, outer_step, scale)
    return header + payload


def _clamp16(v: float) -> float:
    return max(-65504.0, min(65504.0, v))


def decode_blob(data: bytes, *, max_parameters: int = MAX_BLOB_PARAMETERS) -> Blob:
    """Parse a blob; refuse a wrong magic, dtype, length or a non-finite value."""
    if len(data) < HEADER_BYTES:
        raise BlobError(f"{len(data)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, code, flags, _spare, n, step, scale = _HEADER.unpack_from(data)
    if magic != BLOB_MAGIC:
        raise BlobError("not a DiLoCo blob (bad magic)")
    dtype = _CODE_DTYPE.get(code)
    if dtype is None:
        raise BlobError(f"unknown dtype code {code}")
    if n > max_parameters:
        raise BlobError(f"{n} parameters exceed the limit of {max_parameters}")
    payload = memoryview(data)[HEADER_BYTES:]
    if len(payload) != n * WIRE_BYTES[dtype]:
        raise BlobError(f"{len(payload)} payload bytes for {n} {dtype} values")
    if dtype == "fp32":
        values = array("f")
        values.frombytes(payload)
        if struct.pack("=i", 1) != struct.pack("<i", 1):
            values.byteswap()
    elif dtype == "fp16":
        values = array("f", struct.unpack(f"<{n}e", payload))
    else:
        if not (math.isfinite(scale) and scale > 0):
            raise BlobError("int8 blob with a bad scale")
        q = array("b")
        q.frombytes(payload)
        values = array("f", (x * scale for x in q))
    if not all(math.isfinite(v) for v in values):
        raise BlobError("a blob value is not finite")
    return Blob(values, step, bool(flags & FLAG_DONE))


@dataclass
class OuterOptimizer:
    """Nesterov momentum on flat parameters, as torch.optim.SGD(nesterov=True).

    With g the averaged pseudo-gradient: ``b = mu b + g`` (``b = g`` the first time),
    ``theta -= lr (g + mu b)``.
    """

    params: array[float]
    lr: float = OUTER_LR
    momentum: float = OUTER_MOMENTUM
    buffer: array[float] | None = None
    steps: int = 0

    def step(self, pseudo_gradients: Sequence[Sequence[float]]) -> array[float]:
        """Average the workers' pseudo-gradients and apply one outer step."""
        if not pseudo_gradients:
            raise ValueError("an outer step needs at least one pseudo-gradient")
        n = len(self.params)
        for g in pseudo_gradients:
            if len(g) != n:
                raise ValueError(f"a pseudo-gradient of {len(g)} values for {n} parameters")
        w = len(pseudo_gradients)
        avg = [sum(col) / w for col in zip(*pseudo_gradients, strict=True)]
        mu, lr = self.momentum, self.lr
        if self.buffer is None:
            buf = array("f", avg)
        else:
            buf = array("f", (mu * b + g for b, g in zip(self.buffer, avg, strict=True)))
        self.buffer = buf
        self.params = array(
            "f",
            (p - lr * (g + mu * b) for p, g, b in zip(self.params, avg, buf, strict=True)),
        )
        self.steps += 1
        return self.params


# --- traffic ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OuterTraffic:
    """Bytes and time of one outer step, against DDP's all-reduces over the same steps.

    Pseudo-gradients go worker -> provider -> tenant (P x b bytes each, b bytes per value
    of the chosen compression) and the new global parameters come back in fp32 (P x 4:
    parameters, unlike their changes, are not quantised). The tenant's link carries W
    times that, each direction over its own half of the link, so it is the bottleneck:
    time = W P max(b, 4) / B + 2 L (up, then down). DDP over the same devices sends
    2 (N-1)/N P g per device every step, H times per outer step.
    """

    workers: int
    inner_steps: int
    bytes_per_worker: int  # sent per worker per outer step (its pseudo-gradient)
    bytes_down_per_worker: int  # received per worker per outer step (global parameters)
    tenant_bytes: int  # received by the tenant per outer step
    time_s: float  # over the link, tenant-bound
    ddp_bytes_per_step: int  # per device, one DDP all-reduce
    ddp_bytes_per_outer_step: int  # per device, H DDP all-reduces
    link: str

    @property
    def reduction(self) -> float:
        """How many times fewer bytes a worker sends than a DDP device over H steps."""
        return self.ddp_bytes_per_outer_step / max(1, self.bytes_per_worker)

    def summary(self) -> str:
        return (
            f"each outer step (every {self.inner_steps} steps) a worker sends "
            f"{_size(self.bytes_per_worker)} and receives {_size(self.bytes_down_per_worker)}; "
            f"the tenant takes in {_size(self.tenant_bytes)}, {self.time_s:.3g} s both ways "
            f"over the {self.link}. "
            f"DDP would send {_size(self.ddp_bytes_per_step)} per device every step, "
            f"{_size(self.ddp_bytes_per_outer_step)} over the same {self.inner_steps} "
            f"steps: {self.reduction:.3g}x less"
        )


def _size(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{int(n)} B"


def outer_traffic(
    parameters: int,
    workers: int,
    inner_steps: int,
    world_size: int,
    gradient_bytes: int,
    compression: Compression = "fp32",
    link: Link = WAN,
) -> OuterTraffic:
    """The figures of :class:`OuterTraffic` for one job."""
    per_worker = parameters * WIRE_BYTES[compression] + HEADER_BYTES
    down = parameters * WIRE_BYTES["fp32"] + HEADER_BYTES
    tenant = per_worker * workers
    ddp = sync_bytes(TrainingShape(world_size, parameters, gradient_bytes, 1))
    return OuterTraffic(
        workers=workers,
        inner_steps=inner_steps,
        bytes_per_worker=per_worker,
        bytes_down_per_worker=down,
        tenant_bytes=tenant,
        time_s=(tenant + down * workers) / link.bandwidth + 2 * link.latency_s,
        ddp_bytes_per_step=ddp,
        ddp_bytes_per_outer_step=ddp * inner_steps,
        link=link.name,
    )


# --- the outer loop, at the tenant -------------------------------------------------------


@dataclass
class OuterLoop:
    """The tenant's side of DiLoCo as a state machine: joins, reports, outer steps.

    A worker joins with its starting parameters (the first join sets the global ones;
    a later one, e.g. a replacement, gets the current global parameters). It then
    reports one pseudo-gradient per round. A round's outer step is taken when every
    live worker has reported, or ``round_timeout_ms`` after the first report with
    whoever reported by then (a worker lost mid-round does not stop the job; a late
    pseudo-gradient counts in the next round). ``now_ms`` is passed in; nothing sleeps.

    The first workers start together (:meth:`started`): the answer to a join is held
    until every expected worker has joined, so no worker trains round 1 alone while
    another's sandbox is still starting, then waits for it at the first outer step.
    """

    total_steps: int
    round_timeout_ms: int
    lr: float = OUTER_LR
    momentum: float = OUTER_MOMENTUM
    optimizer: OuterOptimizer | None = None
    pending: dict[str, array[float]] = field(default_factory=dict)
    round_started_ms: int | None = None
    history: list[tuple[int, int]] = field(default_factory=list)  # (outer step, reporters)
    joined: dict[str, int] = field(default_factory=dict)  # worker -> when it joined (ms)

    @property
    def outer_step(self) -> int:
        return 0 if self.optimizer is None else self.optimizer.steps

    @property
    def done(self) -> bool:
        return self.outer_step >= self.total_steps

    def join(
        self,
        params: Sequence[float] | array[float],
        *,
        worker: str | None = None,
        now_ms: int = 0,
    ) -> bytes:
        """A worker's starting parameters in; the current global parameters out."""
        if self.optimizer is None:
            self.optimizer = OuterOptimizer(array("f", params), self.lr, self.momentum)
        elif len(params) != len(self.optimizer.params):
            raise BlobError(
                f"a worker joined with {len(params)} parameters, the job has "
                f"{len(self.optimizer.params)}"
            )
        if worker is not None:
            self.joined.setdefault(worker, now_ms)
        return self.answer()

    def started(self, expected: Iterable[str], now_ms: int) -> bool:
        """Whether the joined workers may take their first inner step now.

        Yes once every ``expected`` worker has joined, or ``round_timeout_ms`` after the
        first join (a worker that never comes does not hold the others longer than a
        round would), or once an outer step has been taken (a replacement joining
        mid-run starts at once).
        """
        if self.outer_step > 0:
            return True
        if not self.joined:
            return False
        if set(expected) <= set(self.joined):
            return True
        return now_ms >= min(self.joined.values()) + self.round_timeout_ms

    def join_due(
        self, joined_step: int, joined_ms: int, now_ms: int, *, others_running: bool
    ) -> bool:
        """Whether a worker that joined mid-run at outer step ``joined_step`` (a
        replacement) gets its answer now.

        At the next round boundary: answered then, it starts a whole round with the
        others from the newest global parameters, and its first pseudo-gradient comes
        with theirs. Answered at once, it trained from older parameters and its first
        pseudo-gradient came H inner steps after a join in mid-round, in the next round,
        which it then waited for (0.74-0.89 of its time in inner steps in
        bench/diloco_bench.py, depending on where in the round it joined). At once when
        nobody else could close the round, when the job is done, or after
        ``round_timeout_ms`` (a round that never closes does not hold it longer).
        """
        return (
            self.done
            or self.outer_step > joined_step
            or not others_running
            or now_ms >= joined_ms + self.round_timeout_ms
        )

    def answer(self) -> bytes:
        """The global parameters as a worker receives them (fp32, with the step and done)."""
        assert self.optimizer is not None
        return encode_blob(self.optimizer.params, outer_step=self.outer_step, done=self.done)

    def report(self, worker: str, pseudo_gradient: array[float], now_ms: int) -> None:
        """A worker's pseudo-gradient for the current round (a second one replaces it)."""
        assert self.optimizer is not None, "a worker reports only after joining"
        if len(pseudo_gradient) != len(self.optimizer.params):
            raise BlobError(
                f"a pseudo-gradient of {len(pseudo_gradient)} values for "
                f"{len(self.optimizer.params)} parameters"
            )
        if self.round_started_ms is None:
            self.round_started_ms = now_ms
        self.pending[worker] = pseudo_gradient

    def deadline_ms(self) -> int | None:
        """When the current round steps without the workers still missing."""
        if self.round_started_ms is None:
            return None
        return self.round_started_ms + self.round_timeout_ms

    def ready(self, live: Iterable[str], now_ms: int) -> bool:
        """Whether to take the outer step now."""
        if not self.pending or self.done:
            return False
        missing = set(live) - set(self.pending)
        deadline = self.deadline_ms()
        return not missing or (deadline is not None and now_ms >= deadline)

    def step(self) -> list[str]:
        """Average the pending pseudo-gradients, apply Nesterov; the workers answered."""
        assert self.optimizer is not None
        reporters = sorted(self.pending)
        self.optimizer.step([self.pending[w] for w in reporters])
        self.history.append((self.outer_step, len(reporters)))
        self.pending.clear()
        self.round_started_ms = None
        return reporters


# --- the split ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """What one provider offers a worker: free matching devices and their figures."""

    provider: str
    address: str
    model: str
    free: int
    gang_size: int  # devices its fabric joins
    bandwidth: int  # its fabric, per direction
    flops: int  # per device
    price: int  # micro-credits per device-hour


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """One worker of the split: a gang of ``devices`` on one provider."""

    provider: str
    address: str
    model: str
    devices: int
    price: int
    step_s: float  # one inner step on this gang


@dataclass(frozen=True, slots=True)
class Split:
    """W workers of k devices each, their expected runtime and cost to complete."""

    devices_per_worker: int
    workers: tuple[WorkerSlot, ...]
    runtime_s: float | None  # None when the job gives no step count
    cost: int | None  # micro-credits for every worker held for the whole run
    traffic: OuterTraffic
    considered: tuple[str, ...] = field(default_factory=tuple)  # the other splits, one line each

    @property
    def providers(self) -> list[str]:
        return sorted({w.provider for w in self.workers})

    def describe(self) -> str:
        per: dict[str, int] = {}
        for w in self.workers:
            per[w.provider] = per.get(w.provider, 0) + 1
        where = ", ".join(f"{n} on {p[:12]}" for p, n in sorted(per.items()))
        return (
            f"{len(self.workers)} workers x {self.devices_per_worker} device(s) "
            f"(DDP inside each worker, DiLoCo between them) on {len(per)} provider(s): {where}"
        )


def inner_step_s(shape: TrainingShape, k: int, offer: Offer, util: int) -> float:
    """One inner step of a k-device gang: compute plus what its all-reduce cannot hide."""
    t_c = compute_time_s(shape, offer.flops, util)
    if k <= 1:
        return t_c
    gang = TrainingShape(k, shape.parameters, shape.gradient_bytes, shape.tokens_per_step)
    link = Link("fabric", max(1, offer.bandwidth), FABRIC_LATENCY_S)
    return t_c + max(0.0, sync_time_s(gang, link) - (2 / 3) * t_c)


def choose_split(
    shape: TrainingShape,
    offers: Iterable[Offer],
    *,
    steps: int | None,
    util: int,
    workers: int | None = None,
    compression: Compression = "fp32",
    link: Link = WAN,
) -> Split | None:
    """The split of ``shape.world_size`` devices into workers with the least expected cost.

    For each worker size k dividing the world size (or the one ``workers`` fixes), the
    W = N / k worker slots are taken from the offers cheapest per inner step first (a
    provider with f free devices offers f // k slots, if its fabric joins k devices).
    The outer steps are synchronous, so the job runs at the pace of its slowest worker:
    runtime = steps x slowest inner step + outer steps x the relay time, and every
    worker is paid for that whole runtime. The cheapest complete split wins; a tie goes
    to fewer workers (less traffic). None when no split can be filled now.
    """
    n = shape.world_size
    pool = list(offers)
    sizes = [k for k in range(1, n + 1) if n % k == 0]
    if workers is not None:
        sizes = [n // workers] if n % workers == 0 else []
    best: Split | None = None
    best_key: tuple[float, int] | None = None
    lines: list[str] = []
    for k in sizes:
        w = n // k
        slots: list[WorkerSlot] = []
        for o in pool:
            if k > 1 and o.gang_size < k:
                continue
            t = inner_step_s(shape, k, o, util)
            slots += [WorkerSlot(o.provider, o.address, o.model, k, o.price, t)] * (o.free // k)
        slots.sort(key=lambda s: (s.price * k * s.step_s, s.provider))
        if len(slots) < w:
            lines.append(f"{w} x {k}: only {len(slots)} slot(s) free")
            continue
        chosen = tuple(slots[:w])
        traffic = outer_traffic(
            shape.parameters, w, shape.inner_steps, n, shape.gradient_bytes, compression, link
        )
        runtime = cost = None
        if steps is not None:
            outer = -(-steps // max(1, shape.inner_steps))
            runtime = steps * max(s.step_s for s in chosen) + (
                outer * traffic.time_s if w > 1 else 0
            )
            per_hour = sum(s.price * k for s in chosen)
            cost = -(-int(per_hour * runtime * 1000) // 3_600_000)
        key = (
            float(cost) if cost is not None else float(sum(s.price * k * s.step_s for s in chosen)),
            w,
        )
        lines.append(
            f"{w} x {k}: "
            + ("cost unknown (no steps)" if cost is None else f"{cost} micro-credits")
        )
        if best_key is None or key < best_key:
            best_key = key
            best = Split(k, chosen, runtime, cost, traffic)
    if best is None:
        return None
    return Split(
        best.devices_per_worker, best.workers, best.runtime_s, best.cost, best.traffic, tuple(lines)
    )
