"""Warm sandboxes: one bubblewrap sandbox kept per lease slot across trials, for real.

Consecutive trials with the same ``warm_key`` and spec run in one sandbox, started by
a runner inside it (node.provider.supervisor.serve). Everything here is checked with
real bubblewrap and real processes: that a trial starts as ``python script.py`` would,
that the next trial finds nothing of the one before (files, processes, environment,
descriptors, IPC), that the runner's socket is out of the trial's reach, and that
exit codes, output, timeouts, cancels, limits and usage work as in a fresh sandbox.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from node.provider.executor import (
    InvalidTrialSpecError,
    ResourceLimits,
    TrialOutcome,
    TrialSpec,
    TrialState,
)
from node.provider.sandbox import READY_DIR, SandboxExecutor
from node.provider.supervisor import descendants

KEY_TEXT = "-----BEGIN PRIVATE KEY----- provider secret"

#: Prints how the interpreter started: what must not differ between a fresh
#: ``python script.py`` and one started by the runner.
PROBE = """
import json, os, sys
work = os.getcwd()
def here(x):
    return x.replace(work, "<work>") if isinstance(x, str) else x
print(json.dumps({
    "argv": sys.argv,
    "orig_argv": sys.orig_argv,
    "path0": here(sys.path[0]),
    "path": [here(p) for p in sys.path[1:]],
    "file": here(__file__),
    "name": __name__,
    "globals": sorted(globals()),
    "loader": type(__loader__).__name__,
    "spec": __spec__ is None,
    "executable": sys.executable,
    "flags": list(sys.flags),
    # PWD: bwrap's (its own cwd) in a fresh sandbox, the work dir in a warm one.
    "env": {k: here(v) for k, v in os.environ.items() if k != "PWD"},
    "cwd": here(work),
    "stdout": [sys.stdout.encoding, sys.stdout.line_buffering, sys.stdout.write_through],
    "sid": os.getsid(0) == os.getpid(),
    "pgid": os.getpgid(0) == os.getpid(),
}))
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    (path / "identity.pem").write_text(KEY_TEXT)
    (path / "identity.pem").chmod(0o600)
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "data.txt").write_text("original")
    return path


@pytest.fixture
async def executor(bwrap: None, tmp_path: Path, home: Path) -> Any:
    ex = SandboxExecutor(tmp_path / "trials", hidden_paths=[home], kill_grace_s=1.0)
    assert ex.warm
    yield ex
    await ex.close()


def make_spec(
    workspace: Path,
    code: str,
    *args: str,
    task_id: str,
    warm_key: str | None = "lease1",
    **fields: Any,
) -> TrialSpec:
    script = f"{task_id}.py"
    (workspace / script).write_text(textwrap.dedent(code))
    fields.setdefault("timeout_s", 60)
    return TrialSpec(
        task_id=task_id,
        argv=[sys.executable, script, *args],
        workspace=workspace,
        warm_key=warm_key,
        **fields,
    )


def record(outcome: TrialOutcome) -> dict[str, Any]:
    assert outcome.metric_history, outcome.log_path.read_text()
    return outcome.metric_history[-1]


def slot_of(executor: SandboxExecutor, task_id: str) -> Path:
    """The warm sandbox a trial ran in (its slot), asserted warm."""
    slot = executor.warm_slot(task_id)
    assert slot is not None
    assert slot.startswith(".warm-"), slot
    return executor.root_dir / slot


class TestStartsLikeAFreshInterpreter:
    async def test_python_trial_sees_what_a_fresh_interpreter_would(
        self, executor: SandboxExecutor, workspace: Path, tmp_path: Path, home: Path
    ) -> None:
        cold = SandboxExecutor(tmp_path / "cold", hidden_paths=[home], warm=False)
        fresh = record(await cold.run(make_spec(workspace, PROBE, "a", "--b=1", task_id="c1")))
        warm = [
            record(await executor.run(make_spec(workspace, PROBE, "a", "--b=1", task_id=f"w{n}")))
            for n in range(3)
        ]
        assert slot_of(executor, "w1") == slot_of(executor, "w2")  # the same sandbox
        # argv[1] and __file__ name each trial's own script; the rest is the same.
        for n, seen in enumerate(warm):
            assert seen["argv"] == [f"w{n}.py", "a", "--b=1"]
            assert seen["file"] == f"<work>/w{n}.py"
            seen["argv"][0] = seen["orig_argv"][1] = "c1.py"
            seen["file"] = "<work>/c1.py"
            assert seen == fresh

    async def test_each_trial_draws_its_own_random_numbers(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # The runner has not imported random: each child seeds it afresh, as a new
        # interpreter would (a sweep's trials must not share one random stream).
        code = "import json, random; print(json.dumps({'r': random.random()}))"
        draws = [
            record(await executor.run(make_spec(workspace, code, task_id=f"rnd{n}")))["r"]
            for n in range(3)
        ]
        assert slot_of(executor, "rnd0") == slot_of(executor, "rnd2")
        assert len(set(draws)) == 3

    async def test_env_python_form_and_non_python_commands(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        (workspace / "p.py").write_text("import sys; print(sys.argv); sys.exit(3)\n")
        env_form = TrialSpec(
            task_id="e1",
            argv=["/usr/bin/env", "python3", "p.py", "--x=1"],
            workspace=workspace,
            timeout_s=60,
            warm_key="lease1",
        )
        outcome = await executor.run(env_form)
        assert outcome.state is TrialState.FAILED
        assert outcome.exit_code == 3
        assert outcome.log_path.read_text() == "['p.py', '--x=1']\n"
        shell = TrialSpec(
            task_id="s1",
            argv=["/bin/sh", "-c", "echo from sh; exit 4"],
            workspace=workspace,
            timeout_s=60,
            warm_key="lease1",
        )
        outcome = await executor.run(shell)
        assert (outcome.exit_code, outcome.log_path.read_text()) == (4, "from sh\n")

    async def test_exit_codes_exceptions_atexit_threads_and_metrics(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        crash = """
        import json
        print(json.dumps({"loss": 0.5}), flush=True)
        def inner():
            raise ValueError("bad value")
        inner()
        """
        outcome = await executor.run(make_spec(workspace, crash, task_id="x1"))
        log = outcome.log_path.read_text()
        assert (outcome.state, outcome.exit_code) == (TrialState.FAILED, 1)
        assert outcome.metrics == {"loss": 0.5}
        assert "ValueError: bad value" in log
        assert 'x1.py", line 5, in inner' in log
        assert "supervisor" not in log  # the runner's frames are not the trial's
        ending = """
        import atexit, threading, time
        atexit.register(lambda: print("atexit ran", flush=True))
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        print("main done")
        """
        outcome = await executor.run(make_spec(workspace, ending, task_id="x2"))
        assert outcome.exit_code == 0
        assert outcome.log_path.read_text() == "main done\nthread finished\natexit ran\n"
        killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        outcome = await executor.run(make_spec(workspace, killed, task_id="x3"))
        assert outcome.exit_code == 128 + 9
        syntax = "def broken(:\n"
        outcome = await executor.run(make_spec(workspace, syntax, task_id="x4"))
        assert outcome.exit_code == 1
        assert "SyntaxError" in outcome.log_path.read_text()
        assert slot_of(executor, "x1") == slot_of(executor, "x4")

    async def test_the_end_is_a_fresh_interpreters_end(
        self, executor: SandboxExecutor, workspace: Path, tmp_path: Path, home: Path
    ) -> None:
        # The runner's child ends with _exit once the interpreter's visible steps are
        # done: what a trial left unflushed still arrives, exit statuses are the same.
        cold = SandboxExecutor(tmp_path / "cold", hidden_paths=[home], warm=False)
        endings = {
            "unflushed": """
                import os, sys
                out = os.fdopen(os.dup(1), "w")
                out.write("from a file left open\\n")
                sys.stdout.write("buffered, never flushed\\n")
                """,
            "message": "import sys; print('before'); sys.exit('bye')",
            "status": "raise SystemExit(7)",
            "none": "import sys; sys.exit()",
            "interrupt": "raise KeyboardInterrupt",
        }
        for name, code in endings.items():
            fresh = await cold.run(make_spec(workspace, code, task_id=f"c-{name}"))
            warm = await executor.run(make_spec(workspace, code, task_id=f"w-{name}"))
            assert (warm.exit_code, lines(warm)) == (fresh.exit_code, lines(fresh)), name
        assert slot_of(executor, "w-unflushed") == slot_of(executor, "w-interrupt")


def lines(outcome: TrialOutcome) -> list[str]:
    """A trial's output lines in order of text, its script's path left out."""
    text = re.sub(r'"/[^"]*/[cw]-(\w+)\.py"', r'"\1.py"', outcome.log_path.read_text())
    return sorted(text.splitlines())


class TestPreloadedModules:
    async def test_a_trial_finds_them_imported_and_pristine_whatever_the_last_did(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        spoil = """
        import argparse, json, random
        json.MARK = "left by the first trial"
        json.dumps = None
        argparse.ArgumentParser = None
        random.seed(1)
        """
        look = """
        import json, sys, random
        print(json.dumps({
            "preloaded": sorted({"argparse", "json"} & set(sys.modules)),
            "mark": hasattr(json, "MARK"),
            "parser": sys.modules["argparse"].ArgumentParser is not None,
            "r": random.random(),
        }))
        """
        first = await executor.run(make_spec(workspace, spoil, task_id="m1"))
        assert first.exit_code == 0, first.log_path.read_text()
        seen = [
            record(await executor.run(make_spec(workspace, look, task_id=f"m{n}"))) for n in (2, 3)
        ]
        assert slot_of(executor, "m1") == slot_of(executor, "m3")
        for s in seen:
            # Imported before the script's first line, by the runner, not by the script.
            assert s["preloaded"] == ["argparse", "json"]
            assert (s["mark"], s["parser"]) == (False, True)
        # random.seed(1) of the first trial seeds nobody else; each trial draws its own.
        import random as host_random

        host_random.seed(1)
        assert len({s["r"] for s in seen} | {host_random.random()}) == 3

    async def test_a_parameter_parsing_trial_imports_nothing_on_its_first_parser(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # argparse imports shutil (the terminal's width) and locale (through gettext) on
        # its first ArgumentParser, not at its own import: milliseconds in every trial
        # unless the runner has them too. (A sandbox's first trial runs while the runner
        # preloads: it imports for itself, as a fresh interpreter.)
        await executor.run(make_spec(workspace, "pass", task_id="ap0"))
        code = """
        import argparse, json, sys
        before = set(sys.modules)
        p = argparse.ArgumentParser()
        p.add_argument("--lr", type=float, required=True)
        x = p.parse_args()
        print(json.dumps({"lr": x.lr, "imported": sorted(set(sys.modules) - before)}))
        """
        for n in (1, 2):
            seen = record(
                await executor.run(make_spec(workspace, code, "--lr", "0.5", task_id=f"ap{n}"))
            )
            assert seen == {"lr": 0.5, "imported": []}

    async def test_a_workspace_module_shadows_a_preloaded_one_as_in_a_fresh_interpreter(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        (workspace / "json.py").write_text("def dumps(x):\n    return 'the workspace json'\n")
        code = "import json; print(json.dumps(1))"
        outcome = await executor.run(make_spec(workspace, code, task_id="sh1"))
        assert outcome.log_path.read_text() == "the workspace json\n"
        (workspace / "json.py").unlink()
        outcome = await executor.run(make_spec(workspace, code, task_id="sh2"))
        assert outcome.log_path.read_text() == "1\n"
        assert slot_of(executor, "sh1") == slot_of(executor, "sh2")

    async def test_a_module_that_cannot_be_preloaded_is_skipped(
        self,
        bwrap: None,
        workspace: Path,
        tmp_path: Path,
        home: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        ex = SandboxExecutor(
            tmp_path / "odd", hidden_paths=[home], warm_preload=["no_such_module_here", "csv"]
        )
        try:
            code = "import sys; print(sorted({'csv', 'argparse'} & set(sys.modules)))"
            with caplog.at_level(logging.WARNING, logger="node.provider.sandbox"):
                first = await ex.run(make_spec(workspace, code, task_id="np1"))
            # The runner preloads while the sandbox's first trial runs: not for that one.
            assert first.log_path.read_text() == "[]\n"  # nothing of the operator's list
            assert "cannot preload no_such_module_here" in caplog.text
            second = await ex.run(make_spec(workspace, code, task_id="np2"))
            assert second.log_path.read_text() == "['csv']\n"
        finally:
            await ex.close()


class TestNothingCarriesOver:
    async def test_next_trial_sees_no_file_process_env_or_descriptor_of_the_last(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        first = """
        import os, signal, subprocess, sys, time
        open("left-in-work.txt", "w").write("x")
        open("/tmp/left-in-tmp", "w").write("x")
        os.makedirs("/tmp/dir/sub")
        os.chmod("/tmp/dir", 0)
        open("/dev/shm/left-in-shm", "w").write("x")
        open(os.path.join(os.path.dirname(os.getcwd()), "beside-work"), "w").write("x")
        os.environ["LEAKED"] = "1"
        os.putenv("LEAKED2", "1")
        keep = os.open("data.txt", os.O_RDONLY)
        os.set_inheritable(keep, True)
        # A daemon: double fork, new session, deaf to SIGTERM, still holding our output.
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                open("/tmp/daemon-alive", "w").write(str(os.getpid()))
                while True:
                    time.sleep(0.05)
                    open("/tmp/daemon-alive", "w").write(str(os.getpid()))
            os._exit(0)
        while not os.path.exists("/tmp/daemon-alive"):
            time.sleep(0.01)
        print("first done", flush=True)
        """
        second = """
        import json, os
        work = os.getcwd()
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print(json.dumps({
            "work": sorted(os.listdir(work)),
            "beside": sorted(os.listdir(os.path.dirname(work))),
            "tmp": sorted(os.listdir("/tmp")),
            "shm": sorted(os.listdir("/dev/shm")),
            "env": sorted(k for k in os.environ if k.startswith("LEAKED")),
            "seed": os.environ["MERCATO_SEED"],
            "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
            "others": [p for p in pids if p not in (1, os.getppid(), os.getpid())],
        }))
        """
        # Each trial of a sweep has its own seed: the sandbox is shared all the same.
        one = await executor.run(
            make_spec(workspace, first, task_id="one", env={"MERCATO_SEED": "1"})
        )
        assert one.state is TrialState.SUCCEEDED, one.log_path.read_text()
        two = await executor.run(
            make_spec(workspace, second, task_id="two", env={"MERCATO_SEED": "2"})
        )
        assert slot_of(executor, "one") == slot_of(executor, "two")
        seen = record(two)
        assert seen["work"] == ["data.txt", "one.py", "two.py"]
        assert seen["beside"] == [os.path.basename(executor.work_dir("two"))]
        # The sandbox's /tmp may hold the empty mount points of the provider's dirs (when
        # they lie under /tmp), never what the first trial wrote.
        assert not {"left-in-tmp", "dir", "daemon-alive"} & set(seen["tmp"])
        assert seen["shm"] == []
        assert seen["env"] == []
        assert seen["seed"] == "2"
        assert seen["fds"] == [0, 1, 2, 3]  # 3: the listing's own
        assert seen["others"] == []

    async def test_sysv_ipc_left_behind_retires_the_sandbox(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # A SysV segment outlives its creator in the IPC namespace: the next trial would see it.
        leave = """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.shmget(0x4D45, 4096, 0o1600) >= 0  # IPC_CREAT | 0600
        """
        look = "print(open('/proc/sysvipc/shm').read().count('\\n'))"
        await executor.run(make_spec(workspace, "pass", task_id="i0"))
        left = await executor.run(make_spec(workspace, leave, task_id="i1"))
        assert left.state is TrialState.SUCCEEDED, left.log_path.read_text()
        after = await executor.run(make_spec(workspace, look, task_id="i2"))
        assert after.log_path.read_text() == "1\n"  # the header line only
        assert slot_of(executor, "i0") == slot_of(executor, "i1") != slot_of(executor, "i2")

    async def test_posix_message_queues_are_refused(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # They outlive their creator too, and cannot be listed without a mount.
        code = """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        q = libc.mq_open(b"/leak", 0o100 | 0o2, 0o600, None)
        print(q, ctypes.get_errno())
        """
        outcome = await executor.run(make_spec(workspace, code, task_id="q1"))
        assert outcome.log_path.read_text() == "-1 1\n"  # EPERM

    async def test_different_keys_or_specs_never_share_a_sandbox(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.run(make_spec(workspace, "pass", task_id="k1", warm_key="leaseA"))
        await executor.run(make_spec(workspace, "pass", task_id="k2", warm_key="leaseB"))
        await executor.run(
            make_spec(workspace, "pass", task_id="k3", warm_key="leaseB", env={"LANG": "C"})
        )
        slots = {slot_of(executor, t) for t in ("k1", "k2", "k3")}
        assert len(slots) == 3
        cold = await executor.run(make_spec(workspace, "pass", task_id="k4", warm_key=None))
        assert cold.log_path.parent / "work" == executor.work_dir("k4")

    async def test_lease_close_and_close_end_the_sandboxes(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.run(make_spec(workspace, "pass", task_id="l1", warm_key="leaseA"))
        await executor.run(make_spec(workspace, "pass", task_id="l2", warm_key="leaseB"))
        slot_a, slot_b = slot_of(executor, "l1"), slot_of(executor, "l2")
        await executor.lease_close("leaseA")
        assert not slot_a.exists()
        assert slot_b.exists()
        await executor.close()
        assert not slot_b.exists()


class TestTheRunnerIsOutOfReach:
    async def test_trial_cannot_reach_the_runner(
        self, executor: SandboxExecutor, workspace: Path, home: Path
    ) -> None:
        code = """
        import json, os, sys
        def attempt(action):
            try:
                action()
            except OSError as exc:
                return type(exc).__name__
            return "ok"
        runner = os.getppid()
        print(json.dumps({
            "socket": attempt(lambda: os.open(f"/proc/{runner}/fd/5", os.O_RDWR)),
            "fds": attempt(lambda: os.listdir(f"/proc/{runner}/fd")),
            "mem": attempt(lambda: open(f"/proc/{runner}/mem", "r+b")),
            "environ": attempt(lambda: open(f"/proc/{runner}/environ").read()),
            "key": attempt(lambda: open(sys.argv[1]).read()),
            "own_fd_5": attempt(lambda: os.fstat(5)),
        }))
        """
        outcome = await executor.run(
            make_spec(workspace, code, str(home / "identity.pem"), task_id="r1")
        )
        seen = record(outcome)
        assert seen["own_fd_5"] == "OSError"  # EBADF: the socket is not the trial's
        assert seen["key"] == "FileNotFoundError"
        for what in ("socket", "fds", "mem", "environ"):
            assert seen[what] == "PermissionError", (what, seen)

    async def test_a_trial_sees_only_its_own_slot_not_other_leases(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        other = await executor.run(
            make_spec(workspace, "open('secret', 'w').write('b')", task_id="o1", warm_key="leaseB")
        )
        assert other.state is TrialState.SUCCEEDED
        code = """
        import json, os, sys
        print(json.dumps({"root": sorted(os.listdir(sys.argv[1]))}))
        """
        seen = record(
            await executor.run(make_spec(workspace, code, str(executor.root_dir), task_id="o2"))
        )
        assert (executor.work_dir("o1") / "secret").exists()  # leaseB's, not discarded yet
        assert seen == {"root": [slot_of(executor, "o2").name]}

    async def test_a_trial_that_kills_the_runner_fails_alone(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = (
            "import os, signal; os.kill(os.getppid(), signal.SIGKILL); import time; time.sleep(5)"
        )
        outcome = await executor.run(make_spec(workspace, code, task_id="d1"))
        assert outcome.state is TrialState.FAILED
        after = await executor.run(make_spec(workspace, "print('fine')", task_id="d2"))
        assert after.state is TrialState.SUCCEEDED
        assert after.log_path.read_text() == "fine\n"
        assert slot_of(executor, "d2").exists()


class TestTheNextTrialsChild:
    async def test_it_is_forked_once_the_last_trial_is_gone_and_replaced_if_killed(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.run(make_spec(workspace, "pass", task_id="f0"))
        (warm,) = executor._warm_idle
        # Below the supervisor: bwrap, bwrap's pid 1, the runner, and the next trial's
        # child waiting under the runner (the deepest), nothing else.
        waiting: list[int] = []
        for _ in range(500):
            tree = descendants(warm.pid)
            deepest = max(depth for _, depth in tree)
            waiting = [pid for pid, depth in tree if depth == deepest >= 4]
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert len(waiting) == 1
        os.kill(waiting[0], signal.SIGKILL)  # as the kernel's OOM killer could
        after = await executor.run(make_spec(workspace, "print('fine')", task_id="f1"))
        assert after.state is TrialState.SUCCEEDED, after.log_path.read_text()
        assert after.log_path.read_text() == "fine\n"
        assert slot_of(executor, "f0") == slot_of(executor, "f1")


def guess(workspace: Path, warm_key: str, n: int = 0) -> TrialSpec:
    """The shape a provider guesses for a lease's trials before they come (warm_up)."""
    return TrialSpec(
        task_id=f"warm-up.{n}",
        argv=[sys.executable, "-"],
        workspace=workspace,
        timeout_s=1,
        warm_key=warm_key,
    )


class TestStartedAhead:
    async def test_a_leases_sandboxes_started_ahead_take_its_first_trials_and_no_other(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.warm_up([guess(workspace, "lease1", n) for n in range(2)])
        ahead = {w.slot.name for w in executor._warm_idle}
        assert len(ahead) == 2
        await executor.warm_up([guess(workspace, "lease1")])  # already waiting: none more
        assert len(executor._warm_idle) == 2
        code = "import sys; print(sorted({'argparse', 'json'} & set(sys.modules)))"
        first = await executor.run(make_spec(workspace, code, task_id="a1"))
        # Its sandbox was started (and its runner preloaded) before it came.
        assert slot_of(executor, "a1").name in ahead
        assert first.log_path.read_text() == "['argparse', 'json']\n"
        other = await executor.run(make_spec(workspace, code, task_id="b1", warm_key="leaseB"))
        assert slot_of(executor, "b1").name not in ahead  # another lease's: never
        await executor.lease_close("lease1")
        assert not any((executor.root_dir / name).exists() for name in ahead)
        assert other.state is TrialState.SUCCEEDED

    async def test_a_guess_no_trial_has_is_closed_when_one_of_another_shape_starts(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.warm_up([guess(workspace, "lease1")])
        (ahead,) = executor._warm_idle
        ran = await executor.run(
            make_spec(workspace, "print('ran')", task_id="s1", env={"LANG": "C"})
        )
        assert ran.log_path.read_text() == "ran\n"
        assert slot_of(executor, "s1") != ahead.slot
        assert not ahead.slot.exists()
        assert ahead not in executor._warm_idle


class TestLimitsAndEnds:
    async def test_timeout_cancel_and_a_fresh_sandbox_after(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        slow = """
        import signal, sys, time
        def stop(signum, frame):
            print("saving state", flush=True)
            sys.exit(5)
        signal.signal(signal.SIGTERM, stop)
        print("started", flush=True)
        time.sleep(60)
        """
        await executor.run(make_spec(workspace, "pass", task_id="t0"))
        outcome = await executor.run(make_spec(workspace, slow, task_id="t1", timeout_s=1))
        assert outcome.state is TrialState.TIMED_OUT
        assert outcome.log_path.read_text() == "started\nsaving state\n"
        assert outcome.exit_code == 5
        started = asyncio.Event()

        def on_output(data: bytes) -> None:
            if b"started" in data:
                started.set()

        run = asyncio.create_task(executor.run(make_spec(workspace, slow, task_id="t2"), on_output))
        await started.wait()
        assert await executor.cancel("t2")
        outcome = await run
        assert outcome.state is TrialState.CANCELLED
        after = await executor.run(make_spec(workspace, "print('ok')", task_id="t3"))
        assert after.state is TrialState.SUCCEEDED
        assert len({slot_of(executor, t) for t in ("t0", "t1", "t2", "t3")}) == 3

    async def test_memory_and_disk_watch_stop_a_warm_trial(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        hog = """
        import time
        block = bytearray(300 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(30)
        print("survived", flush=True)
        """
        limits = ResourceLimits(trial_memory_bytes=128 << 20)
        await executor.run(make_spec(workspace, "pass", task_id="m0", limits=limits))
        outcome = await executor.run(make_spec(workspace, hog, task_id="m1", limits=limits))
        assert outcome.state is TrialState.FAILED
        log = outcome.log_path.read_text()
        assert "trial stopped: memory" in log
        assert "survived" not in log
        fill = """
        chunk = b"x" * (1 << 20)
        for n in range(1024):
            with open(f"fill-{n}", "wb") as f:
                f.write(chunk)
        print("filled", flush=True)
        """
        limits = ResourceLimits(disk_bytes=32 << 20, max_file_bytes=4 << 20)
        outcome = await executor.run(make_spec(workspace, fill, task_id="f1", limits=limits))
        assert outcome.state is TrialState.FAILED
        assert "disk limit" in outcome.log_path.read_text()

    async def test_usage_counts_the_trial_and_its_children(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        burn = """
        import subprocess, sys, time
        def spin(seconds):
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass
        child = subprocess.Popen([sys.executable, "-c", "import time\\n"
            "end = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"])
        spin(0.3)
        child.wait()
        """
        await executor.run(make_spec(workspace, "pass", task_id="u0"))
        outcome = await executor.run(make_spec(workspace, burn, task_id="u1"))
        assert outcome.state is TrialState.SUCCEEDED, outcome.log_path.read_text()
        assert outcome.cpu_ms >= 550
        assert outcome.max_rss_bytes > 1 << 20
        assert slot_of(executor, "u0") == slot_of(executor, "u1")

    async def test_pythonpath_of_the_tenant_is_honoured(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # PYTHON* variables change how an interpreter starts: the runner then only
        # execs, so the trial starts exactly as it asked.
        (workspace / "lib").mkdir()
        (workspace / "lib" / "helper.py").write_text("VALUE = 'from lib'\n")
        code = "import helper; print(helper.VALUE)"
        for n in range(2):
            outcome = await executor.run(
                make_spec(workspace, code, task_id=f"pp{n}", env={"PYTHONPATH": "lib"})
            )
            assert outcome.log_path.read_text() == "from lib\n"
        assert slot_of(executor, "pp0") == slot_of(executor, "pp1")


class TestFiles:
    async def test_files_are_written_into_the_trials_copy(
        self, executor: SandboxExecutor, workspace: Path, home: Path, tmp_path: Path
    ) -> None:
        (workspace / "params.json").symlink_to(home / "identity.pem")
        code = "print(open('params.json').read())"
        for warm_key in ("lease1", None):
            spec = make_spec(
                workspace,
                code,
                task_id=f"p{warm_key}",
                warm_key=warm_key,
                files={"params.json": '{"lr": 0.1}'},
            )
            outcome = await executor.run(spec)
            assert outcome.log_path.read_text() == '{"lr": 0.1}\n'
        # The link was replaced in the copy, never written through.
        assert (home / "identity.pem").read_text() == KEY_TEXT
        assert (workspace / "params.json").is_symlink()

    def test_bad_file_names_are_refused(self, workspace: Path) -> None:
        for name in ("../x", "a/b", "..", ""):
            with pytest.raises(InvalidTrialSpecError):
                TrialSpec(
                    task_id="t",
                    argv=["true"],
                    workspace=workspace,
                    timeout_s=1,
                    files={name: "x"},
                )


#: What a queued trial's parameters file holds; a running trial must never find it.
NEXT_SECRET = "parameters-of-the-next-trial-7c1e"

#: Waits for ``go`` in its work dir, then looks everywhere it can for the next trial's
#: parameters (by name and by content), and for the place copies are prepared in.
SEARCH = """
import json, os, sys, time
ready, secret = sys.argv[1], sys.argv[2]
while not os.path.exists("go"):
    time.sleep(0.01)
skip = {"/proc", "/sys", "/dev", "/usr"}
skip |= {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
found = []
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(top, d)) not in skip]
    for name in files:
        path = os.path.join(top, name)
        if name == "params.json":
            found.append(path)
            continue
        try:
            if os.path.getsize(path) < 1 << 16 and secret in open(path, errors="replace").read():
                found.append(path)
        except OSError:
            pass
open("left-by-this-trial", "w").write("x")
print(json.dumps({
    "found": found,
    "ready": os.path.exists(ready),
    "beside": sorted(os.listdir("..")),
}))
"""

#: What a trial starts with: its parameters file, its work dir, its slot.
LOOK = """
import json, os
print(json.dumps({
    "params": open("params.json").read(),
    "work": sorted(os.listdir(".")),
    "beside": sorted(os.listdir("..")),
}))
"""


def prepared(executor: SandboxExecutor) -> list[Path]:
    """The copies waiting in the executor's ready dir."""
    ready = executor.root_dir / READY_DIR
    return sorted(ready.iterdir()) if ready.exists() else []


class TestPreparedWorkDirs:
    async def test_a_running_trial_sees_nothing_of_the_next_ones_copy(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.run(make_spec(workspace, "pass", task_id="p0"))  # the sandbox starts
        ready = str(executor.root_dir / READY_DIR)
        running = asyncio.create_task(
            executor.run(make_spec(workspace, SEARCH, ready, NEXT_SECRET, task_id="pk"))
        )
        for _ in range(3000):
            if executor.warm_slot("pk") is not None:
                break
            await asyncio.sleep(0.01)
        nxt = make_spec(workspace, LOOK, task_id="pn", files={"params.json": NEXT_SECRET})
        await executor.prepare(nxt)
        (copy,) = prepared(executor)
        assert (copy / "params.json").read_text() == NEXT_SECRET
        (copy / "made-ahead").write_text("")  # tells the copy used apart from a fresh one
        (executor.work_dir("pk") / "go").write_text("")
        seen = record(await running)
        assert seen == {"found": [], "ready": False, "beside": ["pk"]}
        after = record(await executor.run(nxt))
        assert slot_of(executor, "pn") == slot_of(executor, "pk")
        assert after == {
            "params": NEXT_SECRET,
            "work": ["data.txt", "made-ahead", "p0.py", "params.json", "pk.py", "pn.py"],
            "beside": ["pn"],  # nothing the trial before left in the slot
        }
        assert prepared(executor) == []

    async def test_a_copy_not_used_or_of_a_cancelled_trial_is_removed(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        await executor.run(make_spec(workspace, "pass", task_id="c0"))
        old = make_spec(workspace, LOOK, task_id="ca", files={"params.json": "old"})
        await executor.prepare(old)
        assert len(prepared(executor)) == 1
        # The trial starts with other parameters than the copy was made with.
        new = TrialSpec(**{**vars(old), "files": {"params.json": "new"}})
        assert record(await executor.run(new))["params"] == "new"
        assert prepared(executor) == []
        # A queued trial cancelled before it starts, once its copy is made or while it is.
        for task_id in ("cb", "cc"):
            spec = make_spec(workspace, LOOK, task_id=task_id, files={"params.json": "x"})
            making = asyncio.create_task(executor.prepare(spec))
            if task_id == "cb":
                await making
                assert len(prepared(executor)) == 1
            else:
                await asyncio.sleep(0)  # the copy has begun in its thread
            await executor.unprepare(task_id)
            await making
            assert prepared(executor) == []

    async def test_a_restart_or_close_leaves_no_copy_behind(
        self, bwrap: None, workspace: Path, tmp_path: Path, home: Path
    ) -> None:
        root = tmp_path / "restart"
        first = SandboxExecutor(root, hidden_paths=[home])
        await first.prepare(make_spec(workspace, LOOK, task_id="r1", files={"a": "1"}))
        assert len(prepared(first)) == 1
        # The daemon stopped without closing (killed); the next one starts on the same root.
        second = SandboxExecutor(root, hidden_paths=[home])
        assert prepared(second) == []
        await second.prepare(make_spec(workspace, LOOK, task_id="r2", files={"a": "2"}))
        assert len(prepared(second)) == 1
        await second.close()
        assert prepared(second) == []
        await first.close()
