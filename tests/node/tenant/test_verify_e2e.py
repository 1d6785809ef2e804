"""A provider that fabricates results, against a tenant over real daemons.

The fabricator is the real provider daemon with a sandbox that runs nothing and
answers "succeeded, loss 1e-06" at once (tests/node/tenant/fabricating_provider.py).
It is the cheapest provider of the market, so it wins the sweep's trials. Two honest
providers sell the same job for more. What a tenant must see:

* the sweep's reported best is the real best (the local run of the same grid), never
  the fabricated 1e-06; every stored result is the real value of its point;
* the fabricator is caught by spot-check replication and a third provider's decision,
  dropped for this tenant, and its pending payment refused;
* ``mercato evidence JOB --json`` exports the dispute: the signed results of both
  sides and of the decider, the workspace hash, the parameters and the seed, so
  anyone can re-run the trial and see who lied.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_sweep_e2e as sweep_e2e
import yaml

from market.verification import NEWCOMER_TRIALS, PROVEN_STREAK, Trust, trial_seed
from node.cli import localcluster as cluster
from node.store.verify_store import VerifyStore
from protocol.envelope import open_envelope

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]

FABRICATOR = Path(__file__).parent / "fabricating_provider.py"
FABRICATED = 1e-06
HONEST = (
    cluster.Template("T4", 2, 150_000, "pcie"),
    cluster.Template("RTX-3090", 2, 250_000, "pcie"),
)


@contextlib.contextmanager
def fabricating_provider(
    c: sweep_e2e.Cluster, name: str = "fabricator", price: int = 1_000, **env: str
) -> Iterator[cluster.NodeRecord]:
    """Start a fabricator (4 cheap "RTX-4090"s) next to the cluster; kill it after."""
    boot = next(n for n in c.nodes if n.role == "bootstrap")
    template = cluster.Template("RTX-4090", 4, price, "pcie")
    rec = cluster._prepare(c.root / "cluster", name, boot.address, template, 6.0)
    log = Path(rec.home) / "logs"
    log.mkdir(parents=True, exist_ok=True)
    with (log / "stdout.log").open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(FABRICATOR), "--config", rec.config],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MERCATO_HOME": rec.home, "FABRICATE_NODE_ID": rec.node_id, **env},
        )
    try:
        cluster._wait_ready(rec, proc, time.monotonic() + 60)
        rec.pid = proc.pid
        cluster._wait_advertised(boot, [rec.node_id], time.monotonic() + 60)
        yield rec
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sweep_e2e.Cluster, str]]:
    root = tmp_path_factory.mktemp("verify-cluster")
    nodes = cluster.up(len(HONEST), home=root, timeout_s=120.0, templates=HONEST)
    c = sweep_e2e.Cluster(root, nodes)
    try:
        with fabricating_provider(c) as fab:
            yield c, fab.node_id
    finally:
        cluster.down(home=root)


class TestFabricatingProvider:
    def test_fabricated_results_are_caught_and_never_reported(
        self, market: tuple[sweep_e2e.Cluster, str], tmp_path: Path
    ) -> None:
        c, fabricator = market
        job = sweep_e2e.job_file(tmp_path / "job")
        with sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant:
            proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "4")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            summary = json.loads(proc.stdout)
            job_id = summary["job_id"]
            results = tenant.json("results", job_id)
            leases = tenant.leases(job_id)

            # The fabricator did win trials (it is the cheapest), so the attack was real.
            assert any(x.provider == fabricator for x in leases)

            # The reported best is the real best, and every stored result is real.
            local = sweep_e2e.local_losses()
            best_point = min(local, key=lambda p: local[p])
            assert summary["best"]["value"] != FABRICATED
            assert sweep_e2e.point_of(summary["best"]["params"]) == best_point
            assert summary["best"]["value"] == pytest.approx(local[best_point])
            assert summary["best"]["verified"] is True  # re-run on another provider
            sweep_e2e.assert_grid_done_once(results)
            for t in results:
                assert t["value"] == pytest.approx(local[sweep_e2e.point_of(t["params"])]), t
                assert t["provider"] != fabricator, t

            # The evidence names the fabricator, with three signed results to check.
            evidence = tenant.json("evidence", job_id)
            disputes = [d for d in evidence["disputes"] if d["liar"] == fabricator]
            assert disputes, evidence
            d = disputes[0]
            assert d["workspace_hash"]
            assert d["params"]
            with sweep_e2e.Store(tenant.store_path) as store:
                job = sweep_e2e.JobStore(store).find_job(job_id)
            assert job is not None
            assert d["seed"] == trial_seed(job.seed, d["number"])  # what $MERCATO_SEED held
            voters = [d["original"], d["check"], d["decider"]]
            assert len({v["provider"] for v in voters}) == 3
            for v in voters:
                env = open_envelope(base64.b64decode(v["result_envelope"]), now_ms=0, replay=None)
                assert env.sender == v["provider"]
                assert env.body.metrics[d["metric"]] == v["value"]
            assert d["original"]["provider"] == fabricator
            assert d["original"]["value"] == FABRICATED
            assert fabricator in evidence["dropped"]
            # Its pending payment is refused: nothing of the fabricator's lease is paid.
            assert any(r["provider"] == fabricator for r in evidence["refused_payments"])
            with sweep_e2e.Store(tenant.store_path) as store:
                paid = {line["lease_id"] for line in store.ledger() if line["amount"]}
            assert not paid & {x.lease_id for x in leases if x.provider == fabricator}

    def test_a_provider_that_fakes_the_canary_gets_no_trial(
        self, market: tuple[sweep_e2e.Cluster, str], tmp_path: Path
    ) -> None:
        """The keyed canary on a provider's first lease: a provider that runs nothing
        cannot know iterated SHA-256 of the tenant's nonce, so it is dropped before any
        trial of it is accepted, and its lease is not paid."""
        c, _ = market
        job = sweep_e2e.job_file(tmp_path / "job")
        with (
            fabricating_provider(c, "lazy", price=500, FABRICATE_CANARY="1") as lazy,
            sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant,
        ):
            proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "4")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            summary = json.loads(proc.stdout)
            job_id = summary["job_id"]
            assert any(x.provider == lazy.node_id for x in tenant.leases(job_id))
            results = tenant.json("results", job_id)
            sweep_e2e.assert_grid_done_once(results)
            assert all(t["provider"] != lazy.node_id for t in results)
            local = sweep_e2e.local_losses()
            for t in results:
                assert t["value"] == pytest.approx(local[sweep_e2e.point_of(t["params"])]), t
            evidence = tenant.json("evidence", job_id)
            assert lazy.node_id in evidence["dropped"]
            refused = [r for r in evidence["refused_payments"] if r["provider"] == lazy.node_id]
            assert refused
            assert "canary" in refused[0]["reason"]


class TestPredictedChecks:
    def test_a_provider_cannot_tell_which_results_will_be_checked(
        self, market: tuple[sweep_e2e.Cluster, str], tmp_path: Path
    ) -> None:
        """The draw that picks the results to re-run must be secret to the tenant.

        The cheat computes the draw from what it sees (job id and trial number in the
        task id, its own node id), runs the trials it expects to be re-run and answers
        a made-up, unremarkable loss (never the best, so the best check does not meet
        it) for the others. Were the draw computable, it would be paid for every
        fabricated trial and never caught. 32 trials at a fixed rate of 1/2: it
        fabricates about half of those it gets, and each of them is re-run with
        probability 1/2 whatever it predicted.
        """
        c, _ = market
        where = tmp_path / "job"
        job = sweep_e2e.job_file(where)
        spec = yaml.safe_load(job.read_text())
        spec["sweep"]["parameters"]["x"] = {"values": [-1, 0, 0.5, 1, 2, 2.5, 3, 3.5]}
        spec["sweep"]["parameters"]["y"] = {"values": [-2, -1, 0, 1]}
        spec["verify"] = {"rate": 0.5}
        job.write_text(yaml.safe_dump(spec))
        with (
            fabricating_provider(
                c, "predictor", price=500, FABRICATE_UNCHECKED="1/2", FABRICATE_VALUE="77.5"
            ) as cheat,
            sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant,
        ):
            proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "4")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            job_id = json.loads(proc.stdout)["job_id"]
            assert any(x.provider == cheat.node_id for x in tenant.leases(job_id))
            results = tenant.json("results", job_id)
            assert len(results) == 32
            evidence = tenant.json("evidence", job_id)
            assert all(t["value"] != 77.5 for t in results), "a fabricated result was kept"
            assert cheat.node_id in evidence["dropped"]
            assert any(cheat.node_id in d["liars"] for d in evidence["disputes"])


class TestOneProvider:
    def test_a_one_provider_market_ends_the_sweep_with_the_best_unverified(
        self, tmp_path: Path
    ) -> None:
        """Nobody else sells the job: checks are given up at once (not after --max-wait),
        and the summary says the best is not verified."""
        with (
            sweep_e2e.running_cluster(tmp_path / "cluster", providers=1) as c,
            sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant,
        ):
            job = sweep_e2e.job_file(tmp_path / "job")
            proc = tenant.run(
                "submit", str(job), "--quiet", "--json", "--max-wait", "600", timeout_s=90
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            summary = json.loads(proc.stdout)
            assert summary["state"] == "done"
            assert summary["best"]["verified"] is False
            evidence = tenant.json("evidence", summary["job_id"])
            verdicts = {c["verdict"] for c in evidence["all_checks"]}
            assert "unchecked: no other provider in the directory sells this job" in verdicts


class TestRoomForNewcomers:
    def test_a_newcomer_gets_one_trial_while_a_proven_provider_runs_the_rest(
        self, tmp_path: Path
    ) -> None:
        """Room for newcomers is measured in trials (market.verification.may_take_trial):
        next to a provider this tenant has proven, a newcomer gets NEWCOMER_TRIALS of the
        sweep, then its lease is released and paid, so its results (each re-run with
        probability 1/4) are few and the tenant stops paying for it early."""
        root = tmp_path / "cluster"
        nodes = cluster.up(len(HONEST), home=root, timeout_s=120.0, templates=HONEST)
        c = sweep_e2e.Cluster(root, nodes)
        try:
            veteran, newcomer = (p.node_id for p in c.providers)
            with sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant:
                tenant.store_path.parent.mkdir(parents=True, exist_ok=True)
                with sweep_e2e.Store(tenant.store_path) as store:
                    vs = VerifyStore(store)
                    vs.set_trust(veteran, Trust(streak=PROVEN_STREAK, verified=PROVEN_STREAK))
                    vs.canary_passed(veteran, 1_000)
                job = sweep_e2e.job_file(tmp_path / "job", sleep=0.3)
                proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "4")
                assert proc.returncode == 0, proc.stdout + proc.stderr
                job_id = json.loads(proc.stdout)["job_id"]
                results = tenant.json("results", job_id)
                sweep_e2e.assert_grid_done_once(results)
                local = sweep_e2e.local_losses()
                for t in results:
                    assert t["value"] == pytest.approx(local[sweep_e2e.point_of(t["params"])])
                leases = tenant.leases(job_id)
                assert {x.provider for x in leases} == {veteran, newcomer}  # both leased
                by = [t["provider"] for t in results]
                assert by.count(newcomer) == NEWCOMER_TRIALS, by
                assert by.count(veteran) == len(results) - NEWCOMER_TRIALS
                with sweep_e2e.Store(tenant.store_path) as store:
                    paid = {line["lease_id"] for line in store.ledger() if line["amount"]}
                assert {x.lease_id for x in leases if x.provider == newcomer} <= paid
        finally:
            cluster.down(home=root)


class TestCheckAfterTheAdvertsExpired:
    def test_a_check_opened_after_the_tenants_adverts_expired_still_finds_the_other_provider(
        self, tmp_path: Path
    ) -> None:
        """The tenant pulls the directory only for an auction, and adverts live a few
        seconds (6 s in a local cluster): a sweep that holds all the leases it wants
        runs on without pulling. A check opened later saw an expired directory, found
        "no other provider in the directory sells this job" and gave up, leaving the
        best one provider's word while another provider sold the job all along
        (bench/verify_digits_bench.py --sweeps 4: five checks of one sweep given up)."""
        root = tmp_path / "cluster"
        alike = (cluster.Template("T4", 1, 150_000, "pcie"),)
        ttl_s = 6.0
        nodes = cluster.up(2, home=root, timeout_s=120.0, templates=alike, ttl_s=ttl_s)
        c = sweep_e2e.Cluster(root, nodes)
        try:
            where = tmp_path / "job"
            # One trial, on the one lease of --parallel 1, outlives every advert the
            # sweep's only auction pulled: its result (the best) is checked after that.
            job = sweep_e2e.job_file(where, sleep=ttl_s + 2)
            spec = yaml.safe_load(job.read_text())
            spec["sweep"]["parameters"]["x"] = {"values": [2]}
            spec["sweep"]["parameters"]["y"] = {"values": [0]}
            job.write_text(yaml.safe_dump(spec))
            with sweep_e2e.tenant_at(tmp_path / "tenant-home", c) as tenant:
                proc = tenant.run("submit", str(job), "--quiet", "--json", "--parallel", "1")
                assert proc.returncode == 0, proc.stdout + proc.stderr
                summary = json.loads(proc.stdout)
                evidence = tenant.json("evidence", summary["job_id"])
                verdicts = [x["verdict"] for x in evidence["all_checks"]]
                assert not [v for v in verdicts if v.startswith("unchecked")], verdicts
                assert summary["best"]["verified"] is True, summary
                leased = {x.provider for x in tenant.leases(summary["job_id"])}
                assert leased == {p.node_id for p in c.providers}  # the check ran elsewhere
        finally:
            cluster.down(home=root)
