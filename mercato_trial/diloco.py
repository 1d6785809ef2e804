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

Under torchrun (a worker of several devices) rank 0 exchanges and broadcasts.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from pathlib import Path
from typing import Any

SYNC_DIR = ".mercato-sync"
WORKER_ENV = "MERCATO_DILOCO_WORKER"
WORKERS_ENV = "MERCATO_DILOCO_WORKERS"
INNER_STEPS_ENV = "MERCATO_DILOCO_INNER_STEPS"
COMPRESSION_ENV = "MERCATO_DILOCO_COMPRESSION"

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


def exchange(seq: int, blob: bytes, root: str | Path = ".") -> bytes:
    """Hand over ``blob`` as ``seq`` and wait for the tenant's answer."""
    hand_over(seq, blob, root)
    return wait_for(seq, root)


def _torch() -> Any:
    import torch

    return torch


def _as_tensor(values: Any) -> Any:
    if type(values).__module__.startswith("torch"):
        return values.detach().reshape(-1)
    return None


class DiLoCo:
    """The worker's side of DiLoCo for a torch model (see the module docstring)."""

    def __init__(self, model: Any, compression: str | None = None, root: str | Path = ".") -> None:
        self.torch = _torch()
        self.params = [p for p in model.parameters()]
        self.compression = compression or os.environ.get(COMPRESSION_ENV, "fp32")
        self.inner_steps = int(os.environ.get(INNER_STEPS_ENV, "100"))
        self.worker = int(os.environ.get(WORKER_ENV, "0"))
        self.workers = int(os.environ.get(WORKERS_ENV, "1"))
        self.root = root
        self.seq = 0
        self.outer_step = 0
        self.done = False
        self.sync_s = 0.0  # time spent waiting for outer steps
        self._start: Any = None
        dist = self.torch.distributed
        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self._rank = self._dist.get_rank() if self._dist is not None else 0

    def _flat(self) -> Any:
        return self.torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def _load(self, flat: Any) -> None:
        i = 0
        with self.torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[i : i + n].reshape(p.shape).to(p.dtype))
                i += n
        self._start = self._flat().clone()

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
        self.seq += 1
        self.sync_s += time.monotonic() - began

    def start(self) -> None:
        """Join: hand over the starting parameters (full precision), load the global ones."""
        self._start = self._flat().clone()
        self._exchange(self._start, "fp32")

    def step(self) -> None:
        """One outer step: hand over start - now, load the new global parameters."""
        delta = self._start - self._flat()
        self._exchange(delta, self.compression)
