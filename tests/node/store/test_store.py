"""The node store on real SQLite files: migrations, WAL, peers, adverts, meta."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.lifecycle import IllegalTransitionError, JobState, LeaseState, TrialState
from node.store.job_store import JobRow, JobStore
from node.store.node_store import LeaseRow, Store
from node.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    MigrationError,
    SchemaTooNewError,
    StoreError,
)
from node.tenant.sweep import finished_trial

A = "a" * 32
B = "b" * 32
C = "c" * 32


def _raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection, as another process would open the file."""
    return sqlite3.connect(path, isolation_level=None)


def _tables(path: Path) -> set[str]:
    with _raw(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "node.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as s:
        yield s


class TestMigrations:
    def test_fresh_store_has_the_current_schema(self, db_path: Path) -> None:
        with Store(db_path) as store:
            assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert {"peers", "adverts", "meta"} <= _tables(db_path)
        with _raw(db_path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    def test_reopen_keeps_data_and_applies_nothing_twice(self, db_path: Path) -> None:
        with Store(db_path) as store:
            store.set_meta("k", "v")
            store.put_advert(A, 1, 10_000, 1_000, b"env")
        # A second run of migration 1 would fail on CREATE TABLE; reopening must not.
        with Store(db_path) as store:
            assert store.schema_version == SCHEMA_VERSION
            assert store.get_meta("k") == "v"
            assert [a.seq for a in store.get_adverts(now_ms=2_000)] == [1]

    def test_appended_migration_runs_once_on_an_existing_store(self, db_path: Path) -> None:
        with Store(db_path) as store:
            store.set_meta("k", "v")
        extra = Migration(
            "extra",
            (
                "CREATE TABLE extra_test"
                " (id TEXT NOT NULL PRIMARY KEY, price INTEGER NOT NULL) STRICT",
            ),
        )
        for _ in range(2):
            with Store(db_path, migrations=(*MIGRATIONS, extra)) as store:
                assert store.schema_version == SCHEMA_VERSION + 1
                assert store.get_meta("k") == "v"
        assert "extra_test" in _tables(db_path)

    def test_failed_migration_is_rolled_back_whole(self, db_path: Path) -> None:
        Store(db_path).close()
        broken = Migration(
            "half broken",
            ("CREATE TABLE half_broken_test (id TEXT PRIMARY KEY) STRICT", "THIS IS NOT SQL"),
        )
        with pytest.raises(MigrationError, match="half broken") as info:
            Store(db_path, migrations=(*MIGRATIONS, broken))
        assert info.value.code == "migration_failed"
        assert "half_broken_test" not in _tables(db_path)
        with Store(db_path) as store:
            assert store.schema_version == SCHEMA_VERSION

    def test_foreign_keys_are_enforced(self, db_path: Path) -> None:
        # Later migrations (leases -> bids, receipts -> leases) rely on this.
        fk = Migration(
            "fk",
            (
                "CREATE TABLE parent (id TEXT NOT NULL PRIMARY KEY) STRICT",
                "CREATE TABLE child (id TEXT NOT NULL PRIMARY KEY,"
                " parent TEXT NOT NULL REFERENCES parent (id)) STRICT",
                "INSERT INTO child (id, parent) VALUES ('c', 'no such parent')",
            ),
        )
        with pytest.raises(MigrationError, match="FOREIGN KEY"):
            Store(db_path, migrations=(*MIGRATIONS, fk))

    def test_store_from_a_newer_mercato_is_refused(self, db_path: Path) -> None:
        Store(db_path).close()
        with _raw(db_path) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        with pytest.raises(SchemaTooNewError, match="upgrade Mercato") as info:
            Store(db_path)
        assert info.value.code == "schema_too_new"
        assert str(SCHEMA_VERSION + 1) in info.value.reason
        # Refusing must not touch it: the newer Mercato can still open it.
        with _raw(db_path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1

    def test_a_file_that_is_not_a_database_is_a_store_error(self, db_path: Path) -> None:
        db_path.write_bytes(b"this is not sqlite, just some text that is long enough" * 20)
        with pytest.raises(StoreError, match="cannot open store"):
            Store(db_path)

    def test_missing_directory_is_a_store_error(self, tmp_path: Path) -> None:
        with pytest.raises(StoreError, match="cannot open store"):
            Store(tmp_path / "no" / "such" / "dir" / "node.sqlite")


class TestJournal:
    def test_wal_mode_is_on_and_persists_in_the_file(self, db_path: Path) -> None:
        with Store(db_path) as store:
            assert store.journal_mode == "wal"
        with _raw(db_path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_another_connection_can_write_between_store_calls(self, store: Store) -> None:
        # No store method may leave a transaction (and the write lock) open behind it.
        store.upsert_peer(A, "http://127.0.0.1:1", "provider", now_ms=1)
        assert store.mark_peer_failure(A) == 1
        store.put_advert(A, 1, 10, 1, b"x")
        store.get_adverts(now_ms=0)
        other = sqlite3.connect(store.path, isolation_level=None, timeout=0)
        try:
            other.execute("INSERT INTO meta (key, value) VALUES ('from', 'other')")
        finally:
            other.close()
        assert store.get_meta("from") == "other"


class TestConcurrentOpen:
    def test_processes_opening_a_new_store_at_once_all_succeed(self, tmp_path: Path) -> None:
        # `mercato status` polled while the first `mercato submit` creates the tenant's
        # store: whoever loses the race to switch the new file to WAL must wait for the
        # other, not fail with "database is locked" (a CI run lost a job this way).
        # Each process imports first, then waits for its "go" line, so the opens meet.
        opener = (
            "import sys; from node.store.node_store import Store\n"
            "for line in sys.stdin: Store(line.strip()).close()\n"
        )
        root = Path(__file__).resolve().parents[3]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", opener],
                cwd=root,
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        for round_ in range(40):
            path = tmp_path / f"race-{round_}.sqlite"
            for proc in procs:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):  # it failed: reported below
                    proc.stdin.write(f"{path}\n".encode())
                    proc.stdin.flush()
            time.sleep(0.05)
        failures = []
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failures.append(err.decode().strip().splitlines()[-1])
        assert failures == []
        with Store(tmp_path / "race-0.sqlite") as store:
            assert store.journal_mode == "wal"
            assert store.schema_version == SCHEMA_VERSION


class TestAdverts:
    def test_older_seq_never_overwrites_newer(self, store: Store) -> None:
        assert store.put_advert(A, 5, 10_000, 100, b"seq5")
        assert not store.put_advert(A, 3, 20_000, 200, b"seq3")
        [held] = store.get_adverts(now_ms=150)
        assert (held.seq, held.envelope, held.expires_ms, held.received_ms) == (
            5,
            b"seq5",
            10_000,
            100,
        )

    def test_equal_seq_does_not_replace_the_held_advert(self, store: Store) -> None:
        assert store.put_advert(A, 5, 10_000, 100, b"first")
        assert not store.put_advert(A, 5, 10_000, 200, b"second")
        assert store.get_adverts(now_ms=0)[0].envelope == b"first"

    def test_newer_seq_replaces_and_envelope_is_verbatim(self, store: Store) -> None:
        envelope = bytes(range(256)) * 4  # every byte value, including NUL
        store.put_advert(A, 1, 10_000, 100, b"old")
        assert store.put_advert(A, 2, 20_000, 200, envelope)
        [held] = store.get_adverts(now_ms=150)
        assert (held.seq, held.envelope, held.expires_ms) == (2, envelope, 20_000)

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seqs=st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=8))
    def test_any_arrival_order_keeps_the_highest_seq(self, store: Store, seqs: list[int]) -> None:
        # One provider per example, so examples sharing the store do not interact.
        provider = uuid.uuid4().hex
        for seq in seqs:
            store.put_advert(provider, seq, 10_000, 1, f"env-{seq}".encode())
        [held] = [a for a in store.get_adverts(now_ms=0) if a.provider == provider]
        assert held.seq == max(seqs)
        assert held.envelope == f"env-{max(seqs)}".encode()

    def test_expired_adverts_are_excluded(self, store: Store) -> None:
        store.put_advert(A, 1, 1_000, 0, b"a")
        store.put_advert(B, 1, 2_000, 0, b"b")
        assert [a.provider for a in store.get_adverts(now_ms=999)] == [A, B]
        # expires_ms is the first instant the advert is no longer valid.
        assert [a.provider for a in store.get_adverts(now_ms=1_000)] == [B]
        assert store.get_adverts(now_ms=2_000) == []

    def test_delete_expired_adverts_counts_and_keeps_live_ones(self, store: Store) -> None:
        store.put_advert(A, 1, 1_000, 0, b"a")
        store.put_advert(B, 1, 1_000, 0, b"b")
        store.put_advert(C, 1, 5_000, 0, b"c")
        assert store.delete_expired_adverts(now_ms=1_000) == 2
        assert store.delete_expired_adverts(now_ms=1_000) == 0
        assert [a.provider for a in store.get_adverts(now_ms=1_000)] == [C]

    def test_adverts_survive_reopen(self, db_path: Path) -> None:
        with Store(db_path) as store:
            store.put_advert(A, 7, 10_000, 5, b"kept")
        with Store(db_path) as store:
            assert [(a.seq, a.envelope) for a in store.get_adverts(now_ms=6)] == [(7, b"kept")]


class TestPeers:
    def test_upsert_records_first_and_last_seen(self, store: Store) -> None:
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=100)
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=300)
        [peer] = store.list_peers()
        assert (peer.node_id, peer.address, peer.role) == (A, "http://127.0.0.1:8001", "provider")
        assert (peer.first_seen_ms, peer.last_seen_ms, peer.failures) == (100, 300, 0)

    def test_last_seen_never_moves_backwards(self, store: Store) -> None:
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=300)
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=100)
        store.mark_peer_success(A, now_ms=200)
        assert store.list_peers()[0].last_seen_ms == 300

    def test_failures_count_up_and_success_resets_them(self, store: Store) -> None:
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=100)
        assert store.mark_peer_failure(A) == 1
        assert store.mark_peer_failure(A) == 2
        assert store.list_peers()[0].failures == 2
        assert store.mark_peer_success(A, now_ms=500)
        [peer] = store.list_peers()
        assert (peer.failures, peer.last_seen_ms) == (0, 500)

    def test_a_new_address_clears_failures_but_the_same_one_does_not(self, store: Store) -> None:
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=100)
        store.mark_peer_failure(A)
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=200)
        assert store.list_peers()[0].failures == 1
        store.upsert_peer(A, "http://127.0.0.1:9001", "provider", now_ms=300)
        [peer] = store.list_peers()
        assert (peer.address, peer.failures, peer.first_seen_ms) == (
            "http://127.0.0.1:9001",
            0,
            100,
        )

    def test_unknown_peers_are_reported_not_created(self, store: Store) -> None:
        assert store.mark_peer_failure(A) is None
        assert store.mark_peer_success(A, now_ms=1) is False
        assert store.remove_peer(A) is False
        assert store.list_peers() == []

    def test_list_by_role_and_remove(self, store: Store) -> None:
        store.upsert_peer(B, "http://127.0.0.1:8002", "bootstrap", now_ms=1)
        store.upsert_peer(A, "http://127.0.0.1:8001", "provider", now_ms=1)
        store.upsert_peer(C, "http://127.0.0.1:8003", "provider", now_ms=1)
        assert [p.node_id for p in store.list_peers()] == [A, B, C]
        assert [p.node_id for p in store.list_peers(role="provider")] == [A, C]
        assert store.remove_peer(A) is True
        assert [p.node_id for p in store.list_peers(role="provider")] == [C]

    def test_unknown_role_is_rejected_by_the_schema(self, store: Store) -> None:
        with pytest.raises(sqlite3.IntegrityError):
            store.upsert_peer(A, "http://127.0.0.1:8001", "oracle", now_ms=1)  # type: ignore[arg-type]
        assert store.list_peers() == []


class TestMeta:
    def test_get_set_overwrite_and_reopen(self, db_path: Path) -> None:
        with Store(db_path) as store:
            assert store.get_meta("missing") is None
            store.set_meta("node_id", "x")
            store.set_meta("node_id", "y")
            assert store.get_meta("node_id") == "y"
        with Store(db_path) as store:
            assert store.get_meta("node_id") == "y"


class TestTrials:
    """Trials on a real file: what a resumed sweep reads back is what was recorded."""

    def job(self, jobs: JobStore) -> str:
        jobs.create_job(
            JobRow("j1", "quadratic", "name: q", "0" * 64, "1" * 64, "/w", "running", "", 7, 1, 1)
        )
        jobs.add_trial("j1", 0, {"x": 1.0})
        return "j1"

    def test_intermediate_values_survive_a_reopen_into_the_search(self, db_path: Path) -> None:
        with Store(db_path) as store:
            jobs = JobStore(store)
            job = self.job(jobs)
            assert jobs.trial(job, 0).intermediate == []  # type: ignore[union-attr]
            steps = [[0, 3.25], [2, 1.5], [5, float("nan")]]
            jobs.update_trial(job, 0, state=TrialState.RUNNING)  # only a running trial is pruned
            assert jobs.finish_trial(job, 0, state=TrialState.PRUNED, intermediate=steps)
        with Store(db_path) as store:
            (row,) = JobStore(store).trials("j1")
        finished = finished_trial(row)
        assert finished.state == "pruned"
        assert finished.intermediate[0] == 3.25
        assert finished.intermediate[2] == 1.5
        assert math.isnan(finished.intermediate[5])
        assert sorted(finished.intermediate) == [0, 2, 5]

    def test_a_store_from_before_the_column_gets_an_empty_history(self, db_path: Path) -> None:
        with Store(db_path, migrations=MIGRATIONS[:3]) as store:  # an older Mercato
            self.job(JobStore(store))
            store._execute("UPDATE trials SET state = 'succeeded'")
        with Store(db_path) as store:
            assert store.schema_version == SCHEMA_VERSION
            (row,) = JobStore(store).trials("j1")
        assert row.intermediate == []
        assert finished_trial(row).intermediate == {}


class TestLifecycles:
    """Every state the store writes moves along market/lifecycle.py's tables, on disk."""

    def job(self, jobs: JobStore) -> str:
        jobs.create_job(
            JobRow("j1", "q", "name: q", "0" * 64, "1" * 64, "/w", JobState.RUNNING, "", 7, 1, 1)
        )
        return "j1"

    def lease(self, store: Store, state: LeaseState = LeaseState.ACTIVE) -> str:
        store.put_lease(
            LeaseRow(
                "L1", "tenant", "o1", A, B, "http://127.0.0.1:1", 1, ("d0",), "cpu", 5, "h",
                0, 10, 1_000, state, "ah", b"award", b"accept", 0,
            )
        )  # fmt: skip
        return "L1"

    def test_a_job_moves_only_along_its_table(self, db_path: Path) -> None:
        with Store(db_path) as store:
            jobs = JobStore(store)
            job = self.job(jobs)
            jobs.set_job_state(job, JobState.CANCELLED, 2, "cancelled by the tenant")
            with pytest.raises(
                IllegalTransitionError, match="job cannot go from cancelled to done"
            ):
                jobs.set_job_state(job, JobState.DONE, 3, "finished")
        with Store(db_path) as store:  # nothing of the refused write reached the file
            row = JobStore(store).get_job("j1")
        assert row is not None
        assert (row.state, row.detail, row.updated_ms) == (
            "cancelled",
            "cancelled by the tenant",
            2,
        )

    def test_a_pending_trial_cannot_have_succeeded(self, store: Store) -> None:
        jobs = JobStore(store)
        job = self.job(jobs)
        jobs.add_trial(job, 0, {})
        with pytest.raises(IllegalTransitionError):
            jobs.finish_trial(job, 0, state=TrialState.SUCCEEDED, value=1.0)
        row = jobs.trial(job, 0)
        assert row is not None
        assert (row.state, row.value) == (TrialState.PENDING, None)
        jobs.update_trial(job, 0, state=TrialState.RUNNING)
        assert jobs.finish_trial(job, 0, state=TrialState.SUCCEEDED, value=1.0)
        # Once final, a late second result is ignored (not an error), a move is refused
        # (succeeded -> pending is legal only for a result spot checks proved false).
        assert not jobs.finish_trial(job, 0, state=TrialState.FAILED)
        with pytest.raises(IllegalTransitionError):
            jobs.update_trial(job, 0, state=TrialState.RUNNING)
        assert jobs.trials(job)[0].state is TrialState.SUCCEEDED

    def test_an_ended_lease_is_never_lost_afterwards(self, store: Store) -> None:
        lease = self.lease(store)
        assert store.set_lease_state(lease, LeaseState.ENDED, 5)
        with pytest.raises(IllegalTransitionError, match="lease cannot go from ended to lost"):
            store.set_lease_state(lease, LeaseState.LOST, 6)
        held = store.get_lease(lease)
        assert held is not None
        assert (held.state, held.updated_ms) == (LeaseState.ENDED, 5)
        assert not store.set_lease_state("no-such-lease", LeaseState.LOST, 7)

    def test_a_lost_lease_ends_when_a_late_receipt_checks_out(self, store: Store) -> None:
        lease = self.lease(store)
        assert store.set_lease_state(lease, LeaseState.LOST, 5)
        assert store.set_lease_state(lease, LeaseState.ENDED, 6)
        assert [x.lease_id for x in store.list_leases(LeaseState.ENDED)] == [lease]
        assert store.list_leases(LeaseState.ACTIVE) == []
