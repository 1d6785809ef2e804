"""The store's schema: its migrations, version and errors.

To change the schema, append a Migration; never edit one that has shipped
(see node.store.node_store for how they are applied).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import MercatoError

# STRICT tables (3.37) keep integers integers: money and times must never come back
# as text or floats. See https://www.sqlite.org/stricttables.html.
MIN_SQLITE_VERSION = (3, 37, 0)


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
    Migration(
        "debit notes, why a lease ended, counterparty records (pay as you go)",
        (
            # A cumulative debit note is kept like a receipt (the provider's envelope and
            # the tenant's countersignature); its ledger line books only the increment.
            "ALTER TABLE receipts ADD COLUMN kind TEXT NOT NULL DEFAULT 'receipt'"
            " CHECK (kind IN ('receipt', 'debit_note'))",
            "ALTER TABLE leases ADD COLUMN end_reason TEXT NOT NULL DEFAULT ''",
            # What each counterparty did about paying: lapsed notes are why a provider
            # refuses a tenant's next order (no-bid reason unpaid_notes).
            """
            CREATE TABLE counterparties (
                node_id TEXT NOT NULL PRIMARY KEY,
                lapsed INTEGER NOT NULL DEFAULT 0 CHECK (lapsed >= 0),
                refused INTEGER NOT NULL DEFAULT 0 CHECK (refused >= 0),
                last_ms INTEGER NOT NULL DEFAULT 0,
                detail TEXT NOT NULL DEFAULT ''
            ) STRICT
            """,
        ),
    ),
    Migration(
        "verified results: spot checks with their evidence, trust, refused payments",
        (
            # One spot check of one trial result: the original, the check and (on a
            # mismatch) the decider, each with the provider's signed task_result
            # envelope, and what it came to (market.verification.Verdict).
            """
            CREATE TABLE verify_checks (
                check_id INTEGER PRIMARY KEY,
                job_id TEXT NOT NULL,
                number INTEGER NOT NULL,
                params TEXT NOT NULL,
                seed INTEGER NOT NULL,
                command TEXT NOT NULL,
                workspace_hash TEXT NOT NULL,
                spec_hash TEXT NOT NULL,
                metric TEXT NOT NULL,
                votes TEXT NOT NULL DEFAULT '[]',
                verdict TEXT,
                liar TEXT,
                created_ms INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL
            ) STRICT
            """,
            # What this tenant learnt of each provider by checking its results.
            """
            CREATE TABLE verify_trust (
                provider TEXT NOT NULL PRIMARY KEY,
                streak INTEGER NOT NULL DEFAULT 0 CHECK (streak >= 0),
                verified INTEGER NOT NULL DEFAULT 0 CHECK (verified >= 0),
                caught INTEGER NOT NULL DEFAULT 0 CHECK (caught >= 0),
                dropped_ms INTEGER,
                canary_ms INTEGER
            ) STRICT
            """,
            # How long the tenant timed each trial run on each provider (from the
            # provider's "running" to its result): measured speed, market.verification.
            """
            CREATE TABLE trial_durations (
                provider TEXT NOT NULL,
                trial TEXT NOT NULL,
                wall_ms INTEGER NOT NULL CHECK (wall_ms >= 0),
                recorded_ms INTEGER NOT NULL,
                PRIMARY KEY (provider, trial)
            ) STRICT
            """,
            # Leases of a provider caught lying that the tenant will not pay.
            """
            CREATE TABLE refused_payments (
                lease_id TEXT NOT NULL PRIMARY KEY,
                provider TEXT NOT NULL,
                job_id TEXT NOT NULL,
                reason TEXT NOT NULL,
                created_ms INTEGER NOT NULL
            ) STRICT
            """,
        ),
    ),
)

#: The schema version this code writes: the number of migrations it knows.
SCHEMA_VERSION = len(MIGRATIONS)
