"""The trial's supervisor: the process between the provider daemon and a trial.

Run as a script, ``python -I -S supervisor.py CONFIG COMMAND...`` (fast, immune to
the environment), never imported by a trial. It imports nothing from Mercato: the
same file is bound read-only into each sandbox on its own and runs there too (the
``enter`` step below). node.provider.sandbox spawns it with ``os.posix_spawn`` and documents
the whole picture; this module is the part that runs outside the daemon.

Outside the sandbox (``supervise``), it:

* asks for SIGKILL when the daemon dies, and becomes a child subreaper, so orphans
  of the trial come to it;
* sets the rlimits (``limits``), closes inherited descriptors and opens the ones
  bubblewrap is given by number: the seccomp program on :data:`SECCOMP_FD`, and a
  user namespace on :data:`USERNS_FD` when the trial runs as ``trial_uid``;
* forks the command (bubblewrap, or the trial itself when unsandboxed) at a lower
  CPU priority (``nice``), so the daemon keeps answering while trials compute, and
  first in line for the kernel's OOM killer (``oom_score_adj``);
* reaps every process of the trial until none is left, which is what makes
  ``wait4()`` on the supervisor account for the whole trial, and exits with the
  command's status (128 + N for signal N);
* forwards SIGTERM to each process of the trial, skipping the first ``skip`` levels
  (bubblewrap and its pid 1, whose death would tear the sandbox down at once, and
  with it the processes' CPU accounting and their chance to save state);
* watches what no rlimit bounds for the trial as a whole: the memory of all its
  processes together (``memory_bytes``, see :func:`memory_used`) and the disk used
  under its work directory (``disk_bytes``, each entry counting at least one 4 KiB
  block, so a flood of empty files counts too). Past a limit it says so on the
  trial's output and kills every process of the trial. The watch polls, so a trial
  can overshoot by what it allocates or writes in one interval (``watch_s``,
  stretched when a scan is slow).

Why a uid of its own (``trial_uid``): a provider run as root would run trials as
uid 0 on the host, and the kernel applies no ``RLIMIT_NPROC`` to uid 0, so a fork
bomb would be unbounded. The supervisor makes a user namespace that maps uid 0 and
``trial_uid`` to themselves; bubblewrap (still uid 0, so it can read and bind what
the daemon can) builds the sandbox in it and runs ``supervisor.py enter``, which
gives up every capability and becomes ``trial_uid`` before it executes the trial.
The namespace is new for each trial, so the kernel counts processes per trial.
"""

from __future__ import annotations

import sys

#: The modules of the interpreter before this file imported any: what a fresh
#: ``python script.py`` has too. A warm runner's child may shadow the others (see
#: :func:`_drop_shadowed`).
AT_START = frozenset(sys.modules)

import contextlib  # noqa: E402 (after AT_START on purpose)
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

#: Descriptor numbers bubblewrap's command line refers to (``--seccomp 3``, ``--userns 4``).
SECCOMP_FD = 3
USERNS_FD = 4
#: A warm sandbox's control socket (the provider's end of a socketpair), passed down to
#: the runner inside (see :func:`serve`).
CONTROL_FD = 5
#: Most bytes of one request to the runner (argv and env are each capped at 1 MiB-ish
#: by the trial spec; this bounds what the runner reads whatever the provider sent).
MAX_REQUEST_BYTES = 8 << 20
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWUSER = 0x10000000
_BLOCK = 4096
#: Exit status when the supervisor cannot set the trial up (distinct from 127, "no such command").
SETUP_FAILED = 125

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def _prctl(option: int, value: int) -> int:
    if _libc is None:
        return -1
    return int(_libc.prctl(option, value, 0, 0, 0))


def _say(message: str) -> None:
    """A line on the trial's output (stderr is the trial's log pipe)."""
    with contextlib.suppress(OSError):
        os.write(2, f"mercato: {message}\n".encode())


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# --- the process tree ------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, depth)`` of every process below ``pid``; depth 1 is a child."""
    found: list[tuple[int, int]] = []
    stack = [(c, 1) for c in children(pid)]
    while stack:
        child, depth = stack.pop()
        found.append((child, depth))
        stack.extend((c, depth + 1) for c in children(child))
    return found


def _kill_all(sig: int, skip: int = 0) -> None:
    for pid, depth in descendants(os.getpid()):
        if depth > skip:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


# --- watching memory and disk ----------------------------------------------------


def memory_used(pids: list[int]) -> int:
    """Bytes of memory of ``pids`` together that the kernel cannot simply reclaim.

    Their proportional anonymous and shared-memory sets (``Pss_Anon`` + ``Pss_Shmem``,
    Linux 5.9+; plain ``Pss`` before): a page shared by forked workers counts once,
    and a memory-mapped dataset (page cache, dropped under pressure) not at all.
    """
    total = 0
    for pid in pids:
        fields: dict[str, int] = {}
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in ("Pss", "Pss_Anon", "Pss_Shmem"):
                        fields[name] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            continue  # gone, or a kernel thread
        if "Pss_Anon" in fields:
            total += fields["Pss_Anon"] + fields.get("Pss_Shmem", 0)
        else:
            total += fields.get("Pss", 0)
    return total


def disk_used(root: str, stop_above: int) -> int:
    """Bytes under ``root`` (each entry at least one block), stopping once past ``stop_above``.

    Raises PermissionError for a directory the trial made unreadable to us (a
    provider not run as root): what the watch cannot see, it cannot bound.
    """
    total = 0
    stack = [root]
    while stack and total <= stop_above:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we looked
                    total += max(st.st_blocks * 512, _BLOCK)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


class Watch:
    """Checks the trial's memory and disk against its limits every ``interval`` seconds."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.memory_bytes: int | None = cfg.get("memory_bytes")
        self.disk_bytes: int | None = cfg.get("disk_bytes")
        self.disk_path: str = cfg.get("disk_path") or "."
        self.interval: float = float(cfg.get("watch_s") or 0.5)
        self.next_at = time.monotonic() + min(self.interval, 0.1)
        self.tripped = False

    @property
    def active(self) -> bool:
        """Whether there is anything to watch."""
        return not self.tripped and (self.memory_bytes is not None or self.disk_bytes is not None)

    def timeout(self) -> float | None:
        """Seconds until the next check; None when nothing is watched."""
        if not self.active:
            return None
        return max(0.0, self.next_at - time.monotonic())

    def check(self) -> str | None:
        """A reason to stop the trial, or None; schedules the next check."""
        if not self.active or time.monotonic() < self.next_at:
            return None
        started = time.monotonic()
        reason = None
        if self.memory_bytes is not None:
            used = memory_used([pid for pid, _ in descendants(os.getpid())])
            if used > self.memory_bytes:
                reason = f"memory {_mib(used)} over the trial's limit of {_mib(self.memory_bytes)}"
        if reason is None and self.disk_bytes is not None:
            try:
                used = disk_used(self.disk_path, self.disk_bytes)
            except PermissionError as exc:
                reason = f"{exc.filename} was made unreadable, so its disk use cannot be checked"
            else:
                if used > self.disk_bytes:
                    reason = (
                        f"work directory holds over {_mib(self.disk_bytes)}, the trial's disk limit"
                    )
        # A slow scan (a tree of many files) is not run back to back: at most ~10% CPU.
        spent = time.monotonic() - started
        self.next_at = time.monotonic() + max(self.interval, 10 * spent)
        if reason is not None:
            self.tripped = True
        return reason


# --- setting up ------------------------------------------------------------------


def _set_limits(limits: list[list[Any]]) -> None:
    for name, soft, hard in limits:
        kind = getattr(resource, name)
        cur_hard = resource.getrlimit(kind)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(kind, (soft, hard))


def _open_on(path: str, target: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if fd != target:
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)


def _user_namespace(uid: int, gid: int, target: int) -> None:
    """A new user namespace mapping 0 and ``uid``/``gid`` to themselves, open on ``target``.

    A child unshares and waits; we (root outside) write its maps and keep the
    namespace by opening it, then let the child go. ``setgroups`` is denied in it:
    nobody in the sandbox can add supplementary groups.
    """
    if _libc is None:
        raise OSError("no C library to call unshare()")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        failed = _libc.unshare(_CLONE_NEWUSER) != 0
        os.write(ready_w, b"x" if failed else b"k")
        os.read(go_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"k":
            raise OSError("unshare(CLONE_NEWUSER) failed")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 0 1\n{uid} {uid} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 0 1\n{gid} {gid} 1\n")
        namespace = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)
    # Only now: the pipes above may have held the target number.
    if namespace != target:
        os.dup2(namespace, target, inheritable=True)
        os.close(namespace)
    else:
        os.set_inheritable(namespace, True)


def _exec(argv: list[str]) -> NoReturn:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        _say(f"cannot run {argv[0]!r}: {exc.strerror}")
    os._exit(127)


def supervise(cfg: dict[str, Any], argv: list[str]) -> NoReturn:
    """Set up, run ``argv``, reap and watch the whole trial; exit with its status."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))  # die with the provider
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the trial come to us
    # ``parent`` None: started by a launcher on another host (a Slurm step), whose
    # pid we cannot know; the death signal above still ties us to the launcher.
    if cfg["parent"] is not None and os.getppid() != cfg["parent"]:
        os._exit(SETUP_FAILED)
    os.chdir(cfg["cwd"])
    # The descriptors the provider did not mean to pass go before the limits shrink
    # (all but a warm sandbox's control socket, which goes down to its runner).
    top = max(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if cfg.get("control"):
        os.closerange(3, CONTROL_FD)
        os.closerange(CONTROL_FD + 1, top)
        os.set_inheritable(CONTROL_FD, True)
    else:
        os.closerange(3, top)
    try:
        if cfg.get("seccomp"):
            _open_on(cfg["seccomp"], SECCOMP_FD)
        if cfg.get("trial_uid") is not None:
            _user_namespace(cfg["trial_uid"], cfg["trial_uid"], USERNS_FD)
        _set_limits(cfg["limits"])
    except (OSError, ValueError) as exc:
        _say(f"cannot set the trial up: {exc}")
        os._exit(SETUP_FAILED)
    skip = int(cfg["skip"])
    signal.signal(signal.SIGTERM, lambda signum, frame: _kill_all(signum, skip))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    pid = os.fork()
    if pid == 0:
        try:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if cfg.get("trial_uid") is not None:
                os.setgroups([])  # the host root's groups stay outside
            if cfg.get("nice"):
                os.nice(int(cfg["nice"]))
            if cfg.get("oom_score_adj"):
                # Raising it needs no privilege: under memory pressure the kernel's
                # OOM killer takes the trial, not the daemon.
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(int(cfg["oom_score_adj"])))
            for sig in (
                signal.SIGTERM,
                signal.SIGINT,
                signal.SIGHUP,
                signal.SIGPIPE,
                signal.SIGXFSZ,
            ):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
        except OSError as exc:
            _say(f"cannot set the trial up: {exc}")
            os._exit(SETUP_FAILED)
        _exec(argv)
    for fd in (SECCOMP_FD, USERNS_FD):
        with contextlib.suppress(OSError):
            os.close(fd)
    watch = Watch(cfg)
    code: int | None = None
    while True:
        try:
            died, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if died == 0:
            reason = watch.check()
            if reason is not None:
                _say(f"trial stopped: {reason}")
                _kill_all(signal.SIGKILL)
            wait_s = watch.timeout()
            signal.sigtimedwait({signal.SIGCHLD}, 3600.0 if wait_s is None else wait_s)
            continue
        if died == pid:
            code = os.waitstatus_to_exitcode(status)
        if code is not None:
            _kill_all(signal.SIGKILL)  # the command is done: nothing of it stays behind
    # Our own ru_maxrss starts at our spawner's (posix_spawn shares its memory until
    # exec); the trial's processes, forked from us after exec, are measured cleanly.
    with contextlib.suppress(OSError), open(cfg["usage"], "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    if code is None:
        code = SETUP_FAILED
    status = 128 - code if code < 0 else code
    if cfg.get("status"):
        # Started by a launcher (srun) that may report its own status, not the trial's.
        with contextlib.suppress(OSError), open(cfg["status"], "w") as f:
            f.write(str(status))
    os._exit(status)


def enter(cfg: dict[str, Any], argv: list[str]) -> NoReturn:
    """Inside the sandbox: set the per-trial limits, become ``uid`` if asked, run the trial.

    RLIMIT_NPROC is set here, inside the sandbox's user namespace, because the
    kernel counts it per user *per namespace*: set outside, it would also count
    every process of the daemon's user.
    """
    _become_trial(cfg)
    _exec(argv)


def _become_trial(cfg: dict[str, Any]) -> None:
    """Drop every capability, become ``uid`` (if given), chdir, set the limits; or exit."""
    try:
        uid = cfg.get("uid")
        if uid is not None:
            last_cap = 63
            with (
                contextlib.suppress(OSError, ValueError),
                open("/proc/sys/kernel/cap_last_cap") as f,
            ):
                last_cap = int(f.read())
            for cap in range(last_cap + 1):
                _prctl(_PR_CAPBSET_DROP, cap)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # all ids non-zero: the kernel clears every capability
            if os.getuid() != uid or os.geteuid() != uid:
                raise OSError("the uid did not change")
        os.chdir(cfg["cwd"])
        _set_limits(cfg.get("limits", []))
    except (OSError, ValueError) as exc:
        _say(f"cannot set the trial up: {exc}")
        os._exit(SETUP_FAILED)


# --- a warm sandbox: one runner, many trials ------------------------------------
#
# node.provider.sandbox keeps one sandbox per lease slot across the trials of a lease
# ("warm"). Inside it this file runs as the *runner* instead of exec'ing one trial:
# ``warm`` does what ``enter`` does (capabilities dropped, ``trial_uid``, RLIMIT_NPROC),
# then serves requests on CONTROL_FD, a socket only the provider holds the other end
# of. Per trial it forks a fresh child (ahead of the request: see serve) that closes
# every other descriptor and runs the trial; when the trial's main process ends it
# kills every other process of the sandbox's pid namespace, reaps them all, empties
# /tmp and /dev/shm and checks that nothing is left before it answers. The runner
# never runs trial code itself, so a child carries nothing of an earlier trial.


def warm(cfg: dict[str, Any]) -> NoReturn:
    """Inside the sandbox: become the trial's user, then serve trials (see :func:`serve`).

    With ``python`` set, the runner re-executes itself under that interpreter without
    ``-I -S`` (the environment bwrap set is the provider's, with no PYTHON* variable
    of the tenant's), so a child can run ``python script.py`` without starting an
    interpreter: it starts as ``python script.py`` would, only earlier.
    """
    _become_trial(cfg)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    python = cfg.get("python")
    if python:
        try:
            os.execv(python, [python, os.path.abspath(__file__), "serve", json.dumps(cfg)])
        except OSError as exc:
            _say(f"cannot start the runner: {exc.strerror}")
            os._exit(SETUP_FAILED)
    job = serve(cfg)
    _exec(job[0])


def _recv_exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError
        buf += part
    return buf


def _send_reply(sock: Any, reply: dict[str, Any]) -> None:
    data = json.dumps(reply).encode()
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _snapshot(roots: list[str]) -> set[str]:
    """Every path under ``roots`` at the runner's start, on their own file systems.

    bwrap makes the parents of its mount points in the sandbox's ``/tmp`` when the
    provider's directories lie under ``/tmp``: those stay, everything else goes.
    """
    seen: set[str] = set()
    for root in roots:
        with contextlib.suppress(OSError):
            dev = os.lstat(root).st_dev
            stack = [root]
            while stack:
                for entry in os.scandir(stack.pop()):
                    seen.add(entry.path)
                    if (
                        entry.is_dir(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_dev == dev
                    ):
                        stack.append(entry.path)
    return seen


def _empty_dir(path: str, keep: set[str], dev: int) -> None:
    """Remove everything under ``path`` the trial made (not in ``keep``), never ``path``."""
    for entry in os.scandir(path):
        full = entry.path
        st = entry.stat(follow_symlinks=False)
        is_dir = entry.is_dir(follow_symlinks=False)
        if full in keep:
            if is_dir and st.st_dev == dev:
                _empty_dir(full, keep, dev)
            continue
        if is_dir:
            if st.st_dev != dev:
                raise OSError(f"{full} is a mount the sandbox did not start with")
            os.chmod(full, 0o700)
            _empty_dir(full, keep, dev)
            os.rmdir(full)
        else:
            os.unlink(full)


def _state() -> tuple[int, list[int]]:
    """What a trial could change of the runner that its successors would inherit."""
    return os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0))


def _leftovers(scratch: list[str], keep: set[str], state: tuple[int, list[int]]) -> str | None:
    """Why the sandbox is not clean for another trial, or None once it is."""
    for path in scratch:
        try:
            _empty_dir(path, keep, os.lstat(path).st_dev)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"cannot empty {path}: {exc}"
    mine = {"1", str(os.getpid())}
    try:
        alive = [p for p in os.listdir("/proc") if p.isdigit() and p not in mine]
    except OSError as exc:
        return f"cannot list processes: {exc}"
    if alive:
        return f"processes {', '.join(alive[:5])} outlived the trial"
    for kind in ("shm", "msg", "sem"):
        # SysV IPC objects live as long as the IPC namespace, the sandbox's: one left
        # behind would be seen by the next trial, so the sandbox goes instead.
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                if len(f.read().splitlines()) > 1:
                    return f"the trial left SysV {kind} objects"
        except FileNotFoundError:
            continue
    if _state() != state:
        return "the trial changed the runner's priority or CPU affinity"
    return None


def _reap_trial(main: int) -> tuple[int, float, int]:
    """Reap the trial's whole tree: its status, CPU seconds and largest RSS (KiB).

    Once its main process is gone every other process of the pid namespace (all of
    them the trial's: bwrap's pid 1 and this runner are spared by kill(-1)) is killed,
    as the cold path's supervisor does; a subreaper, the runner reaps them all.
    """
    code: int | None = None
    cpu = 0.0
    rss = 0
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        cpu += usage.ru_utime + usage.ru_stime
        rss = max(rss, usage.ru_maxrss)
        if pid == main:
            code = os.waitstatus_to_exitcode(status)
        if code is not None:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
    if code is None:
        code = -int(signal.SIGKILL)
    return (128 - code if code < 0 else code), cpu, rss


def serve(cfg: dict[str, Any]) -> tuple[list[str], int | None, frozenset[str]]:
    """The runner's loop; returns only in a trial's child: ``(argv, script, preloaded)``.

    ``script`` set: ``argv[script]`` is a Python script to run here as the interpreter
    ``argv[script - 1]`` would (:func:`run_script`); else exec ``argv``. ``preloaded``:
    the modules the runner had imported when it forked the child (:func:`preload`).
    The parent never returns: it exits when the provider closes the socket or when the
    sandbox is not clean after a trial.

    The runner preloads once it has passed the sandbox's first trial on to its child:
    that trial imports what it needs itself, as a fresh interpreter does, and starts
    without waiting for the whole list (tens of milliseconds, several times that when
    a lease's sandboxes start together on a busy host); the trials after it find the
    modules imported. Names that fail to import are named in the first answer.

    The child of the next trial is forked *before* its request comes (once the sandbox
    is clean after the last trial), and waits for it on a socket of its own: the fork
    and the closing of descriptors are done while the provider handles the last result
    and sends the next trial, not after. It is forked from the runner in the same state
    as it would be later (the runner does nothing between trials), holds nothing of any
    trial, and is not dumpable until its request comes.
    """
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=CONTROL_FD)
    # Not dumpable: the trial (the same uid) cannot open /proc/<runner>/{mem,fd,environ}.
    _prctl(_PR_SET_DUMPABLE, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # SIGTERM on a timeout is for the trial; the runner reaps it and answers.
        signal.signal(sig, signal.SIG_IGN)
    state = _state()
    scratch = list(cfg.get("scratch", ["/tmp", "/dev/shm"]))
    keep = _snapshot(scratch)
    # Only a runner that runs scripts itself (under the trial's interpreter) preloads:
    # an exec'd command starts from nothing anyway.
    to_preload = list(cfg.get("preload", [])) if cfg.get("python") else []
    failed: list[str] = []
    if cfg.get("preload_now"):  # started ahead of its first trial: nothing to wait for
        failed, to_preload = preload(to_preload), []
    while True:
        pid, chan = _fork_waiting(sock)
        if pid == 0:
            # The runner's own imports (json, ctypes...) count too: a fresh interpreter
            # has none of them.
            return (*_take_request(chan), frozenset(set(sys.modules) - AT_START))
        try:
            head, fds, _, _ = socket.recv_fds(sock, 4, 4)
            if not head:
                os._exit(0)
            size = int.from_bytes(head + _recv_exact(sock, 4 - len(head)), "big")
            if size > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            raw = _recv_exact(sock, size)
            req = json.loads(raw)
            argv = [str(a) for a in req["argv"]]
            script = req.get("script")
            if script is not None and not (cfg.get("python") and 1 <= int(script) < len(argv)):
                raise ValueError("no interpreter to run a script in")
            if len(fds) != 1 or not argv or not isinstance(req["env"], dict):
                raise ValueError("a request passes one descriptor and a command")
            if not isinstance(req.get("cwd"), str):
                raise ValueError("a request names the trial's work dir")
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
            os._exit(0)  # the provider is gone or confused: the sandbox ends
        out = fds[0]
        try:
            _pass_on(chan, raw, out)
        except OSError:
            # The waiting child is gone (killed from outside the sandbox, say by the
            # kernel's OOM killer): it is reaped, and a new one takes the request.
            chan.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            pid, chan = _fork_waiting(sock)
            if pid == 0:
                return (*_take_request(chan), frozenset(set(sys.modules) - AT_START))
            try:
                _pass_on(chan, raw, out)
            except OSError:
                os._exit(0)  # the sandbox ends
        os.close(out)
        chan.close()
        started = time.monotonic()
        if to_preload:
            failed, to_preload = preload(to_preload), []
        status, cpu, rss = _reap_trial(pid)
        wall = time.monotonic() - started
        why = _leftovers(scratch, keep, state)
        reply = {"status": status, "cpu_s": cpu, "maxrss_kib": rss, "wall_s": wall, "unclean": why}
        try:
            _send_reply(sock, {**reply, "preload_failed": failed} if failed else reply)
            failed = []
        except OSError:
            os._exit(0)
        if why is not None:
            os._exit(0)


def _pass_on(chan: Any, raw: bytes, out: int) -> None:
    """Give the waiting child its request and its output pipe's write end."""
    import socket

    socket.send_fds(chan, [len(raw).to_bytes(4, "big")], [out])
    chan.sendall(raw)


def _fork_waiting(control: Any) -> tuple[int, Any]:
    """Fork the next trial's child; in it, every descriptor but stdin, stdout, stderr
    and its end of a new socket to the runner is closed. ``(pid, runner's end)`` in the
    runner, ``(0, child's end)`` in the child."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            control.detach()  # closed below with the rest; never closed twice by its object
            keep = theirs.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, max(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        except OSError as exc:
            _say(f"cannot set the trial up: {exc}")
            os._exit(SETUP_FAILED)
        return 0, theirs
    theirs.close()
    return pid, ours


def _take_request(chan: Any) -> tuple[list[str], int | None]:
    """In the waiting child: the request the runner passes on, then the trial's own
    process set up (output, cwd, signals, environment); ``(argv, script)``."""
    import socket

    try:
        head, fds, _, _ = socket.recv_fds(chan, 4, 1)
        if len(fds) != 1:
            os._exit(0)  # the runner ended without a trial for this child
        req = json.loads(
            _recv_exact(chan, int.from_bytes(head + _recv_exact(chan, 4 - len(head)), "big"))
        )
    except (OSError, EOFError, ValueError):
        os._exit(0)
    try:
        chan.close()
        out = fds[0]
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        argv = [str(a) for a in req["argv"]]
        cwd = str(req["cwd"])
        # bwrap sets PWD; here it is the trial's own work dir.
        env = {"PWD": cwd, **{str(k): str(v) for k, v in req["env"].items()}}
        script = req.get("script")
        _prctl(_PR_SET_DUMPABLE, 1)
        os.chdir(cwd)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if script is None:
            for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.clear()
            os.environ.update(env)
            return argv, None
        # What a fresh interpreter sets up: Ctrl-C as KeyboardInterrupt, and
        # SIGPIPE / SIGXFSZ ignored (errors instead).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(env)
        return argv, int(script)
    except OSError as exc:
        _say(f"cannot set the trial up: {exc}")
        os._exit(SETUP_FAILED)


def preload(names: list[str]) -> list[str]:
    """Import ``names`` once in the runner, so no later trial's child imports them again.

    What multiprocessing's forkserver does with its preload list: a child forked from
    the runner finds them in ``sys.modules``, the same modules a fresh interpreter
    would import (the provider's own standard library; the trial's directory is not
    on the runner's path). A child has its own copy of them (fork), so nothing a trial
    does to one reaches the next trial. The runner's objects are then frozen out of
    the collector: a child's collections never walk (and so never copy) the runner's
    pages. A name that fails to import is skipped; returns why each one failed (for
    the provider's log: the runner's own output would reach the trial running then).
    """
    import gc
    import importlib

    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an operator's list: a bad name must not end the runner
            failed.append(f"cannot preload {name}: {exc!r}"[:500])
    gc.freeze()
    return failed


def _drop_shadowed(preloaded: frozenset[str], directory: str) -> None:
    """Forget every preloaded module when the script's directory could shadow one.

    A fresh ``python script.py`` imports ``json.py`` (or a ``json/`` package) next to
    the script before the standard library's, and so do the modules that import it:
    when any entry of ``directory`` bears the name of a preloaded module, the child
    imports everything as a fresh interpreter would.
    """
    if not preloaded:
        return
    # A built-in module (time, _json...) is found before any file of the path.
    tops = {name.partition(".")[0] for name in preloaded} - set(sys.builtin_module_names)
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    if any(entry.partition(".")[0] in tops for entry in entries):
        for name in preloaded:
            sys.modules.pop(name, None)


def run_script(argv: list[str], script: int, preloaded: frozenset[str] = frozenset()) -> None:
    """Run ``script`` as ``python script.py ARGS`` does, in this (freshly forked) process.

    ``__main__`` is a new module named after the script's absolute path, ``sys.argv``
    and ``sys.path[0]`` are what the interpreter would set; an uncaught exception
    prints its traceback (without the runner's frames) and exits 1 (raises
    SystemExit, as the script's own ``sys.exit`` does). :func:`end` then ends the
    child as the interpreter would.
    """
    import builtins
    from importlib.machinery import SourceFileLoader

    path = os.path.abspath(argv[script])
    sys.argv = argv[script:]
    sys.orig_argv = argv[script - 1 :]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    _drop_shadowed(preloaded, sys.path[0])
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        name = argv[script - 1]
        sys.stderr.write(f"{name}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}\n")
        raise SystemExit(2) from None
    module = type(sys)("__main__")
    module.__dict__.update(
        {
            "__file__": path,
            "__cached__": None,
            "__builtins__": builtins,
            "__loader__": SourceFileLoader("__main__", path),
            "__annotations__": {},
        }
    )
    sys.modules["__main__"] = module
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None


def exit_status(code: object) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter reports it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(1 << 31) <= code < 1 << 31 else -1
    # Anything else is printed on stderr and the status is 1 (sys.exit("message")).
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def end(status: int) -> NoReturn:
    """End a trial's child the way the interpreter ends, then ``_exit``.

    What ``python script.py`` does on the way out and a trial can see: wait for its
    non-daemon threads, run its atexit handlers, drop its ``__main__`` globals (a file
    left open there is flushed), flush stdout and stderr (a failed stdout flush makes
    the status 120). What it skips is tearing down every module, the runner's
    preloaded ones included: in a forked child that copies each page of the runner it
    touches, milliseconds per trial for nothing the trial can observe. multiprocessing
    ends its forked children with ``os._exit`` for the same reason.
    """
    import atexit
    import gc

    threading = sys.modules.get("threading")
    if threading is not None:
        with contextlib.suppress(Exception):
            threading._shutdown()
    atexit._run_exitfuncs()
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        with contextlib.suppress(Exception):
            main_module.__dict__.clear()
    gc.collect()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        if stream is None or getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except Exception:
            if name == "stdout":
                status = 120
    os._exit(status)


def main(args: list[str]) -> NoReturn:
    """``supervisor.py CONFIG COMMAND...``, ``enter CONFIG COMMAND...`` or ``probe UID``."""
    if len(args) >= 3 and args[0] == "enter":
        enter(json.loads(args[1]), args[2:])
    if len(args) == 2 and args[0] == "warm":
        warm(json.loads(args[1]))
    if len(args) == 2 and args[0] == "probe":
        try:
            _user_namespace(int(args[1]), int(args[1]), USERNS_FD)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"cannot make a user namespace for uid {args[1]}: {exc}\n")
            os._exit(1)
        os._exit(0)
    if len(args) < 2:
        _say("usage: supervisor.py CONFIG COMMAND... | enter CONFIG COMMAND... | probe UID")
        os._exit(SETUP_FAILED)
    supervise(json.loads(args[0]), args[1:])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        # The runner under the trial's interpreter: a child comes back here to run its
        # trial, and the interpreter's own exit (atexit, threads, flush) ends it.
        _argv, _script, _preloaded = serve(json.loads(sys.argv[2]))
        if _script is None:
            _exec(_argv)
        try:
            run_script(_argv, _script, _preloaded)
            _status = 0
        except SystemExit as _exit:
            _status = exit_status(_exit.code)
        end(_status)
    else:
        main(sys.argv[1:])
