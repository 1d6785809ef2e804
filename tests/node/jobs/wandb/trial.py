"""A trial whose command passes no parameters (``--lr=${lr}`` stays literal, as in W&B):
it reads them with ``mercato_trial.params()`` from $MERCATO_PARAMS_FILE, shows what it was
given, and reports its loss at printed steps 100, 200, ... (labels, not counts).
"""

import json
import os
import sys
import time

from mercato_trial import params, report

p = params()
with open("params.json", encoding="utf-8") as f:
    mine = f.read()
print(json.dumps({"argv": sys.argv[1:], "file": os.environ["MERCATO_PARAMS_FILE"]}))
print(json.dumps({"params": p, "user_params_json": mine, "t": time.time()}), flush=True)
for i in range(p["steps"]):
    time.sleep(p["pause"])
    report(step=100 * (i + 1), loss=p["a"] + 1.0 / (i + 1), t=time.time())
report(loss=p["a"], t=time.time())
