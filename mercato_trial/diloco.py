"""DiLoCo inside a trial: hand the pseudo-gradient to the provider, get the global parameters.

A trial has no network. A DiLoCo worker hands its blob to its provider's daemon as a
file in its own working directory, and the daemon carries it to the tenant in signed,
hashed ``sync_chunk`` messages when the tenant asks (docs/protocol.md); the new global
parameters come back the same way into another file. The mailbox, relative to the
trial's working directory::

    .mercato-sync/out-<seq>.bin   written by the worker (to a temporary name, then renamed)
    .mercato-sync/in-<seq>.bin    written by the daemon once the blob's hash is verified

``seq`` 0 is the worker's starting parameters (it joins; the answer is the current
global parameters, so a replacement worker starts where the job is), then one
pseudo-gradient (parameters at the start of the round minus after H inner steps) per
outer step. The blob layout is market/diloco.py's: a 20-byte little-endian header
(``MDL1``, dtype code, flags, 2 spare bytes, count u32, outer step u32, int8 scale f32)
then the values. Like the rest of this package, nothing here imports Mercato.

Use with torch::

    from mercato_trial.diloco import DiLoCo
    sync = DiLoCo(model)
    sync.start()                     # joins: loads the global parameters
    while not sync.done:
        for _ in range(sync.inner_steps): train_one_step()
        sync.step()                  # blocks until the outer step comes back

With ``DiLoCo(model, overlap=True)`` the worker does not wait: ``step()`` hands the
pseudo-gradient over and returns, the next round's inner steps run while the outer step
travels, and ``poll()`` (call it after every inner step) applies the answer the moment it
arrives (or waits for it once ``max_ahead`` inner steps are in flight; by default a
quarter of a round in the first rounds, half a round after, see :func:`default_ahead`):
the global parameters plus the inner steps taken since the hand-over (their
change is rebased onto the global parameters, and counts in the next pseudo-gradient,
measured from the global parameters as usual). The tenant's side does not change. Only
the last outer step (``MERCATO_DILOCO_OUTER_STEPS``) is waited for, so the job ends on
the global parameters. The idea is Streaming DiLoCo's overlapping of communication with
computation (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication");
the merge here is a rebase of the in-flight steps, not their mixing weight::

    sync = DiLoCo(model, overlap=True, on_outer_step=evaluate)
    sync.start()
    while not sync.done:
        for _ in range(sync.inner_steps):
            train_one_step()
            sync.poll()
        sync.step()

``on_outer_step(outer_step)`` is called each time the global parameters arrive, while the
model holds exactly them (a held-out loss measured there is the job's loss, not a
worker's). Under torchrun (a worker of several devices) rank 0 exchanges and broadcasts,
and every outer step is waited for (``overlap`` applies to one-process workers).
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYNC_DIR = ".mercato-sync"
WORKER_ENV = "MERCATO_DILOCO_WORKER"
WORKERS_ENV = "MERCATO_DILOCO_WORKERS"
INNER_STEPS_ENV = "MERCATO_DILOCO_INNER_STEPS"
COMPRESSION_ENV = "MERCATO_DILOCO_COMPRESSION"
OUTER_STEPS_ENV = "MERCATO_DILOCO_OUTER_STEPS"

_HEADER = struct.Struct("<4sBBHIIf")
_CODES = {"fp32": 0, "fp16": 1, "int8": 2}
_DONE = 1


def encode(values: Any, compression: str = "fp32") -> bytes:
    """A blob of flat float values (a 1-D float tensor, or any sequence of floats)."""
    payload: bytes
    tensor = _as_tensor(values)
    if tensor is not None:
        n = tensor.numel()
        scale = 0.0
        if compression == "fp32":
            payload = tensor.float().numpy().astype("<f4").tobytes()
        elif compression == "fp16":
            payload = tensor.float().clamp(-65504, 65504).half().numpy().astype("<f2").tobytes()
        else:
            peak = float(tensor.abs().max()) if n else 0.0
            scale = peak / 127 if peak > 0 else 1.0
            q = (tensor.float() / scale).round().clamp(-127, 127).to(dtype=_torch().int8)
            payload = q.numpy().tobytes()
    else:
        vals = [float(v) for v in values]
        n = len(vals)
        scale = 0.0
        if compression == "fp32":
            payload = struct.pack(f"<{n}f", *vals)
        elif compression == "fp16":
            payload = struct.pack(f"<{n}e", *(max(-65504.0, min(65504.0, v)) for v in vals))
        else:
            peak = max((abs(v) for v in vals), default=0.0)
            scale = peak / 127 if peak > 0 else 1.0
            payload = array("b", (max(-127, min(127, round(v / scale))) for v in vals)).tobytes()
    return _HEADER.pack(b"MDL1", _CODES[compression], 0, 0, n, 0, scale) + payload


def decode(blob: bytes) -> tuple[list[float], int, bool]:
    """The values, the outer step and whether training is done (the tenant's blob)."""
    magic, code, flags, _spare, n, step, scale = _HEADER.unpack_from(blob)
    if magic != b"MDL1":
        raise ValueError("not a DiLoCo blob")
    body = blob[_HEADER.size :]
    if code == 0:
        values = list(struct.unpack(f"<{n}f", body))
    elif code == 1:
        values = list(struct.unpack(f"<{n}e", body))
    else:
        values = [x * scale for x in array("b", body)]
    return values, step, bool(flags & _DONE)


def hand_over(seq: int, blob: bytes, root: str | Path = ".") -> None:
    """Leave ``blob`` for the daemon: written to a temporary name, then renamed."""
    box = Path(root) / SYNC_DIR
    box.mkdir(mode=0o700, exist_ok=True)
    tmp = box / f".out-{seq}.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, box / f"out-{seq}.bin")
    old = box / f"out-{seq - 1}.bin"
    if seq > 0:
        old.unlink(missing_ok=True)


def wait_for(seq: int, root: str | Path = ".", poll_s: float = 0.02) -> bytes:
    """Block until the daemon has written the answer to hand-over ``seq``; return it."""
    path = Path(root) / SYNC_DIR / f"in-{seq}.bin"
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            time.sleep(poll_s)
            continue
        path.unlink(missing_ok=True)
        return data


def answer_ready(seq: int, root: str | Path = ".") -> bool:
    """Whether the daemon has written the answer to hand-over ``seq`` (one stat call)."""
    return (Path(root) / SYNC_DIR / f"in-{seq}.bin").exists()


def exchange(seq: int, blob: bytes, root: str | Path = ".") -> bytes:
    """Hand over ``blob`` as ``seq`` and wait for the tenant's answer."""
    hand_over(seq, blob, root)
    return wait_for(seq, root)


def default_ahead(inner_steps: int, outer_steps: int | None, landed: int) -> int:
    """Inner steps a worker may take with an outer step in flight, ``landed`` steps in.

    A quarter of a round while the job is young, half a round once ``max(3, a quarter of
    the outer steps)`` outer steps have landed. Steps taken in flight are computed before
    the outer step they are rebased onto, so they are stale by that step; the outer steps
    are largest while the loss still falls steeply (the first ones), which is where half
    a round of stale steps cost a short job its progress (a 3-outer-step int8 job ended
    above its first step's loss). Later the outer steps are small and the longer window
    hides more of the relay and of the slower workers (bench/diloco_bench.py). A job of
    at most 3 outer steps (or whose worker is not told how many) stays at a quarter.
    """
    quarter = max(1, inner_steps // 4)
    if outer_steps is None or landed < max(3, -(-outer_steps // 4)):
        return quarter
    return max(quarter, inner_steps // 2)


def _torch() -> Any:
    import torch

    return torch


def _as_tensor(values: Any) -> Any:
    if type(values).__module__.startswith("torch"):
        return values.detach().reshape(-1)
    return None


class DiLoCo:
    """The worker's side of DiLoCo for a torch model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        compression: str | None = None,
        root: str | Path = ".",
        *,
        overlap: bool = False,
        max_ahead: int | None = None,
        on_outer_step: Callable[[int], None] | None = None,
    ) -> None:
        self.torch = _torch()
        self.params = [p for p in model.parameters()]
        self.compression = compression or os.environ.get(COMPRESSION_ENV, "fp32")
        self.inner_steps = int(os.environ.get(INNER_STEPS_ENV, "100"))
        self.worker = int(os.environ.get(WORKER_ENV, "0"))
        self.workers = int(os.environ.get(WORKERS_ENV, "1"))
        outer = os.environ.get(OUTER_STEPS_ENV)
        self.outer_steps = int(outer) if outer else None
        self.root = root
        self.seq = 0
        self.outer_step = 0
        self.done = False
        self.sync_s = 0.0  # time spent inside the helper: waiting, copying, (de)coding
        self.on_outer_step = on_outer_step
        self._start: Any = None  # the global parameters the current round started from
        self._handed: Any = None  # the parameters at the hand-over still in flight
        dist = self.torch.distributed
        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self._rank = self._dist.get_rank() if self._dist is not None else 0
        several = self._dist is not None and self._dist.get_world_size() > 1
        # Overlap needs to know which outer step is the last (that one is waited for),
        # and one process: ranks would have to agree on the inner step an answer lands.
        self.overlap = overlap and self.outer_steps is not None and not several
        # Inner steps a worker may take while its outer step is in flight before poll()
        # waits for it. A worker that is persistently faster than the slowest waits the
        # same time either way; waiting early keeps its steps from going stale (their
        # gradients are taken before the outer step they are rebased onto). None: the
        # schedule of default_ahead, set at each hand-over.
        self._fixed_ahead = max_ahead
        self.max_ahead = self._ahead_now()
        self._ahead = 0

    def _ahead_now(self) -> int:
        if self._fixed_ahead is not None:
            return self._fixed_ahead
        return default_ahead(self.inner_steps, self.outer_steps, self.outer_step)

    def _flat(self) -> Any:
        return self.torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def _load(self, flat: Any) -> None:
        i = 0
        with self.torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[i : i + n].reshape(p.shape).to(p.dtype))
                i += n

    def _arrived(self, answer: bytes) -> Any:
        """Load the global parameters of an answer; they are the next round's start."""
        got, step, done = decode(answer)
        flat = self.torch.tensor(got, dtype=self.torch.float32)
        self.outer_step, self.done = step, done
        self._load(flat)
        self._start = flat
        self.seq += 1
        if self.on_outer_step is not None and self.seq > 1:
            self.on_outer_step(self.outer_step)
        return flat

    def _exchange(self, values: Any, compression: str) -> None:
        began = time.monotonic()
        meta = self.torch.zeros(2, dtype=self.torch.float64)
        flat = self.torch.zeros(self._start.numel() if self._start is not None else 0)
        if self._rank == 0:
            answer = exchange(self.seq, encode(values, compression), self.root)
            got, step, done = decode(answer)
            flat = self.torch.tensor(got, dtype=self.torch.float32)
            meta = self.torch.tensor([float(step), 1.0 if done else 0.0], dtype=self.torch.float64)
        if self._dist is not None and self._dist.get_world_size() > 1:
            if flat.numel() == 0:
                flat = self.torch.zeros(sum(p.numel() for p in self.params))
            self._dist.broadcast(flat, 0)
            self._dist.broadcast(meta, 0)
        self.outer_step, self.done = int(meta[0]), bool(meta[1])
        self._load(flat)
        self._start = flat.clone()
        self.seq += 1
        self.sync_s += time.monotonic() - began
        if self.on_outer_step is not None and self.seq > 1:
            self.on_outer_step(self.outer_step)

    def start(self) -> None:
        """Join: hand over the starting parameters (full precision), load the global ones."""
        self._start = self._flat().clone()
        self._exchange(self._start, "fp32")

    def poll(self) -> bool:
        """With ``overlap``: apply the outer step if its answer is there; never blocks.

        The inner steps taken since the hand-over are kept, rebased onto the new global
        parameters: params = global + (params now - params at the hand-over).
        """
        if self._handed is None:
            return False
        self._ahead += 1
        if self._ahead < self.max_ahead and not answer_ready(self.seq, self.root):
            return False
        self._receive()  # waits if ``max_ahead`` steps are already in flight
        return True

    def _receive(self) -> None:
        began = time.monotonic()
        answer = wait_for(self.seq, self.root)
        since = self._flat() - self._handed
        self._handed = None
        glob = self._arrived(answer)
        if not self.done:
            self._load(glob + since)
        self.sync_s += time.monotonic() - began

    def step(self) -> None:
        """One outer step: hand over start - now; load (or, overlapped, await) the answer."""
        if self._handed is not None:  # the previous outer step is still in flight
            self._receive()
        if self.done:  # the job ended while this worker's last answer was in flight
            self._load(self._start)
            return
        delta = self._start - self._flat()
        last = self.outer_steps is not None and self.outer_step + 1 >= self.outer_steps
        if not self.overlap or last:
            self._exchange(delta, self.compression)
            return
        began = time.monotonic()
        hand_over(self.seq, encode(delta, self.compression), self.root)
        self._handed = self._flat()
        self._ahead = 0
        self.max_ahead = self._ahead_now()
        self.sync_s += time.monotonic() - began
