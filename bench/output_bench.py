"""Event-loop time a trial's output costs the provider, per 64 KiB read.

A hostile trial prints ``{}`` (or any tiny JSON object) as fast as it can; every read
of its pipe (64 KiB, node.provider.sandbox) is fed to
``node.provider.executor.OutputCollector`` on the provider's event loop, with callbacks
like node.provider.work's (append to the task's log, merge kept metrics). The figure
is the loop time one read takes: while it runs,
nothing else on the daemon (``/healthz``, other tenants' heartbeats and polls) is
served. Issue 12 measured 0.3-0.8 s ``/healthz`` latency under such a flood.

Workloads: ``{}`` lines, ``{"loss": <float>}`` lines, and plain 80-byte log lines.
The last line printed is ``empty_ms=<x> metric_ms=<y> log_ms=<z>`` (per 64 KiB read).

Run: ``python bench/output_bench.py [--reads 200]``
"""

from __future__ import annotations

import argparse
import io
import time

from node.provider.executor import OutputCollector

READ = 64 * 1024


def per_read_ms(line: bytes, reads: int) -> float:
    """Mean loop time of one 64 KiB read of ``line`` repeated, through the collector."""
    log = bytearray()
    metrics: dict[str, int | float] = {}
    collector = OutputCollector(io.BytesIO(), 8 << 20, log.extend, metrics.update)
    chunk = (line * (READ // len(line) + 1))[:READ]
    start = time.perf_counter()
    for _ in range(reads):
        collector.feed(chunk)
    return (time.perf_counter() - start) / reads * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    empty = per_read_ms(b"{}\n", args.reads)
    metric = per_read_ms(b'{"loss": 0.123456}\n', args.reads)
    plain = per_read_ms(b"x" * 79 + b"\n", args.reads)
    print(f"empty_ms={empty:.2f} metric_ms={metric:.2f} log_ms={plain:.2f}")


if __name__ == "__main__":
    main()
