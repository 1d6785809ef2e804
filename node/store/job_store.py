"""The tenant's jobs and trials, kept in the node's store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from market.lifecycle import JOB, TRIAL, JobState, TrialState
from node.store.node_store import Store

#: The trial states a result may still be recorded in (the others are final).
_UNFINISHED = (TrialState.PENDING.value, TrialState.RUNNING.value)


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: str
    name: str
    spec_yaml: str
    spec_hash: str
    workspace_hash: str
    workspace_path: str
    state: JobState
    detail: str
    seed: int
    created_ms: int
    updated_ms: int


@dataclass(frozen=True, slots=True)
class TrialRow:
    job_id: str
    number: int
    params: dict[str, Any]
    state: TrialState
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
    row["state"] = TrialState(row["state"])
    return TrialRow(**row)


def _job_row(row: dict[str, Any]) -> JobRow:
    return JobRow(**{**row, "state": JobState(row["state"])})


_TRIAL_JSON = ("params", "failed_providers", "metrics", "intermediate")


class JobStore:
    """Jobs and trials of a tenant, on top of a Store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create_job(self, job: JobRow) -> None:
        row = asdict(job)
        row["state"] = JobState(job.state).value
        cols, marks = ", ".join(row), ", ".join("?" for _ in row)
        self.store._execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(row.values()))

    def get_job(self, job_id: str) -> JobRow | None:
        rows = list(self.store._query("SELECT * FROM jobs WHERE job_id = ?", [job_id]))
        return _job_row(rows[0]) if rows else None

    def find_job(self, prefix: str) -> JobRow | None:
        """A job by id or unique id prefix."""
        rows = list(self.store._query("SELECT * FROM jobs WHERE job_id LIKE ? || '%'", [prefix]))
        return _job_row(rows[0]) if len(rows) == 1 else None

    def list_jobs(self) -> list[JobRow]:
        return [_job_row(r) for r in self.store._query("SELECT * FROM jobs ORDER BY created_ms")]

    def set_job_state(self, job_id: str, state: JobState, now_ms: int, detail: str = "") -> None:
        """Move a job along market.lifecycle.JOB (IllegalTransitionError otherwise)."""
        state = JobState(state)
        with self.store._transaction():
            held = self.store._execute(
                "SELECT state FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if held is not None:
                JOB.check(JobState(held[0]), state)
            self.store._execute(
                "UPDATE jobs SET state = ?, detail = ?, updated_ms = ? WHERE job_id = ?",
                (state.value, detail, now_ms, job_id),
            )

    def add_trial(self, job_id: str, number: int, params: dict[str, Any]) -> None:
        self.store._execute(
            "INSERT INTO trials (job_id, number, params, state) VALUES (?, ?, ?, ?)",
            (job_id, number, json.dumps(params, sort_keys=True), TrialState.PENDING.value),
        )

    def _write_trial(self, job_id: str, number: int, fields: dict[str, Any]) -> None:
        values = [
            json.dumps(v, sort_keys=True) if k in _TRIAL_JSON else v for k, v in fields.items()
        ]
        assign = ", ".join(f"{k} = ?" for k in fields)
        self.store._execute(
            f"UPDATE trials SET {assign} WHERE job_id = ? AND number = ?",
            (*values, job_id, number),
        )

    def _held_trial_state(self, job_id: str, number: int) -> TrialState | None:
        row = self.store._execute(
            "SELECT state FROM trials WHERE job_id = ? AND number = ?", (job_id, number)
        ).fetchone()
        return None if row is None else TrialState(row[0])

    def update_trial(self, job_id: str, number: int, **fields: Any) -> None:
        """Set columns of one trial; JSON columns take Python values.

        A new ``state`` moves only along market.lifecycle.TRIAL: an illegal move raises
        IllegalTransitionError and writes nothing.
        """
        if not fields:
            return
        if "state" not in fields:  # one statement: no read, no transaction needed
            self._write_trial(job_id, number, fields)
            return
        with self.store._transaction():
            held = self._held_trial_state(job_id, number)
            if held is not None:
                fields["state"] = TRIAL.check(held, TrialState(fields["state"])).value
            self._write_trial(job_id, number, fields)

    def finish_trial(self, job_id: str, number: int, *, state: TrialState, **fields: Any) -> bool:
        """Record a trial's outcome once: False (and nothing written) if already final.

        Recording an outcome the trial's state cannot move to (a pending trial cannot
        have succeeded) raises IllegalTransitionError.
        """
        with self.store._transaction():
            held = self._held_trial_state(job_id, number)
            if held is None or held.value not in _UNFINISHED:
                return False
            fields["state"] = TRIAL.check(held, TrialState(state)).value
            self._write_trial(job_id, number, fields)
        return True

    def trials(self, job_id: str) -> list[TrialRow]:
        rows = self.store._query("SELECT * FROM trials WHERE job_id = ? ORDER BY number", [job_id])
        return [_trial_row(r) for r in rows]

    def trial(self, job_id: str, number: int) -> TrialRow | None:
        rows = list(
            self.store._query(
                "SELECT * FROM trials WHERE job_id = ? AND number = ?", [job_id, number]
            )
        )
        return _trial_row(rows[0]) if rows else None
