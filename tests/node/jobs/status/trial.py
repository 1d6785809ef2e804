"""A trial of the status page test: ``loss = (log2 x - 1)^2``, reported as a JSON line.

x = 30 holds the trial for 30 s, so the sweep is still running when the test looks.
"""

import argparse
import json
import math
import time

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float, required=True)
args = parser.parse_args()
if args.x >= 30:
    time.sleep(args.x)
loss = (math.log2(args.x) - 1) ** 2
print(json.dumps({"loss": loss, "accuracy": 1 / (1 + loss)}), flush=True)
