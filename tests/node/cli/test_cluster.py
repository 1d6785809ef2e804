"""`mercato cluster up|status|down` and `mercato market` as a developer runs them: real
processes on loopback, homes under a temporary MERCATO_HOME."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

TTL_S = 3.0
# Expiry plus room for a loaded CI box: a `mercato market` call is a fresh interpreter.
GONE_WITHIN_S = TTL_S + 20.0


def mercato(
    env: dict[str, str], *args: str, timeout_s: float = 90.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def mercato_json(env: dict[str, str], *args: str) -> Any:
    proc = mercato(env, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


@pytest.fixture
def cluster_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose MERCATO_HOME is private; the cluster is always taken down."""
    env = {k: v for k, v in os.environ.items() if k != "MERCATO_PEER"}
    env["MERCATO_HOME"] = str(tmp_path / "home")
    try:
        yield env
    finally:
        state = tmp_path / "home" / "cluster" / "cluster.json"
        if state.exists():  # the test failed before its own `cluster down`
            pids = [n["pid"] for n in json.loads(state.read_text())["nodes"]]
            mercato(env, "cluster", "down")
            for pid in pids:  # never leave a daemon behind
                if not gone(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def test_cluster_up_market_kill_and_down(cluster_env: dict[str, str]) -> None:
    env = cluster_env
    up = mercato(env, "cluster", "up", "--providers", "3", "--advert-ttl", str(TTL_S))
    assert up.returncode == 0, up.stderr + up.stdout
    assert "1 bootstrap + 3 providers" in up.stdout

    # status: four healthy nodes with their pid, address and devices
    rows = mercato_json(env, "cluster", "status")
    assert [r["name"] for r in rows] == ["bootstrap", "provider-1", "provider-2", "provider-3"]
    for r in rows:
        assert r["health"] == "ok", r
        assert r["pid"] > 0
        assert not gone(r["pid"])
        assert r["address"].startswith("http://127.0.0.1:")
    boot, providers = rows[0], rows[1:]
    assert boot["role"] == "bootstrap"
    assert boot["devices"] == []
    assert all(r["role"] == "provider" and r["devices"] for r in providers)
    kinds = {d["kind"] for r in providers for d in r["devices"]}
    assert "ipu" in kinds
    assert "gpu" in kinds

    # a second `up` refuses instead of starting a second cluster
    again = mercato(env, "cluster", "up", "--providers", "1")
    assert again.returncode != 0
    assert "already running" in again.stderr
    assert "Traceback" not in again.stderr

    # market: the three providers, their adverts verified by the tenant
    market = mercato_json(env, "market")
    by_id = {m["provider"]: m for m in market}
    assert set(by_id) == {r["node_id"] for r in providers}
    for r in providers:
        advert = by_id[r["node_id"]]
        assert advert["address"] == r["address"]
        assert [(d["model"], d["count"]) for d in advert["devices"]] == [
            (d["model"], d["count"]) for d in r["devices"]
        ]
        assert all(d["simulated"] for d in advert["devices"])
        floors = [d["price_floor_micro_credits_per_device_hour"] for d in advert["devices"]]
        assert all(type(f) is int and f > 0 for f in floors)
        assert 0 < advert["expires_in_ms"] <= TTL_S * 1000

    # a provider dies without a word: its advert expires, the others stay
    victim, survivors = providers[1], [providers[0], providers[2]]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        listed = {m["provider"] for m in mercato_json(env, "market")}
        assert {s["node_id"] for s in survivors} <= listed
        if victim["node_id"] not in listed:
            break
        assert time.monotonic() < deadline, "the dead provider's advert never expired"
        time.sleep(0.5)
    health = {r["name"]: r["health"] for r in mercato_json(env, "cluster", "status")}
    assert health == {
        "bootstrap": "ok",
        "provider-1": "ok",
        "provider-2": "dead",
        "provider-3": "ok",
    }

    # down: every process is gone and the cluster is forgotten
    down = mercato(env, "cluster", "down")
    assert down.returncode == 0, down.stderr
    assert "stopped 3 nodes" in down.stdout
    for r in rows:
        assert gone(r["pid"]), r
    assert mercato_json(env, "cluster", "status") == []
    no_peer = mercato(env, "market")
    assert no_peer.returncode != 0
    assert "no peer to ask" in no_peer.stderr


def test_a_stale_cluster_file_never_kills_another_program(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """After a reboot, cluster.json may list pids that now belong to other programs."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        root = tmp_path / "home" / "cluster"
        root.mkdir(parents=True)
        node = {
            "name": "provider-1",
            "role": "provider",
            "home": str(root / "provider-1"),
            "config": str(root / "provider-1" / "provider.toml"),
            "pid": bystander.pid,
            "address": "http://127.0.0.1:9",
            "node_id": "a" * 32,
            "devices": [],
        }
        (root / "cluster.json").write_text(json.dumps({"nodes": [node]}))
        rows = mercato_json(cluster_env, "cluster", "status")
        assert [(r["name"], r["health"]) for r in rows] == [("provider-1", "dead")]
        down = mercato(cluster_env, "cluster", "down")
        assert down.returncode == 0
        assert "stopped 0 nodes" in down.stdout
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()
