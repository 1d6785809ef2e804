"""The tenant's record of spot checks: evidence, trust per provider, refused payments.

Evidence is kept as the providers signed it (their ``task_result`` envelopes), with
what is needed to run the trial again (workspace hash, command, parameters, seed),
so anyone holding the workspace can re-run it and see who lied.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

from market.verification import DRAW_SECRET_BYTES, Trust
from node.store.node_store import Store


@dataclass(frozen=True, slots=True)
class Vote:
    """One provider's answer for a trial: its metric value and its signed result."""

    role: str  # original | check | decider
    provider: str
    value: float
    task_id: str
    lease_id: str
    envelope: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "provider": self.provider,
            "value": self.value,
            "task_id": self.task_id,
            "lease_id": self.lease_id,
            "result_envelope": base64.b64encode(self.envelope).decode(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vote:
        return cls(
            role=d["role"],
            provider=d["provider"],
            value=d["value"],
            task_id=d["task_id"],
            lease_id=d["lease_id"],
            envelope=base64.b64decode(d["result_envelope"]),
        )


class VerifyStore:
    """Spot checks, trust and refused payments, on top of a Store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- checks -----------------------------------------------------------------

    def open_check(
        self,
        *,
        job_id: str,
        number: int,
        params: dict[str, Any],
        seed: int,
        command: list[str],
        workspace_hash: str,
        spec_hash: str,
        metric: str,
        original: Vote,
        now_ms: int,
    ) -> int:
        cursor = self.store._execute(
            """
            INSERT INTO verify_checks (job_id, number, params, seed, command, workspace_hash,
                spec_hash, metric, votes, created_ms, updated_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (
                job_id,
                number,
                json.dumps(params, sort_keys=True),
                seed,
                json.dumps(command),
                workspace_hash,
                spec_hash,
                metric,
                json.dumps([original.to_json()]),
                now_ms,
                now_ms,
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def add_vote(self, check_id: int, vote: Vote, now_ms: int) -> None:
        rows = list(
            self.store._query("SELECT votes FROM verify_checks WHERE check_id = ?", [check_id])
        )
        votes = [*json.loads(rows[0]["votes"]), vote.to_json()]
        self.store._execute(
            "UPDATE verify_checks SET votes = ?, updated_ms = ? WHERE check_id = ?",
            (json.dumps(votes), now_ms, check_id),
        )

    def close_check(self, check_id: int, verdict: str, liar: str | None, now_ms: int) -> None:
        self.store._execute(
            "UPDATE verify_checks SET verdict = ?, liar = ?, updated_ms = ? WHERE check_id = ?",
            (verdict, liar, now_ms, check_id),
        )

    def checks(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.store._query(
            "SELECT * FROM verify_checks WHERE job_id = ? ORDER BY check_id", [job_id]
        )
        out = []
        for r in rows:
            r = dict(r)
            for key in ("params", "command", "votes"):
                r[key] = json.loads(r[key])
            out.append(r)
        return out

    def verified_numbers(self, job_id: str) -> set[int]:
        """Trials of ``job_id`` whose stored result a check confirmed."""
        rows = self.store._query(
            "SELECT number FROM verify_checks WHERE job_id = ? AND verdict IN "
            "('agreed', 'check_lied', 'original_lied')",
            [job_id],
        )
        return {r["number"] for r in rows}

    # --- trust ------------------------------------------------------------------

    def draw_secret(self) -> bytes:
        """The tenant's key for the spot-check draw (market.verification.draw), made on
        first use and kept, so a resumed sweep checks the same results. Never sent."""
        made = secrets.token_hex(DRAW_SECRET_BYTES)
        return bytes.fromhex(self.store.setdefault_meta("verify_draw_secret", made))

    def trust(self, provider: str) -> Trust:
        rows = list(
            self.store._query(
                "SELECT streak, verified, caught FROM verify_trust WHERE provider = ?", [provider]
            )
        )
        return Trust(**rows[0]) if rows else Trust()

    def set_trust(self, provider: str, trust: Trust) -> None:
        self.store._execute(
            """
            INSERT INTO verify_trust (provider, streak, verified, caught) VALUES (?, ?, ?, ?)
            ON CONFLICT (provider) DO UPDATE SET streak = excluded.streak,
                verified = excluded.verified, caught = excluded.caught
            """,
            (provider, trust.streak, trust.verified, trust.caught),
        )

    def drop(self, provider: str, now_ms: int) -> None:
        """Never lease from ``provider`` again (it was caught returning a false result)."""
        self.set_trust(provider, self.trust(provider))
        self.store._execute(
            "UPDATE verify_trust SET dropped_ms = ? WHERE provider = ? AND dropped_ms IS NULL",
            (now_ms, provider),
        )

    def canary_passed(self, provider: str, wall_ms: int) -> None:
        self.set_trust(provider, self.trust(provider))
        self.store._execute(
            "UPDATE verify_trust SET canary_ms = ? WHERE provider = ?", (wall_ms, provider)
        )

    def vetted(self, provider: str) -> bool:
        """Whether ``provider`` passed this tenant's canary before."""
        rows = self.store._query(
            "SELECT 1 FROM verify_trust WHERE provider = ? AND canary_ms IS NOT NULL",
            [provider],
        )
        return bool(list(rows))

    def dropped(self) -> set[str]:
        rows = self.store._query("SELECT provider FROM verify_trust WHERE dropped_ms IS NOT NULL")
        return {r["provider"] for r in rows}

    # --- measured speed ---------------------------------------------------------

    #: Durations kept for the fit: the newest, so a provider that slows down shows it.
    MAX_DURATIONS = 5_000

    def record_duration(self, provider: str, trial: str, wall_ms: int, now_ms: int) -> None:
        """The tenant's own timing of ``trial`` (job id and number) on ``provider``."""
        self.store._execute(
            """
            INSERT INTO trial_durations (provider, trial, wall_ms, recorded_ms)
            VALUES (?, ?, ?, ?) ON CONFLICT (provider, trial) DO UPDATE
            SET wall_ms = excluded.wall_ms, recorded_ms = excluded.recorded_ms
            """,
            (provider, trial, max(0, wall_ms), now_ms),
        )

    def durations(self) -> list[tuple[str, str, int]]:
        rows = self.store._query(
            "SELECT provider, trial, wall_ms FROM trial_durations "
            "ORDER BY recorded_ms DESC LIMIT ?",
            [self.MAX_DURATIONS],
        )
        return [(r["provider"], r["trial"], r["wall_ms"]) for r in rows]

    # --- payments ---------------------------------------------------------------

    def refuse_payment(
        self, lease_id: str, provider: str, job_id: str, reason: str, now_ms: int
    ) -> None:
        self.store._execute(
            """
            INSERT INTO refused_payments (lease_id, provider, job_id, reason, created_ms)
            VALUES (?, ?, ?, ?, ?) ON CONFLICT (lease_id) DO NOTHING
            """,
            (lease_id, provider, job_id, reason, now_ms),
        )

    def refused(self, job_id: str | None = None) -> list[dict[str, Any]]:
        rows = self.store._query("SELECT * FROM refused_payments ORDER BY created_ms")
        return [dict(r) for r in rows if job_id is None or r["job_id"] == job_id]

    def is_refused(self, lease_id: str) -> bool:
        rows = self.store._query("SELECT 1 FROM refused_payments WHERE lease_id = ?", [lease_id])
        return bool(list(rows))


def evidence(store: Store, job_id: str) -> dict[str, Any]:
    """Everything needed to re-run ``job_id``'s disputed trials and see who lied (JSON)."""
    vs = VerifyStore(store)
    checks = vs.checks(job_id)
    disputes = []
    for c in checks:
        votes = {v["role"]: v for v in reversed(c["votes"])}  # the first of each role
        if "decider" not in votes:
            continue
        caught = c["liar"].split(",") if c["liar"] else []
        disputes.append(
            {
                "number": c["number"],
                "params": c["params"],
                "seed": c["seed"],
                "command": c["command"],
                "workspace_hash": c["workspace_hash"],
                "spec_hash": c["spec_hash"],
                "metric": c["metric"],
                "verdict": c["verdict"],
                "liar": caught[0] if caught else None,
                "liars": caught,  # two when a fourth vote showed original and check lied
                "original": votes.get("original"),
                "check": votes.get("check"),
                "decider": votes.get("decider"),
                "deciders": [v for v in c["votes"] if v["role"] == "decider"],
            }
        )
    return {
        "job_id": job_id,
        "checks": len(checks),
        "agreed": sum(1 for c in checks if c["verdict"] == "agreed"),
        "disputes": disputes,
        "dropped": sorted(vs.dropped()),
        "refused_payments": vs.refused(job_id),
        "all_checks": checks,
    }
