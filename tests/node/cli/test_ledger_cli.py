"""``mercato ledger``: balances, export and an independent check of the evidence.

The evidence comes from a real lease: a real provider daemon, a real tenant over HTTP,
debit notes countersigned during the lease and the closing receipt. The CLI runs as a
real subprocess, as an operator or a payment system would run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.config import NodeConfig, NodeSection, SettlementSection
from node.daemon import Daemon
from node.net.transport import HttpTransport
from node.provider.inventory import DeviceDecl
from node.store.node_store import Store
from node.tenant.client import Tenant
from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import DebitNote, Requirement

JOB = hashlib.sha256(b"test_ledger_cli").hexdigest()


def mercato(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One paid lease with notes: the tenant's and the provider's homes."""
    tmp = tmp_path_factory.mktemp("ledger")

    async def run() -> None:
        config = NodeConfig(
            node=NodeSection(listen_port=0, home=tmp / "provider"),
            devices=[DeviceDecl(model="RTX-4090", count=2, price_floor=3_600_000, simulated=True)],
            settlement=SettlementSection(min_debit_interval_s=0.5),
            detect_gpus=False,
        )
        daemon = await Daemon.start(config)
        (tmp / "tenant").mkdir()
        store = Store(tmp / "tenant" / "node.sqlite")
        transport = HttpTransport()
        try:
            tenant = Tenant(
                Identity.generate(),
                store,
                transport,
                debit_interval_ms=500,
                payment_timeout_ms=1_000,
            )
            await tenant.refresh(daemon.address)
            report = await tenant.auction(Requirement(kind="gpu"), 1, 10_000_000, job_spec_hash=JOB)
            lease = store.get_lease(report.leases[0].lease_id)
            assert lease is not None
            seq = 0
            while len(store.list_receipts(lease.lease_id, kind="debit_note")) < 2:
                assert await tenant.heartbeat(lease, seq)
                seq += 1
                await asyncio.sleep(0.2)
            await tenant.release(lease)
        finally:
            await transport.close()
            store.close()
            await daemon.close()

    asyncio.run(run())
    return {"tenant": tmp / "tenant", "provider": tmp / "provider"}


@pytest.fixture(scope="module")
def exported(homes: dict[str, Path]) -> dict[str, Any]:
    out = homes["tenant"].parent / "evidence.json"
    done = mercato("ledger", "--home", str(homes["tenant"]), "export", str(out))
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def write(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(doc))
    return str(path)


class TestBalances:
    def test_both_sides_show_the_same_debt_per_counterparty(self, homes: dict[str, Path]) -> None:
        views = {}
        for side, home in homes.items():
            done = mercato("ledger", "--home", str(home), "--json")
            assert done.returncode == 0, done.stderr
            views[side] = json.loads(done.stdout)
        [tenant_view] = views["tenant"]["counterparties"]
        [provider_view] = views["provider"]["counterparties"]
        assert tenant_view["booked"] == -provider_view["booked"] < 0
        assert tenant_view["lines"] == provider_view["lines"] >= 3  # notes and the receipt
        assert tenant_view["unsigned"] == provider_view["unsigned"] == 0


class TestVerify:
    def test_an_honest_export_verifies_and_its_totals_are_the_ledgers(
        self, homes: dict[str, Path], exported: dict[str, Any], tmp_path: Path
    ) -> None:
        done = mercato("ledger", "verify", write(tmp_path, exported), "--json")
        assert done.returncode == 0, done.stderr + done.stdout
        result = json.loads(done.stdout)
        with Store(homes["provider"] / "node.sqlite") as store:
            earned = store.ledger_balance()
        assert [t["amount_micro_credits"] for t in result["totals"]] == [earned]
        assert result["bills"] >= 3

    def test_the_providers_export_proves_the_same_debt(
        self, homes: dict[str, Path], exported: dict[str, Any], tmp_path: Path
    ) -> None:
        out = tmp_path / "provider.json"
        assert (
            mercato("ledger", "--home", str(homes["provider"]), "export", str(out)).returncode == 0
        )
        theirs = json.loads(out.read_text())
        assert theirs["totals"] == exported["totals"]

    @pytest.mark.parametrize(
        ("tamper", "why"),
        [
            ("claimed_total", "its countersigned bills prove"),
            ("flipped_signature", "bill 0"),
            ("dropped_countersign", "countersignature"),
            ("inflated_totals", "differ from the proven"),
            ("resigned_by_a_stranger", "not signed by the lease's provider"),
            ("duplicated_lease", "appears twice"),
        ],
    )
    def test_a_tampered_export_is_rejected_with_the_reason(
        self, exported: dict[str, Any], tmp_path: Path, tamper: str, why: str
    ) -> None:
        doc = json.loads(json.dumps(exported))
        lease = doc["leases"][0]
        if tamper == "claimed_total":
            lease["amount_micro_credits"] += 1_000_000
        elif tamper == "flipped_signature":
            raw = bytearray.fromhex(lease["bills"][0]["bill"])
            raw[-5] ^= 1
            lease["bills"][0]["bill"] = raw.hex()
        elif tamper == "dropped_countersign":
            lease["bills"][0]["countersign"] = lease["bills"][0]["bill"]
        elif tamper == "inflated_totals":
            doc["totals"][0]["amount_micro_credits"] *= 2
        elif tamper == "resigned_by_a_stranger":
            stranger = Identity.generate()
            note = DebitNote(
                lease_id=lease["lease_id"],
                provider=stranger.node_id,
                tenant=lease["tenant"],
                seq=99,
                device_ms=3_600_000,
                price=3_600_000,
                amount=3_600_000,
            )
            sealed = seal(
                stranger, note, now_ms=1_700_000_000_000, nonce=bytes(16), to=lease["tenant"]
            )
            lease["bills"][0]["bill"] = sealed.hex()
        elif tamper == "duplicated_lease":
            doc["leases"].append(lease)
        done = mercato("ledger", "verify", write(tmp_path, doc))
        assert done.returncode == 1
        assert why in done.stderr
        assert done.stdout == ""
