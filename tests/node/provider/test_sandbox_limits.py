"""Hostile trials against the sandbox's limits, in real bubblewrap with real processes.

Each test is a trial that tries to hurt the provider or its other tenants (fill RAM
through /dev/shm, fork without end, allocate or write past its share, reach kernel
interfaces no trial needs, open GPUs it did not lease) and checks from the host that
it was held. Each attempt is itself bounded, so on a sandbox without the limit the
test fails instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from market.catalog import lookup
from node.daemon import nvidia_device_nodes
from node.provider.executor import ResourceLimits, TrialOutcome, TrialSpec, TrialState
from node.provider.inventory import DetectedGpu, DeviceDecl, build_inventory
from node.provider.sandbox import SandboxExecutor

ROOT = os.geteuid() == 0


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


@pytest.fixture
def executor(bwrap: None, tmp_path: Path) -> SandboxExecutor:
    return SandboxExecutor(tmp_path / "trials", hidden_paths=[tmp_path / "home"])


def make_spec(workspace: Path, code: str, *args: str, **fields: Any) -> TrialSpec:
    (workspace / "trial.py").write_text(textwrap.dedent(code))
    fields.setdefault("timeout_s", 60)
    return TrialSpec(
        task_id="t1", argv=[sys.executable, "trial.py", *args], workspace=workspace, **fields
    )


def record(outcome: TrialOutcome) -> dict[str, Any]:
    """The last JSON object the trial printed."""
    assert outcome.metric_history, outcome.log_path.read_text()
    return outcome.metric_history[-1]


def work_bytes(outcome: TrialOutcome) -> int:
    """Disk blocks the trial's work directory holds."""
    total = 0
    for dirpath, _, files in os.walk(outcome.log_path.parent / "work"):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class TestDevices:
    async def test_dev_shm_holds_no_more_than_its_cap(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # /dev/shm was a directory of bwrap's /dev, a tmpfs of half the machine's RAM.
        cap = ResourceLimits().shm_bytes
        assert cap is not None
        code = """
        import json, os, sys
        from contextlib import suppress
        cap = int(sys.argv[1])
        written = 0
        chunk = b"x" * (1 << 20)
        result = "ok"
        try:
            with open("/dev/shm/fill", "wb") as f:
                while written < cap + (64 << 20):
                    written += f.write(chunk)
                    f.flush()
        except OSError as exc:
            result = type(exc).__name__
        with suppress(OSError):
            os.unlink("/dev/shm/fill")
        try:
            open("/dev/planted", "w").close()
            planted = "ok"
        except OSError as exc:
            planted = type(exc).__name__
        print(json.dumps({"written": written, "result": result, "planted": planted}))
        """
        outcome = await executor.run(make_spec(workspace, code, str(cap)))
        got = record(outcome)
        assert got["result"] == "OSError"  # ENOSPC
        assert got["written"] <= cap
        assert got["planted"] == "OSError"  # /dev itself is read-only

    async def test_only_leased_gpus_are_visible(
        self, bwrap: None, tmp_path: Path, workspace: Path
    ) -> None:
        if not ROOT:
            pytest.skip("making fake device nodes (mknod) needs root")
        dev = tmp_path / "dev"
        dev.mkdir()
        null = os.makedev(1, 3)  # the fake GPUs behave as /dev/null
        names = [f"nvidia{n}" for n in range(4)]
        names += ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"]
        for name in names:
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, null)
            os.chmod(dev / name, 0o666)  # as the NVIDIA driver makes them (NVreg_DeviceFileMode)
        model = lookup("H100-SXM")
        gpus = [
            DetectedGpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", 80 << 30, model.name, minor=i)
            for i in range(4)
        ]
        decl = DeviceDecl(model="H100-SXM", count=4, price_floor=1)
        inventory = build_inventory([decl], detected=gpus)
        leased = ("gpu1", "gpu3")
        nodes = nvidia_device_nodes(inventory, leased, dev_root=dev)
        executor = SandboxExecutor(tmp_path / "trials", hidden_paths=[], device_root=dev)
        code = """
        import json, os
        seen = sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))
        with open("/dev/nvidia1", "wb") as f:
            f.write(b"usable")
        print(json.dumps({"seen": seen}))
        """
        outcome = await executor.run(make_spec(workspace, code, device_nodes=nodes))
        assert record(outcome)["seen"] == [
            "nvidia-modeset",
            "nvidia-uvm",
            "nvidia-uvm-tools",
            "nvidia1",
            "nvidia3",
            "nvidiactl",
        ]


class TestProcesses:
    async def test_fork_bomb_is_bounded_even_for_a_root_provider(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # RLIMIT_NPROC alone does nothing for uid 0, and this machine's CI runs as root.
        code = """
        import json, os, signal, sys, time
        started, error = 0, None
        children = []
        for _ in range(int(sys.argv[1])):
            try:
                pid = os.fork()
            except OSError as exc:
                error = type(exc).__name__
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
            started += 1
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        print(json.dumps({"started": started, "error": error, "uid": os.getuid()}))
        """
        limits = ResourceLimits(max_processes=16)
        outcome = await executor.run(make_spec(workspace, code, "64", limits=limits))
        got = record(outcome)
        assert got["error"] == "BlockingIOError"  # EAGAIN
        assert got["started"] < 16
        assert got["uid"] != 0

    async def test_defaults_bound_open_files_processes_and_priority(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        code = """
        import json, os, resource
        print(json.dumps({
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
            "nice": os.nice(0),
            "oom_score_adj": int(open("/proc/self/oom_score_adj").read()),
        }))
        """
        outcome = await executor.run(make_spec(workspace, code))
        defaults = ResourceLimits()
        assert record(outcome) == {
            "nofile": defaults.open_files,
            "nproc": defaults.max_processes,
            "nice": 10,  # the daemon keeps its CPU...
            "oom_score_adj": 500,  # ...and its memory: the OOM killer takes a trial first
        }


class TestMemoryAndDisk:
    async def test_memory_of_all_processes_together_is_capped(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # Four workers of 96 MiB each: every one under the cap, together far over it.
        code = """
        import os, sys, time
        for _ in range(3):
            if os.fork() == 0:
                break
        block = bytearray(96 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        print("allocated", flush=True)
        time.sleep(30)
        print("survived", flush=True)
        """
        limits = ResourceLimits(trial_memory_bytes=256 << 20)
        outcome = await executor.run(make_spec(workspace, code, limits=limits))
        log = outcome.log_path.read_bytes()
        assert outcome.state is TrialState.FAILED
        assert b"survived" not in log
        assert b"trial stopped: memory" in log

    async def test_a_memory_mapped_dataset_is_not_counted_as_memory(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # Page cache the kernel can drop: killing the trial for it would be a false alarm.
        code = """
        import mmap, time
        size = 192 << 20
        with open("dataset.bin", "wb") as f:
            f.truncate(size)
        with open("dataset.bin", "rb") as f:
            data = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            total = sum(data[i] for i in range(0, size, 4096))  # every page resident
            time.sleep(1.5)  # several looks of the watch
        print("done", total, flush=True)
        """
        limits = ResourceLimits(trial_memory_bytes=128 << 20)
        outcome = await executor.run(make_spec(workspace, code, limits=limits))
        assert outcome.state is TrialState.SUCCEEDED, outcome.log_path.read_text()

    async def test_work_directory_is_held_to_its_disk_quota(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        # Many files, each far below the per-file cap (RLIMIT_FSIZE): only a quota of
        # the whole directory stops this. The attempt stops itself at 1 GiB.
        code = """
        import os
        chunk = b"x" * (1 << 20)
        for n in range(1024):
            with open(f"fill-{n}", "wb") as f:
                f.write(chunk)
        print("filled", flush=True)
        """
        limits = ResourceLimits(disk_bytes=32 << 20, max_file_bytes=4 << 20)
        outcome = await executor.run(make_spec(workspace, code, limits=limits))
        log = outcome.log_path.read_bytes()
        assert outcome.state is TrialState.FAILED
        assert b"filled" not in log
        assert b"disk limit" in log
        assert work_bytes(outcome) < 1 << 30
        executor.discard("t1")


#: System call numbers (asm/unistd.h) of the two architectures CI and providers run.
SYSCALLS = {
    "x86_64": {
        "io_uring_setup": 425,
        "ptrace": 101,
        "personality": 135,
        "unshare": 272,
        "keyctl": 250,
        "bpf": 321,
        "userfaultfd": 323,
        "mount": 165,
    },
    "aarch64": {
        "io_uring_setup": 425,
        "ptrace": 117,
        "personality": 92,
        "unshare": 97,
        "keyctl": 219,
        "bpf": 280,
        "userfaultfd": 282,
        "mount": 40,
    },
}


class TestSeccomp:
    async def test_kernel_interfaces_no_trial_needs_are_refused(
        self, executor: SandboxExecutor, workspace: Path
    ) -> None:
        numbers = SYSCALLS.get(platform.machine())
        if numbers is None:
            pytest.skip(f"no system call table for {platform.machine()} in this test")
        code = """
        import ctypes, errno, json, os, sys
        nr = json.loads(sys.argv[1])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def call(name, *args):
            ctypes.set_errno(0)
            result = libc.syscall(nr[name], *[ctypes.c_long(a) for a in args])
            return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        print(json.dumps({
            "io_uring_setup": call("io_uring_setup", 4, ctypes.addressof(params)),
            "ptrace_pid1": call("ptrace", 16, 1, 0, 0),  # PTRACE_ATTACH to the sandbox's init
            "personality": call("personality", 0x0040000),  # ADDR_NO_RANDOMIZE
            "unshare_user": call("unshare", 0x10000000),
            "keyctl": call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID, the user keyring
            "bpf": call("bpf", 0, 0, 0),
            "userfaultfd": call("userfaultfd", 0),
            "mount": call("mount", 0, 0, 0, 0, 0),
        }))
        pid = os.fork()  # what trials do need still works
        if pid == 0:
            os._exit(7)
        print(json.dumps({"child": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}))
        """
        outcome = await executor.run(make_spec(workspace, code, json.dumps(numbers)))
        assert record(outcome) == {"child": 7}
        refused = outcome.metric_history[0]
        assert refused == dict.fromkeys(refused, "EPERM")

    def test_the_filters_compiled_in_a_child_are_libseccomps_own(self, tmp_path: Path) -> None:
        # The daemon compiles in a child (no libseccomp in the daemon); what it writes
        # must be the very program libseccomp compiles here, for each variant.
        from node.provider import seccomp

        for extra in ((), seccomp.WARM_REFUSED):
            path = tmp_path / f"filter{len(extra)}.bpf"
            seccomp.write_filter(path, extra)
            assert path.read_bytes() == seccomp.compile_filter(extra)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_a_compiler_that_cannot_run_is_a_clear_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        from node.provider import seccomp

        monkeypatch.setattr(seccomp, "_compiled", {})
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
        with pytest.raises(seccomp.SeccompUnavailableError, match="cannot run the seccomp"):
            seccomp.write_filter(tmp_path / "f.bpf")
        assert not (tmp_path / "f.bpf").exists()


def test_supervisor_is_a_module_of_its_own() -> None:
    """The supervisor is bound into sandboxes alone: it may import nothing of Mercato."""
    import ast

    import node.provider.supervisor

    tree = ast.parse(Path(node.provider.supervisor.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for alias in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])
    }
    assert "os" in imported  # the walk saw the imports...
    assert not imported & {"node", "market", "protocol"}  # ...and none of Mercato
