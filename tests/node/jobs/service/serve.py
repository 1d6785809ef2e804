"""A tiny 'service' for tests: reports health for a while, then (optionally) crashes."""

import json
import os
import sys
import time

lifetime = float(os.environ.get("LIFETIME_S", sys.argv[1] if len(sys.argv) > 1 else "3600"))
start = time.monotonic()
while time.monotonic() - start < lifetime:
    print(json.dumps({"healthy": 1, "uptime_s": round(time.monotonic() - start, 1)}), flush=True)
    time.sleep(0.5)
print("crashing on purpose", flush=True)
sys.exit(3)
