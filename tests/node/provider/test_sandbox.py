"""The sandboxed executor, with real bubblewrap and real processes.

Every trial here is tenant code run for real: what it can read, write, reach and
leave behind is checked from the host afterwards. The OutputCollector tests at the
end are about line and metrics logic only and feed it bytes in memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from node.provider.executor import (
    MAX_LINE_BYTES,
    Executor,
    InvalidTrialSpecError,
    NetworkNotAllowedError,
    OutputCollector,
    ResourceLimits,
    TrialAlreadyRunningError,
    TrialOutcome,
    TrialSpec,
    TrialState,
)
from node.provider.sandbox import SandboxExecutor, SandboxUnavailableError

KEY_TEXT = "-----BEGIN PRIVATE KEY----- provider secret"
HOST_HAS_CA_CERTS = os.path.isdir("/etc/ssl/certs")

ATTEMPT = """
def attempt(action):
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "ok"
"""

SPAWN = """
import subprocess, time

def spawn(argv, **kwargs):
    # Popen can return before the kernel has set the new command line (vfork resumes
    # the parent mid-exec); wait for it, so the host sees the child once we say so.
    child = subprocess.Popen(argv, **kwargs)
    want = ("\\0".join(argv) + "\\0").encode()
    while open(f"/proc/{child.pid}/cmdline", "rb").read() != want:
        time.sleep(0.01)
    return child
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake provider home: a 0600 key and a 0644 file, so invisible != unreadable."""
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    key = path / "identity.pem"
    key.write_text(KEY_TEXT)
    key.chmod(0o600)
    public = path / "public.txt"
    public.write_text("public")
    public.chmod(0o644)
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "data.txt").write_text("original")
    # Trials import this to try something and say which error stopped them.
    (path / "attempt.py").write_text(ATTEMPT)
    (path / "spawn.py").write_text(SPAWN)
    return path


@pytest.fixture
def executor(bwrap: None, tmp_path: Path, home: Path) -> SandboxExecutor:
    return SandboxExecutor(tmp_path / "trials", hidden_paths=[home], kill_grace_s=1.0)


def make_spec(
    workspace: Path, code: str, *args: str, task_id: str = "t1", **fields: Any
) -> TrialSpec:
    """A trial that runs ``code`` (saved as ``<task_id>.py``) with the provider's interpreter."""
    script = f"{task_id}.py"
    (workspace / script).write_text(textwrap.dedent(code))
    fields.setdefault("timeout_s", 60)
    return TrialSpec(
        task_id=task_id,
        argv=[sys.executable, script, *args],
        workspace=workspace,
        **fields,
    )


def record(outcome: TrialOutcome) -> dict[str, Any]:
    """The last JSON object the trial printed."""
    assert outcome.metric_history, outcome.log_path.read_text()
    return outcome.metric_history[-1]


def processes_running(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == wanted:
                found.append(int(entry))
    return found


class TestIsolation:
    async def test_provider_key_is_invisible_not_just_unreadable(
        self, executor: SandboxExecutor, workspace: Path, home: Path, tmp_path: Path
    ) -> None:
        code = """
        import json, os, sys
        from attempt import attempt
        home = sys.argv[1]
        print(json.dumps({
            "key": attempt(lambda: open(os.path.join(home, "identity.pem")).read()),
            "public": attempt(lambda: open(os.path.join(home, "public.txt")).read()),
            "listing": attempt(lambda: os.listdir(home)),
        }))
        """
        spec = make_spec(workspace, code, str(home))
        outcome = await executor.run(spec)
        assert record(outcome) == {
            "key": "FileNotFoundError",
            "public": "FileNotFoundError",
            "listing": "FileNotFoundError",
        }
        # The same trial without the sandbox reads both: the check above can fail.
        bare = SandboxExecutor(tmp_path / "bare", use_bwrap=False, allow_unsandboxed=True)
        exposed = record(await bare.run(spec))
        assert exposed["key"] == "ok"
        assert exposed["public"] == "ok"

    async def test_root_dir_inside_home_shows_only_the_trials_own_dir(
        self, bwrap: None, workspace: Path, home: Path
    ) -> None:
        executor = SandboxExecutor(home / "trials", hidden_paths=[home])
        neighbour = await executor.run(make_spec(workspace, "print('hi')", task_id="neighbour"))
        assert neighbour.state is TrialState.SUCCEEDED
        code = """
        import json, os, sys
        home = sys.argv[1]
        print(json.dumps({
            "home": sorted(os.listdir(home)),
            "trials": sorted(os.listdir(os.path.join(home, "trials"))),
        }))
        """
        outcome = await executor.run(make_spec(workspace, code, str(home), task_id="mine"))
        assert record(outcome) == {"home": ["trials"], "trials": ["mine"]}

    async def test_hidden_dir_under_shared_dir_is_covered(
        self, bwrap: None, tmp_path: Path, workspace: Path
    ) -> None:
        data = tmp_path / "data"
        (data / "home" / "datasets").mkdir(parents=True)
        (data / "sample.csv").write_text("a,b\n1,2\n")
        (data / "home" / "identity.pem").write_text(KEY_TEXT)
        (data / "home" / "datasets" / "mnist.txt").write_text("digits")
        executor = SandboxExecutor(
            tmp_path / "trials",
            hidden_paths=[data / "home"],
            ro_paths=[data, data / "home" / "datasets"],
        )
        code = """
        import json, os, sys
        from attempt import attempt
        data = sys.argv[1]
        print(json.dumps({
            "sample": open(os.path.join(data, "sample.csv")).read(),
            "home": sorted(os.listdir(os.path.join(data, "home"))),
            "key": attempt(lambda: open(os.path.join(data, "home", "identity.pem")).read()),
            "shared": open(os.path.join(data, "home", "datasets", "mnist.txt")).read(),
            "write": attempt(lambda: open(os.path.join(data, "new.txt"), "w").write("x")),
        }))
        """
        outcome = await executor.run(make_spec(workspace, code, str(data)))
        assert record(outcome) == {
            "sample": "a,b\n1,2\n",
            "home": ["datasets"],
            "key": "FileNotFoundError",
            "shared": "digits",
            "write": "OSError",
        }
        assert not (data / "new.txt").exists()

    async def test_sharing_a_hidden_path_is_refused(self, bwrap: None, home: Path) -> None:
        with pytest.raises(SandboxUnavailableError):
            SandboxExecutor(home.parent / "trials", hidden_paths=[home], ro_paths=[home])

    async def test_writes_outside_the_work_dir_do_not_land(
        self, executor: SandboxExecutor, workspace: Path, home: Path, tmp_path: Path
    ) -> None:
        other = tmp_path / "other"
        other.mkdir()
        neighbour = await executor.run(make_spec(workspace, "pass", task_id="neighbour"))
        neighbour_work = neighbour.log_path.parent / "work"
        assert neighbour_work.is_dir()
        marker = secrets.token_hex(4)
        targets = [
            other / "escape.txt",
            neighbour_work / "escape.txt",
            home / "escape.txt",
            Path(f"/usr/escape-{marker}.txt"),
            Path(f"/etc/escape-{marker}.txt"),
        ]
        code = """
        import json, os, sys
        from attempt import attempt
        results = {t: attempt(lambda t=t: open(t, "w").write("x")) for t in sys.argv[1:]}
        results["inside"] = attempt(lambda: open("inside.txt", "w").write("x"))
        print(json.dumps(results))
        """
        outcome = await executor.run(make_spec(workspace, code, *map(str, targets)))
        results = record(outcome)
        assert results.pop("inside") == "ok"
        assert (outcome.log_path.parent / "work" / "inside.txt").read_text() == "x"
        assert all(result != "ok" for result in results.values()), results
        for target in targets:
            assert not target.exists()

    async def test_host_kernel_settings_and_tls_keys_are_out_of_reach(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # Opening for writing only, never writing: if this regressed, the open would
        # succeed and the test fail without touching the host's settings.
        code = """
        import json, os
        from attempt import attempt
        print(json.dumps({
            "core_pattern": attempt(
                lambda: os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))
            ),
            "tls_keys": attempt(lambda: os.listdir("/etc/ssl/private")),
            "ca_certs": attempt(lambda: os.listdir("/etc/ssl/certs")),
        }))
        """
        outcome = await executor.run(make_spec(workspace, code))
        result = record(outcome)
        assert result["core_pattern"] != "ok"
        assert result["tls_keys"] == "FileNotFoundError"
        # The public CA roots are shared: the missing private keys were held back.
        assert result["ca_certs"] == ("ok" if HOST_HAS_CA_CERTS else "FileNotFoundError")

    async def test_no_network_by_default(
        self, executor: SandboxExecutor, workspace: Path, tmp_path: Path, home: Path
    ) -> None:
        code = """
        import json, socket, sys
        sock = socket.socket()
        sock.settimeout(10)
        try:
            sock.connect(("127.0.0.1", int(sys.argv[1])))
            result = "connected"
        except OSError as exc:
            result = type(exc).__name__
        print(json.dumps({"result": result}))
        """
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(4)
            port = str(server.getsockname()[1])
            outcome = await executor.run(make_spec(workspace, code, port))
            assert record(outcome)["result"] == "ConnectionRefusedError"

            with pytest.raises(NetworkNotAllowedError) as refused:
                await executor.run(make_spec(workspace, code, port, network=True))
            assert refused.value.code == "network_not_allowed"

            # With the provider's consent the same trial reaches the same socket.
            open_net = SandboxExecutor(tmp_path / "net", allow_network=True, hidden_paths=[home])
            outcome = await open_net.run(make_spec(workspace, code, port, network=True))
            assert record(outcome)["result"] == "connected"

    async def test_provider_environment_is_not_inherited(
        self, executor: SandboxExecutor, workspace: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MERCATO_TEST_SECRET", "hunter2")
        code = "import json, os; print(json.dumps(dict(os.environ)))"
        spec = make_spec(
            workspace,
            code,
            env={"LR": "0.01", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            device_ids=["gpu1"],
            device_env={"CUDA_VISIBLE_DEVICES": "1"},
        )
        outcome = await executor.run(spec)
        env = record(outcome)
        assert "MERCATO_TEST_SECRET" not in env
        assert "hunter2" not in json.dumps(env)
        assert env["LR"] == "0.01"
        assert env["CUDA_VISIBLE_DEVICES"] == "1"
        assert env["HOME"] == str(outcome.log_path.parent / "work")
        assert env["PYTHONUNBUFFERED"] == "1"


class TestStopping:
    @pytest.mark.parametrize("sandboxed", [True, False], ids=["bwrap", "unsandboxed"])
    async def test_timeout_kills_the_trial_and_its_children(
        self, bwrap: None, sandboxed: bool, tmp_path: Path, workspace: Path
    ) -> None:
        executor = SandboxExecutor(
            tmp_path / "trials",
            use_bwrap=sandboxed,
            allow_unsandboxed=not sandboxed,
            kill_grace_s=1.0,
        )
        child = ["sleep", f"1000.{secrets.randbelow(10**6)}"]
        escaped = ["sleep", f"1001.{secrets.randbelow(10**6)}"]
        code = """
        import subprocess, sys, time
        from spawn import spawn
        spawn(["sleep", sys.argv[1]])
        spawn(["sleep", sys.argv[2]], start_new_session=True)
        print("started", flush=True)
        time.sleep(1000)
        """
        seen: list[int] = []

        def on_output(line: bytes) -> None:
            if b"started" in line:  # a batch of lines
                seen.extend(processes_running(child) + processes_running(escaped))

        spec = make_spec(workspace, code, child[1], escaped[1], timeout_s=3)
        outcome = await executor.run(spec, on_output=on_output)
        assert outcome.state is TrialState.TIMED_OUT
        assert len(seen) == 2  # both children really ran...
        assert processes_running(child) == []  # ...and are gone, the escaped one too
        assert processes_running(escaped) == []

    @pytest.mark.parametrize("sandboxed", [True, False], ids=["bwrap", "unsandboxed"])
    async def test_trial_ignoring_sigterm_is_killed(
        self, bwrap: None, sandboxed: bool, tmp_path: Path, workspace: Path
    ) -> None:
        executor = SandboxExecutor(
            tmp_path / "trials",
            use_bwrap=sandboxed,
            allow_unsandboxed=not sandboxed,
            kill_grace_s=0.5,
        )
        code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1000)
        """
        outcome = await executor.run(make_spec(workspace, code, timeout_s=1))
        assert outcome.state is TrialState.TIMED_OUT

    async def test_stopped_trial_may_save_state_and_is_charged_its_cpu(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import json, signal, sys, time

        def save(signum, frame):
            print(json.dumps({"saved": True, "cpu_s": time.process_time()}), flush=True)
            sys.exit(0)

        signal.signal(signal.SIGTERM, save)
        print("ready", flush=True)
        start = time.process_time()
        while time.process_time() - start < 0.1:
            pass
        print("busy", flush=True)
        time.sleep(1000)
        """
        busy = asyncio.Event()

        def on_output(line: bytes) -> None:
            if b"busy\n" in line:  # a batch of lines
                busy.set()

        run = asyncio.create_task(executor.run(make_spec(workspace, code), on_output=on_output))
        await asyncio.wait_for(busy.wait(), 30)
        await executor.cancel("t1")
        outcome = await run
        assert outcome.state is TrialState.CANCELLED
        saved = record(outcome)
        assert saved["saved"] is True
        assert outcome.cpu_ms >= saved["cpu_s"] * 1000

    async def test_cancel_kills_the_process_group(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        child = ["sleep", f"1002.{secrets.randbelow(10**6)}"]
        code = """
        import sys, time
        from spawn import spawn
        spawn(["sleep", sys.argv[1]])
        print("started", flush=True)
        time.sleep(1000)
        """
        started = asyncio.Event()
        seen: list[int] = []

        def on_output(line: bytes) -> None:
            if b"started" in line:  # a batch of lines
                seen.extend(processes_running(child))
                started.set()

        spec = make_spec(workspace, code, child[1])
        run = asyncio.create_task(executor.run(spec, on_output=on_output))
        await asyncio.wait_for(started.wait(), 30)
        assert await executor.cancel("t1") is True
        outcome = await run
        assert outcome.state is TrialState.CANCELLED
        assert seen
        assert processes_running(child) == []
        assert await executor.cancel("t1") is False

    async def test_cancelling_run_kills_the_trial(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        child = ["sleep", f"1003.{secrets.randbelow(10**6)}"]
        code = """
        import sys, time
        from spawn import spawn
        spawn(["sleep", sys.argv[1]])
        print("started", flush=True)
        time.sleep(1000)
        """
        started = asyncio.Event()
        spec = make_spec(workspace, code, child[1])
        run = asyncio.create_task(executor.run(spec, on_output=lambda _: started.set()))
        await asyncio.wait_for(started.wait(), 30)
        assert processes_running(child)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert processes_running(child) == []

    async def test_endless_output_is_capped(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import sys
        line = "x" * 99 + "\\n"
        while True:
            sys.stdout.write(line)
        """
        delivered: list[bytes] = []
        spec = make_spec(workspace, code, timeout_s=3, max_output_bytes=10_000)
        outcome = await executor.run(spec, on_output=delivered.append)
        assert outcome.state is TrialState.TIMED_OUT
        assert outcome.output_truncated
        assert 0 < outcome.output_bytes <= 10_000
        assert outcome.log_path.stat().st_size == outcome.output_bytes
        assert sum(map(len, delivered)) == outcome.output_bytes

    async def test_metrics_after_the_cap_still_count(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        from mercato_trial import report
        for step in range(20_000):
            print("y" * 99)
        report(loss=0.125)
        """
        spec = make_spec(workspace, code, max_output_bytes=10_000, metric="loss")
        outcome = await executor.run(spec)
        assert outcome.state is TrialState.SUCCEEDED
        assert outcome.output_truncated
        assert outcome.output_bytes <= 10_000
        assert outcome.metric_value == 0.125


class TestRunning:
    async def test_metrics_are_parsed_from_json_lines(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import json
        from mercato_trial import report
        print(json.dumps({"step": 1, "loss": 1.0}))
        print("epoch 1 done")
        print(json.dumps({"step": 2, "loss": 0.5, "note": "halfway", "ok": True}))
        print(json.dumps([1, 2, 3]))
        print('{"step": 3, "loss": NaN}')
        report(step=4, acc=0.75)
        print("{not json}")
        """
        pushed: list[dict[str, Any]] = []
        outcome = await executor.run(
            make_spec(workspace, code, metric="loss"), on_metrics=pushed.append
        )
        assert outcome.state is TrialState.SUCCEEDED
        assert outcome.metrics == {"step": 4, "loss": 0.5, "acc": 0.75}
        assert outcome.metric_value == 0.5
        assert [r["step"] for r in outcome.metric_history] == [1, 2, 3, 4]
        assert outcome.metric_history[1]["note"] == "halfway"
        # Only the kept metric values of each record reach on_metrics (no NaN, no bool).
        assert pushed == [
            {"step": 1, "loss": 1.0},
            {"step": 2, "loss": 0.5},
            {"step": 3},
            {"step": 4, "acc": 0.75},
        ]
        assert outcome.metrics_dropped == {"not_finite": 1}
        assert b"epoch 1 done" in outcome.log_path.read_bytes()

    async def test_trial_uses_the_providers_interpreter_and_packages(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # numpy is not installed here; msgpack and yaml live only in the venv.
        code = """
        import json, statistics, sys
        import msgpack, yaml
        print(json.dumps({
            "prefix": sys.prefix,
            "mean": statistics.mean([1, 2, 3]),
            "msgpack": msgpack.unpackb(msgpack.packb([1, 2])),
            "yaml": yaml.safe_load("a: 1"),
        }))
        """
        outcome = await executor.run(make_spec(workspace, code))
        assert record(outcome) == {
            "prefix": sys.prefix,
            "mean": 2,
            "msgpack": [1, 2],
            "yaml": {"a": 1},
        }

    @pytest.mark.parametrize(
        ("code", "state", "exit_code"),
        [
            ("raise SystemExit(0)", TrialState.SUCCEEDED, 0),
            ("raise SystemExit(3)", TrialState.FAILED, 3),
            ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", TrialState.FAILED, 137),
        ],
        ids=["exit-0", "exit-3", "sigkill"],
    )
    async def test_exit_status_maps_to_state(
        self,
        executor: SandboxExecutor,
        workspace: Path,
        code: str,
        state: TrialState,
        exit_code: int,
    ) -> None:
        outcome = await executor.run(make_spec(workspace, code))
        assert outcome.state is state
        assert outcome.exit_code == exit_code

    async def test_missing_command_fails_with_a_reason(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        spec = TrialSpec(
            task_id="t1", argv=["no-such-command-xyz"], workspace=workspace, timeout_s=30
        )
        outcome = await executor.run(spec)
        assert outcome.state is TrialState.FAILED
        assert outcome.exit_code != 0
        assert b"no-such-command-xyz" in outcome.log_path.read_bytes()

    async def test_resource_limits_are_applied(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import errno, json, resource
        names = ["RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_CORE"]
        out = {n: list(resource.getrlimit(getattr(resource, n))) for n in names}
        try:
            block = b"x" * (512 << 20)
            out["alloc"] = "ok"
        except MemoryError:
            out["alloc"] = "MemoryError"
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (2 << 20))
            out["write"] = "ok"
        except OSError as exc:
            out["write"] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
        limits = ResourceLimits(
            memory_bytes=256 << 20, max_processes=64, max_file_bytes=1 << 20, cpu_seconds=30
        )
        outcome = await executor.run(make_spec(workspace, code, limits=limits))
        assert record(outcome) == {
            "RLIMIT_AS": [256 << 20, 256 << 20],
            "RLIMIT_NPROC": [64, 64],
            "RLIMIT_FSIZE": [1 << 20, 1 << 20],
            "RLIMIT_CPU": [30, 35],
            "RLIMIT_CORE": [0, 0],
            "alloc": "MemoryError",
            "write": "EFBIG",
        }

    async def test_each_trial_works_on_its_own_copy_of_the_workspace(
        self, executor: SandboxExecutor, workspace: Path, home: Path
    ) -> None:
        (workspace / "key").symlink_to(home / "identity.pem")
        code = """
        import json, os, sys
        from attempt import attempt
        before = open("data.txt").read()
        open("data.txt", "w").write("changed")
        open("new.txt", "w").write("new")
        print(json.dumps({"before": before, "key": attempt(lambda: open("key").read())}))
        """
        first = await executor.run(make_spec(workspace, code, task_id="first"))
        second = await executor.run(make_spec(workspace, code, task_id="second"))
        assert record(first) == {"before": "original", "key": "FileNotFoundError"}
        assert record(second) == {"before": "original", "key": "FileNotFoundError"}
        assert (workspace / "data.txt").read_text() == "original"
        assert not (workspace / "new.txt").exists()
        # The link was copied as a link, not as the provider's key.
        assert (first.log_path.parent / "work" / "key").is_symlink()

    async def test_rerun_and_discard_clear_what_the_trial_left(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import os
        os.makedirs("locked/inner")
        open("locked/inner/result.txt", "w").write("x")
        os.chmod("locked/inner", 0o500)
        os.chmod("locked", 0o500)
        os.symlink("/usr", "usr-link")
        """
        usr_mode = os.stat("/usr").st_mode
        first = await executor.run(make_spec(workspace, code))
        assert (first.log_path.parent / "work" / "locked" / "inner" / "result.txt").exists()
        second = await executor.run(make_spec(workspace, code))
        assert second.state is TrialState.SUCCEEDED, second.log_path.read_text()
        executor.discard("t1")
        assert not second.log_path.parent.exists()
        assert os.stat("/usr").st_mode == usr_mode  # the planted link was not followed

    async def test_workspace_with_a_fifo_is_refused(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        os.mkfifo(workspace / "pipe")
        with pytest.raises(InvalidTrialSpecError):
            await executor.run(make_spec(workspace, "pass"))

    async def test_usage_is_measured_per_trial(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        burner = make_spec(
            workspace,
            """
            import json, time
            block = b"x" * (150 << 20)
            start = time.process_time()
            while time.process_time() - start < 0.5:
                pass
            print(json.dumps({"cpu_s": time.process_time()}))
            """,
            task_id="burner",
        )
        sleeper = make_spec(workspace, "import time; time.sleep(0.5)", task_id="sleeper")
        busy, idle = await asyncio.gather(executor.run(burner), executor.run(sleeper))
        burned_ms = record(busy)["cpu_s"] * 1000
        assert busy.cpu_ms >= burned_ms
        assert busy.max_rss_bytes >= 150 << 20
        # Trials running side by side are not charged for each other's CPU.
        assert idle.cpu_ms < burned_ms
        assert idle.max_rss_bytes < 150 << 20


class TestConfiguration:
    def test_unsandboxed_mode_is_refused_unless_allowed(self, tmp_path: Path) -> None:
        with pytest.raises(SandboxUnavailableError) as refused:
            SandboxExecutor(tmp_path / "trials", use_bwrap=False)
        assert refused.value.code == "sandbox_unavailable"
        assert "bubblewrap" in refused.value.reason
        assert "allow_unsandboxed" in refused.value.reason

    def test_missing_bwrap_is_refused_unless_allowed(self, tmp_path: Path) -> None:
        with pytest.raises(SandboxUnavailableError):
            SandboxExecutor(tmp_path / "trials", bwrap_path="/nonexistent/bwrap")
        fallback = SandboxExecutor(
            tmp_path / "trials", bwrap_path="/nonexistent/bwrap", allow_unsandboxed=True
        )
        assert not fallback.sandboxed

    async def test_allowed_unsandboxed_mode_still_runs_trials_cleanly(
        self, tmp_path: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("MERCATO_TEST_SECRET", "hunter2")
        executor = SandboxExecutor(tmp_path / "trials", use_bwrap=False, allow_unsandboxed=True)
        code = "import json, os; print(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd()}))"
        outcome = await executor.run(make_spec(workspace, code))
        assert outcome.state is TrialState.SUCCEEDED
        assert "MERCATO_TEST_SECRET" not in record(outcome)["env"]
        assert record(outcome)["cwd"] == str(outcome.log_path.parent / "work")

    def test_bwrap_is_detected(self, executor: SandboxExecutor) -> None:
        assert executor.sandboxed
        assert isinstance(executor, Executor)

    @pytest.mark.parametrize(
        "fields",
        [
            {"task_id": "../escape"},
            {"task_id": ""},
            {"argv": []},
            {"argv": "python trial.py"},
            {"env": {"BAD=NAME": "x"}},
            {"env": {"OK": "nul\0byte"}},
            {"timeout_s": 0},
            {"timeout_s": float("inf")},
            {"max_output_bytes": -1},
            {"device_nodes": ["/etc/shadow"]},
            {"device_nodes": ["/dev/../etc/shadow"]},
        ],
    )
    def test_bad_spec_is_refused(self, workspace: Path, fields: dict[str, Any]) -> None:
        base: dict[str, Any] = {
            "task_id": "t1",
            "argv": ["python"],
            "workspace": workspace,
            "timeout_s": 10,
        }
        with pytest.raises(InvalidTrialSpecError) as refused:
            TrialSpec(**(base | fields))
        assert refused.value.code == "invalid_trial_spec"

    def test_bad_limits_are_refused(self) -> None:
        with pytest.raises(InvalidTrialSpecError):
            ResourceLimits(memory_bytes=0)

    async def test_same_task_twice_is_refused(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        started = asyncio.Event()
        spec = make_spec(workspace, "import time; print('up', flush=True); time.sleep(1000)")
        run = asyncio.create_task(executor.run(spec, on_output=lambda _: started.set()))
        await asyncio.wait_for(started.wait(), 30)
        with pytest.raises(TrialAlreadyRunningError):
            await executor.run(spec)
        await executor.cancel("t1")
        assert (await run).state is TrialState.CANCELLED


class TestOutputCollectorLogic:
    """Line splitting and the cap, fed in memory (no process involved)."""

    def test_in_memory_lines_split_across_reads_are_joined(self) -> None:
        log = io.BytesIO()
        collector = OutputCollector(log, 1000)
        collector.feed(b'{"loss": 0.')
        collector.feed(b'5}\nplain\n{"loss"')
        collector.feed(b": 0.25}")
        collector.close()
        assert collector.metrics == {"loss": 0.25}
        assert log.getvalue() == b'{"loss": 0.5}\nplain\n{"loss": 0.25}'

    def test_in_memory_overlong_line_is_log_text_not_a_metric(self) -> None:
        log = io.BytesIO()
        collector = OutputCollector(log, 10 * MAX_LINE_BYTES)
        padding = " " * (MAX_LINE_BYTES + 10)
        collector.feed(b'{"loss": 1' + padding.encode() + b"}\n")
        collector.feed(b'{"loss": 2}\n')
        assert collector.metrics == {"loss": 2}

    def test_in_memory_metrics_past_the_cap_update_without_history(self) -> None:
        collector = OutputCollector(io.BytesIO(), 20)
        collector.feed(b'{"loss": 1}\n' + b"z" * 100 + b'\n{"loss": 0.5}\n')
        assert collector.truncated
        assert collector.metrics == {"loss": 0.5}
        assert collector.metric_history == [{"loss": 1}]
        assert collector.output_bytes == len(b'{"loss": 1}\n')

    def test_in_memory_broken_callback_does_not_stop_collection(self) -> None:
        def broken(_: bytes) -> None:
            raise RuntimeError("consumer gone")

        collector = OutputCollector(io.BytesIO(), 1000, on_output=broken)
        collector.feed(b'{"loss": 1}\n')
        assert collector.metrics == {"loss": 1}


def node_installed_for_every_trial() -> bool:
    """Whether node/ is under sys.prefix (a wheel install), which the sandbox binds."""
    import node

    return Path(node.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())


class TestTrialHelperBinding:
    async def test_trials_import_mercato_trial_but_not_the_node(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        """Only the report helper is bound in: the provider's own code stays out."""
        if node_installed_for_every_trial():
            pytest.skip("node is installed under sys.prefix, which every trial sees")
        import node.daemon

        code = f"""
        import os
        print("daemon.py visible:", os.path.exists({node.daemon.__file__!r}))
        from mercato_trial import report
        report(step=1)
        """
        outcome = await executor.run(make_spec(workspace, code))
        log = outcome.log_path.read_bytes()
        assert b"daemon.py visible: False" in log, log
        assert outcome.state is TrialState.SUCCEEDED, log
        assert outcome.metrics == {"step": 1}
