"""The tenant's read-only commands as a user runs them: real `mercato` processes on a real
tenant store (SQLite), piped, narrowed to 80 columns, asked for JSON or CSV.

No cluster: the job and its trials are written to the store the way the sweep runner
writes them, so each test takes a fraction of a second.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.store.job_store import JobRow, JobStore
from node.store.node_store import Store
from node.tenant.sweep import QUEUED_DETAIL

SPEC = """\
name: nested-demo
program: train.py
method: random
run_cap: 400
metric: {name: val_loss, goal: minimize}
parameters:
  optimizer:
    parameters:
      lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
      beta1: {values: [0.9, 0.95]}
  layers: {values: [2, 4, 8]}
  activation: {values: [relu, gelu]}
"""
JOB = "nested-demo-abc123"
TRIALS = 400  # enough that `status --json` is larger than a pipe's buffer


def params(n: int) -> dict[str, Any]:
    return {
        "activation": "relu" if n % 2 else "gelu",
        "layers": [2, 4, 8][n % 3],
        "optimizer": {"beta1": 0.9, "lr": 0.001 * (n + 1)},
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tenant-cli")
    (root / "tenant").mkdir()
    with Store(root / "tenant" / "node.sqlite") as store:
        jobs = JobStore(store)
        jobs.create_job(
            JobRow(
                job_id=JOB,
                name="nested-demo",
                spec_yaml=SPEC,
                spec_hash="0" * 64,
                workspace_hash="0" * 64,
                workspace_path=str(root / "ws.tar"),
                state="running",
                detail="",
                seed=1,
                created_ms=1,
                updated_ms=1,
            )
        )
        for n in range(TRIALS):
            jobs.add_trial(JOB, n, params(n))
            jobs.update_trial(JOB, n, state="running")  # assigned; a result may follow
            if n < TRIALS - 3:
                jobs.finish_trial(
                    JOB,
                    n,
                    state="succeeded",
                    value=1.0 / (n + 1),
                    metrics={"val_loss": 1.0 / (n + 1)},
                    detail="",
                    finished_ms=2,
                    provider="P" * 32,
                    attempts=1,
                )
            else:
                jobs.update_trial(
                    JOB, n, state="running", provider="Q" * 32, attempts=1, detail=QUEUED_DETAIL
                )
    return root


def mercato(home: Path, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["MERCATO_HOME"] = str(home)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def piped(home: Path, command: str) -> subprocess.CompletedProcess[str]:
    """``mercato ARGS | head -1`` through a real shell pipe."""
    return subprocess.run(
        ["bash", "-c", f"{sys.executable} -m node.cli {command} | head -1"],
        env={**os.environ, "MERCATO_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestPipes:
    @pytest.mark.parametrize("command", [f"status {JOB} --json", "jobs --json", f"status {JOB}"])
    def test_a_closed_pipe_ends_quietly(self, home: Path, command: str) -> None:
        proc = piped(home, command)
        assert proc.stdout.strip(), proc.stderr
        assert "Traceback" not in proc.stderr
        assert "BrokenPipeError" not in proc.stderr


class TestHelp:
    @pytest.mark.parametrize(
        ("command", "phrase"),
        [
            ("jobs", "Every job in the tenant's store"),
            ("status", "queued trials apart from running"),
            ("logs", "What one trial printed"),
            ("results", "nested parameters as dotted columns"),
            ("cancel", "releases every lease"),
        ],
    )
    def test_every_tenant_command_explains_itself(
        self, home: Path, command: str, phrase: str
    ) -> None:
        proc = mercato(home, command, "--help", columns=200)
        assert proc.returncode == 0
        assert phrase in " ".join(proc.stdout.split())
        assert "job id (or a unique prefix)" in proc.stdout or command == "jobs"


class TestJson:
    def test_errors_are_json_under_json(self, home: Path) -> None:
        proc = mercato(home, "status", "no-such-job", "--json")
        assert proc.returncode == 1
        assert json.loads(proc.stdout) == {
            "error": {
                "code": "job_not_found",
                "reason": "no job 'no-such-job' (see `mercato jobs`)",
            }
        }

    def test_errors_stay_plain_text_without_json(self, home: Path) -> None:
        proc = mercato(home, "status", "no-such-job")
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.startswith("mercato: no job 'no-such-job'")

    def test_a_bad_job_file_lists_its_problems_as_json(self, home: Path, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("program: t.py\nmethod: sideways\nparameters: {a: {values: [1]}}\n")
        proc = mercato(home, "plan", str(bad), "--json", "--peer", "http://127.0.0.1:9")
        assert proc.returncode == 1
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "bad_job"
        assert [p["path"] for p in err["problems"]] == ["method"]

    def test_an_unset_envvar_of_the_command_is_refused_before_anything_is_spent(
        self, home: Path, tmp_path: Path
    ) -> None:
        job = tmp_path / "env.yaml"
        job.write_text(
            "program: t.py\nmethod: grid\nparameters: {a: {values: [1]}}\n"
            "command: [python3, t.py, '--data=${envvar:MERCATO_TEST_UNSET_VAR}/x', '${args}']\n"
        )
        proc = mercato(home, "plan", str(job), "--json", "--peer", "http://127.0.0.1:9")
        assert proc.returncode == 1
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "bad_job"
        assert "MERCATO_TEST_UNSET_VAR is not set" in err["problems"][0]["message"]

    def test_money_names_its_unit(self, home: Path) -> None:
        proc = mercato(home, "status", JOB, "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["spend_micro_credits"] == 0
        assert "spend" not in data


class TestCsv:
    def test_nested_parameters_are_dotted_columns(self, home: Path) -> None:
        proc = mercato(home, "results", JOB, "--csv")
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(io.StringIO(proc.stdout)))
        assert len(rows) == TRIALS
        assert {"optimizer.lr", "optimizer.beta1", "layers", "activation"} <= set(rows[0])
        assert "optimizer" not in rows[0]
        assert float(rows[4]["optimizer.lr"]) == pytest.approx(0.005)
        assert rows[4]["activation"] == "gelu"
        assert int(rows[4]["layers"]) == 4


class TestStatusTable:
    def test_readable_at_80_columns(self, home: Path) -> None:
        proc = mercato(home, "status", JOB, columns=80)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert max(len(x) for x in lines) <= 80, "\n".join(x for x in lines if len(x) > 80)
        # The columns are wide enough to read: whole words and whole parameter names.
        assert sum(x.split()[1:2] == ["succeeded"] for x in lines) == TRIALS - 3
        assert sum(x.split()[1:2] == ["queued"] for x in lines) == 3
        assert any("optimizer.lr=" in x for x in lines)

    @pytest.mark.parametrize("columns", [50, 60, 80])
    def test_jobs_says_interrupted_in_one_word_at_any_width(self, home: Path, columns: int) -> None:
        # The job's tenant process is gone (no runner lock): `jobs` must say so legibly.
        proc = mercato(home, "jobs", columns=columns)
        assert proc.returncode == 0, proc.stderr
        assert "interrupted:" in proc.stdout, proc.stdout

    def test_running_does_not_count_queued_trials(self, home: Path) -> None:
        # The three unfinished trials were assigned but no provider has started them.
        proc = mercato(home, "status", JOB, "--json")
        data = json.loads(proc.stdout)
        assert data["trials"].get("queued") == 3
        assert "running" not in data["trials"]
