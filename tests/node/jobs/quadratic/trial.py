"""A tiny stdlib trial: loss = (x - 2)^2 + (y + 0.8)^2, optionally slow and chatty.

Parameters arrive as ``--name=value`` (W&B's ``${args}``); with ``--steps=N`` it
reports N intermediate losses first, sleeping ``--sleep`` seconds in all. The last
line is the final metric, as any trial reports it.
"""

import argparse
import json
import time


def loss(x: float, y: float) -> float:
    return (x - 2.0) ** 2 + (y + 0.8) ** 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=float, required=True)
    parser.add_argument("--y", type=float, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    final = loss(args.x, args.y)
    steps = max(args.steps, 1)
    for step in range(args.steps):
        print(json.dumps({"step": step, "loss": final + steps - step}), flush=True)
        time.sleep(args.sleep / steps)
    if not args.steps:
        time.sleep(args.sleep)
    print(f"x={args.x} y={args.y}", flush=True)
    print(json.dumps({"loss": final}), flush=True)


if __name__ == "__main__":
    main()
