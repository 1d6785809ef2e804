"""The default executor: each trial is a local process inside a bubblewrap sandbox.

Tenant code is untrusted. :class:`SandboxExecutor` runs it so that it cannot read
the provider's key, see other trials, write outside its own directory, reach the
network (unless allowed), or outlive its timeout.

Layout under ``root_dir`` (mode 0700)::

    .seccomp.bpf        the compiled seccomp filter (node.provider.seccomp), written at start
    .seccomp-warm.bpf   the same with mq_open refused, for warm sandboxes
    <task_id>/          mode 0700, recreated fresh for every run of the task
        work/           a copy of the workspace: the trial's cwd and HOME, writable
                        (owned by ``trial_uid`` when the provider runs as root)
        output.log      the trial's output within the cap
    .warm-<n>/          a warm sandbox's slot (see "Warm sandboxes" below), bound in it
        <task_id>/      the running trial's work dir, the slot's only entry
    .ready/<n>/         a queued trial's work dir, copied before it starts (``prepare``)

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
  runs with its installed packages) and the ``mercato_trial`` package (for
  :func:`mercato_trial.report`), plus any ``ro_paths`` the provider shares (datasets);
* fresh ``/proc``; a minimal, read-only ``/dev`` (plus ``spec.device_nodes``, looked
  up under ``device_root`` on the host) with a ``/dev/shm`` tmpfs of
  ``limits.shm_bytes`` (bwrap's own ``/dev`` is a writable tmpfs of half the RAM); a
  private ``/tmp`` tmpfs of ``limits.tmp_bytes``;
* the trial's ``work/`` bound read-write at its own path, as cwd; the rest of the
  root is remounted read-only, so the trial writes only to ``work/`` and ``/tmp``.

Hidden paths (the provider home, ``MERCATO_HOME``, and ``root_dir`` itself) are
never exposed: bwrap builds the root in an empty tmpfs, so binding only the trial's
directory under them shows nothing else of them; if a hidden path lies under a
bound path it is covered by an empty read-only tmpfs (and a needed path under it,
say a venv inside the home, is bound again on top).

bwrap runs with new user, pid, net, ipc, uts and cgroup namespaces (the network
only shared when the spec asks and the executor allows it), ``--cap-drop ALL``,
``--die-with-parent``, ``--new-session`` (no terminal injection), ``--clearenv``
and the seccomp filter of :mod:`node.provider.seccomp` (io_uring, ptrace, keyrings, bpf,
mounts, new namespaces... refused; the list and the reasons are there). The
environment is ``PATH``, ``LANG``, ``USER``/``LOGNAME`` (``trial``), then
``spec.env``, then ``HOME`` (the work dir), ``TMPDIR``, ``PYTHONUNBUFFERED=1``,
then ``spec.device_env``.

Who the trial is: run by a non-root provider, bwrap maps the provider's user into
the sandbox (``--unshare-user --disable-userns``). Run by root, the trial would be
uid 0 on the host, for which the kernel ignores RLIMIT_NPROC: it runs as
``trial_uid`` instead (default :data:`DEFAULT_TRIAL_UID`), in a user namespace the
supervisor makes, and its work dir is chowned to that uid. If this host cannot make
the namespace, the executor logs why and trials run as root without a process cap.

Supervisor: we do not exec the trial (or bwrap) directly but :mod:`node.provider.supervisor`,
a module that imports nothing of Mercato, run as ``python -I -S supervisor.py``
and spawned with ``os.posix_spawn``, which is safe in a threaded process, unlike
``preexec_fn``. It sets the rlimits, asks for SIGKILL when the provider dies,
closes inherited descriptors, makes itself a child subreaper, forks the command at
niceness :data:`TRIAL_NICE` and OOM score :data:`TRIAL_OOM_SCORE_ADJ`, reaps every
process of the trial until none is left, watches its memory and disk, then exits
with the command's status. Inside the sandbox the same file (bound alone,
read-only) runs first as ``supervisor.py enter``: it sets RLIMIT_NPROC, becomes
``trial_uid`` when there is one, and executes the trial.

Limits (``spec.limits``, :class:`node.provider.executor.ResourceLimits`; the defaults are
for strangers' code):

* processes and threads: RLIMIT_NPROC, set inside the sandbox's user namespace,
  where the kernel counts it per trial (per namespace), and enforced as root too
  because the trial is then ``trial_uid``. Unsandboxed it counts every process of
  the provider's user, and nothing for root;
* memory of all the trial's processes together (anonymous and shared memory,
  proportionally: see node.provider.supervisor.memory_used) and disk used under its work
  dir: watched by the supervisor, which kills the trial and says why in its log when
  one is exceeded. A watch polls: a trial can overshoot by what it allocates or
  writes in one interval (0.1 s at first, then 0.5 s);
  ``memory_bytes`` (RLIMIT_AS) is the kernel-enforced bound per process, and a
  cgroup ``MemoryMax=`` around the daemon the hard one for all trials together;
* per process: RLIMIT_AS (``memory_bytes``), RLIMIT_FSIZE, RLIMIT_NOFILE
  (``open_files``), RLIMIT_CPU, RLIMIT_CORE always 0;
* RAM-backed ``/tmp`` and ``/dev/shm``: tmpfs sizes (bwrap ``--size``; a bwrap too
  old for it gets no ``/dev/shm`` at all).

Warm sandboxes: a trial whose spec has a ``warm_key`` (the provider passes the lease
id) runs in a sandbox kept for the next trial with the same key and the same sandbox
shape (devices, network, limits, the variables that shape an interpreter's start), one
per lease slot (:class:`_Warm`). The supervisor and bwrap run as above, but inside,
``supervisor.py warm`` does what ``enter`` does (capabilities dropped, ``trial_uid``,
RLIMIT_NPROC) and then stays as the *runner*: non-dumpable, a child subreaper, talking
to the daemon over a socketpair (descriptor 5) that only the daemon holds the other end
of. Per trial the daemon empties the slot directory (bound read-write into the sandbox
in place of ``<task_id>/work``) and copies the workspace into a fresh ``<task_id>/`` in
it, then sends argv, environment and work dir with the write end of the trial's own
output pipe (SCM_RIGHTS). The runner passes them to the trial's child (forked ahead,
once the last trial was cleaned up, every other descriptor closed), which
execs the command, or, for ``python script.py`` under the runner's interpreter, runs
the script in place (no new interpreter; node.provider.supervisor.run_script). When the
trial's main process ends the runner kills every other process in the pid namespace,
reaps them all (its rusage is the trial's), empties ``/tmp`` and ``/dev/shm``, checks
that no process, SysV IPC object or change to its own priority or affinity is left,
and answers; the daemon then moves everything the trial left in the slot out to
``<task_id>/slot/`` (removed with the trial's log by ``discard``), so an idle slot is
empty. Any doubt (an unclean answer, no answer, a timeout or cancel, a tripped
limit) closes the sandbox; the next trial starts a new one. Idle ones close after
:data:`WARM_IDLE_S`, with their lease (``lease_close``) or with the executor
(``close``). docs/operators.md says what a warm sandbox does not isolate (one pid and
IPC namespace across a lease's trials, one uid, one hash seed).

Prepared work dirs: the provider queues the next trial of a slot while the current
one runs, and ``prepare`` copies the queued trial's workspace (with its files) then,
into ``.ready/`` under ``root_dir``, which no sandbox sees (``root_dir`` is hidden, and
a sandbox binds only its own slot). When the trial starts in a warm sandbox whose slot
is empty, its copy moves in with one ``rename`` on the event loop: no copy and no hop
to a thread between one trial's end and the next one's start. A copy made for other
files or another workspace than the trial starts with, or into a slot that is not
empty, is not used (the trial copies afresh, as without one). A copy is removed when
its trial will not run (``unprepare``, which the provider calls for a queued task that
is cancelled), when the executor closes, and when it starts (a daemon that stopped
leaves none behind).

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
:class:`node.provider.executor.OutputCollector` (cap and metrics rules are documented there):
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
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import mercato_trial
from market.lifecycle import TrialState
from node.config import DEFAULT_WARM_PRELOAD
from node.home import resolve_home
from node.provider import seccomp, supervisor
from node.provider.executor import (
    InvalidTrialSpecError,
    MetricsCallback,
    NetworkNotAllowedError,
    OutputCallback,
    OutputCollector,
    TrialAlreadyRunningError,
    TrialOutcome,
    TrialSpec,
)
from protocol.errors import MercatoError

logger = logging.getLogger(__name__)

WORK_DIR = "work"
LOG_FILE = "output.log"
#: Where the supervisor writes the trial's exit status when a launcher started it.
STATUS_FILE = "status"
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

#: Trials run at this CPU niceness: a trial that keeps every core busy still leaves the
#: daemon (heartbeats, other tenants' requests) the CPU it needs.
TRIAL_NICE = 10
#: Trials' oom_score_adj (-1000..1000): when memory runs out, on the host or in a cgroup
#: such as the systemd unit's MemoryMax=, the kernel kills a trial before the daemon.
TRIAL_OOM_SCORE_ADJ = 500
#: When the daemon runs as root, trials run as this uid on the host (see
#: node.provider.supervisor): above systemd's container range (up to 1879048191) and below
#: 2^31, so no login user, container or tool that reads uids as signed ints meets it.
DEFAULT_TRIAL_UID = 2_000_000_000
_SUPERVISOR = os.path.abspath(supervisor.__file__)
#: An idle warm sandbox is closed after this many seconds without a trial.
WARM_IDLE_S = 30.0
#: At most this many warm sandboxes wait idle at once (the longest idle closes first).
MAX_WARM_IDLE = 64
#: The runner's answer is a small JSON object; anything longer is a broken runner.
_MAX_REPLY = 1 << 16
#: Under ``root_dir``: queued trials' work dirs, copied ahead (:meth:`SandboxExecutor.prepare`).
READY_DIR = ".ready"
#: Under a warm trial's own dir once it ended: what it left in its slot (moved out).
SLOT_LEFT = "slot"
#: A slot holding more entries than this after a trial is emptied in a thread when the
#: next one starts, not moved out entry by entry on the event loop.
_MAX_MOVED = 16
#: Control nodes every CUDA process opens, besides the /dev/nvidiaN of its own GPUs.
NVIDIA_CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


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
    perms: bool = False
    userns_fd: bool = False


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
        perms="--perms" in help_text,
        userns_fd="--userns " in help_text,
    )


@functools.cache
def probe_trial_uid(uid: int) -> str | None:
    """Why trials cannot run as ``uid`` here (None: they can); root only.

    Runs the supervisor's own user-namespace setup once, in a short subprocess.
    """
    if os.geteuid() != 0:
        return "the daemon is not root (trials run as its own user)"
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", _SUPERVISOR, "probe", str(uid)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run the supervisor: {exc}"
    if done.returncode != 0:
        return done.stderr.strip() or f"user namespace setup failed (exit {done.returncode})"
    return None


def _has_pidfd() -> bool:
    """Whether this kernel has pidfd_open (5.3+), which a warm sandbox is watched with."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _absolute(path: str | Path) -> str:
    return os.path.abspath(os.fspath(path))


@dataclass
class _Running:
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Prepared:
    """A queued trial's work dir, copied ahead into ``.ready/`` (``done`` once complete)."""

    path: Path
    workspace: Path
    files: dict[str, str]
    done: bool = False


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
        trial_uid: int | None = DEFAULT_TRIAL_UID,
        device_root: Path | str = "/dev",
        warm: bool = True,
        warm_preload: Sequence[str] = DEFAULT_WARM_PRELOAD,
    ) -> None:
        self.root_dir = Path(_absolute(root_dir))
        #: Modules each warm runner imports for its Python trials (supervisor.preload).
        self.warm_preload = list(warm_preload)
        self._device_root = _absolute(device_root)
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
        # Copies prepared for trials of an earlier run of the daemon: none will start.
        _remove_tree(self.root_dir / READY_DIR)
        self._ready: dict[str, _Prepared] = {}
        self._ready_seq = 0
        self._seccomp: str | None = None
        self._seccomp_warm: str | None = None
        self._warm_idle: list[_Warm] = []
        self._warm_seq = 0
        self._warm_dirs: dict[str, tuple[Path, Path]] = {}  # task id -> (slot, work dir)
        self.trial_uid: int | None = None
        if self._bwrap is not None:
            # A name no task id can take (they never start with a dot).
            self._seccomp = str(self.root_dir / ".seccomp.bpf")
            try:
                seccomp.write_filter(self._seccomp)
                if warm and self.supports_warm and _has_pidfd():
                    self._seccomp_warm = str(self.root_dir / ".seccomp-warm.bpf")
                    seccomp.write_filter(self._seccomp_warm, seccomp.WARM_REFUSED)
            except seccomp.SeccompUnavailableError as exc:
                raise SandboxUnavailableError(
                    f"{exc}; trials never run in a sandbox without a seccomp filter"
                ) from exc
            if trial_uid is not None and os.geteuid() == 0:
                why = probe_trial_uid(trial_uid)
                if not (self._bwrap.perms and self._bwrap.userns_fd):
                    why = f"{self._bwrap.path} is too old (no --perms or --userns)"
                if why is None:
                    self.trial_uid = trial_uid
                else:
                    logger.warning(
                        "trials run as root on this host, so their process limit is not "
                        "enforced: %s",
                        why,
                    )

    #: Whether this executor may keep a sandbox warm across trials (a subclass that
    #: launches the supervisor elsewhere, such as a Slurm step, may not).
    supports_warm: ClassVar[bool] = True

    @property
    def sandboxed(self) -> bool:
        """Whether trials run inside bubblewrap."""
        return self._bwrap is not None

    @property
    def warm(self) -> bool:
        """Whether trials with a ``warm_key`` reuse a warm sandbox (see :class:`_Warm`)."""
        return self._seccomp_warm is not None

    async def run(
        self,
        spec: TrialSpec,
        on_output: OutputCallback | None = None,
        on_metrics: MetricsCallback | None = None,
    ) -> TrialOutcome:
        """Run ``spec`` to its end; see node.provider.executor for the contract."""
        if spec.network and not self.allow_network:
            raise NetworkNotAllowedError("this provider does not give trials network access")
        if spec.task_id in self._running:
            raise TrialAlreadyRunningError(f"trial {spec.task_id} is already running")
        if not spec.workspace.is_dir():
            raise InvalidTrialSpecError(f"workspace {spec.workspace} is not a directory")
        running = _Running()
        self._running[spec.task_id] = running
        try:
            if self.warm and spec.warm_key is not None:
                return await self._run_warm(spec, running, on_output, on_metrics)
            trial_dir = await asyncio.to_thread(self._prepare, spec)
            return await self._run(spec, trial_dir, running, on_output, on_metrics)
        finally:
            del self._running[spec.task_id]
            running.done.set()
            # A copy prepared for a trial that could not start (its sandbox failed to).
            ready = self._ready.pop(spec.task_id, None)
            if ready is not None and ready.done:
                await asyncio.to_thread(_remove_tree, ready.path)

    async def cancel(self, task_id: str) -> bool:
        """Kill a running trial's process tree; returns once its ``run`` has finished."""
        running = self._running.get(task_id)
        if running is None:
            return False
        running.cancel.set()
        await running.done.wait()
        return True

    def discard(self, task_id: str) -> None:
        """Delete a finished trial's directory (work dir and log) once it is shipped.

        A warm trial's work dir is in its sandbox's slot, which the next trial there
        empties before it starts (or closing the sandbox removes): not removed here,
        where it would race that next trial's start.
        """
        if task_id in self._running:
            raise TrialAlreadyRunningError(f"trial {task_id} is still running")
        self._warm_dirs.pop(task_id, None)
        _remove_tree(self.root_dir / task_id)

    def work_dir(self, task_id: str) -> Path:
        """Where a trial works: its DiLoCo mailbox (node/provider/sync.py) lives there."""
        warm = self._warm_dirs.get(task_id)
        return warm[1] if warm is not None else self.root_dir / task_id / WORK_DIR

    def warm_slot(self, task_id: str) -> str | None:
        """The warm sandbox a trial ran in (its slot's name), until ``discard``; None for a
        trial in a sandbox of its own. Two trials with the same name shared a sandbox."""
        warm = self._warm_dirs.get(task_id)
        return None if warm is None else warm[0].name

    async def lease_open(self, lease_id: str, device_ids: Sequence[str]) -> None:
        """Nothing to hold up front: a warm sandbox starts with a lease's first trial."""

    async def lease_close(self, lease_id: str) -> None:
        """Close the lease's idle warm sandboxes (a running trial's closes when it ends)."""
        for w in self._take_idle(lambda w: w.warm_key == lease_id):
            await self._retire(w)

    async def close(self) -> None:
        """Close every idle warm sandbox and drop prepared copies (the daemon's stop)."""
        idle, self._warm_idle = self._warm_idle, []
        for w in idle:
            await self._retire(w)
        self._ready.clear()
        with contextlib.suppress(OSError):  # a copy still being made (a cancelled prepare)
            await asyncio.to_thread(_remove_tree, self.root_dir / READY_DIR)

    async def prepare(self, spec: TrialSpec) -> None:
        """Copy the work dir of a trial that will start soon, before it starts.

        For a trial that would run in a warm sandbox (see "Prepared work dirs" in the
        module docstring); a no-op otherwise, or when the trial runs or is prepared
        already. The copy is taken by ``run`` if the spec's workspace and files are
        the same; a copy that fails is dropped (the trial's own start copies again and
        says why).
        """
        if not (self.warm and spec.warm_key is not None):
            return
        if spec.task_id in self._ready or spec.task_id in self._running:
            return
        self._ready_seq += 1
        entry = _Prepared(
            self.root_dir / READY_DIR / str(self._ready_seq), spec.workspace, dict(spec.files)
        )
        self._ready[spec.task_id] = entry
        try:
            await asyncio.to_thread(self._copy_ready, spec, entry.path)
            if self._ready.get(spec.task_id) is entry:
                entry.done = True
                return
        except Exception as exc:
            logger.info("no prepared work dir for %s: %s", spec.task_id, exc)
        # Failed, or its trial started (copying for itself) or was unprepared meanwhile.
        if self._ready.get(spec.task_id) is entry:
            del self._ready[spec.task_id]
        await asyncio.to_thread(_remove_tree, entry.path)

    async def unprepare(self, task_id: str) -> None:
        """Remove what ``prepare`` copied for a trial that will not start here."""
        entry = self._ready.pop(task_id, None)
        if entry is not None and entry.done:
            await asyncio.to_thread(_remove_tree, entry.path)
        # Not done: prepare sees its entry gone when the copy ends, and removes it.

    def _copy_ready(self, spec: TrialSpec, path: Path) -> None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self._copy_workspace(spec, path)

    def _prepare(self, spec: TrialSpec) -> Path:
        trial_dir = self.root_dir / spec.task_id
        _remove_tree(trial_dir)
        trial_dir.mkdir(mode=0o700)
        self._copy_workspace(spec, trial_dir / WORK_DIR)
        if not self.sandboxed:
            (trial_dir / "tmp").mkdir(mode=0o700)
        return trial_dir

    def _copy_workspace(self, spec: TrialSpec, work: Path) -> None:
        """The trial's own copy of the workspace, with ``spec.files`` written over it."""
        shutil.copytree(spec.workspace, work, symlinks=True, copy_function=_copy_regular)
        for name, text in spec.files.items():
            target = work / name
            # A link or directory of that name in the workspace is replaced, never followed.
            if target.is_symlink() or target.exists():
                _remove_tree(target)
            target.write_text(text)
        # The trial runs without CAP_DAC_OVERRIDE even as root: its cwd must be its own.
        work.chmod(0o700)
        if self.trial_uid is not None:
            _chown_tree(work, self.trial_uid)

    def _env(self, spec: TrialSpec, work: str, tmp: str) -> dict[str, str]:
        env = {"PATH": f"{os.path.dirname(sys.executable)}:{_PATH}", "LANG": "C.UTF-8"}
        # getpass.getuser() (used by torch and others) fails for a uid without a passwd entry.
        env.update({"USER": "trial", "LOGNAME": "trial"})
        env.update(spec.env)
        env.update({"HOME": work, "TMPDIR": tmp, "PYTHONUNBUFFERED": "1"})
        env.update(spec.device_env)
        return env

    def _bwrap_argv(
        self,
        spec: TrialSpec,
        work: str,
        env: dict[str, str],
        warm: dict[str, Any] | None = None,
    ) -> list[str]:
        """bwrap's command line for ``spec``; with ``warm``, a runner's (``work`` its slot)."""
        probe = self._bwrap
        assert probe is not None
        assert probe.path is not None
        limits = spec.limits
        args: list[str] = [probe.path]
        if self.trial_uid is not None:
            # The user namespace the supervisor made (uid 0 and trial_uid mapped); the
            # capabilities added here are only what `supervisor.py enter` needs to
            # become trial_uid, and it drops them all.
            args += ["--userns", str(supervisor.USERNS_FD)]
            args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
            if not spec.network:
                args.append("--unshare-net")
            args += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
                args += ["--cap-add", cap]
        else:
            args.append("--unshare-all")
            if spec.network:
                args.append("--share-net")
            if probe.disable_userns:
                args += ["--unshare-user", "--disable-userns"]
            args += ["--cap-drop", "ALL"]
        args += ["--die-with-parent", "--new-session"]
        if self._seccomp is not None or warm is not None:
            args += ["--seccomp", str(supervisor.SECCOMP_FD)]
        # Read-only /proc: the trial may be uid 0 outside the sandbox (a provider run as
        # root), and a root-owned, writable /proc/sys/kernel/core_pattern would let it
        # run code on the host; bwrap only covers what it finds writable by mode.
        args += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        # bwrap makes the missing parents of a mount point 0700, which trial_uid could
        # not pass through: those are made first, 0755 (a no-op where they exist).
        made: set[str] = {"/", "/dev", "/proc", "/tmp"}
        for node in spec.device_nodes:
            host = os.path.join(self._device_root, os.path.relpath(node, "/dev"))
            args += [*self._parents(node, made), "--dev-bind", host, node]
        # bwrap's /dev is a tmpfs of half the RAM, /dev/shm a directory in it: the
        # whole /dev becomes read-only, and /dev/shm a tmpfs of its own, capped (or,
        # with a bwrap that cannot size a tmpfs, none at all).
        args += ["--remount-ro", "/dev"]
        perms = ["--perms", "1777"] if probe.perms else []
        if probe.tmpfs_size and limits.shm_bytes is not None:
            args += [*perms, "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm"]
        if probe.tmpfs_size and limits.tmp_bytes is not None:
            args += ["--size", str(limits.tmp_bytes)]
        args += [*perms, "--tmpfs", "/tmp"]

        needed: list[str] = ["/usr"]
        for top in _TOP_LEVEL:
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                needed.append(top)
        needed += [p for p in (*_ETC, *_SYS) if os.path.lexists(p)]
        for path in (sys.prefix, sys.base_prefix, *self._ro_paths, _trial_package_dir()):
            needed += [_absolute(path), os.path.realpath(path)]
        needed.append(_SUPERVISOR)
        args += self._mounts(needed, made)

        # The root bwrap built is a tmpfs: read-only, so the trial writes only to its
        # work dir and /tmp, the places that are cleaned up and bounded.
        args += [*self._parents(work, made), "--bind", work, work]
        args += ["--remount-ro", "/", "--clearenv"]
        if self.trial_uid is None:
            args += ["--chdir", work]  # else trial_uid's own dir, entered once we are it
        for key, value in env.items():
            args += ["--setenv", key, value]
        enter = {"uid": self.trial_uid, "cwd": work, "limits": _sandbox_rlimits(spec)}
        if warm is not None:
            enter.update(warm, cwd="/")
            return [
                *args,
                "--",
                *(sys.executable, "-I", "-S", _SUPERVISOR, "warm", json.dumps(enter)),
            ]
        return [
            *args,
            "--",
            *(sys.executable, "-I", "-S", _SUPERVISOR, "enter", json.dumps(enter)),
            *spec.argv,
        ]

    def _parents(self, dest: str, made: set[str]) -> list[str]:
        """``--dir`` for each parent of ``dest`` not made yet, readable by trial_uid."""
        if self.trial_uid is None:
            return []
        out: list[str] = []
        parts = Path(dest).parent.parts
        for depth in range(2, len(parts) + 1):
            parent = os.path.join(*parts[:depth])
            if parent not in made:
                made.add(parent)
                out += ["--perms", "0755", "--dir", parent]
        return out

    def _mounts(self, needed: list[str], made: set[str]) -> list[str]:
        """Read-only binds of ``needed``, with every hidden path under them covered."""
        binds: list[str] = []
        for path in sorted(set(needed), key=len):
            if not any(_is_under(path, kept) for kept in binds):
                binds.append(path)
        args: list[str] = []
        for path in binds:
            if path in self._hidden:
                raise SandboxUnavailableError(f"{path} is both needed by trials and hidden")
            args += [*self._parents(path, made), "--ro-bind", path, path]
            made.add(path)
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
                args += [*self._parents(path, made), "--ro-bind", path, path]
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
            launcher, launch_env = self._launcher(spec)
            proc = _Process.spawn(
                command,
                env,
                work,
                spec,
                collector,
                skip,
                sandboxed=self.sandboxed,
                seccomp_path=self._seccomp,
                trial_uid=self.trial_uid,
                launcher=launcher,
                launch_env=launch_env,
            )
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

    # --- warm sandboxes --------------------------------------------------------------

    async def _run_warm(
        self,
        spec: TrialSpec,
        running: _Running,
        on_output: OutputCallback | None,
        on_metrics: MetricsCallback | None,
    ) -> TrialOutcome:
        """Run ``spec`` in a warm sandbox of its key: an idle one of the same spec or a new one."""
        key, base_env, python = self._warm_shape(spec)
        w = await self._take_warm(spec, key, base_env, python)
        keep = False
        trial_dir = self.root_dir / spec.task_id
        try:
            ready = self._ready.pop(spec.task_id, None)
            moved = self._move_in(spec, ready, w.slot) if ready is not None else None
            if moved is not None:
                work = moved
            else:
                stale = ready.path if ready is not None and ready.done else None
                work = await asyncio.to_thread(self._prepare_warm, spec, w.slot, stale)
            self._warm_dirs[spec.task_id] = (w.slot, work)
            env = self._env(spec, str(work), "/tmp")
            log_path = trial_dir / LOG_FILE
            with log_path.open("wb") as log:
                collector = OutputCollector(log, spec.max_output_bytes, on_output, on_metrics)
                if running.cancel.is_set():
                    keep = True
                    return self._outcome(spec, TrialState.CANCELLED, None, collector, log_path)
                end = await w.run_trial(
                    spec,
                    env,
                    str(work),
                    _script_index(spec.argv, env, python),
                    collector,
                    running.cancel,
                    self.kill_grace_s,
                )
                keep = end.keep
                collector.close()
                return self._outcome(spec, end.state, end, collector, log_path)
        finally:
            if keep:
                keep = self._vacate(w.slot, trial_dir, spec.task_id)
            if keep:
                w.idle_since = time.monotonic()
                self._warm_idle.append(w)
                while len(self._warm_idle) > MAX_WARM_IDLE:
                    await self._retire(self._warm_idle.pop(0))
            else:
                await self._retire(w)

    def _warm_shape(self, spec: TrialSpec) -> tuple[tuple[Any, ...], dict[str, str], str | None]:
        """A warm sandbox's key for ``spec``, the runner's environment and interpreter.

        The runner starts with the provider's variables and those that shape how an
        interpreter starts (locale, time zone, PYTHON*): only those make its key. The
        rest (a sweep's seed, the trial's devices) comes with each trial.
        """
        trial_env = self._env(spec, "/", "/tmp")
        base_env = {k: v for k, v in trial_env.items() if k in _RUNNER_VARS or _shapes_start(k)}
        python = _runner_python(spec.argv, trial_env)
        key = (
            spec.warm_key,
            tuple(sorted((k, v) for k, v in base_env.items() if _shapes_start(k))),
            spec.device_nodes,
            spec.network,
            spec.limits,
            python,
        )
        return key, base_env, python

    async def warm_up(self, specs: Sequence[TrialSpec]) -> None:
        """Start warm sandboxes for trials like ``specs`` (one each) before they come.

        The provider calls it with one spec per slot of a lease while the tenant
        uploads the workspace, in the shape the lease's trials most likely have (the
        provider's environment, ``python3``, no network): the first trials find their
        sandboxes started (their runners preloading already) instead of starting them.
        Sandboxes of this lease only, like any other (``warm_key``); one whose shape no
        trial has is closed when a trial of another shape starts under the lease, with
        the lease, or after :data:`WARM_IDLE_S`. A no-op without warm sandboxes, and
        for as many of a shape as wait idle already.
        """
        if not self.warm:
            return
        shapes: dict[tuple[Any, ...], tuple[TrialSpec, dict[str, str], str | None, int]] = {}
        for spec in specs:
            if spec.warm_key is None:
                continue
            key, base_env, python = self._warm_shape(spec)
            n = shapes[key][3] if key in shapes else 0
            shapes[key] = (shapes[key][0] if key in shapes else spec, base_env, python, n + 1)
        for key, (spec, base_env, python, wanted) in shapes.items():
            for _ in range(wanted - sum(1 for w in self._warm_idle if w.key == key)):
                w = await self._spawn_warm(spec, key, base_env, python, preload_now=True)
                self._warm_idle.append(w)
        while len(self._warm_idle) > MAX_WARM_IDLE:
            await self._retire(self._warm_idle.pop(0))

    async def _take_warm(
        self, spec: TrialSpec, key: tuple[Any, ...], env: dict[str, str], python: str | None
    ) -> _Warm:
        now = time.monotonic()
        for w in self._take_idle(lambda w: w.exited.done() or now - w.idle_since > WARM_IDLE_S):
            await self._retire(w)
        for w in self._warm_idle:
            if w.key == key:
                self._warm_idle.remove(w)
                return w
        # The same lease with another spec (env, devices, limits): never reused now.
        for w in self._take_idle(lambda w: w.warm_key == spec.warm_key):
            await self._retire(w)
        return await self._spawn_warm(spec, key, env, python)

    def _take_idle(self, which: Callable[[_Warm], bool]) -> list[_Warm]:
        """Idle sandboxes ``which`` picks, out of the idle list at once (no await between
        choosing and taking: trials starting together must not take one twice)."""
        taken: list[_Warm] = []
        kept: list[_Warm] = []
        for w in self._warm_idle:
            (taken if which(w) else kept).append(w)
        self._warm_idle = kept
        return taken

    async def _spawn_warm(
        self,
        spec: TrialSpec,
        key: tuple[Any, ...],
        env: dict[str, str],
        python: str | None,
        *,
        preload_now: bool = False,
    ) -> _Warm:
        """A new warm sandbox; its runner preloads at once with ``preload_now`` (started
        ahead of its first trial), else once that trial runs (see supervisor.serve)."""
        self._warm_seq += 1
        slot = self.root_dir / f".warm-{self._warm_seq}"
        await asyncio.to_thread(self._make_slot, slot)
        assert self._seccomp_warm is not None
        cfg = {
            "python": python,
            "scratch": ["/tmp", "/dev/shm"],
            "preload": self.warm_preload,
            "preload_now": preload_now,
        }
        command = self._bwrap_argv(spec, str(slot), env, cfg)
        return _Warm.spawn(
            command, env, slot, spec, key, python, self._seccomp_warm, self.trial_uid
        )

    def _make_slot(self, slot: Path) -> None:
        _remove_tree(slot)  # one left by an earlier run of the daemon
        slot.mkdir(mode=0o700)
        if self.trial_uid is not None:
            os.chown(slot, self.trial_uid, self.trial_uid)

    async def _retire(self, w: _Warm) -> None:
        """Close a warm sandbox and remove its slot (the last trial's work dir)."""
        w.close()
        await asyncio.to_thread(_remove_tree, w.slot)

    def _prepare_warm(self, spec: TrialSpec, slot: Path, stale: Path | None = None) -> Path:
        """The trial's log dir, and its fresh work dir (returned), alone in the emptied slot.

        ``stale``: a prepared copy that was not used, removed here.
        """
        if stale is not None:
            _remove_tree(stale)
        trial_dir = self.root_dir / spec.task_id
        _remove_tree(trial_dir)
        trial_dir.mkdir(mode=0o700)
        # The trial owned the slot: whatever it left there or did to it is undone.
        self._own_slot(slot)
        for entry in os.scandir(slot):
            _remove_tree(Path(entry.path))
        work = slot / spec.task_id
        self._copy_workspace(spec, work)
        return work

    def _own_slot(self, slot: Path) -> None:
        """Undo what a trial did to its slot's mode (it owned the slot)."""
        slot.chmod(0o700)
        if self.trial_uid is not None:
            os.chown(slot, self.trial_uid, self.trial_uid)

    def _move_in(self, spec: TrialSpec, ready: _Prepared, slot: Path) -> Path | None:
        """The trial's prepared copy renamed into its empty slot (on the event loop: a
        few system calls); None when it cannot be used and the trial copies afresh."""
        if not ready.done or ready.workspace != spec.workspace or ready.files != spec.files:
            return None
        trial_dir = self.root_dir / spec.task_id
        work = slot / spec.task_id
        try:
            trial_dir.mkdir(mode=0o700)  # exists: a run before of this id, cleaned in a thread
            self._own_slot(slot)
            with os.scandir(slot) as entries:
                if next(entries, None) is not None:
                    return None  # the last trial's leftovers are emptied in a thread
            os.rename(ready.path, work)
        except OSError as exc:
            logger.info("prepared work dir for %s not used: %s", spec.task_id, exc)
            return None
        return work

    def _vacate(self, slot: Path, trial_dir: Path, task_id: str) -> bool:
        """Move what a finished trial left in its slot out, under its own dir (which
        ``discard`` removes), so the next trial's copy can move into an empty slot.

        Renames on the event loop, a few system calls for a trial that left only its
        work dir; what cannot be moved (more entries than :data:`_MAX_MOVED`, a
        directory the trial made unwritable) stays for the next trial's start to empty
        in a thread, as without a prepared copy. False: the slot itself cannot be put
        right, and the sandbox closes.
        """
        try:
            self._own_slot(slot)
        except OSError as exc:
            logger.info("warm sandbox %s: cannot take its slot back: %s", slot.name, exc)
            return False
        left = trial_dir / SLOT_LEFT
        try:
            with os.scandir(slot) as it:
                entries = [e.name for _, e in zip(range(_MAX_MOVED + 1), it, strict=False)]
            if not entries or len(entries) > _MAX_MOVED:
                return True
            left.mkdir(mode=0o700)
            for name in entries:
                os.rename(slot / name, left / name)
                if name == task_id and task_id in self._warm_dirs:
                    self._warm_dirs[task_id] = (slot, left / task_id)
        except OSError as exc:
            logger.info("warm sandbox %s: %s left for the next start: %s", slot.name, task_id, exc)
        return True

    def _launcher(self, spec: TrialSpec) -> tuple[list[str], dict[str, str]]:
        """A command that starts the supervisor elsewhere (e.g. ``srun ...``) and its env.

        Empty here: the supervisor is the daemon's own child. A cluster backend
        (node.provider.slurm) returns its launcher, so the supervisor, bwrap and the trial run
        exactly as here, only on the backend's node.
        """
        return [], {}

    def _outcome(
        self,
        spec: TrialSpec,
        state: TrialState,
        proc: _Process | _Ended | None,
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


def _trial_package_dir() -> str:
    # Only mercato_trial (the report helper) is bound into the sandbox, not node/.
    return os.path.dirname(os.path.abspath(mercato_trial.__file__))


def _rlimits(spec: TrialSpec, sandboxed: bool) -> list[tuple[str, int, int]]:
    """Per-process limits the supervisor sets before it starts bwrap (or the trial)."""
    limits = spec.limits
    out: list[tuple[str, int, int]] = [("RLIMIT_CORE", 0, 0)]
    if limits.memory_bytes is not None:
        out.append(("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes))
    if limits.max_processes is not None and not sandboxed:
        out.append(("RLIMIT_NPROC", limits.max_processes, limits.max_processes))
    if limits.max_file_bytes is not None:
        out.append(("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes))
    if limits.open_files is not None:
        out.append(("RLIMIT_NOFILE", limits.open_files, limits.open_files))
    if limits.cpu_seconds is not None:
        # SIGXCPU at the soft limit lets the trial save its state; SIGKILL 5 s later
        # (setrlimit(2): the hard limit kills).
        out.append(("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 5))
    return out


def _sandbox_rlimits(spec: TrialSpec) -> list[tuple[str, int, int]]:
    """Limits set inside the sandbox's user namespace, where the kernel counts them per trial."""
    n = spec.limits.max_processes
    return [] if n is None else [("RLIMIT_NPROC", n, n)]


def _chown_tree(root: Path, uid: int) -> None:
    """Give the trial's uid its work dir (links themselves, never what they point to)."""
    os.chown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


class _Process:
    """One spawned trial: its supervisor's pid (also its process group), output and exit."""

    def __init__(self, pid: int, read_fd: int, started: float, collector: OutputCollector) -> None:
        self.pid = pid
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
        self._output = _Pipe(read_fd, collector)
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
        *,
        sandboxed: bool,
        seccomp_path: str | None = None,
        trial_uid: int | None = None,
        launcher: Sequence[str] = (),
        launch_env: dict[str, str] | None = None,
    ) -> _Process:
        """Start ``command`` under the supervisor, in a new session, output piped.

        With a ``launcher`` (argv prefix), that is what is spawned here, with
        ``launch_env``; it starts the supervisor (with ``env``) where it runs, so the
        supervisor cannot check its parent's pid.
        """
        usage = os.path.join(os.path.dirname(cwd.rstrip("/")), "usage")
        config = json.dumps(
            {
                "parent": None if launcher else os.getpid(),
                "cwd": cwd,
                "limits": _rlimits(spec, sandboxed),
                "skip": skip,
                "usage": usage,
                "status": os.path.join(os.path.dirname(usage), STATUS_FILE) if launcher else None,
                "seccomp": seccomp_path,
                "trial_uid": trial_uid,
                "nice": TRIAL_NICE,
                "oom_score_adj": TRIAL_OOM_SCORE_ADJ,
                "memory_bytes": spec.limits.trial_memory_bytes,
                "disk_bytes": spec.limits.disk_bytes,
                "disk_path": cwd,
            }
        )
        argv = [*launcher, sys.executable, "-I", "-S", _SUPERVISOR, config, *command]
        read_fd, write_fd = os.pipe()
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                {**env, **(launch_env or {})} if launcher else env,
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
        cancel_wait = asyncio.create_task(cancel.wait())  # ended in the finally below
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

    async def drain(self) -> None:
        """Read what is left of the output after the exit, for at most ``_DRAIN_S``."""
        await self._output.drain()

    def close(self) -> None:
        """Stop watching the pipe and the pidfd and release them."""
        self._output.close()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poller is not None:
            self._poller.cancel()
        if not self._exited.done():
            self._exited.cancel()


# --- warm sandboxes ----------------------------------------------------------------


#: The variables a warm runner starts with besides those of :func:`_shapes_start`.
_RUNNER_VARS = ("PATH", "USER", "LOGNAME", "HOME", "TMPDIR")


def _shapes_start(name: str) -> bool:
    """Whether an environment variable changes how a Python interpreter starts."""
    return name.startswith(("PYTHON", "LC_")) or name in ("LANG", "LANGUAGE", "TZ")


def _runner_python(argv: Sequence[str], env: dict[str, str]) -> str | None:
    """The interpreter a warm runner runs under so it can start Python trials itself.

    The trial's own interpreter (``python3``, or ``/usr/bin/env python3``, found on its
    PATH) when that is this daemon's Python; None (the runner only execs) when the
    tenant sets any PYTHON* variable (they change how an interpreter starts, and the
    runner's start must be the provider's alone) or the command is something else.
    """
    if any(k.startswith("PYTHON") and k != "PYTHONUNBUFFERED" for k in env):
        return None
    first = _interpreter_at(argv, env)
    if first is None:
        return None
    exe = shutil.which(argv[first], path=env.get("PATH"))
    if exe is None or os.path.realpath(exe) != os.path.realpath(sys.executable):
        return None
    return os.path.abspath(exe)


def _interpreter_at(argv: Sequence[str], env: dict[str, str]) -> int | None:
    """Index of the command proper: 1 after a bare ``/usr/bin/env``, else 0."""
    if os.path.basename(argv[0]) != "env":
        return 0
    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None or os.path.realpath(exe) not in ("/usr/bin/env", "/bin/env"):
        return None
    return 1 if len(argv) > 1 and not argv[1].startswith("-") and "=" not in argv[1] else None


def _script_index(argv: Sequence[str], env: dict[str, str], python: str | None) -> int | None:
    """Index of the script when ``argv`` is ``python SCRIPT ARGS`` under the runner's Python."""
    if python is None:
        return None
    first = _interpreter_at(argv, env)
    if first is None or first + 1 >= len(argv):
        return None
    exe = shutil.which(argv[first], path=env.get("PATH"))
    script = argv[first + 1]
    if exe is None or os.path.abspath(exe) != python or not script or script.startswith("-"):
        return None
    return first + 1


@dataclass
class _Ended:
    """How a trial on a warm sandbox ended; ``keep``: the sandbox may take another."""

    state: TrialState
    exit_code: int | None
    wall_ms: int
    cpu_ms: int
    max_rss_bytes: int
    keep: bool


def _read_available(fd: int) -> bytes | None:
    """What a non-blocking pipe holds now: None if nothing yet, ``b""`` at its end (a
    read error ends it too)."""
    try:
        return os.read(fd, _READ_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class _Pipe:
    """A trial's output pipe on the event loop, fed to its collector (both the cold
    path's ``_Process`` and a warm sandbox's trials read their output through it)."""

    def __init__(self, fd: int, collector: OutputCollector) -> None:
        self._fd = fd
        self._collector = collector
        self._loop = asyncio.get_running_loop()
        self._eof: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        data = _read_available(self._fd)
        if data is None:
            return
        if not data:
            self._loop.remove_reader(self._fd)
            if not self._eof.done():
                self._eof.set_result(None)
        else:
            self._collector.feed(data)

    async def drain(self) -> None:
        """Wait for the end of output (every holder gone), for at most ``_DRAIN_S``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._eof), _DRAIN_S)

    def close(self) -> None:
        if not self._eof.done():
            self._loop.remove_reader(self._fd)
            self._eof.cancel()
        os.close(self._fd)


class _Warm:
    """One warm sandbox: a supervisor, bubblewrap and the runner inside, kept across trials.

    The provider holds one end of a socketpair; the runner (node.provider.supervisor,
    :func:`~node.provider.supervisor.serve`) the other, on descriptor 5, which no trial
    inherits. Per trial the provider sends argv, environment and work dir, with the
    write end of the trial's own output pipe; the runner answers with the trial's exit
    status, rusage and whether the sandbox is clean for another trial. The supervisor's
    own output (bwrap's errors, a tripped memory or disk watch) goes to the trial
    running at the time. Any doubt closes the sandbox.
    """

    def __init__(
        self,
        pid: int,
        sock: socket.socket,
        log_fd: int,
        slot: Path,
        key: tuple[Any, ...],
        warm_key: str | None,
    ) -> None:
        self.pid = pid
        self.sock = sock
        self.slot = slot
        self.key = key
        self.warm_key = warm_key
        self.idle_since = time.monotonic()
        self.collector: OutputCollector | None = None
        self.exit_code: int | None = None
        self._log_fd = log_fd
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._closed = False
        os.set_blocking(log_fd, False)
        self._loop.add_reader(log_fd, self._log_readable)
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._pidfd_readable)

    @classmethod
    def spawn(
        cls,
        command: list[str],
        env: dict[str, str],
        slot: Path,
        spec: TrialSpec,
        key: tuple[Any, ...],
        python: str | None,
        seccomp_path: str,
        trial_uid: int | None,
    ) -> _Warm:
        """Start the supervisor, bwrap and the runner for trials like ``spec``."""
        config = json.dumps(
            {
                "parent": os.getpid(),
                "cwd": str(slot),
                "limits": _rlimits(spec, True),
                "skip": 2,
                "usage": os.devnull,
                "status": None,
                "seccomp": seccomp_path,
                "trial_uid": trial_uid,
                "nice": TRIAL_NICE,
                "oom_score_adj": TRIAL_OOM_SCORE_ADJ,
                "memory_bytes": spec.limits.trial_memory_bytes,
                # The slot holds only the running trial's work dir.
                "disk_bytes": spec.limits.disk_bytes,
                "disk_path": str(slot),
                "control": True,
            }
        )
        argv = [sys.executable, "-I", "-S", _SUPERVISOR, config, *command]
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_fd, write_fd = os.pipe()
        # dup2 onto the same number would keep close-on-exec: never pass fd 5 as is.
        control = os.dup(theirs.fileno()) if theirs.fileno() == supervisor.CONTROL_FD else -1
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_fd, 1),
                    (os.POSIX_SPAWN_DUP2, write_fd, 2),
                    (
                        os.POSIX_SPAWN_DUP2,
                        control if control >= 0 else theirs.fileno(),
                        supervisor.CONTROL_FD,
                    ),
                ],
                setsid=True,
            )
        except BaseException:
            os.close(read_fd)
            mine.close()
            raise
        finally:
            os.close(write_fd)
            theirs.close()
            if control >= 0:
                os.close(control)
        mine.setblocking(False)
        logger.debug("warm sandbox %s started (runner python %s)", slot.name, python)
        return cls(pid, mine, read_fd, slot, key, spec.warm_key)

    def _log_readable(self) -> None:
        data = _read_available(self._log_fd)
        if data is None:
            return
        if not data:
            self._loop.remove_reader(self._log_fd)
        elif self.collector is not None:
            self.collector.feed(data)
        else:
            logger.info("warm sandbox %s: %s", self.slot.name, data[:500])

    def _pidfd_readable(self) -> None:
        self._loop.remove_reader(self._pidfd)
        if not self.exited.done():
            self.exited.set_result(None)

    async def run_trial(
        self,
        spec: TrialSpec,
        env: dict[str, str],
        work: str,
        script: int | None,
        collector: OutputCollector,
        cancel: asyncio.Event,
        grace_s: float,
    ) -> _Ended:
        """Run one trial here; on any doubt the caller closes the sandbox (``keep`` false)."""
        request = json.dumps(
            {"argv": list(spec.argv), "env": env, "cwd": work, "script": script}
        ).encode()
        out_r, out_w = os.pipe()
        pipe = _Pipe(out_r, collector)
        self.collector = collector
        started = time.monotonic()
        state: TrialState | None = None
        reply: dict[str, Any] | None = None
        try:
            try:
                await asyncio.wait_for(
                    self._send(len(request).to_bytes(4, "big") + request, out_w), spec.timeout_s
                )
            finally:
                os.close(out_w)
            answer = asyncio.create_task(self._reply())  # awaited or cancelled below
            cancelled = asyncio.create_task(cancel.wait())
            try:
                waiters: list[asyncio.Future[Any]] = [answer, self.exited, cancelled]
                await asyncio.wait(
                    waiters, timeout=spec.timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not answer.done() and not self.exited.done():
                    state = TrialState.CANCELLED if cancel.is_set() else TrialState.TIMED_OUT
                    # To the supervisor, which passes it on to the trial's processes; the
                    # runner ignores it, reaps the trial and still answers with its usage.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGTERM)
                    await asyncio.wait(
                        waiters[:2], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
                    )
                if answer.done() and not answer.cancelled():
                    if answer.exception() is None:
                        reply = answer.result()
                    else:
                        logger.info(
                            "warm sandbox %s: no answer: %r", self.slot.name, answer.exception()
                        )
            finally:
                answer.cancel()
                cancelled.cancel()
            wall_ms = round((time.monotonic() - started) * 1000)
            if reply is not None:
                await pipe.drain()
        finally:
            pipe.close()
        if reply is not None and reply.get("preload_failed"):
            logger.warning(
                "warm sandbox %s: %s", self.slot.name, "; ".join(reply["preload_failed"])
            )
        why = None if reply is None else reply["unclean"]
        keep = reply is not None and state is None and why is None and not self.exited.done()
        if why is not None:
            logger.info("warm sandbox %s closes: %s", self.slot.name, why)
        if not keep:
            self.close()  # reaps the supervisor: its status stands for a runner that died
        self.collector = None
        if reply is None:
            return _Ended(
                state or TrialState.FAILED,
                self.exit_code,
                wall_ms,
                0,
                0,
                keep=False,
            )
        status = int(reply["status"])
        # The runner's word, bounded by what the trial's wall time allows on this host.
        cpu_ms = min(round(reply["cpu_s"] * 1000), wall_ms * (os.cpu_count() or 1))
        return _Ended(
            state or (TrialState.SUCCEEDED if status == 0 else TrialState.FAILED),
            status,
            wall_ms,
            max(0, cpu_ms),
            int(reply["maxrss_kib"]) * 1024,
            keep=keep,
        )

    async def _send(self, data: bytes, fd: int) -> None:
        # The descriptor rides on the first bytes; the rest (a long argv) follows.
        sent = socket.send_fds(self.sock, [data], [fd])
        if sent < len(data):
            await self._loop.sock_sendall(self.sock, data[sent:])

    async def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = await self._loop.sock_recv(self.sock, n - len(buf))
            if not part:
                raise EOFError("the runner closed its socket")
            buf += part
        return buf

    async def _reply(self) -> dict[str, Any]:
        size = int.from_bytes(await self._recv_exact(4), "big")
        if size > _MAX_REPLY:
            raise ValueError(f"the runner's answer is {size} bytes")
        reply = json.loads(await self._recv_exact(size))
        if not (
            isinstance(reply, dict)
            and type(reply.get("status")) is int
            and 0 <= reply["status"] <= 255
            and type(reply.get("cpu_s")) in (int, float)
            and reply["cpu_s"] >= 0
            and type(reply.get("maxrss_kib")) is int
            and reply["maxrss_kib"] >= 0
            and (reply.get("unclean") is None or isinstance(reply["unclean"], str))
            and isinstance(reply.get("preload_failed", []), list)
            and all(isinstance(x, str) for x in reply.get("preload_failed", []))
        ):
            raise ValueError("the runner's answer is malformed")
        return reply

    def close(self) -> None:
        """Kill the whole sandbox and reap its supervisor (fast: SIGKILL, then wait4)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        _, status, _ = os.wait4(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.exit_code = 128 - code if code < 0 else code
        # What the supervisor said last (a tripped watch) still reaches the trial.
        with contextlib.suppress(OSError):
            while data := os.read(self._log_fd, _READ_CHUNK):
                if self.collector is not None:
                    self.collector.feed(data)
        self._loop.remove_reader(self._log_fd)
        self._loop.remove_reader(self._pidfd)
        os.close(self._log_fd)
        os.close(self._pidfd)
        if not self.exited.done():
            self.exited.cancel()
