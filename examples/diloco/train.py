"""One DiLoCo worker: a small MLP on data made here, H inner steps, then an outer step.

The tenant leases W workers on (possibly) different providers and runs each as this
script (under torchrun when a worker has several devices). Every H inner steps the
worker hands its pseudo-gradient to its provider's daemon through
``mercato_trial.diloco`` (a file in its work directory: the trial has no network) and
blocks until the tenant's new global parameters come back the same way.

The task: regression onto a fixed random two-layer teacher network; each worker draws
its own shard of inputs (seeded by its worker index), and every worker evaluates on
the same held-out set, so the losses compare. Rank 0 reports ``loss`` (held-out MSE)
after every outer step, and at the end the utilisation: time inside inner steps over
wall time.
"""

import os
import time

import torch

from mercato_trial import report
from mercato_trial.diloco import DiLoCo


def teacher_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1234)  # the same teacher for everyone
    w1, w2 = torch.randn(32, 64) / 32**0.5, torch.randn(64, 1) / 8
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    return x, torch.tanh(x @ w1) @ w2


def main() -> None:
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    torch.set_num_threads(1)
    worker = int(os.environ.get("MERCATO_DILOCO_WORKER", "0"))
    x, y = teacher_data(2048, seed=100 + 10 * worker + rank)
    x_eval, y_eval = teacher_data(512, seed=1)
    torch.manual_seed(0)  # the same starting point everywhere (the first join wins anyway)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.AdamW(net.parameters(), lr=float(os.environ.get("INNER_LR", "0.003")))
    batch = int(os.environ.get("BATCH", "64"))
    sync = DiLoCo(model)
    sync.start()
    began = time.monotonic()  # utilisation counts from the first inner step
    gen = torch.Generator().manual_seed(7 + worker)
    inner_s = 0.0
    while not sync.done:
        t0 = time.monotonic()
        for _ in range(sync.inner_steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
            opt.step()
        inner_s += time.monotonic() - t0
        sync.step()
        if rank == 0:
            with torch.no_grad():
                loss = torch.nn.functional.mse_loss(model(x_eval), y_eval).item()
            report(outer_step=sync.outer_step, loss=loss, worker=worker)
    if rank == 0:
        wall = time.monotonic() - began
        report(
            loss=loss,
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
