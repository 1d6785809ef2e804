"""A local multi-node cluster: one bootstrap node and N providers as background processes.

Each node has its own home under ``$MERCATO_HOME/cluster/<name>/`` and binds a free
loopback port (port 0; the daemon writes its real address to ``daemon.json``, so there
is no race for ports). ``cluster.json`` records what runs, so ``status`` and ``down``
work from any shell, and tenant commands find the bootstrap node when no peer is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.home import READY_FILE, resolve_home
from protocol.errors import MercatoError

STATE_FILE = "cluster.json"


class ClusterError(MercatoError):
    """The local cluster cannot be started, found or stopped as asked."""

    code = "cluster_error"


@dataclass(frozen=True)
class Template:
    """A simulated machine: devices, fabric and floor price (micro-credits/device-hour)."""

    model: str
    count: int
    price_floor: int
    interconnect: str  # nvlink | pcie | ipu-link | infinity-fabric | none


# A mixed fleet: consumer and datacenter GPUs, an NVLink box, an IPU-POD4, an AMD node.
# Cycled when more providers are asked for than there are templates.
TEMPLATES: tuple[Template, ...] = (
    Template("RTX-4090", 2, 350_000, "pcie"),
    Template("A100-80GB", 1, 1_200_000, "none"),
    Template("Bow-IPU", 4, 900_000, "ipu-link"),
    Template("H100-SXM", 8, 2_500_000, "nvlink"),
    Template("L4", 4, 400_000, "pcie"),
    Template("T4", 2, 150_000, "pcie"),
    Template("RTX-3090", 2, 250_000, "pcie"),
    Template("MI300X", 8, 2_000_000, "infinity-fabric"),
)


@dataclass
class NodeRecord:
    name: str
    role: str
    home: str
    config: str
    pid: int = 0
    address: str = ""
    node_id: str = ""
    devices: list[dict[str, Any]] = field(default_factory=list)


def cluster_root(home: Path | None = None) -> Path:
    return (home or resolve_home()) / "cluster"


def provider_config(
    name: str, home: Path, bootstrap: str | None, template: Template | None, ttl_s: float
) -> str:
    """TOML for one cluster node (bootstrap when ``template`` is None)."""
    lines = [
        "# Written by `mercato cluster up`: a simulated node on loopback.",
        "detect_gpus = false",
        "",
        "[node]",
        f'role = "{"bootstrap" if template is None else "provider"}"',
        'listen_host = "127.0.0.1"',
        "listen_port = 0",
        f"home = {json.dumps(str(home))}",
        f"bootstrap = [{json.dumps(bootstrap)}]" if bootstrap else "bootstrap = []",
        "",
        "[gossip]",
        "interval_s = 0.5",
        "request_timeout_s = 2.0",
        "",
        "[advert]",
        f"ttl_s = {ttl_s}",
        "refresh_fraction = 0.3",
        "",
        "# Every node and tenant of the cluster connects from 127.0.0.1: one address,",
        "# many peers, so the per-address cap is the total cap here.",
        "[http]",
        "max_connections_per_peer = 512",
    ]
    if template is not None:
        lines += [
            "",
            "[[devices]]",
            f'model = "{template.model}"',
            f"count = {template.count}",
            f"price_floor = {template.price_floor}",
            "simulated = true",
            "",
            "[interconnect]",
            f'kind = "{template.interconnect}"',
        ]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    # Nodes outlive `cluster up`, so they are orphans: a container whose pid 1 does not
    # reap (docker without --init) keeps them as zombies forever. A zombie is dead.
    return not _zombie(pid)


def _running(n: NodeRecord) -> bool:
    """``n``'s daemon still runs: its pid is alive and still runs ``n``'s config. A pid
    recorded before a reboot may belong to another program now, which must not be killed."""
    if not _alive(n.pid):
        return False
    try:
        argv = Path(f"/proc/{n.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # no procfs (macOS): trust the pid
        return True
    return os.fsencode(n.config) in argv


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS) or already gone
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ")".
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def http_json(url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """GET a JSON document from a local node (stdlib, no event loop needed)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def load_state(root: Path) -> list[NodeRecord]:
    path = root / STATE_FILE
    if not path.exists():
        return []
    return [NodeRecord(**n) for n in json.loads(path.read_text())["nodes"]]


def save_state(root: Path, nodes: list[NodeRecord]) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"nodes": [asdict(n) for n in nodes]}, indent=2))
    tmp.replace(root / STATE_FILE)


def bootstrap_address(home: Path | None = None) -> str | None:
    """Address of the running local cluster's bootstrap node, if there is one."""
    for n in load_state(cluster_root(home)):
        if n.role == "bootstrap" and _running(n):
            return n.address
    return None


#: Children this process started, kept so they are reaped (not garbage-collected while
#: running, which Python reports as a ResourceWarning) when the cluster goes down.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(record: NodeRecord) -> subprocess.Popen[bytes]:
    proc = _start(record)
    _CHILDREN[proc.pid] = proc
    return proc


def _start(record: NodeRecord) -> subprocess.Popen[bytes]:
    log_dir = Path(record.home) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (Path(record.home) / READY_FILE).unlink()
    out = open(log_dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "provider", "run", "--config", record.config],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C does not kill the cluster
            env={**os.environ, "MERCATO_HOME": record.home},
        )
    finally:
        out.close()


def _wait_ready(record: NodeRecord, proc: subprocess.Popen[bytes], deadline: float) -> None:
    ready = Path(record.home) / READY_FILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(record)
            raise ClusterError(f"{record.name} exited with {proc.returncode}:\n{tail}")
        if ready.exists():
            with contextlib.suppress(ValueError):
                info = json.loads(ready.read_text())
                record.address, record.node_id = info["address"], info["node_id"]
                return
        time.sleep(0.05)
    raise ClusterError(f"{record.name} did not start in time:\n{_log_tail(record)}")


def _log_tail(record: NodeRecord, lines: int = 15) -> str:
    path = Path(record.home) / "logs" / "stdout.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def up(
    providers: int,
    home: Path | None = None,
    ttl_s: float = 6.0,
    timeout_s: float = 60.0,
    templates: tuple[Template, ...] = TEMPLATES,
) -> list[NodeRecord]:
    """Start the cluster; return when every node is up and every advert is in the directory."""
    if providers < 1:
        raise ClusterError("--providers must be at least 1")
    root = cluster_root(home)
    running = [n for n in load_state(root) if _running(n)]
    if running:
        raise ClusterError(
            f"a cluster is already running ({len(running)} nodes); `mercato cluster down` first"
        )
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    nodes: list[NodeRecord] = []
    try:
        boot = _prepare(root, "bootstrap", None, None, ttl_s)
        proc = _spawn(boot)
        boot.pid = proc.pid
        nodes.append(boot)
        save_state(root, nodes)
        _wait_ready(boot, proc, deadline)
        procs = []
        for i in range(providers):
            rec = _prepare(
                root, f"provider-{i + 1}", boot.address, templates[i % len(templates)], ttl_s
            )
            p = _spawn(rec)
            rec.pid = p.pid
            nodes.append(rec)
            procs.append((rec, p))
        save_state(root, nodes)
        for rec, p in procs:
            _wait_ready(rec, p, deadline)
        save_state(root, nodes)
        _wait_advertised(boot, [r.node_id for r, _ in procs], deadline)
    except BaseException:
        down(home)
        raise
    return nodes


def _prepare(
    root: Path, name: str, bootstrap: str | None, template: Template | None, ttl_s: float
) -> NodeRecord:
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    config = home / "provider.toml"
    config.write_text(provider_config(name, home, bootstrap, template, ttl_s))
    role = "bootstrap" if template is None else "provider"
    return NodeRecord(name=name, role=role, home=str(home), config=str(config))


def _wait_advertised(boot: NodeRecord, providers: list[str], deadline: float) -> None:
    """Wait until the bootstrap's directory holds an advert of every provider."""
    want = set(providers)
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if set(http_json(boot.address + "/directory.json").get("providers", [])) >= want:
                return
        time.sleep(0.1)
    raise ClusterError("providers did not all appear in the bootstrap node's directory in time")


def status(home: Path | None = None) -> list[dict[str, Any]]:
    """Each node with its pid, address, status page, devices and health."""
    out = []
    for n in load_state(cluster_root(home)):
        row: dict[str, Any] = {
            "name": n.name,
            "role": n.role,
            "pid": n.pid,
            "address": n.address,
            "node_id": n.node_id,
            "home": n.home,
            # The node's status page (node.operator.status_page); cluster nodes listen on loopback.
            "status_url": n.address + "/" if n.address else "",
            "devices": [],
            "health": "dead",
        }
        if _running(n):
            try:
                h = http_json(n.address + "/healthz", timeout_s=1.0)
                row.update(health=h.get("status", "?"), devices=h.get("devices", []))
                row.update(peers=h.get("peers"), adverts=h.get("adverts"))
            except (OSError, ValueError):
                row["health"] = "unreachable"
        out.append(row)
    return out


def down(home: Path | None = None, timeout_s: float = 10.0) -> int:
    """SIGTERM every node, SIGKILL what is still there after ``timeout_s``; return count."""
    root = cluster_root(home)
    nodes = load_state(root)
    live = [n for n in nodes if _running(n)]
    for n in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(n.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_running(n) for n in live):
        time.sleep(0.05)
    for n in live:
        if _running(n):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.pid, signal.SIGKILL)
    for n in nodes:
        proc = _CHILDREN.pop(n.pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    with contextlib.suppress(FileNotFoundError):
        (root / STATE_FILE).unlink()
    return len(live)
