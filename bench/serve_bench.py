"""Serving: the gateway's overhead, and availability while a replica's provider dies.

Three phases on the digits classifier of examples/inference-service (scikit-learn):

* direct: the example's server.py run as a plain process on a Unix socket of this
  machine, loaded by C concurrent clients for T seconds (``POST /predict`` of one
  image): requests per second, p50 and p99 latency. The floor.
* gateway: a local cluster (``node.cli.localcluster``: a bootstrap node and 3 provider
  daemons, real bubblewrap sandboxes), ``mercato serve`` of the example with 2 replicas
  in a subprocess, the same load through its gateway: client -> gateway -> provider
  daemon (token check) -> Unix socket -> the sandboxed server, and back.
* failover: the same load for F seconds, alternating ``GET /sample`` (idempotent:
  the gateway sends it again elsewhere) and ``POST /predict`` (not retried once sent);
  the provider of replica 0 gets SIGKILL after F/4 seconds. Counted: requests
  answered, GETs lost (goal 0), POSTs lost (goal: only those in flight at the kill),
  and the time until the replacement replica was ready.

Run: ``python bench/serve_bench.py [--seconds 8] [--clients 8] [--failover 20]``
(about a minute; needs ``pip install -e '.[examples]'`` for scikit-learn). The figures
are printed as JSON, the last line is ``overhead_p50_ms=<gateway p50 - direct p50>``.
On a shared 2-core machine the client, gateway, daemons and servers share the cores:
the absolute figures say more about the machine than about the code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.cli import localcluster as cluster  # noqa: E402
from node.cli.localcluster import Template  # noqa: E402

EXAMPLE = ROOT / "examples" / "inference-service"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(len(s) * q))], 2)


async def load(
    session: aiohttp.ClientSession,
    base: str,
    seconds: float,
    clients: int,
    image: list[float],
    *,
    mixed: bool = False,
    at: float | None = None,
    action: Any = None,
) -> dict[str, Any]:
    """C clients in a loop for ``seconds``; latency of each answered request."""
    latencies: list[float] = []
    lost = {"GET": 0, "POST": 0}
    sent = {"GET": 0, "POST": 0}
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds
    body = json.dumps({"images": [image]}).encode()

    async def client(n: int) -> None:
        i = n
        while time.monotonic() < end:
            i += 1
            method = "GET" if mixed and i % 2 else "POST"
            sent[method] += 1
            t0 = time.monotonic()
            try:
                if method == "GET":
                    r = await session.get(base + "/sample?n=1")
                else:
                    r = await session.post(
                        base + "/predict", data=body, headers={"Content-Type": "application/json"}
                    )
                async with r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status != 200:
                        lost[method] += 1
                        continue
            except (aiohttp.ClientError, TimeoutError):
                lost[method] += 1
                continue
            latencies.append((time.monotonic() - t0) * 1000)

    async def trigger() -> None:
        if at is not None:
            await asyncio.sleep(at)
            action()

    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for n in range(clients):
            tg.create_task(client(n))
        tg.create_task(trigger())
    wall = time.monotonic() - started
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "sent": sent,
        "lost": lost,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


async def direct(tmp: Path, seconds: float, clients: int, image: list[float]) -> dict[str, Any]:
    sock = tmp / "direct.sock"
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock
        [sys.executable, str(EXAMPLE / "server.py"), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the direct server did not start")
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(sock))
        ) as session:
            return await load(session, "http://direct", seconds, clients, image)
    finally:
        proc.terminate()
        proc.wait(10)


def serve_view(home: Path, job_id: str) -> dict[str, Any]:
    path = home / "tenant" / "jobs" / job_id / "serve.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--failover", type=float, default=20.0)
    args = ap.parse_args()
    from sklearn.datasets import load_digits

    image = [float(v) for v in load_digits().data[1600]]
    out: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmpdir:
        tmp = Path(tmpdir)
        out["direct"] = await direct(tmp, args.seconds, args.clients, image)
        home = tmp / "home"
        cluster.up(3, home=home, templates=(Template("sim-gpu-small", 1, 100_000, "none"),))
        env = {**os.environ, "MERCATO_HOME": str(home)}
        env.pop("MERCATO_PEER", None)
        with (tmp / "serve.err").open("w") as err:
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock
                [sys.executable, "-m", "node.cli", "serve", str(EXAMPLE / "job.yaml"), "--json"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=ROOT,
            )
        try:
            assert proc.stdout is not None
            t0 = time.monotonic()
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                raise RuntimeError((tmp / "serve.err").read_text())
            ready = json.loads(line)
            out["ready_s"] = round(time.monotonic() - t0, 2)
            gateway, job_id = ready["gateway"], ready["job_id"]
            async with aiohttp.ClientSession() as session:
                out["gateway"] = await load(session, gateway, args.seconds, args.clients, image)
                victim = next(r for r in serve_view(home, job_id)["replicas"] if r["replica"] == 0)
                nodes = cluster.load_state(cluster.cluster_root(home))
                pid = next(n.pid for n in nodes if n.node_id == victim["provider"])
                killed_at: list[float] = []

                def kill() -> None:
                    killed_at.append(time.monotonic())
                    os.kill(pid, signal.SIGKILL)

                before = serve_view(home, job_id)
                replaced: list[float] = []

                async def watch() -> None:
                    """When the replacement was ready (serve.json is rewritten each second)."""
                    while time.monotonic() < time.monotonic() + 300:
                        r0 = next(
                            r for r in serve_view(home, job_id)["replicas"] if r["replica"] == 0
                        )
                        if killed_at and r0["generation"] == 2 and r0["state"] == "ready":
                            replaced.append(time.monotonic() - killed_at[0])
                            return
                        await asyncio.sleep(0.2)

                watcher = asyncio.ensure_future(watch())
                out["failover"] = await load(
                    session,
                    gateway,
                    args.failover,
                    args.clients,
                    image,
                    mixed=True,
                    at=args.failover / 4,
                    action=kill,
                )
                try:
                    await asyncio.wait_for(watcher, 120)
                    out["failover"]["replaced_ready_s_after_kill"] = round(replaced[0], 1)
                except TimeoutError:
                    out["failover"]["replaced_ready_s_after_kill"] = None
                after = serve_view(home, job_id)
                out["failover"]["gateway_retries"] = after["retries"] - before["retries"]
                out["failover"]["gateway_failed"] = after["failed"] - before["failed"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            assert proc.stdout is not None
            proc.stdout.close()
            cluster.down(home=home)
    print(json.dumps(out, indent=2))
    d, g = out["direct"]["p50_ms"], out["gateway"]["p50_ms"]
    print(f"overhead_p50_ms={(g or 0) - (d or 0):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
