"""The default executor: each trial is a local process inside a bubblewrap sandbox.

Tenant code is untrusted. :class:`SandboxExecutor` runs it so that it cannot read
the provider's key, see other trials, write outside its own directory, reach the
network (unless allowed), or outlive its timeout.

Layout under ``root_dir`` (mode 0700)::

    <task_id>/          mode 0700, recreated fresh for every run of the task
        work/           a copy of the workspace: the trial's cwd and HOME, writable
        output.log      the trial's output within the cap

The workspace is **copied**, not bind-mounted: trials write checkpoints and results
next to their code, and each trial of a sweep must start from the same pristine
files. Workspaces are bounded (node.workspace caps them at 64 MiB), so the copy is
cheap. Symlinks are copied as links, never followed (a link to the provider's key
would otherwise be copied as the key), and anything that is not a regular file,
directory or link is refused. The log is kept *beside* ``work/``, not in it, so the
trial cannot swap it for a link that the provider later reads and ships.

Inside bubblewrap (``bwrap``) the trial sees a new root built from:

* read-only binds of ``/usr`` (and ``/bin``, ``/lib``... as binds or the same
  symlinks as the host), a few files of ``/etc`` (dynamic linker cache, TLS roots,
  name service, passwd/group: never ``/etc/shadow``), the Python installation
  (``sys.prefix``, ``sys.base_prefix`` and their real paths, so ``sys.executable``
  runs with its installed packages) and the ``node`` package (for
  :func:`node.trial.report`), plus any ``ro_paths`` the provider shares (datasets);
* fresh ``/proc``, a minimal ``/dev`` (plus ``spec.device_nodes``), a private
  ``/tmp`` tmpfs of ``limits.tmp_bytes``;
* the trial's ``work/`` bound read-write at its own path, as cwd; the rest of the
  root is remounted read-only, so the trial writes only to ``work/`` and ``/tmp``.

Hidden paths (the provider home, ``MERCATO_HOME``, and ``root_dir`` itself) are
never exposed: bwrap builds the root in an empty tmpfs, so binding only the trial's
directory under them shows nothing else of them; if a hidden path lies under a
bound path it is covered by an empty read-only tmpfs (and a needed path under it,
say a venv inside the home, is bound again on top).

bwrap runs with ``--unshare-all`` (user, pid, net, ipc, uts, cgroup namespaces; the
network only with ``--share-net`` when the spec asks and the executor allows it),
``--disable-userns``, ``--cap-drop ALL``, ``--die-with-parent``, ``--new-session``
(no terminal injection) and ``--clearenv``: the environment is ``PATH``, ``LANG``,
then ``spec.env``, then ``HOME`` (the work dir), ``TMPDIR``,
``PYTHONUNBUFFERED=1``, then ``spec.device_env``.

Supervisor: we do not exec the trial (or bwrap) directly but a small supervisor
(``_SUPERVISOR``, run as ``python -I -S``) spawned with ``os.posix_spawn``, which is
safe in a threaded process, unlike ``preexec_fn``. It sets the rlimits, resets
SIGPIPE/SIGXFSZ, asks for SIGKILL when the provider dies, closes inherited
descriptors, makes itself a child subreaper, forks the command and reaps every
process of the trial until none is left, then exits with the command's status.

Limits (setrlimit(2)): RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_CPU from
``spec.limits``, RLIMIT_CORE always 0. Caveat: RLIMIT_NPROC counts every process of
the user, not of the trial, and the kernel does not apply it to root (bwrap maps
root in the sandbox to root outside, so ``--unshare-user`` does not help then); a
provider that needs a hard process cap runs as a dedicated user or adds a cgroup
``pids.max``. Files are bounded one by one (RLIMIT_FSIZE), not in total:
``root_dir`` belongs on a volume with a quota.

Stopping: on timeout or cancel the supervisor gets SIGTERM and passes it to every
process of the trial (not to bwrap, whose death would tear the sandbox down at
once), so a trial can save its state; after ``kill_grace_s`` the supervisor's
process group (supervisor, bwrap or the unsandboxed trial) gets SIGKILL. Nothing
outlives the trial: in the sandbox bwrap's pid namespace ends with it, taking
every process, daemonised or not (``--die-with-parent`` and the supervisor's
parent-death signal cover a provider that dies). Unsandboxed, processes left behind
are orphans that the subreaper adopts and kills when the trial's command exits,
including ones that called setsid(); only a trial that ignores SIGTERM until the
SIGKILL can leave such an escaped process behind, one more reason for the sandbox.

Output: stdout and stderr share one pipe, read without blocking and fed to
:class:`node.executor.OutputCollector` (cap and metrics rules are documented there):
past the cap the trial keeps running and its output is drained and dropped, so it
neither blocks nor fills the disk or memory; its timeout ends it.

Usage: ``wait4(2)`` on the supervisor gives the rusage of the supervisor and of
everything it reaped, which is the whole trial (bwrap's pid 1 reaps the sandbox's
processes and is reaped by the supervisor in turn), and nothing else: concurrent
trials never blur each other, unlike ``getrusage(RUSAGE_CHILDREN)``, which sums all
of the provider's children. A trial stopped with SIGTERM is still counted in full;
one that needed the SIGKILL is under-counted (the kernel reaps a dying pid
namespace without accounting). ``max_rss_bytes`` is the largest resident set of any
one process of the trial (at least the supervisor's, about 10 MB).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.executor import (
    InvalidTrialSpecError,
    MetricsCallback,
    NetworkNotAllowedError,
    OutputCallback,
    OutputCollector,
    TrialAlreadyRunningError,
    TrialOutcome,
    TrialSpec,
    TrialState,
)
from node.home import resolve_home
from protocol.errors import MercatoError

logger = logging.getLogger(__name__)

WORK_DIR = "work"
LOG_FILE = "output.log"
DEFAULT_KILL_GRACE_S = 2.0
#: After the trial has exited, how long its output pipe may stay open (held by an
#: escaped descendant) before we stop reading it.
_DRAIN_S = 1.0
_READ_CHUNK = 64 * 1024

#: /etc entries a typical Python trial needs. Never /etc/shadow, nor /etc/ssl or
#: /etc/pki whole: their private/ dirs hold the host's TLS keys, which a trial that is
#: uid 0 on the host (a provider run as root) could read.
_ETC = (
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/gai.conf",
    "/etc/group",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/passwd",
    "/etc/pki/ca-trust",
    "/etc/pki/tls/cert.pem",
    "/etc/pki/tls/certs",
    "/etc/protocols",
    "/etc/resolv.conf",
    "/etc/services",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/timezone",
)
_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: CPU topology, read by OpenMP/BLAS to size thread pools.
_SYS = ("/sys/devices/system/cpu",)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The trial's supervisor, run as ``python -I -S`` (fast, immune to the env): it sets
# the rlimits, becomes a child subreaper, forks the command, reaps every process of
# the trial and exits with the command's status (128 + N for signal N). Reaping
# everything is what makes wait4() on it account for the whole trial. SIGTERM to it
# is forwarded to each process of the trial, skipping the first ``skip`` levels
# (bwrap and its pid 1, whose death would tear the sandbox down at once, and with
# it the processes' CPU accounting and their chance to save state).
_SUPERVISOR = r"""
import json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
except Exception:
    libc = None
def prctl(option, value):
    if libc is not None:
        libc.prctl(option, value, 0, 0, 0)
prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: die with the provider
prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the trial come to us
if os.getppid() != cfg["parent"]:
    os._exit(125)
for name, soft, hard in cfg["limits"]:
    kind = getattr(resource, name)
    cur_hard = resource.getrlimit(kind)[1]
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(kind, (soft, hard))
os.chdir(cfg["cwd"])
os.closerange(3, max(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
def children(pid):
    out = []
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return out
def forward(signum, frame):
    stack = [(c, 1) for c in children(os.getpid())]
    while stack:
        pid, depth = stack.pop()
        if depth > cfg["skip"]:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        stack.extend((c, depth + 1) for c in children(pid))
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    try:
        prctl(1, int(signal.SIGKILL))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write("mercato: cannot run %r: %s\n" % (argv[0], exc.strerror))
        sys.stderr.flush()
    os._exit(127)
code = None
while True:
    try:
        died, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if died == pid:
        code = os.waitstatus_to_exitcode(status)
    if code is not None:
        for child in children(os.getpid()):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
# Our own ru_maxrss starts at our spawner's (posix_spawn shares its memory until exec);
# the trial's processes, forked from us after exec, are measured cleanly.
try:
    with open(cfg["usage"], "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
except OSError:
    pass
os._exit(128 - code if code < 0 else code)
"""


class SandboxUnavailableError(MercatoError):
    """bubblewrap is missing or cannot create a sandbox on this host."""

    code = "sandbox_unavailable"
    http_status = 503


@dataclass(frozen=True)
class BwrapProbe:
    """Whether bwrap works here, and which optional flags it has."""

    path: str | None
    ok: bool
    reason: str
    disable_userns: bool = False
    tmpfs_size: bool = False


@functools.cache
def probe_bwrap(path: str | None = None) -> BwrapProbe:
    """Find bwrap (``path`` or on PATH) and check that it can build a sandbox here.

    Cached: the answer does not change while the process runs. Runs a short
    subprocess, so call it at startup, not from the event loop's hot path.
    """
    exe = path or shutil.which("bwrap")
    if exe is None:
        return BwrapProbe(None, False, "bwrap is not installed (apt-get install bubblewrap)")
    try:
        help_text = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        trial = subprocess.run(
            [
                *(exe, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL"),
                *("--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"),
                *(sys.executable, "-I", "-S", "-c", "pass"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return BwrapProbe(exe, False, f"cannot run {exe}: {exc}")
    if trial.returncode != 0:
        detail = trial.stderr.strip().splitlines()[-1:] or [f"exit {trial.returncode}"]
        return BwrapProbe(exe, False, f"{exe} cannot create a sandbox here: {detail[0]}")
    return BwrapProbe(
        exe,
        True,
        "ok",
        disable_userns="--disable-userns" in help_text,
        tmpfs_size="--size" in help_text,
    )


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _absolute(path: str | Path) -> str:
    return os.path.abspath(os.fspath(path))


@dataclass
class _Running:
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class SandboxExecutor:
    """Runs trials as local processes, inside bubblewrap unless explicitly allowed not to.

    ``use_bwrap``: ``None`` detects bwrap, ``True`` requires it, ``False`` never uses
    it. Without bwrap construction fails with ``sandbox_unavailable`` unless
    ``allow_unsandboxed`` (then limits, timeout, output cap and a clean environment
    still apply, but the trial can read whatever the provider's user can, and use
    the network). ``allow_network`` lets trials that ask for it share the host
    network. ``hidden_paths`` are kept out of every sandbox (default: the provider
    home); ``ro_paths`` are shared read-only with every trial (e.g. datasets).
    """

    def __init__(
        self,
        root_dir: Path | str,
        use_bwrap: bool | None = None,
        allow_unsandboxed: bool = False,
        allow_network: bool = False,
        *,
        hidden_paths: Sequence[Path | str] | None = None,
        ro_paths: Sequence[Path | str] = (),
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        bwrap_path: str | None = None,
    ) -> None:
        self.root_dir = Path(_absolute(root_dir))
        self.allow_network = allow_network
        self.kill_grace_s = kill_grace_s
        self._bwrap: BwrapProbe | None = None
        if use_bwrap is not False:
            probe = probe_bwrap(bwrap_path)
            if probe.ok:
                self._bwrap = probe
            elif use_bwrap or not allow_unsandboxed:
                raise SandboxUnavailableError(
                    f"{probe.reason}; install bubblewrap, or set allow_unsandboxed to run "
                    "tenant code without a sandbox"
                )
        elif not allow_unsandboxed:
            raise SandboxUnavailableError(
                "running without bubblewrap was asked but allow_unsandboxed is not set; "
                "install bubblewrap or set allow_unsandboxed"
            )
        hidden = [resolve_home()] if hidden_paths is None else list(hidden_paths)
        hidden.append(self.root_dir)
        self._hidden = sorted({p for h in hidden for p in (_absolute(h), os.path.realpath(h))})
        self._ro_paths = [_absolute(p) for p in ro_paths]
        for path in ro_paths:
            if {_absolute(path), os.path.realpath(path)} & set(self._hidden):
                raise SandboxUnavailableError(f"{path} is both shared with trials and hidden")
        self._running: dict[str, _Running] = {}
        self.root_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def sandboxed(self) -> bool:
        """Whether trials run inside bubblewrap."""
        return self._bwrap is not None

    async def run(
        self,
        spec: TrialSpec,
        on_output: OutputCallback | None = None,
        on_metrics: MetricsCallback | None = None,
    ) -> TrialOutcome:
        """Run ``spec`` to its end; see node.executor for the contract."""
        if spec.network and not self.allow_network:
            raise NetworkNotAllowedError("this provider does not give trials network access")
        if spec.task_id in self._running:
            raise TrialAlreadyRunningError(f"trial {spec.task_id} is already running")
        if not spec.workspace.is_dir():
            raise InvalidTrialSpecError(f"workspace {spec.workspace} is not a directory")
        running = _Running()
        self._running[spec.task_id] = running
        try:
            trial_dir = await asyncio.to_thread(self._prepare, spec)
            return await self._run(spec, trial_dir, running, on_output, on_metrics)
        finally:
            del self._running[spec.task_id]
            running.done.set()

    async def cancel(self, task_id: str) -> bool:
        """Kill a running trial's process tree; returns once its ``run`` has finished."""
        running = self._running.get(task_id)
        if running is None:
            return False
        running.cancel.set()
        await running.done.wait()
        return True

    def discard(self, task_id: str) -> None:
        """Delete a finished trial's directory (work dir and log) once it is shipped."""
        if task_id in self._running:
            raise TrialAlreadyRunningError(f"trial {task_id} is still running")
        _remove_tree(self.root_dir / task_id)

    def _prepare(self, spec: TrialSpec) -> Path:
        trial_dir = self.root_dir / spec.task_id
        _remove_tree(trial_dir)
        trial_dir.mkdir(mode=0o700)
        work = trial_dir / WORK_DIR
        shutil.copytree(spec.workspace, work, symlinks=True, copy_function=_copy_regular)
        # The trial runs without CAP_DAC_OVERRIDE even as root: its cwd must be its own.
        work.chmod(0o700)
        if not self.sandboxed:
            (trial_dir / "tmp").mkdir(mode=0o700)
        return trial_dir

    def _env(self, spec: TrialSpec, work: str, tmp: str) -> dict[str, str]:
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{_PATH}", "LANG": "C.UTF-8"}
        env.update(spec.env)
        env.update({"HOME": work, "TMPDIR": tmp, "PYTHONUNBUFFERED": "1"})
        env.update(spec.device_env)
        return env

    def _bwrap_argv(self, spec: TrialSpec, work: str, env: dict[str, str]) -> list[str]:
        probe = self._bwrap
        assert probe is not None
        assert probe.path is not None
        args: list[str] = [probe.path, "--unshare-all"]
        if spec.network:
            args.append("--share-net")
        if probe.disable_userns:
            args += ["--unshare-user", "--disable-userns"]
        args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        # Read-only /proc: the trial may be uid 0 outside the sandbox (a provider run as
        # root), and a root-owned, writable /proc/sys/kernel/core_pattern would let it
        # run code on the host; bwrap only covers what it finds writable by mode.
        args += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        for node in spec.device_nodes:
            args += ["--dev-bind", node, node]
        if probe.tmpfs_size and spec.limits.tmp_bytes is not None:
            args += ["--size", str(spec.limits.tmp_bytes)]
        args += ["--tmpfs", "/tmp"]

        needed: list[str] = ["/usr"]
        for top in _TOP_LEVEL:
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                needed.append(top)
        needed += [p for p in (*_ETC, *_SYS) if os.path.lexists(p)]
        for path in (sys.prefix, sys.base_prefix, *self._ro_paths, _node_package_dir()):
            needed += [_absolute(path), os.path.realpath(path)]
        args += self._mounts(needed)

        # The root bwrap built is a tmpfs: read-only, so the trial writes only to its
        # work dir and /tmp, the places that are cleaned up and bounded.
        args += ["--bind", work, work, "--remount-ro", "/", "--chdir", work, "--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        return [*args, "--", *spec.argv]

    def _mounts(self, needed: list[str]) -> list[str]:
        """Read-only binds of ``needed``, with every hidden path under them covered."""
        binds: list[str] = []
        for path in sorted(set(needed), key=len):
            if not any(_is_under(path, kept) for kept in binds):
                binds.append(path)
        args: list[str] = []
        for path in binds:
            if path in self._hidden:
                raise SandboxUnavailableError(f"{path} is both needed by trials and hidden")
            args += ["--ro-bind", path, path]
        masks = [
            h
            for h in self._hidden
            if os.path.lexists(h) and any(_is_under(h, b) and h != b for b in binds)
        ]
        mask_dirs = [m for m in masks if os.path.isdir(m) and not os.path.islink(m)]
        for path in masks:
            if path in mask_dirs:
                args += ["--tmpfs", path]
            else:
                args += ["--ro-bind", "/dev/null", path]
        for path in sorted(set(needed), key=len):
            covered = any(_is_under(path, m) for m in masks)
            holds_hidden = any(_is_under(h, path) for h in self._hidden)
            if covered and not holds_hidden and os.path.exists(path):
                args += ["--ro-bind", path, path]
        # Read-only only now: bwrap had to create the mount points of the binds above.
        for path in mask_dirs:
            args += ["--remount-ro", path]
        return args

    async def _run(
        self,
        spec: TrialSpec,
        trial_dir: Path,
        running: _Running,
        on_output: OutputCallback | None,
        on_metrics: MetricsCallback | None,
    ) -> TrialOutcome:
        work = str(trial_dir / WORK_DIR)
        log_path = trial_dir / LOG_FILE
        with log_path.open("wb") as log:
            collector = OutputCollector(log, spec.max_output_bytes, on_output, on_metrics)
            if running.cancel.is_set():
                return self._outcome(spec, TrialState.CANCELLED, None, collector, log_path)
            if self.sandboxed:
                env = self._env(spec, work, "/tmp")
                command = self._bwrap_argv(spec, work, env)
            else:
                env = self._env(spec, work, str(trial_dir / "tmp"))
                command = list(spec.argv)
            # bwrap and its pid 1 stand between the supervisor and the trial.
            skip = 2 if self.sandboxed else 0
            proc = _Process.spawn(command, env, work, spec, collector, skip)
            try:
                state = await proc.supervise(spec.timeout_s, running.cancel, self.kill_grace_s)
                await proc.drain()
            except asyncio.CancelledError:
                # Stop it the orderly way, so the supervisor still reaps the whole
                # trial; only a second cancel falls back to SIGKILL and a blocking reap.
                try:
                    await proc.stop(self.kill_grace_s)
                finally:
                    proc.kill_and_reap()
                raise
            except BaseException:
                proc.kill_and_reap()
                raise
            finally:
                proc.close()
            collector.close()
            if state is None:
                state = TrialState.SUCCEEDED if proc.exit_code == 0 else TrialState.FAILED
            return self._outcome(spec, state, proc, collector, log_path)

    def _outcome(
        self,
        spec: TrialSpec,
        state: TrialState,
        proc: _Process | None,
        collector: OutputCollector,
        log_path: Path,
    ) -> TrialOutcome:
        metrics = dict(collector.metrics)
        return TrialOutcome(
            task_id=spec.task_id,
            state=state,
            exit_code=None if proc is None else proc.exit_code,
            metrics=metrics,
            metric_history=list(collector.metric_history),
            metric_value=metrics.get(spec.metric) if spec.metric else None,
            wall_ms=0 if proc is None else proc.wall_ms,
            cpu_ms=0 if proc is None else proc.cpu_ms,
            max_rss_bytes=0 if proc is None else proc.max_rss_bytes,
            output_bytes=collector.output_bytes,
            output_truncated=collector.truncated,
            log_path=log_path,
            metrics_dropped=dict(collector.dropped),
        )


def _remove_tree(path: Path) -> None:
    """Remove a trial's directory, including dirs the trial made read-only."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    path.chmod(0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            # chmod follows links: a link the trial planted must never be chmodded.
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path)


def _copy_regular(src: str, dst: str) -> Any:
    if not stat.S_ISREG(os.lstat(src).st_mode):
        raise InvalidTrialSpecError(f"workspace entry {src} is not a regular file")
    return shutil.copy2(src, dst)


def _node_package_dir() -> str:
    # The package that holds node.trial, so trials can import the report helper.
    return os.path.dirname(os.path.abspath(__file__))


def _rlimits(spec: TrialSpec) -> list[tuple[str, int, int]]:
    limits = spec.limits
    out: list[tuple[str, int, int]] = [("RLIMIT_CORE", 0, 0)]
    if limits.memory_bytes is not None:
        out.append(("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes))
    if limits.max_processes is not None:
        out.append(("RLIMIT_NPROC", limits.max_processes, limits.max_processes))
    if limits.max_file_bytes is not None:
        out.append(("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes))
    if limits.cpu_seconds is not None:
        # SIGXCPU at the soft limit lets the trial save its state; SIGKILL 5 s later
        # (setrlimit(2): the hard limit kills).
        out.append(("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 5))
    return out


class _Process:
    """One spawned trial: its supervisor's pid (also its process group), output and exit."""

    def __init__(self, pid: int, read_fd: int, started: float, collector: OutputCollector) -> None:
        self.pid = pid
        self._read_fd = read_fd
        self._collector = collector
        self._started = started
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._pidfd = -1
        self._reaped = False
        self.exit_code: int | None = None
        self.wall_ms = 0
        self.cpu_ms = 0
        self.max_rss_bytes = 0
        self.usage_path = ""
        self._eof: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(read_fd, False)
        self._loop.add_reader(read_fd, self._readable)
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._poller: asyncio.Task[None] | None = self._loop.create_task(self._poll_exit())
        else:
            self._poller = None
            self._loop.add_reader(self._pidfd, self._pidfd_readable)

    @classmethod
    def spawn(
        cls,
        command: list[str],
        env: dict[str, str],
        cwd: str,
        spec: TrialSpec,
        collector: OutputCollector,
        skip: int,
    ) -> _Process:
        """Start ``command`` under the supervisor, in a new session, output piped."""
        usage = os.path.join(os.path.dirname(cwd.rstrip("/")), "usage")
        config = json.dumps(
            {
                "parent": os.getpid(),
                "cwd": cwd,
                "limits": _rlimits(spec),
                "skip": skip,
                "usage": usage,
            }
        )
        argv = [sys.executable, "-I", "-S", "-c", _SUPERVISOR, config, *command]
        read_fd, write_fd = os.pipe()
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_fd, 1),
                    (os.POSIX_SPAWN_DUP2, write_fd, 2),
                ],
                setsid=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        proc = cls(pid, read_fd, time.monotonic(), collector)
        proc.usage_path = usage
        return proc

    # --- exit ---------------------------------------------------------------------

    def _pidfd_readable(self) -> None:
        # Readable once the process is a zombie: exited but not reaped, so its pid
        # (and process group id) cannot be reused while we still signal it.
        self._loop.remove_reader(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)

    async def _poll_exit(self) -> None:
        # Kernels before 5.3 have no pidfd: wait in a thread, without reaping (WNOWAIT).
        await asyncio.to_thread(os.waitid, os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        if not self._exited.done():
            self._exited.set_result(None)

    async def supervise(
        self, timeout_s: float, cancel: asyncio.Event, grace_s: float
    ) -> TrialState | None:
        """Wait for exit, the timeout or a cancel; ``None`` when the trial ended itself."""
        cancel_wait = asyncio.ensure_future(cancel.wait())
        waiters: list[asyncio.Future[Any]] = [self._exited, cancel_wait]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel_wait.cancel()
        state: TrialState | None = None
        if not self._exited.done():
            state = TrialState.CANCELLED if cancel.is_set() else TrialState.TIMED_OUT
        await self.stop(grace_s)
        return state

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the trial, SIGKILL its group after ``grace_s``, reap (no-op once reaped)."""
        if self._reaped:
            return
        if not self._exited.done():
            # To the supervisor only: it passes SIGTERM on to the trial's processes.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await self._exited
        # The supervisor is gone; whatever is left in its group goes too.
        self._signal(signal.SIGKILL)
        self._reap()

    def _signal(self, sig: int) -> None:
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.pid, 0)
        self._reaped = True
        self.wall_ms = round((time.monotonic() - self._started) * 1000)
        code = os.waitstatus_to_exitcode(status)
        self.exit_code = 128 - code if code < 0 else code
        self.cpu_ms = round((usage.ru_utime + usage.ru_stime) * 1000)
        self.max_rss_bytes = usage.ru_maxrss * 1024  # Linux reports KiB (getrusage(2))
        # Prefer the supervisor's own measure of the trial's processes: wait4's figure
        # includes the supervisor, whose high-water mark starts at the spawning daemon's.
        with contextlib.suppress(OSError, ValueError), open(self.usage_path) as f:
            self.max_rss_bytes = int(f.read()) * 1024

    def kill_and_reap(self) -> None:
        """Used when ``run`` is cancelled: SIGKILL the group and reap it at once."""
        if not self._reaped:
            self._signal(signal.SIGKILL)
            self._reap()

    # --- output -------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = os.read(self._read_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._read_fd)
            if not self._eof.done():
                self._eof.set_result(None)
        else:
            self._collector.feed(data)

    async def drain(self) -> None:
        """Read what is left of the output after the exit, for at most ``_DRAIN_S``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._eof), _DRAIN_S)

    def close(self) -> None:
        """Stop watching the pipe and the pidfd and release them."""
        if not self._eof.done():
            self._loop.remove_reader(self._read_fd)
            self._eof.cancel()
        os.close(self._read_fd)
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poller is not None:
            self._poller.cancel()
        if not self._exited.done():
            self._exited.cancel()
