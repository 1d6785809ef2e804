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
import hashlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

from market.lifecycle import LEASE, LeaseState
from node.store.schema import (
    MIGRATIONS,
    MIN_SQLITE_VERSION,
    Migration,
    MigrationError,
    SchemaTooNewError,
    StoreError,
)
from protocol.messages import DebitNote, Receipt

PeerRole = Literal["provider", "bootstrap", "tenant"]

# Longer than any transaction this store runs, short enough that a wedged writer
# surfaces as an error instead of a hung daemon.
DEFAULT_BUSY_TIMEOUT_MS = 5_000


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


def _import_sqlite_utils() -> Any:
    """sqlite_utils, imported without numpy or pandas.

    sqlite-utils imports numpy and pandas when they are installed (optuna brings numpy)
    only to map their scalar types to column types on insert, which this store never
    does; numpy alone is ~15 MB of resident memory in every idle provider daemon
    (tests/node/test_idle_imports.py). While sqlite_utils is imported they are hidden
    from it (``sys.modules[name] = None`` makes ``import name`` raise ImportError), then
    visible again to whoever imports them later. Where one is already loaded (a tenant
    that ran optuna first) nothing is hidden and sqlite-utils uses it as usual.
    """
    if "sqlite_utils" in sys.modules:
        return sys.modules["sqlite_utils"]
    hidden = [name for name in ("numpy", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            del sys.modules[name]
    return sqlite_utils


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
            self._db: Any = _import_sqlite_utils().Database(conn, execute_plugins=False)
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
        self._enable_wal(busy_timeout_ms)
        self._execute("PRAGMA synchronous = NORMAL")
        self._execute("PRAGMA foreign_keys = ON")

    def _enable_wal(self, busy_timeout_ms: int) -> None:
        """Switch to WAL, waiting up to the busy timeout for another opener's lock.

        Changing the journal mode needs the file to itself, and SQLite answers "database
        is locked" at once instead of calling the busy handler. Two processes that open a
        new store at the same moment (`mercato status` while the first `mercato submit`
        creates it) would make one of them fail; the loser waits and tries again. Once
        the file is in WAL the statement changes nothing and takes no lock.
        """
        deadline = time.monotonic() + busy_timeout_ms / 1000
        pause = 0.001
        while True:
            try:
                self._execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

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

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        """The rows of a SELECT, each a dict from column name to value."""
        return cast(Iterator[dict[str, Any]], self._db.query(sql, params))

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
        rows = self._query(
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

    def setdefault_meta(self, key: str, value: str) -> str:
        """The value under ``key``; stores ``value`` there first if there is none (one
        statement: two processes asking at once both get the value stored first)."""
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (key, value),
        )
        stored = self.get_meta(key)
        assert stored is not None  # meta rows are never deleted
        return stored

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- leases -------------------------------------------------------------------

    def put_lease(self, lease: LeaseRow) -> None:
        """Insert a lease, or update its state and end if it is already held.

        A held lease moves only along market.lifecycle.LEASE (IllegalTransitionError
        otherwise, and nothing is written).
        """
        row = asdict(lease)
        row["devices"] = json.dumps(list(lease.devices))
        row["state"] = LeaseState(lease.state).value
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._transaction():
            self._check_lease_move(lease.lease_id, LeaseState(lease.state))
            self._execute(
                f"""
                INSERT INTO leases ({cols}) VALUES ({marks})
                ON CONFLICT (lease_id) DO UPDATE SET
                    state = excluded.state, end_ms = excluded.end_ms,
                    updated_ms = excluded.updated_ms
                """,
                tuple(row.values()),
            )

    def _check_lease_move(self, lease_id: str, state: LeaseState) -> bool:
        """Raise if the held lease may not move to ``state``; False if none is held."""
        held = self._execute("SELECT state FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        if held is None:
            return False
        LEASE.check(LeaseState(held[0]), state)
        return True

    def set_lease_job(self, lease_id: str, job_id: str) -> None:
        self._execute("UPDATE leases SET job_id = ? WHERE lease_id = ?", (job_id, lease_id))

    def set_lease_state(self, lease_id: str, state: LeaseState, now_ms: int) -> bool:
        """Move a lease along market.lifecycle.LEASE; False if no such lease is held.

        An illegal move raises IllegalTransitionError and writes nothing.
        """
        state = LeaseState(state)
        with self._transaction():
            if not self._check_lease_move(lease_id, state):
                return False
            self._execute(
                "UPDATE leases SET state = ?, updated_ms = ? WHERE lease_id = ?",
                (state.value, now_ms, lease_id),
            )
        return True

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        rows = list(self._query("SELECT * FROM leases WHERE lease_id = ?", [lease_id]))
        return _lease_row(rows[0]) if rows else None

    def list_leases(
        self, state: LeaseState | None = None, *, updated_since: int | None = None
    ) -> list[LeaseRow]:
        """Leases (in ``state``, last changed at or after ``updated_since``), oldest first."""
        params: list[Any] = [LeaseState(state).value] if state else []
        where = "WHERE state = ?" if state else ""
        if updated_since is not None:
            where = f"{where} {'AND' if where else 'WHERE'} updated_ms >= ?"
            params = [*params, updated_since]
        rows = self._query(f"SELECT * FROM leases {where} ORDER BY start_ms, lease_id", params)
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

    def list_receipts(
        self, lease_id: str | None = None, kind: str | None = "receipt"
    ) -> list[ReceiptRow]:
        """Receipts (by default; ``kind="debit_note"`` for notes, None for both)."""
        clauses, params = [], []
        if lease_id:
            clauses.append("lease_id = ?")
            params.append(lease_id)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(f"SELECT * FROM receipts {where} ORDER BY created_ms", params)
        return [ReceiptRow(**r) for r in rows]

    def lease_paid(self, lease_id: str) -> int:
        """Micro-credits already booked for a lease (its notes' and receipts' increments)."""
        row = self._execute(
            "SELECT COALESCE(SUM(ABS(amount)), 0) FROM ledger WHERE lease_id = ?", (lease_id,)
        ).fetchone()
        return int(row[0])

    def balances(self, me: str) -> list[dict[str, Any]]:
        """Per counterparty of node ``me``: what is booked, what is billed but unsigned.

        ``booked`` sums the ledger in micro-credits (positive: earned from them, negative:
        paid to them); ``unsigned`` is, over their leases, the latest provider-signed
        figure that no countersignature covers yet (owed to us if we provide, disputed or
        not yet settled if we rent); ``lapsed`` and ``refused`` count their notes that
        lapsed and the bills we refused to countersign.
        """
        out: dict[str, dict[str, Any]] = {}

        def entry(node_id: str) -> dict[str, Any]:
            return out.setdefault(
                node_id,
                {
                    "counterparty": node_id,
                    "lines": 0,
                    "booked": 0,
                    "unsigned": 0,
                    "lapsed": 0,
                    "refused": 0,
                },
            )

        for r in self._query(
            "SELECT counterparty, COUNT(*) AS n, SUM(amount) AS booked FROM ledger"
            " GROUP BY counterparty"
        ):
            e = entry(r["counterparty"])
            e["lines"], e["booked"] = r["n"], r["booked"]
        for r in self._query(
            "SELECT lease_id, provider, tenant, MAX(amount) AS top FROM receipts GROUP BY lease_id"
        ):
            other = r["tenant"] if r["provider"] == me else r["provider"]
            unsigned = r["top"] - self.lease_paid(r["lease_id"])
            if unsigned > 0:
                entry(other)["unsigned"] += unsigned
        for r in self._query("SELECT * FROM counterparties"):
            e = entry(r["node_id"])
            e["lapsed"], e["refused"] = r["lapsed"], r["refused"]
        return sorted(out.values(), key=lambda e: str(e["counterparty"]))

    def record_lapse(self, node_id: str, now_ms: int, detail: str) -> None:
        """A counterparty let a debit note lapse (the provider ended the lease)."""
        self._execute(
            "INSERT INTO counterparties (node_id, lapsed, last_ms, detail) VALUES (?, 1, ?, ?)"
            " ON CONFLICT (node_id) DO UPDATE SET lapsed = lapsed + 1,"
            " last_ms = excluded.last_ms, detail = excluded.detail",
            (node_id, now_ms, detail[:1024]),
        )

    def record_refusal(self, node_id: str, now_ms: int, detail: str) -> None:
        """We refused to countersign a counterparty's bill (the tenant side), with why."""
        self._execute(
            "INSERT INTO counterparties (node_id, refused, last_ms, detail) VALUES (?, 1, ?, ?)"
            " ON CONFLICT (node_id) DO UPDATE SET refused = refused + 1,"
            " last_ms = excluded.last_ms, detail = excluded.detail",
            (node_id, now_ms, detail[:1024]),
        )

    def counterparty(self, node_id: str) -> dict[str, Any] | None:
        rows = list(self._query("SELECT * FROM counterparties WHERE node_id = ?", [node_id]))
        return rows[0] if rows else None

    def set_lease_end_reason(self, lease_id: str, reason: str) -> None:
        self._execute(
            "UPDATE leases SET end_reason = ? WHERE lease_id = ?", (reason[:1024], lease_id)
        )

    def ledger_balance(self) -> int:
        """Sum of the ledger in micro-credits (earned minus spent)."""
        row = self._execute("SELECT COALESCE(SUM(amount), 0) FROM ledger").fetchone()
        return int(row[0])

    def ledger(self) -> list[dict[str, Any]]:
        return list(self._query("SELECT * FROM ledger ORDER BY ts_ms, receipt_hash"))

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
        rows = self._query("SELECT * FROM reputation")
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
    state: LeaseState
    award_hash: str
    award: bytes
    accept: bytes
    updated_ms: int
    job_id: str | None = None  # tenant side: the job the lease serves
    end_reason: str = ""  # why it ended when that is not plain (e.g. a lapsed debit note)


def _lease_row(row: dict[str, Any]) -> LeaseRow:
    row = dict(row)
    row["devices"] = tuple(json.loads(row["devices"]))
    row["state"] = LeaseState(row["state"])
    return LeaseRow(**row)


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """A provider-signed receipt as both sides keep it (the tenant adds its countersign)."""

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
    kind: str = "receipt"  # or "debit_note" (cumulative, countersigned during the lease)

    @classmethod
    def signed(cls, bill: Receipt | DebitNote, raw: bytes, now_ms: int) -> ReceiptRow:
        """The row for a receipt or debit note as sealed in the envelope ``raw``, not yet
        countersigned (the same builder on the provider's and the tenant's side).

        The hash is the envelope's digest, so a countersignature (which names it) finds it.
        """
        note = isinstance(bill, DebitNote)
        task_id = bill.task_id if isinstance(bill, Receipt) else None
        return cls(
            receipt_hash=hashlib.sha256(raw).hexdigest(),
            lease_id=bill.lease_id,
            task_id=task_id,
            provider=bill.provider,
            tenant=bill.tenant,
            device_ms=bill.device_ms,
            price=bill.price,
            amount=bill.amount,
            receipt=bytes(raw),
            countersign=None,
            created_ms=now_ms,
            kind="debit_note" if note else "receipt",
        )
