"""The node's SQLite store: one file per node, opened through sqlite-utils.

The schema version is SQLite's ``PRAGMA user_version``; ``MIGRATIONS[n - 1]`` takes a
store from version ``n - 1`` to ``n``. Each migration runs in its own ``BEGIN
IMMEDIATE`` transaction together with the version bump, so a store is always at
exactly one version, and two processes opening the same file never both apply a
step. To change the schema, append a Migration; never edit one that has shipped.

The store never reads the clock: every time is an argument in integer milliseconds
since the Unix epoch. It is synchronous and meant for small writes from the daemon's
event loop; use it from the thread that opened it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import sqlite_utils

from protocol.errors import MercatoError

PeerRole = Literal["provider", "bootstrap", "tenant"]

# STRICT tables (3.37) keep integers integers: money and times must never come back
# as text or floats. See https://www.sqlite.org/stricttables.html.
MIN_SQLITE_VERSION = (3, 37, 0)

# Longer than any transaction this store runs, short enough that a wedged writer
# surfaces as an error instead of a hung daemon.
DEFAULT_BUSY_TIMEOUT_MS = 5_000


class StoreError(MercatoError):
    """The store cannot be opened or used."""

    code = "store_error"


class SchemaTooNewError(StoreError):
    """The store was written by a newer Mercato whose schema this code does not know."""

    code = "schema_too_new"


class MigrationError(StoreError):
    """A schema migration failed; it was rolled back and the store is unchanged."""

    code = "migration_failed"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: SQL statements run in a single transaction, in order."""

    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "peers, adverts and meta",
        (
            """
            CREATE TABLE peers (
                node_id TEXT NOT NULL PRIMARY KEY,
                address TEXT NOT NULL,
                role TEXT NOT NULL CHECK (role IN ('provider', 'bootstrap', 'tenant')),
                first_seen_ms INTEGER NOT NULL,
                last_seen_ms INTEGER NOT NULL,
                failures INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0)
            ) STRICT
            """,
            """
            CREATE TABLE adverts (
                provider TEXT NOT NULL PRIMARY KEY,
                seq INTEGER NOT NULL CHECK (seq >= 0),
                expires_ms INTEGER NOT NULL,
                received_ms INTEGER NOT NULL,
                envelope BLOB NOT NULL
            ) STRICT
            """,
            "CREATE INDEX adverts_expires_ms ON adverts (expires_ms)",
            """
            CREATE TABLE meta (
                key TEXT NOT NULL PRIMARY KEY,
                value TEXT NOT NULL
            ) STRICT
            """,
        ),
    ),
    Migration(
        "leases, receipts, ledger and reputation",
        (
            # One row per lease, on both sides; ``side`` says which one we are.
            """
            CREATE TABLE leases (
                lease_id TEXT NOT NULL PRIMARY KEY,
                side TEXT NOT NULL CHECK (side IN ('provider', 'tenant')),
                order_id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                provider TEXT NOT NULL,
                provider_address TEXT NOT NULL DEFAULT '',
                units INTEGER NOT NULL CHECK (units > 0),
                devices TEXT NOT NULL,
                model TEXT NOT NULL,
                price INTEGER NOT NULL CHECK (price >= 0),
                job_spec_hash TEXT NOT NULL,
                start_ms INTEGER NOT NULL,
                end_ms INTEGER NOT NULL,
                heartbeat_interval_ms INTEGER NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('active', 'ended', 'lost')),
                award_hash TEXT NOT NULL,
                award BLOB NOT NULL,
                accept BLOB NOT NULL,
                updated_ms INTEGER NOT NULL
            ) STRICT
            """,
            # A receipt is the provider's signed usage; ``countersign`` is the tenant's
            # envelope that names it. Both bytes are kept verbatim as proof.
            """
            CREATE TABLE receipts (
                receipt_hash TEXT NOT NULL PRIMARY KEY,
                lease_id TEXT NOT NULL,
                task_id TEXT,
                provider TEXT NOT NULL,
                tenant TEXT NOT NULL,
                device_ms INTEGER NOT NULL CHECK (device_ms >= 0),
                price INTEGER NOT NULL CHECK (price >= 0),
                amount INTEGER NOT NULL CHECK (amount >= 0),
                receipt BLOB NOT NULL,
                countersign BLOB,
                created_ms INTEGER NOT NULL
            ) STRICT
            """,
            "CREATE INDEX receipts_lease ON receipts (lease_id)",
            # Money moves only through countersigned receipts: one ledger line each.
            # amount > 0 is earned (provider side), < 0 is spent (tenant side).
            """
            CREATE TABLE ledger (
                receipt_hash TEXT NOT NULL PRIMARY KEY REFERENCES receipts (receipt_hash),
                ts_ms INTEGER NOT NULL,
                lease_id TEXT NOT NULL,
                counterparty TEXT NOT NULL,
                amount INTEGER NOT NULL
            ) STRICT
            """,
            """
            CREATE TABLE reputation (
                provider TEXT NOT NULL PRIMARY KEY,
                completed INTEGER NOT NULL DEFAULT 0,
                failed INTEGER NOT NULL DEFAULT 0,
                declined INTEGER NOT NULL DEFAULT 0,
                rejected INTEGER NOT NULL DEFAULT 0
            ) STRICT
            """,
        ),
    ),
    Migration(
        "jobs and trials (tenant side)",
        (
            """
            CREATE TABLE jobs (
                job_id TEXT NOT NULL PRIMARY KEY,
                name TEXT NOT NULL,
                spec_yaml TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                workspace_hash TEXT NOT NULL,
                workspace_path TEXT NOT NULL,
                state TEXT NOT NULL
                    CHECK (state IN ('running', 'done', 'cancelled', 'failed')),
                detail TEXT NOT NULL DEFAULT '',
                seed INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL
            ) STRICT
            """,
            # A trial's row exists before it is assigned, so a restarted tenant knows
            # every trial it ever started; ``value`` is the metric (a float, not money).
            """
            CREATE TABLE trials (
                job_id TEXT NOT NULL REFERENCES jobs (job_id),
                number INTEGER NOT NULL,
                params TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN
                    ('pending', 'running', 'succeeded', 'failed', 'pruned', 'cancelled')),
                attempts INTEGER NOT NULL DEFAULT 0,
                failed_providers TEXT NOT NULL DEFAULT '[]',
                provider TEXT,
                lease_id TEXT,
                task_id TEXT,
                value REAL,
                metrics TEXT NOT NULL DEFAULT '{}',
                detail TEXT NOT NULL DEFAULT '',
                result BLOB,
                started_ms INTEGER,
                finished_ms INTEGER,
                PRIMARY KEY (job_id, number)
            ) STRICT
            """,
            "ALTER TABLE leases ADD COLUMN job_id TEXT",
        ),
    ),
    Migration(
        "trials keep their intermediate metric values (the pruner's history)",
        # A JSON list of [step, value] pairs, kept when the trial finishes, so a resumed
        # sweep's pruner judges new trials against the same rungs as before the restart.
        ("ALTER TABLE trials ADD COLUMN intermediate TEXT NOT NULL DEFAULT '[]'",),
    ),
)

#: The schema version this code writes: the number of migrations it knows.
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Peer:
    """A node we can reach, and how reachable it has been."""

    node_id: str
    address: str
    role: PeerRole
    first_seen_ms: int
    last_seen_ms: int
    failures: int


@dataclass(frozen=True, slots=True)
class StoredAdvert:
    """The newest advert held for a provider: the signed envelope bytes, verbatim."""

    provider: str
    seq: int
    expires_ms: int
    received_ms: int
    envelope: bytes


class Store:
    """The node's SQLite store (WAL journal, foreign keys on, migrated on open)."""

    def __init__(
        self,
        path: Path | str,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; the store needs "
                f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer"
            )
        self.path = Path(path)
        self._migrations = tuple(migrations)
        self._closed = False
        # isolation_level=None: no implicit transactions; each write below is either a
        # single statement (atomic by itself) or an explicit BEGIN ... COMMIT.
        try:
            conn = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        try:
            self._db: Any = sqlite_utils.Database(conn, execute_plugins=False)
            self._configure(busy_timeout_ms)
            self._migrate()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        except BaseException:
            conn.close()
            raise

    def _configure(self, busy_timeout_ms: int) -> None:
        self._execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # WAL lets CLI readers run while the daemon writes; NORMAL syncs at checkpoints
        # only, which in WAL mode can lose the last commits on power loss but never
        # corrupts the file (https://www.sqlite.org/pragma.html#pragma_synchronous).
        self._execute("PRAGMA journal_mode = WAL")
        self._execute("PRAGMA synchronous = NORMAL")
        self._execute("PRAGMA foreign_keys = ON")

    def _migrate(self) -> None:
        known = len(self._migrations)
        self._refuse_newer(self.schema_version, known)
        for version in range(self.schema_version + 1, known + 1):
            migration = self._migrations[version - 1]
            self._execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another process may have migrated.
                current = self.schema_version
                self._refuse_newer(current, known)
                if current < version:
                    for statement in migration.statements:
                        self._execute(statement)
                    self._execute(f"PRAGMA user_version = {version}")
                self._execute("COMMIT")
            except BaseException as e:
                # Some errors (disk full, I/O) make SQLite roll back by itself.
                if self._db.conn.in_transaction:
                    self._execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise MigrationError(
                        f"migration {version} ({migration.name}) of {self.path} failed "
                        f"and was rolled back: {e}"
                    ) from e
                raise

    def _refuse_newer(self, version: int, known: int) -> None:
        if version > known:
            raise SchemaTooNewError(
                f"store {self.path} has schema version {version}, but this Mercato knows "
                f"only up to {known}; upgrade Mercato or point MERCATO_HOME elsewhere"
            )

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return cast(sqlite3.Cursor, self._db.execute(sql, params))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        self._execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.conn.in_transaction:
                self._execute("ROLLBACK")
            raise
        self._execute("COMMIT")

    # --- schema and connection ----------------------------------------------------

    @property
    def schema_version(self) -> int:
        """The store's schema version (``PRAGMA user_version``)."""
        return int(self._execute("PRAGMA user_version").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        """The journal mode in effect (``"wal"`` unless the file system cannot do WAL)."""
        return str(self._db.journal_mode)

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- peers --------------------------------------------------------------------

    def upsert_peer(self, node_id: str, address: str, role: PeerRole, now_ms: int) -> None:
        """Record that ``node_id`` is reachable at ``address``, seen at ``now_ms``.

        A new address resets the failure count: failures at the old address say
        nothing about the new one. ``last_seen_ms`` never moves backwards.
        """
        self._execute(
            """
            INSERT INTO peers (node_id, address, role, first_seen_ms, last_seen_ms, failures)
            VALUES (?, ?, ?, ?, ?, 0)
            ON CONFLICT (node_id) DO UPDATE SET
                failures = CASE WHEN address = excluded.address THEN failures ELSE 0 END,
                address = excluded.address,
                role = excluded.role,
                last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)
            """,
            (node_id, address, role, now_ms, now_ms),
        )

    def mark_peer_failure(self, node_id: str) -> int | None:
        """Count one failed contact; the new failure count, or None for an unknown peer."""
        # fetchall, not fetchone: the UPDATE commits only once its statement is done.
        rows = self._execute(
            "UPDATE peers SET failures = failures + 1 WHERE node_id = ? RETURNING failures",
            (node_id,),
        ).fetchall()
        return int(rows[0][0]) if rows else None

    def mark_peer_success(self, node_id: str, now_ms: int) -> bool:
        """Record a successful contact: failures back to 0; False for an unknown peer."""
        cursor = self._execute(
            """
            UPDATE peers SET failures = 0, last_seen_ms = MAX(last_seen_ms, ?)
            WHERE node_id = ?
            """,
            (now_ms, node_id),
        )
        return cursor.rowcount > 0

    def list_peers(self, role: PeerRole | None = None) -> list[Peer]:
        """Known peers ordered by node id, optionally only those with ``role``."""
        where, params = ("role = ?", [role]) if role is not None else (None, [])
        rows = self._db["peers"].rows_where(where, params, order_by="node_id")
        return [Peer(**row) for row in rows]

    def remove_peer(self, node_id: str) -> bool:
        """Forget a peer; False if it was not known."""
        cursor = self._execute("DELETE FROM peers WHERE node_id = ?", (node_id,))
        return cursor.rowcount > 0

    # --- adverts ------------------------------------------------------------------

    def put_advert(
        self, provider: str, seq: int, expires_ms: int, received_ms: int, envelope: bytes
    ) -> bool:
        """Keep this advert if its ``seq`` is higher than the one held for ``provider``.

        One statement, so it is atomic: an older or equal ``seq`` never overwrites a
        newer advert, whatever order they arrive in. True if the advert was stored.
        """
        cursor = self._execute(
            """
            INSERT INTO adverts (provider, seq, expires_ms, received_ms, envelope)
            VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (provider) DO UPDATE SET
                seq = excluded.seq,
                expires_ms = excluded.expires_ms,
                received_ms = excluded.received_ms,
                envelope = excluded.envelope
            WHERE excluded.seq > adverts.seq
            """,
            (provider, seq, expires_ms, received_ms, bytes(envelope)),
        )
        return cursor.rowcount > 0

    def get_adverts(self, now_ms: int) -> list[StoredAdvert]:
        """Adverts not yet expired at ``now_ms`` (``expires_ms > now_ms``), by provider."""
        rows = self._db.query(
            """
            SELECT provider, seq, expires_ms, received_ms, envelope FROM adverts
            WHERE expires_ms > ? ORDER BY provider
            """,
            [now_ms],
        )
        return [StoredAdvert(**row) for row in rows]

    def delete_expired_adverts(self, now_ms: int) -> int:
        """Delete adverts expired at ``now_ms``; the number deleted."""
        cursor = self._execute("DELETE FROM adverts WHERE expires_ms <= ?", (now_ms,))
        return cursor.rowcount

    # --- meta ---------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- leases -------------------------------------------------------------------

    def put_lease(self, lease: LeaseRow) -> None:
        """Insert a lease, or update its state and end if it is already held."""
        row = asdict(lease)
        row["devices"] = json.dumps(list(lease.devices))
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._execute(
            f"""
            INSERT INTO leases ({cols}) VALUES ({marks})
            ON CONFLICT (lease_id) DO UPDATE SET
                state = excluded.state, end_ms = excluded.end_ms,
                updated_ms = excluded.updated_ms
            """,
            tuple(row.values()),
        )

    def set_lease_job(self, lease_id: str, job_id: str) -> None:
        self._execute("UPDATE leases SET job_id = ? WHERE lease_id = ?", (job_id, lease_id))

    def set_lease_state(self, lease_id: str, state: str, now_ms: int) -> bool:
        cursor = self._execute(
            "UPDATE leases SET state = ?, updated_ms = ? WHERE lease_id = ?",
            (state, now_ms, lease_id),
        )
        return cursor.rowcount > 0

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        rows = list(self._db.query("SELECT * FROM leases WHERE lease_id = ?", [lease_id]))
        return _lease_row(rows[0]) if rows else None

    def list_leases(self, state: str | None = None) -> list[LeaseRow]:
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._db.query(f"SELECT * FROM leases {where} ORDER BY start_ms, lease_id", params)
        return [_lease_row(r) for r in rows]

    # --- receipts and ledger --------------------------------------------------------

    def put_receipt(self, receipt: ReceiptRow) -> bool:
        """Store a provider-signed receipt once (idempotent by hash)."""
        row = asdict(receipt)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cursor = self._execute(
            f"INSERT INTO receipts ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING",
            tuple(row.values()),
        )
        return cursor.rowcount > 0

    def countersign_receipt(
        self,
        receipt_hash: str,
        countersign: bytes,
        ledger_amount: int,
        counterparty: str,
        now_ms: int,
    ) -> bool:
        """Attach the tenant's countersignature and book the ledger line, atomically.

        Books at most once per receipt: a repeated countersignature changes nothing.
        """
        with self._transaction():
            cursor = self._execute(
                "UPDATE receipts SET countersign = ?"
                " WHERE receipt_hash = ? AND countersign IS NULL",
                (bytes(countersign), receipt_hash),
            )
            if cursor.rowcount == 0:
                return False
            lease_id = self._execute(
                "SELECT lease_id FROM receipts WHERE receipt_hash = ?", (receipt_hash,)
            ).fetchone()[0]
            self._execute(
                "INSERT INTO ledger (receipt_hash, ts_ms, lease_id, counterparty, amount)"
                " VALUES (?, ?, ?, ?, ?)",
                (receipt_hash, now_ms, lease_id, counterparty, ledger_amount),
            )
        return True

    def list_receipts(self, lease_id: str | None = None) -> list[ReceiptRow]:
        where, params = ("WHERE lease_id = ?", [lease_id]) if lease_id else ("", [])
        rows = self._db.query(f"SELECT * FROM receipts {where} ORDER BY created_ms", params)
        return [ReceiptRow(**r) for r in rows]

    def ledger_balance(self) -> int:
        """Sum of the ledger in micro-credits (earned minus spent)."""
        row = self._execute("SELECT COALESCE(SUM(amount), 0) FROM ledger").fetchone()
        return int(row[0])

    def ledger(self) -> list[dict[str, Any]]:
        return list(self._db.query("SELECT * FROM ledger ORDER BY ts_ms, receipt_hash"))

    # --- reputation -----------------------------------------------------------------

    def record_outcome(self, provider: str, outcome: str) -> None:
        """Count one lease outcome (completed, failed, declined, rejected) for a provider."""
        if outcome not in ("completed", "failed", "declined", "rejected"):
            raise ValueError(f"unknown outcome {outcome!r}")
        self._execute(
            f"""
            INSERT INTO reputation (provider, {outcome}) VALUES (?, 1)
            ON CONFLICT (provider) DO UPDATE SET {outcome} = {outcome} + 1
            """,
            (provider,),
        )

    def reputation(self) -> dict[str, dict[str, int]]:
        rows = self._db.query("SELECT * FROM reputation")
        return {r.pop("provider"): r for r in rows}


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """A lease as stored on either side (``side``), with both signed envelopes."""

    lease_id: str
    side: str
    order_id: str
    tenant: str
    provider: str
    provider_address: str
    units: int
    devices: tuple[str, ...]
    model: str
    price: int
    job_spec_hash: str
    start_ms: int
    end_ms: int
    heartbeat_interval_ms: int
    state: str
    award_hash: str
    award: bytes
    accept: bytes
    updated_ms: int
    job_id: str | None = None  # tenant side: the job the lease serves


def _lease_row(row: dict[str, Any]) -> LeaseRow:
    row = dict(row)
    row["devices"] = tuple(json.loads(row["devices"]))
    return LeaseRow(**row)


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    receipt_hash: str
    lease_id: str
    task_id: str | None
    provider: str
    tenant: str
    device_ms: int
    price: int
    amount: int
    receipt: bytes
    countersign: bytes | None
    created_ms: int


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    name: str
    spec_yaml: str
    spec_hash: str
    workspace_hash: str
    workspace_path: str
    state: str
    detail: str
    seed: int
    created_ms: int
    updated_ms: int


@dataclass(frozen=True, slots=True)
class TrialRow:
    job_id: str
    number: int
    params: dict[str, Any]
    state: str
    attempts: int
    failed_providers: list[str]
    provider: str | None
    lease_id: str | None
    task_id: str | None
    value: float | None
    metrics: dict[str, Any]
    detail: str
    result: bytes | None
    started_ms: int | None
    finished_ms: int | None
    intermediate: list[list[float]]  # [step, value] pairs, step ascending


def _trial_row(row: dict[str, Any]) -> TrialRow:
    row = dict(row)
    for key in _TRIAL_JSON:
        row[key] = json.loads(row[key])
    return TrialRow(**row)


_TRIAL_JSON = ("params", "failed_providers", "metrics", "intermediate")


class JobStore:
    """Jobs and trials of a tenant, on top of a Store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create_job(self, job: JobRow) -> None:
        row = asdict(job)
        cols, marks = ", ".join(row), ", ".join("?" for _ in row)
        self.store._execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(row.values()))

    def get_job(self, job_id: str) -> JobRow | None:
        rows = list(self.store._db.query("SELECT * FROM jobs WHERE job_id = ?", [job_id]))
        return JobRow(**rows[0]) if rows else None

    def find_job(self, prefix: str) -> JobRow | None:
        """A job by id or unique id prefix."""
        rows = list(self.store._db.query("SELECT * FROM jobs WHERE job_id LIKE ? || '%'", [prefix]))
        return JobRow(**rows[0]) if len(rows) == 1 else None

    def list_jobs(self) -> list[JobRow]:
        return [JobRow(**r) for r in self.store._db.query("SELECT * FROM jobs ORDER BY created_ms")]

    def set_job_state(self, job_id: str, state: str, now_ms: int, detail: str = "") -> None:
        self.store._execute(
            "UPDATE jobs SET state = ?, detail = ?, updated_ms = ? WHERE job_id = ?",
            (state, detail, now_ms, job_id),
        )

    def add_trial(self, job_id: str, number: int, params: dict[str, Any]) -> None:
        self.store._execute(
            "INSERT INTO trials (job_id, number, params, state) VALUES (?, ?, ?, 'pending')",
            (job_id, number, json.dumps(params, sort_keys=True)),
        )

    def update_trial(self, job_id: str, number: int, **fields: Any) -> None:
        """Set columns of one trial; JSON columns take Python values."""
        if not fields:
            return
        values = [
            json.dumps(v, sort_keys=True) if k in _TRIAL_JSON else v for k, v in fields.items()
        ]
        assign = ", ".join(f"{k} = ?" for k in fields)
        self.store._execute(
            f"UPDATE trials SET {assign} WHERE job_id = ? AND number = ?",
            (*values, job_id, number),
        )

    def finish_trial(self, job_id: str, number: int, **fields: Any) -> bool:
        """Record a trial's outcome once: False (and nothing written) if already final."""
        values = [
            json.dumps(v, sort_keys=True) if k in _TRIAL_JSON else v for k, v in fields.items()
        ]
        assign = ", ".join(f"{k} = ?" for k in fields)
        cursor = self.store._execute(
            f"UPDATE trials SET {assign} WHERE job_id = ? AND number = ?"
            " AND state IN ('pending', 'running')",
            (*values, job_id, number),
        )
        return cursor.rowcount > 0

    def trials(self, job_id: str) -> list[TrialRow]:
        rows = self.store._db.query(
            "SELECT * FROM trials WHERE job_id = ? ORDER BY number", [job_id]
        )
        return [_trial_row(r) for r in rows]

    def trial(self, job_id: str, number: int) -> TrialRow | None:
        rows = list(
            self.store._db.query(
                "SELECT * FROM trials WHERE job_id = ? AND number = ?", [job_id, number]
            )
        )
        return _trial_row(rows[0]) if rows else None
