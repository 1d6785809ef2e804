"""A real two-process data-parallel training run: torch DDP on CPU with the gloo backend.

Launched by the provider as ``torchrun --standalone --nproc_per_node=2 train.py``. Each
process trains a small MLP on its shard of a synthetic regression task; DDP averages
gradients every step (a ring all-reduce). Rank 0 prints the loss as JSON lines; the last
``loss`` it prints is the job's final metric.
"""

import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    true_w = torch.randn(16, 1)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data shard
    x = torch.randn(512, 16, generator=gen)
    y = x @ true_w + 0.01 * torch.randn(512, 1, generator=gen)

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    steps = int(os.environ.get("STEPS", "60"))
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # gradients all-reduced across the ranks here
        opt.step()
        if step % 10 == 0 or step == steps:
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(json.dumps({"step": step, "loss": total.item() / world}), flush=True)
    if rank == 0:
        print(json.dumps({"loss": total.item() / world, "world_size": world}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
