"""The tenant's jobs and trials, kept in the node's store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from node.store.node_store import Store


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
