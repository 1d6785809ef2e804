"""Issue 20 end to end: a service served by two providers behind `mercato serve`.

A real local cluster (a bootstrap node, three provider daemons, each with the real
bubblewrap sandbox), the real CLI in a subprocess, the service a real process in the
sandbox listening on a Unix socket. The tests run in order on one served job:
readiness, requests through the gateway, direct calls with and without the tenant's
token, a provider SIGKILLed while requests flow, and cancel releasing every lease.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from node.cli import localcluster as cluster
from node.cli.localcluster import Template
from node.home import NodeHome
from node.store.node_store import Store
from protocol.capability import issue
from protocol.identity import Identity

pytestmark = pytest.mark.cluster

JOB = Path(__file__).parents[1] / "jobs" / "serve" / "job.yaml"
TEMPLATES = (Template("sim-gpu-small", 1, 100_000, "none"),)


@dataclass
class Served:
    home: Path
    proc: subprocess.Popen[str]
    job_id: str
    gateway: str

    def view(self) -> dict[str, Any]:
        path = self.home / "tenant" / "jobs" / self.job_id / "serve.json"
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def tenant(self) -> Identity:
        return NodeHome(self.home / "tenant").load_or_create_identity()


def http(
    url: str, *, method: str = "GET", data: bytes | None = None, token: str | None = None
) -> tuple[int, bytes]:
    headers = {} if token is None else {"Authorization": f"Mercato {token}"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError:
        return 0, b""


def wait_for(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("serve")
    cluster.up(3, home=home, templates=TEMPLATES)
    env = {**os.environ, "MERCATO_HOME": str(home)}
    env.pop("MERCATO_PEER", None)
    with (home / "serve.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", str(JOB), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once every replica is ready
        assert line, (home / "serve.err").read_text()
        ready = json.loads(line)
        yield Served(home, proc, ready["job_id"], ready["gateway"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
        cluster.down(home=home)


def mercato(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MERCATO_HOME": str(served.home)}
    env.pop("MERCATO_PEER", None)
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def lease_of(served: Served, replica: int) -> dict[str, Any]:
    return next(r for r in served.view()["replicas"] if r["replica"] == replica)


class TestServe:
    def test_replicas_are_ready_on_distinct_providers_and_share_requests(
        self, served: Served
    ) -> None:
        view = wait_for("two ready replicas", lambda: served.view()["ready"] == 2 and served.view())
        providers = {r["provider"] for r in view["replicas"]}
        assert len(providers) == 2
        for _ in range(20):
            status, body = http(served.gateway + "/whoami?x=1")
            assert status == 200
            assert json.loads(body)["path"] == "/whoami?x=1"
        status, body = http(served.gateway + "/echo", method="POST", data=b"hello")
        assert (status, body) == (200, b"hello")
        # Both replicas took a share (serve.json is rewritten every second).
        wait_for(
            "requests on both replicas",
            lambda: all(r["requests"] > 0 for r in served.view()["replicas"]),
            timeout=10,
        )

    def test_only_the_tenants_token_reaches_the_service(self, served: Served) -> None:
        r0, r1 = lease_of(served, 0), lease_of(served, 1)
        url = r0["url"] + "/whoami"
        tenant = served.tenant()
        far = int(time.time() * 1000) + 600_000
        assert http(url, token=issue(tenant, r0["lease_id"], far))[0] == 200
        no_token = http(url)
        assert no_token[0] == 401
        assert json.loads(no_token[1])["error"]["code"] == "bad_capability"
        expired = http(url, token=issue(tenant, r0["lease_id"], far - 700_000))
        assert (expired[0], json.loads(expired[1])["error"]["code"]) == (
            401,
            "capability_expired",
        )
        stranger = Identity.generate()
        assert http(url, token=issue(stranger, r0["lease_id"], far))[0] == 403
        assert http(url, token=issue(tenant, r1["lease_id"], far))[0] == 403
        # A token whose signature is another key's, over the tenant's payload.
        good = issue(tenant, r0["lease_id"], far)
        forged = good.rsplit(".", 1)[0] + "." + issue(stranger, r0["lease_id"], far).split(".")[2]
        assert http(url, token=forged)[0] == 401
        # GET-only token: POST refused before the service sees it.
        get_only = issue(tenant, r0["lease_id"], far, methods=("GET",))
        assert http(r0["url"] + "/echo", method="POST", data=b"x", token=get_only)[0] == 403
        # `mercato token` authorises someone else: GET only, for a minute.
        issued = mercato(
            served, "token", served.job_id, "--methods", "GET", "--ttl", "60", "--json"
        )
        tokens = {t["replica"]: t for t in json.loads(issued.stdout)}
        assert tokens[0]["url"] == r0["url"]
        assert http(url, token=tokens[0]["token"])[0] == 200
        assert (
            http(r0["url"] + "/echo", method="POST", data=b"x", token=tokens[0]["token"])[0] == 403
        )
        assert http(url, token=tokens[1]["token"])[0] == 403  # replica 1's lease, not this one
        provider = r0["url"].split("/svc/")[0]
        metrics = http(provider + "/metrics")[1].decode()
        assert 'mercato_rejections_total{code="bad_capability"} 2.0' in metrics
        assert 'mercato_rejections_total{code="capability_scope"} 5.0' in metrics
        assert 'mercato_rejections_total{code="capability_expired"} 1.0' in metrics

    def test_a_killed_provider_is_replaced_while_requests_continue(self, served: Served) -> None:
        victim = lease_of(served, 0)
        nodes = cluster.load_state(cluster.cluster_root(served.home))
        pid = next(n.pid for n in nodes if n.node_id == victim["provider"])
        answers: list[int] = []
        for i in range(200):
            if i == 20:
                os.kill(pid, signal.SIGKILL)
            answers.append(http(served.gateway + "/whoami")[0])
            if i > 40 and lease_of(served, 0)["generation"] == 2:
                break
        assert answers.count(200) == len(answers), answers  # GETs are retried elsewhere
        replaced = wait_for(
            "replica 0 replaced and ready",
            lambda: (r := lease_of(served, 0))["generation"] == 2 and r["state"] == "ready" and r,
        )
        assert replaced["provider"] not in (victim["provider"], lease_of(served, 1)["provider"])
        view = served.view()
        assert view["failed_providers"] == [victim["provider"]]
        assert [(r["replica"], r["lease_id"], r["state"]) for r in view["replaced"]] == [
            (0, victim["lease_id"], "lost")
        ]
        status = mercato(served, "status", served.job_id)
        assert "lost" in status.stdout
        assert "ready" in status.stdout
        assert http(served.gateway + "/whoami")[0] == 200

    def test_cancel_releases_every_lease(self, served: Served) -> None:
        out = mercato(served, "cancel", served.job_id)
        assert out.returncode == 0, out.stderr
        assert served.proc.wait(60) == 0
        with Store(NodeHome(served.home / "tenant").store_path) as store:
            leases = store.list_leases()
        assert len(leases) == 3  # two replicas, one replacement
        assert all(lease.state != "active" for lease in leases), [x.state for x in leases]
        for node in cluster.load_state(cluster.cluster_root(served.home)):
            if node.role != "provider" or node.node_id in served.view()["failed_providers"]:
                continue  # the SIGKILLed provider never learnt its lease ended
            db = NodeHome(Path(node.home)).store_path
            with Store(db) as store:
                states = [x.state for x in store.list_leases()]
            assert states, node.name  # each live provider served a replica
            assert "active" not in states, (node.name, states)
        status, _ = http(served.gateway + "/whoami")
        assert status == 0 or status >= 500
