"""The deterministic simulation (bench/simulate.py) and its virtual-time loop.

The simulation runs real nodes, providers and tenants on the in-memory transport (a fake
network: the test is about the logic of many nodes, as every test name says). It runs
as a real subprocess, twice at once with different hash seeds, so what is compared is
exactly what a user reproducing a run would compare.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

import protocol.envelope as envelope_module
from market.bidding import BidEngine, Device, LeaseState, ProviderLease
from node.net.simloop import VirtualTimeLoop, run
from node.store.node_store import LeaseRow
from protocol import codec
from protocol.envelope import open_envelope, seal, signed_part
from protocol.errors import BadSignatureError
from protocol.identity import Identity
from protocol.messages import Accept, Advert, Award, DeviceGroup, Interconnect, Order, Requirement

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "bench" / "simulate.py"
T0 = 1_767_225_600_000


def load_simulate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("simulate", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class TestVirtualTimeLoop:
    def test_timers_fire_in_order_at_their_virtual_time(self) -> None:
        async def main() -> list[tuple[str, float]]:
            loop = asyncio.get_running_loop()
            fired: list[tuple[str, float]] = []

            async def after(delay: float, name: str) -> None:
                await asyncio.sleep(delay)
                fired.append((name, loop.time()))

            await asyncio.gather(after(3600, "hour"), after(1.5, "soon"), after(0, "now"))
            return fired

        assert run(main()) == [("now", 0.0), ("soon", 1.5), ("hour", 3600.0)]

    def test_a_timeout_expires_in_virtual_time(self) -> None:
        async def main() -> float:
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(100), timeout=5)
            return loop.time()

        assert run(main(), start=10.0) == 15.0

    def test_real_io_from_a_thread_still_completes(self) -> None:
        async def main() -> int:
            return await asyncio.to_thread(sum, [1, 2, 3])

        assert run(main()) == 6

    def test_time_never_moves_backwards(self) -> None:
        loop = VirtualTimeLoop(start=5.0)
        try:
            with pytest.raises(ValueError, match="forward"):
                loop.advance(-1)
            assert loop.time() == 5.0
        finally:
            loop.close()


def _advert(identity: Identity, expires_ms: int) -> Advert:
    group = DeviceGroup(
        model="L4",
        kind="gpu",
        ids=["gpu0"],
        free=["gpu0"],
        memory_bytes=24 * 10**9,
        fp16_flops=121 * 10**12,
        memory_bandwidth=300 * 10**9,
        price_floor=400_000,
    )
    return Advert(
        provider=identity.node_id,
        address="http://p.sim",
        devices=[group],
        interconnect=Interconnect(kind="pcie", bandwidth=1, gang_size=1),
        seq=1,
        expires_ms=expires_ms,
    )


def _lease(tenant: Identity, provider: Identity, *, bind: bytes | None = None) -> LeaseRow:
    award = Award(
        order_id="o1",
        bid_id="b1",
        lease_id="o1.L1",
        provider=provider.node_id,
        units=1,
        price=400_000,
        heartbeat_interval_ms=2_000,
        lease_end_ms=T0 + 60_000,
    )
    award_raw = seal(tenant, award, now_ms=T0, nonce=b"\1" * 16, to=provider.node_id)
    accept = Accept(
        lease_id="o1.L1",
        order_id="o1",
        award_hash=hashlib.sha256(bind or award_raw).hexdigest(),
        start_ms=T0,
    )
    accept_raw = seal(provider, accept, now_ms=T0, nonce=b"\2" * 16, to=tenant.node_id)
    return LeaseRow(
        lease_id="o1.L1",
        side="tenant",
        order_id="o1",
        tenant=tenant.node_id,
        provider=provider.node_id,
        provider_address="http://p.sim",
        units=1,
        devices=("gpu0",),
        model="L4",
        price=400_000,
        job_spec_hash="0" * 64,
        start_ms=T0,
        end_ms=T0 + 60_000,
        heartbeat_interval_ms=2_000,
        state="active",
        award_hash=hashlib.sha256(award_raw).hexdigest(),
        award=award_raw,
        accept=accept_raw,
        updated_ms=T0,
    )


class TestInvariantChecks:
    """The checks the simulation runs must catch what they claim to catch."""

    def test_a_device_leased_twice_is_caught(self) -> None:
        sim = load_simulate()
        engine = BidEngine(
            "p" * 32,
            [Device("gpu0", "L4", "gpu", 1, 1, 1, 1)],
            Interconnect(kind="pcie", bandwidth=1, gang_size=1),
        )
        sim.check_engine(engine, "provider 1")  # a fresh engine is consistent
        for lease_id in ("L1", "L2"):
            engine.leases[lease_id] = ProviderLease(
                lease_id, "o", "t", "h", ("gpu0",), 1, T0, T0 + 1, 1000, T0
            )
        engine.free.clear()
        assert all(lease.state is LeaseState.ACTIVE for lease in engine.leases.values())
        with pytest.raises(sim.InvariantError, match="provider 1"):
            sim.check_engine(engine, "provider 1")

    def test_a_device_in_two_signed_leases_is_caught_even_if_the_engine_forgot(self) -> None:
        sim = load_simulate()
        tenant = Identity.from_seed(b"t" * 32)
        provider = Identity.from_seed(b"p" * 32)
        gpu = [Device("gpu0", "L4", "gpu", 1, 1, 1, 1)]
        first = dataclasses.replace(_lease(tenant, provider), side="provider")
        sim.check_signed_leases([first], gpu, T0, "provider 1")
        again = dataclasses.replace(first, lease_id="o2.L1")  # sold again after a restart
        with pytest.raises(sim.InvariantError, match="provider 1 signed active leases"):
            sim.check_signed_leases([first, again], gpu, T0, "provider 1")
        sim.check_signed_leases([first, again], gpu, first.end_ms, "provider 1")  # both over
        with pytest.raises(sim.InvariantError, match="gpu0"):
            sim.check_signed_leases([first], [], T0, "provider 1")

    def test_a_lease_whose_accept_binds_another_award_is_caught(self) -> None:
        sim = load_simulate()
        tenant = Identity.from_seed(b"t" * 32)
        provider = Identity.from_seed(b"p" * 32)
        sim.check_lease_rows([_lease(tenant, provider)])
        with pytest.raises(sim.InvariantError, match="another award"):
            sim.check_lease_rows([_lease(tenant, provider, bind=b"some other award")])

    def test_a_lease_signed_by_the_wrong_provider_is_caught(self) -> None:
        sim = load_simulate()
        tenant = Identity.from_seed(b"t" * 32)
        provider = Identity.from_seed(b"p" * 32)
        forged = _lease(tenant, Identity.from_seed(b"m" * 32))
        row = dataclasses.replace(_lease(tenant, provider), accept=forged.accept)
        with pytest.raises(sim.InvariantError, match="signed by the wrong nodes"):
            sim.check_lease_rows([row])

    def test_an_order_to_an_expired_advert_is_caught(self) -> None:
        sim = load_simulate()
        provider = Identity.from_seed(b"p" * 32)
        order = Order(
            order_id="o1",
            tenant=Identity.from_seed(b"t" * 32).node_id,
            job_spec_hash="0" * 64,
            workload="sweep",
            requirement=Requirement(),
            units=1,
            max_price=1,
            bid_deadline_ms=T0 + 1000,
            lease_ms=1000,
        )
        live = {provider.node_id: _advert(provider, T0 + 1)}
        sim.check_candidates(order, T0, [provider.node_id], live)
        dead = {provider.node_id: _advert(provider, T0)}
        with pytest.raises(sim.InvariantError, match="expired"):
            sim.check_candidates(order, T0, [provider.node_id], dead)


def _simulate(tmp_path: Path, hash_seed: str, *extra: str) -> subprocess.Popen[str]:
    out = tmp_path / f"run-{hash_seed}.json"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    args = [sys.executable, str(SCRIPT), "--nodes", "200", "--quick", "--seed", "7", *extra]
    # 20 % of the nodes crash: enough to hit providers holding leases (seed 7 does).
    args += ["--loss", "0.01", "--partition", "16", "--crash", "0.2", "--json", str(out)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


class TestSimulation:
    def test_memory_transport_200_nodes_with_faults_are_deterministic_and_converge(
        self, tmp_path: Path
    ) -> None:
        # Two processes at once (two cores), with different hash randomisation, one
        # checking signatures ahead in a second process, the other not.
        procs = {
            "1": _simulate(tmp_path, "1", "--checker"),
            "4242": _simulate(tmp_path, "4242", "--no-checker"),
        }
        outputs = {seed: p.communicate(timeout=110)[0] for seed, p in procs.items()}
        for seed, p in procs.items():
            assert p.returncode == 0, outputs[seed]  # exit 1 means an invariant broke
        runs: dict[str, dict[str, Any]] = {
            seed: json.loads((tmp_path / f"run-{seed}.json").read_text())[0] for seed in procs
        }
        first, second = runs["1"], runs["4242"]
        # Same seed: the same trace (every auction, crash, heal, final directory), with
        # or without the signature checker, which answered most receivers' checks.
        assert first["trace"] == second["trace"]
        assert first["checker_hits"] > 2 * first["checker_misses"] > 0
        assert first["checker_cpu_s"] > 0
        assert second["checker_hits"] == second["checker_misses"] == 0
        assert outputs["1"].splitlines()[-1] == outputs["4242"].splitlines()[-1]
        assert outputs["1"].splitlines()[-1].startswith("converge_rounds=")
        # --table prints the saved runs again, without simulating, with the same last line.
        saved = [str(tmp_path / f"run-{seed}.json") for seed in procs]
        table = subprocess.run(
            [sys.executable, str(SCRIPT), "--table", *saved],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        assert table[-1] == outputs["1"].splitlines()[-1]
        assert sum(line.split()[0] == "200" for line in table) == 2
        # Faults really happened and the market kept working through them.
        assert first["crashed"] == 40
        assert first["dropped"] > 0
        assert first["auctions"] > 0
        assert first["leases"] > 0
        # Every node got every advert at the start, and again after the heal.
        assert first["converge_all_rounds"] < 30
        assert first["heal_rounds_all"] < 60


class TestDishonestParties:
    def test_liars_gain_nothing_beyond_the_tolerance_and_honest_providers_lose_little(
        self,
    ) -> None:
        """A fifth of each side cheats (overbill, backdate, stall; vanish, never pay)."""
        sim = load_simulate()
        p = sim.SettlementParams(providers=15, tenants=10, dishonest=0.2, sim_s=140.0, seed=3)
        r = sim.run_settlement(p)
        kinds = set(r.leases_by_kind)
        assert {k.split("/")[0] for k in kinds} >= {"honest", "vanish", "never_pays"}, kinds
        assert {k.split("/")[1] for k in kinds} >= {"honest", "overbill", "stall"}, kinds
        assert r.refused_accepts > 0  # the backdater's leases were refused
        assert r.refused_bills > 0
        assert r.overbilled_beyond_tolerance == 0
        # Interval + timeout, in intervals (the rounding of amounts adds a hair).
        bound = 1 + p.payment_timeout_ms / p.debit_interval_ms
        assert 0 < r.provider_loss_max_intervals <= bound + 0.01
        assert 0 < r.settlement_share < 0.05


class TestFabricatingProviders:
    def test_fabricators_are_caught_and_never_give_a_sweep_its_best(self) -> None:
        """Tenants spot-check sweeps on the simulated market (market.verification's rule,
        the real VerifyStore and auction); a third of the providers make results up."""
        sim = load_simulate()
        p = sim.Params(
            nodes=40,
            providers=10,
            tenants=3,
            seed=4,
            fabricators=0.3,
            sweep_trials=8,
            partition_s=0.0,
            crash=0.0,
            join_s=3.0,
            steady_s=90.0,
            lease_hold_s=4.0,
        )
        r = sim.run_once(p)
        v = r.verification
        assert v["fabricators"] == 3
        assert v["sweeps"] >= 4
        assert v["runs"]["check"] > 0
        assert v["extra_spend_pct"] is not None
        assert v["extra_spend_pct"] > 0
        # Fabricators won work and were caught, by every tenant they gave results to,
        # well before their 20th result to it; no honest provider was. A result is
        # checked at a rate (a quarter for a newcomer), so a fabricator that gave a
        # tenant one or two results may go unchecked: at this size that happens in 3
        # of 8 seeds (1, 7, 10), and here since tenants read adverts through their own
        # leases (another placement); what is bounded is how far it gets.
        assert v["fabricators_caught"] >= 2
        assert all(x["results"] <= 2 for x in v["uncaught_pairs"])
        assert v["caught_pairs"]
        assert all(x["caught_at"] <= 20 for x in v["caught_pairs"])
        assert v["caught_by_20th_frac"] == 1.0
        assert v["wrongly_caught"] == 0
        # No sweep reported a made-up result as its best.
        assert v["fabricated_best"] == 0
        assert v["fabricated_results_kept"] == 0


def _sweep_params(sim: ModuleType, **kw: Any) -> Any:
    """A small honest market of sweeping tenants, no partition or crash."""
    base: dict[str, Any] = dict(
        nodes=20,
        providers=6,
        tenants=2,
        seed=1,
        fabricators=0.0,
        sweep_trials=4,
        partition_s=0.0,
        crash=0.0,
        join_s=3.0,
    )
    return sim.Params(**{**base, **kw})


class TestSweepSettlement:
    """Simulated sweeping tenants settle their leases as real ones do (node/tenant/sweep.py:
    heartbeats whose replies carry debit notes, countersigned; a release tried again)."""

    def test_a_lease_held_past_its_first_debit_note_is_paid_and_kept(self) -> None:
        # Notes every 10 s fall due from 20 s and lapse 10 s later: a 40 s run is a
        # lease its provider ends for want of payment unless the tenant countersigns.
        sim = load_simulate()
        r = sim.run_once(_sweep_params(sim, lease_hold_s=40.0, steady_s=200.0, loss=0.0))
        v = r.verification
        assert v["leases_lapsed"] == 0
        assert v["providers_refusing_tenants"] == 0
        assert v["sweeps"] >= 2  # each tenant finished one at least
        assert v["overhead"]["all"]["trials"] >= 8

    def test_a_lost_release_is_tried_again_and_the_tenant_stays_welcome(self) -> None:
        # 5 % of messages lost each way: some releases never reach their provider. A
        # tenant that gives up on them leaves the lease to lapse, and that provider then
        # refuses its orders for a day (market.debit.SettlementPolicy.lapse_memory_ms).
        sim = load_simulate()
        r = sim.run_once(
            _sweep_params(sim, lease_hold_s=4.0, steady_s=300.0, loss=0.05, sweep_trials=8)
        )
        v = r.verification
        assert r.releases_failed > 0  # the loss did hit releases
        assert v["leases_lapsed"] == 0
        assert v["providers_refusing_tenants"] == 0
        o = v["overhead"]
        assert o["all"]["sweeps"] == v["sweeps"] >= 6
        assert o["first"]["sweeps"] == 2
        assert o["later"]["sweeps"] == v["sweeps"] - 2
        assert o["later"]["extra_runs_pct"] is not None


class TestSignatureOracle:
    """The simulation's second-core signature checks (``SignatureOracle``) with a real
    checker process: a proof passes exactly the check it was made for and nothing
    else, so a simulated receiver still rejects every signature a daemon rejects."""

    @pytest.fixture
    def oracle(self) -> Any:
        sim = load_simulate()
        with sim.SignatureOracle() as oracle:
            yield oracle

    @staticmethod
    def _parts(data: bytes) -> tuple[bytes, bytes, bytes]:
        env = codec.decode(data)
        return env["from"], env["sig"], signed_part(data, env)

    @staticmethod
    def _answered(oracle: Any, data: bytes, within_s: float = 20.0) -> bool:
        """Send ``data`` alone; True once the checker's proof of it is in (False when
        none came within ``within_s``: the checker answers nothing for a bad one)."""
        sig = codec.decode(data)["sig"]
        oracle._requests.send_bytes(msgpack.packb([data]))
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            oracle._collect()
            if sig in oracle._known:
                return True
            time.sleep(0.01)
        return False

    def _sealed(self) -> tuple[Identity, bytes]:
        tenant = Identity.generate()
        data = seal(tenant, _advert(tenant, T0 + 60_000), now_ms=T0, nonce=b"\7" * 16)
        return tenant, data

    def test_a_proof_passes_only_the_bytes_and_key_it_was_made_for(self, oracle: Any) -> None:
        _, data = self._sealed()
        key, sig, message = self._parts(data)
        assert self._answered(oracle, data)
        # Other bytes under the same signature: the proof does not cover them.
        with pytest.raises(BadSignatureError):
            oracle.check(key, sig, message[:-1] + bytes([message[-1] ^ 1]))
        # Another key with the same signature and bytes: neither.
        assert self._answered(oracle, data)
        with pytest.raises(BadSignatureError):
            oracle.check(Identity.generate().public_key, sig, message)
        assert oracle.hits == 0
        assert oracle.misses == 2
        # The exact triple: passed on the proof, without verifying here.
        assert self._answered(oracle, data)
        oracle.check(key, sig, message)
        assert oracle.hits == 1

    def test_a_forged_signature_gets_no_proof_and_is_rejected(self, oracle: Any) -> None:
        _, data = self._sealed()
        forged = data.replace(codec.decode(data)["sig"], bytes(64))
        key, sig, message = self._parts(forged)
        assert not self._answered(oracle, forged, within_s=1.0)
        with pytest.raises(BadSignatureError):
            oracle.check(key, sig, message)
        assert (oracle.hits, oracle.misses) == (0, 1)

    def test_installed_it_answers_open_envelope_and_uninstalls(self) -> None:
        sim = load_simulate()
        real = envelope_module.verify
        _, data = self._sealed()
        with sim.SignatureOracle() as oracle:
            assert envelope_module.verify == oracle.check
            assert self._answered(oracle, data)
            opened = open_envelope(data, now_ms=T0, replay=None)
            assert opened.type == "advert"
            assert oracle.hits == 1
        assert envelope_module.verify is real
        assert oracle.cpu_s > 0  # the checker's CPU, taken when it ended
