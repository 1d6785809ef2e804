"""One DiLoCo worker: a small character-level language model on text made here.

The tenant leases W workers on (possibly) different providers and runs each as this
script (under torchrun when a worker has several devices). Every H inner steps the
worker hands its pseudo-gradient to its provider's daemon through
``mercato_trial.diloco`` (a file in its work directory: the trial has no network); the
tenant's new global parameters come back the same way. The worker does not wait for
them (``overlap=True``): it goes on with the next round's inner steps and applies the
outer step the moment it lands; only the last outer step is waited for.

The task: next-character prediction on text from a fixed random "language", an order-2
Markov chain over 16 characters (each pair of characters has its own distribution of
the next one, drawn once from a Dirichlet(0.2)). The model is a Bengio-style n-gram
network (embeddings of the two previous characters, one hidden layer). Each worker draws
its own shard of text (seeded by its worker index); everyone evaluates on the same
held-out text, and the chain's own probabilities give the lowest loss any model can
reach on it (``floor``). The loss reported is the held-out cross-entropy in nats of the
global parameters after every outer step; at the end the worker reports its utilisation:
time inside inner steps over wall time from its first inner step until it holds the
final global parameters.
"""

import argparse
import bisect
import math
import os
import random
import time

import torch

from mercato_trial import report
from mercato_trial.diloco import DiLoCo

VOCAB = 16
CONTEXT = 2
SHARD = 30_000  # characters of text per worker
BATCH = 64
EMBED = 16  # width of a character's embedding
HIDDEN = 64  # width of each hidden layer
LAYERS = 1  # hidden layers
LR = 0.01  # AdamW peak learning rate of the inner steps
WARMUP = 0.05  # of all inner steps, then cosine down to 10 % of LR


def language() -> list[list[float]]:
    """The chain's cumulative next-character distributions, one row per context."""
    torch.manual_seed(1234)  # the same language for everyone
    probs = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.2)).sample((VOCAB**CONTEXT,))
    return probs.cumsum(1).tolist()


def text(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` characters of the language as (two previous characters, next character)."""
    cdf = language()
    rng = random.Random(seed)
    out = [rng.randrange(VOCAB) for _ in range(CONTEXT)]
    for _ in range(n - CONTEXT):
        row = cdf[out[-2] * VOCAB + out[-1]]
        out.append(min(bisect.bisect_left(row, rng.random()), VOCAB - 1))
    t = torch.tensor(out)
    return torch.stack([t[:-2], t[1:-1]], 1), t[2:]


def floor(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy of the chain itself on (x, y): no model can do better on average."""
    cdf = torch.tensor(language())
    probs = torch.diff(cdf, dim=1, prepend=torch.zeros(len(cdf), 1))
    return float(-probs[x[:, 0] * VOCAB + x[:, 1], y].clamp_min(1e-12).log().mean())


def shard(worker: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return text(SHARD, seed=100 + 10 * worker + rank)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    return text(4_000, seed=1)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same starting point everywhere (the first join wins anyway)
    layers: list[torch.nn.Module] = [torch.nn.Embedding(VOCAB, EMBED), torch.nn.Flatten()]
    width = EMBED * CONTEXT
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(width, HIDDEN), torch.nn.GELU()]
        width = HIDDEN
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, VOCAB))


def configure(argv: list[str] | None = None) -> None:
    """The model's size and the batch from the command line (the job file's command).

    The defaults are the small model (3,408 parameters) that runs in seconds; the
    benchmark's longer configuration passes e.g. ``--hidden 256 --layers 2 --batch 512``.
    """
    global SHARD, BATCH, EMBED, HIDDEN, LAYERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", type=int, default=SHARD)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--embed", type=int, default=EMBED)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--layers", type=int, default=LAYERS)
    a = ap.parse_args(argv)
    SHARD, BATCH, EMBED, HIDDEN, LAYERS = a.shard, a.batch, a.embed, a.hidden, a.layers


def lr_at(step: int, total: int, peak: float = LR) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine down to 10 %."""
    warm = max(1, int(WARMUP * total))
    if step < warm:
        return peak * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def main() -> None:
    configure()
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(1)  # several workers share a machine's cores: no oversubscription
    worker = int(os.environ.get("MERCATO_DILOCO_WORKER", "0"))
    x, y = shard(worker, rank)
    x_eval, y_eval = held_out()
    model = make_model()
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    peak = float(os.environ.get("INNER_LR", str(LR)))
    opt = torch.optim.AdamW(net.parameters(), lr=peak, weight_decay=0.01)
    losses: list[float] = []

    def evaluate(outer_step: int) -> None:
        """The model holds the global parameters right now: the job's held-out loss."""
        with torch.no_grad():
            losses.append(loss_of(model, x_eval, y_eval).item())
        if rank == 0:
            report(outer_step=outer_step, loss=losses[-1], worker=worker)

    sync = DiLoCo(model, overlap=True, on_outer_step=evaluate)
    sync.start()
    total = (sync.outer_steps or 1) * sync.inner_steps
    step = sync.outer_step * sync.inner_steps  # a replacement joins part-way through
    gen = torch.Generator().manual_seed(7 + worker)
    began = time.monotonic()  # utilisation counts from the first inner step
    inner_s = 0.0
    while not sync.done:
        for _ in range(sync.inner_steps):
            t0 = time.monotonic()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, peak)
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            opt.zero_grad()
            loss_of(net, x[idx], y[idx]).backward()
            opt.step()
            step += 1
            inner_s += time.monotonic() - t0
            sync.poll()
        sync.step()
    wall = time.monotonic() - began
    if not losses:  # joined after the last outer step: it holds the final parameters
        evaluate(sync.outer_step)
    if rank == 0:
        report(
            loss=losses[-1],
            floor=floor(x_eval, y_eval),
            outer_steps=sync.outer_step,
            utilisation=inner_s / wall,
            inner_s=inner_s,
            sync_s=sync.sync_s,
            wall_s=wall,
        )
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
