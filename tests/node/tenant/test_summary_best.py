"""The best a job reports, when several trials tie on the metric (real SQLite store)."""

from __future__ import annotations

from pathlib import Path

from node.store.job_store import JobRow, JobStore
from node.store.node_store import Store
from node.store.verify_store import VerifyStore, Vote
from node.tenant.jobs import summarize

DIGITS = Path(__file__).parents[3] / "examples" / "digits-sweep" / "sweep.yaml"


def test_of_tied_bests_the_one_a_check_confirmed_is_reported(tmp_path: Path) -> None:
    """The digits sweep has several points at the same accuracy; the runner re-runs one
    of them before it ends. The summary must report that one, not another trial of
    the same value that nobody checked (which may come from a provider never checked)."""
    with Store(tmp_path / "node.sqlite") as store:
        jobs = JobStore(store)
        job = JobRow(
            job_id="digits-1",
            name="digits-svm",
            spec_yaml=DIGITS.read_text(),
            spec_hash="0" * 64,
            workspace_hash="0" * 64,
            workspace_path=str(tmp_path / "ws.tar"),
            state="done",
            detail="",
            seed=1,
            created_ms=1,
            updated_ms=1,
        )
        jobs.create_job(job)
        for n, value in enumerate([0.9889, 0.9889, 0.95]):
            jobs.add_trial(job.job_id, n, {"C": n})
            jobs.update_trial(job.job_id, n, state="running")
            jobs.finish_trial(
                job.job_id,
                n,
                state="succeeded",
                value=value,
                metrics={"val_accuracy": value},
                detail="",
                finished_ms=2,
                provider=f"{n}" * 32,
                attempts=1,
            )
        vs = VerifyStore(store)
        check = vs.open_check(
            job_id=job.job_id,
            number=1,
            params={"C": 1},
            seed=1,
            command=["python3", "train.py"],
            workspace_hash="0" * 64,
            spec_hash="0" * 64,
            metric="val_accuracy",
            original=Vote("original", "1" * 32, 0.9889, "t1", "l1", b""),
            now_ms=3,
        )
        vs.close_check(check, "agreed", None, 4)
        summary = summarize(store, job)
    assert summary.best is not None
    assert summary.best.number == 1
    assert summary.best_verified is True
