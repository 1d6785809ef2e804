"""`mercato provider status` and `mercato provider prices` as an operator runs them: a real
daemon process (`mercato provider run`) on a loopback port, the CLI talking to it, a
tenant leasing from it with `mercato order`, and the daemon stopped and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.cli.main import main
from node.home import NodeHome
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import PriceUpdate

pytestmark = pytest.mark.cluster

FLOOR = 350_000  # the config's floor: 0.35 credits per device-hour


def config_text(home: Path, floor: int = FLOOR, status: str = "") -> str:
    return f"""
detect_gpus = false

[node]
role = "provider"
listen_host = "127.0.0.1"
listen_port = 0
home = {json.dumps(str(home))}

[[devices]]
model = "RTX-4090"
count = 2
price_floor = {floor}
simulated = true

[interconnect]
kind = "pcie"
{status}
"""


class Provider:
    """One `mercato provider run` process; start() waits for its daemon.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "provider"
        self.config = root / "provider.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "MERCATO_HOME": str(root / "mercato")}
        self.env.pop("MERCATO_PEER", None)

    def write(self, floor: int = FLOOR, status: str = "") -> None:
        self.config.write_text(config_text(self.home, floor, status))

    def start(self) -> dict[str, Any]:
        ready = self.home / "daemon.json"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "provider", "run", "--config", str(self.config)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            if ready.exists():
                try:
                    info: dict[str, Any] = json.loads(ready.read_text())
                    return info
                except ValueError:
                    pass
            time.sleep(0.05)
        raise AssertionError("daemon did not start:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.home / "logs" / "node.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    p = Provider(tmp_path)
    p.write()
    try:
        yield p
    finally:
        p.stop()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/x-mercato-envelope"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def own_advert_floor(doc: dict[str, Any]) -> int | None:
    """The floor this provider advertises, as its own directory holds it."""
    for a in doc["adverts"]:
        if a["provider"] == doc["node_id"]:
            return int(a["devices"][0]["price_floor"])
    return None


class TestProviderStatus:
    def test_devices_leases_earnings_live_and_from_the_store(
        self, provider: Provider, capsys: pytest.CaptureFixture[str]
    ) -> None:
        info = provider.start()
        home = str(provider.home)

        doc = cli_json(capsys, "provider", "status", "--config", str(provider.config))
        assert doc["source"] == "daemon"
        assert doc["node_id"] == info["node_id"]
        assert [(d["id"], d["state"]) for d in doc["devices"]] == [
            ("gpu0", "free"),
            ("gpu1", "free"),
        ]
        assert doc["leases"] == []
        assert doc["earnings"]["earned"] == 0

        # A tenant leases one device for a few seconds, then releases it and pays.
        order = subprocess.Popen(
            [
                *(sys.executable, "-m", "node.cli", "order", "--units", "1"),
                *("--hold", "3", "--peer", info["address"], "--json"),
            ],
            env=provider.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            leased = wait_for(
                "a leased device",
                lambda: [
                    d
                    for d in cli_json(capsys, "provider", "status", "--home", home)["devices"]
                    if d["state"] == "leased"
                ],
            )
            out, err = order.communicate(timeout=60)
        finally:
            if order.poll() is None:
                order.kill()
                order.communicate()
        assert order.returncode == 0, err
        result = json.loads(out)
        (lease,) = result["leases"]
        assert [d["lease_id"] for d in leased] == [lease["lease_id"]]
        paid = sum(r["amount_micro_credits"] for r in result["receipts"])
        assert paid > 0

        doc = cli_json(capsys, "provider", "status", "--home", home)
        assert [d["state"] for d in doc["devices"]] == ["free", "free"]
        assert [(x["lease_id"], x["state"]) for x in doc["leases"]] == [
            (lease["lease_id"], "ended")
        ]
        assert doc["earnings"]["earned"] == paid
        assert doc["earnings"]["countersigned"] == 1

        # People get a table with the same facts.
        code, text, _ = cli(capsys, "provider", "status", "--home", home)
        assert code == 0
        assert lease["lease_id"][:10] in text
        assert "ended" in text

        # The daemon is down: the store still knows the lease and the money.
        provider.stop()
        doc = cli_json(capsys, "provider", "status", "--config", str(provider.config))
        assert doc["source"] == "store"
        assert "not running" in doc["daemon"]
        assert doc["node_id"] == info["node_id"]
        assert [x["lease_id"] for x in doc["leases"]] == [lease["lease_id"]]
        assert doc["leases"][0]["paid"] == paid  # from the receipts it keeps
        assert doc["earnings"]["earned"] == paid
        code, text, _ = cli(capsys, "provider", "status", "--home", home)
        assert code == 0
        assert "showing what the store knows" in text

    def test_no_node_at_the_home_is_a_clear_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = cli(capsys, "provider", "status", "--home", str(tmp_path / "nothing"))
        assert code == 1
        assert "no node at" in err


class TestProviderPrices:
    def test_set_readvertises_persists_and_the_config_wins_when_it_changes(
        self, provider: Provider, capsys: pytest.CaptureFixture[str]
    ) -> None:
        provider.start()
        home = str(provider.home)
        rows = cli_json(capsys, "provider", "prices", "--home", home)
        assert rows == [
            {"model": "RTX-4090", "floor": FLOOR, "config_floor": FLOOR, "override": False}
        ]

        # Aliases and case are forgiven; credits are exact decimals.
        rows = cli_json(capsys, "provider", "prices", "--home", home, "--set", "rtx-4090=0.5")
        assert rows[0]["floor"] == 500_000
        assert rows[0]["override"] is True

        def readvertised() -> dict[str, Any] | None:
            d: dict[str, Any] = cli_json(capsys, "provider", "status", "--home", home)
            return d if own_advert_floor(d) == 500_000 else None

        doc = wait_for("the new advert", readvertised)
        assert {d["price_floor"] for d in doc["devices"]} == {500_000}
        assert "RTX-4090: 0.35 -> 0.5 credits" in provider.log()

        # Tenants see the new floor: one offering 0.45 finds nobody to ask.
        order = subprocess.run(
            [
                *(sys.executable, "-m", "node.cli", "order", "--units", "1"),
                *("--max-price", "0.45", "--peer", doc["address"], "--json"),
            ],
            env=provider.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert order.returncode == 1
        answer = json.loads(order.stdout)
        assert answer["asked"] == []
        assert "at or below 0.45 credits" in answer["answers"]

        # The floor survives a restart...
        provider.stop()
        provider.start()
        assert cli_json(capsys, "provider", "prices", "--home", home)[0]["floor"] == 500_000

        # ...and --reset goes back to the config.
        rows = cli_json(capsys, "provider", "prices", "--home", home, "--reset")
        assert rows[0] == {
            "model": "RTX-4090",
            "floor": FLOOR,
            "config_floor": FLOOR,
            "override": False,
        }

        # Set again, then the operator edits the config: the newer decision (config) wins.
        cli_json(capsys, "provider", "prices", "--home", home, "--set", "RTX-4090=0.6")
        provider.stop()
        provider.write(floor=400_000)
        provider.start()
        rows = cli_json(capsys, "provider", "prices", "--config", str(provider.config))
        assert rows[0]["floor"] == 400_000
        assert rows[0]["override"] is False
        assert "config's floor changed since" in provider.log()

    def test_refusals(
        self, provider: Provider, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        info = provider.start()
        home = str(provider.home)
        url = info["control_url"] + "/control/prices"

        # A model this provider does not sell: the CLI says which ones it does.
        code, _, err = cli(capsys, "provider", "prices", "--home", home, "--set", "H100=2")
        assert code == 1
        assert "no devices of model H100-SXM here" in err
        assert "RTX-4090" in err

        # Bad syntax is a usage error before anything is sent.
        with pytest.raises(SystemExit) as exc:
            main(["provider", "prices", "--home", home, "--set", "RTX-4090"])
        assert exc.value.code == 2

        # Anyone else's key, even one addressed to this node, changes nothing.
        stranger = Identity.generate()
        body = PriceUpdate(floors={"RTX-4090": 1})
        now = time.time_ns() // 1_000_000
        forged = seal(stranger, body, now_ms=now, nonce=os.urandom(16), to=info["node_id"])
        assert post(url, forged) == (
            403,
            {
                "error": {
                    "code": "sender_mismatch",
                    "reason": "price updates must be signed with this node's own key",
                }
            },
        )
        # The node's own update, replayed, is refused the second time.
        own = NodeHome(provider.home).load_or_create_identity()
        sealed = seal(own, body, now_ms=now, nonce=os.urandom(16), to=info["node_id"])
        assert post(url, sealed)[0] == 200
        status, answer = post(url, sealed)
        assert (status, answer["error"]["code"]) == (409, "replay")
        status, answer = post(url, b"\x93not an envelope")
        assert status == 400
        rows = cli_json(capsys, "provider", "prices", "--home", home)
        assert rows[0]["floor"] == 1  # the one accepted update, nothing else

        # With the daemon down, --set says so instead of pretending.
        provider.stop()
        code, _, err = cli(capsys, "provider", "prices", "--home", home, "--set", "RTX-4090=1")
        assert code == 1
        assert "not running" in err
        assert "prices are set on the running daemon" in err

    def test_clients_outside_allow_from_are_refused(
        self, provider: Provider, capsys: pytest.CaptureFixture[str]
    ) -> None:
        provider.write(status='\n[status]\nallow_from = ["10.0.0.0/8"]\n')
        info = provider.start()
        for path in ("/", "/status.json"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(info["control_url"] + path, timeout=10)
            assert exc.value.code == 403
        code, _, err = cli(capsys, "provider", "status", "--home", str(provider.home))
        assert code == 1
        assert "127.0.0.1 is not in [status] allow_from" in err
        # /healthz and /metrics stay open for probes and Prometheus.
        with urllib.request.urlopen(info["control_url"] + "/healthz", timeout=10) as resp:
            assert resp.status == 200
