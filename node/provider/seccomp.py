"""The seccomp filter every sandboxed trial runs under, compiled with libseccomp.

bubblewrap loads it (``--seccomp FD``) just before it executes the trial, after it
has built the sandbox, so bubblewrap itself needs none of what is refused here. The
filter allows every system call except the ones below, which return ``EPERM`` (a
clear error for the trial, not a kill). The list follows Docker's default profile
and the kernel's own history of sandbox escapes; each group says why.

Refused, and why:

* ``io_uring_setup``, ``io_uring_enter``, ``io_uring_register``: a second system-call
  interface that seccomp cannot see into, and a large source of kernel bugs (Google
  turned it off on ChromeOS, Android and its servers); programs fall back to plain I/O.
* ``ptrace``, ``process_vm_readv``, ``process_vm_writev``, ``pidfd_getfd``,
  ``process_madvise``, ``kcmp``: reading or steering other processes, among them the
  sandbox's own pid 1 (bubblewrap, which holds the namespaces).
* ``keyctl``, ``add_key``, ``request_key``: the kernel keyrings are not namespaced.
* ``bpf``, ``perf_event_open``, ``userfaultfd``: kernel attack surface (the verifier,
  perf, page-fault races used to widen exploits).
* ``kexec_load``, ``kexec_file_load``, ``reboot``, ``init_module``, ``finit_module``,
  ``delete_module``: the host's kernel and its modules.
* ``mount``, ``umount2``, ``pivot_root``, ``chroot``, ``move_mount``, ``open_tree``,
  ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``, ``mount_setattr``: changing the
  sandbox's view of the file system, the new mount API included.
* ``unshare``, ``setns``, ``clone`` with a ``CLONE_NEW*`` flag, and ``clone3`` (as
  ``ENOSYS``): new namespaces are how most unprivileged kernel exploits reach code
  meant for root. ``clone3`` passes its flags in memory, where a filter cannot read
  them; ``ENOSYS`` makes the C library fall back to ``clone``.
* ``personality`` beyond ``PER_LINUX``, ``PER_LINUX32`` and ``UNAME26``:
  ``ADDR_NO_RANDOMIZE``, ``READ_IMPLIES_EXEC`` and friends switch exploit mitigations
  off. The query (``0xffffffff``) is refused too: a filter cannot tell it apart
  without also letting flags through.
* ``open_by_handle_at``, ``name_to_handle_at``: opening files by handle walks around
  the mount namespace (the "shocker" container escape).
* ``swapon``, ``swapoff``, ``acct``, ``quotactl``, ``syslog``, ``vhangup``,
  ``lookup_dcookie``, ``iopl``, ``ioperm``, ``uselib``, ``fanotify_init``,
  ``settimeofday``, ``clock_settime``: host-wide settings, devices and logs.
* ``ioctl`` ``TIOCSTI`` and ``TIOCLINUX``: typing into a terminal someone else reads.

A warm sandbox (node.provider.sandbox: one sandbox for consecutive trials of a lease
slot) also refuses ``mq_open`` (:data:`WARM_REFUSED`): a POSIX message queue lives as
long as the IPC namespace, there is no way to list the queues without mounting their
file system, and one left by a trial would reach the next.

Only the native architecture is allowed: a 32-bit (``int 0x80``) or x32 system call
kills the trial, because the numbers of those tables would bypass the rules.

The daemon compiles the filters once, at start, in a short-lived child process (this
module run as a program): libseccomp and its binding are needed for nothing else, and
loaded in the daemon they would stay resident for its lifetime (~0.3 MB of an idle
daemon, docs/benchmarks.md "Idle provider RSS"). The program is the same bytes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REFUSED = (
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "vhangup",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "uselib",
    "fanotify_init",
    "settimeofday",
    "clock_settime",
)
#: Refused in warm sandboxes only (see the module docstring).
WARM_REFUSED = ("mq_open",)
#: clone(2) flags that make a namespace (linux/sched.h).
CLONE_NEW_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
#: The largest harmless personality: PER_LINUX (0), PER_LINUX32 (8), UNAME26 (0x20000)
#: and their combination; every mitigation-disabling flag is a higher bit.
MAX_PERSONALITY = 0x0020008
TIOCSTI = 0x5412
TIOCLINUX = 0x541C


class SeccompUnavailableError(RuntimeError):
    """libseccomp (or its Python binding) is missing: no filter can be built here."""


def compile_filter(extra: tuple[str, ...] = ()) -> bytes:
    """The BPF program (``struct sock_filter`` array) that bubblewrap loads.

    ``extra``: more system calls refused (``EPERM``), e.g. :data:`WARM_REFUSED`.
    """
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # the binding loads libseccomp.so.2 on import
        raise SeccompUnavailableError(
            f"cannot load libseccomp ({exc}); install libseccomp2 and pyseccomp"
        ) from exc
    refuse = sc.ERRNO(errno.EPERM)
    flt = sc.SyscallFilter(sc.ALLOW)
    for name in (*REFUSED, *extra):
        try:
            flt.add_rule(refuse, name)
        except (ValueError, OSError):
            continue  # not a system call of this architecture (e.g. iopl on arm64)
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NEW_FLAGS:
        flt.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    flt.add_rule(refuse, "personality", sc.Arg(0, sc.GT, MAX_PERSONALITY))
    for request in (TIOCSTI, TIOCLINUX):
        flt.add_rule(refuse, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    # export_bpf writes to a file object; a temporary file keeps this free of pipes.
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise SeccompUnavailableError("libseccomp produced no valid BPF program")
    return program


def write_filter(path: str | os.PathLike[str], extra: tuple[str, ...] = ()) -> None:
    """Compile the filter (``extra`` refused too) into ``path`` (mode 0600), atomically."""
    program = compiled_filter(tuple(extra))
    tmp = f"{os.fspath(path)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, program)
    finally:
        os.close(fd)
    os.replace(tmp, path)


#: What the child compiles besides what is asked: the daemon needs both at start.
_VARIANTS: tuple[tuple[str, ...], ...] = ((), WARM_REFUSED)
#: Bound on the child's run (an import and a compile: well under a second).
_COMPILE_TIMEOUT_S = 120.0


#: Programs compiled in this process, by the extra system calls they refuse.
_compiled: dict[tuple[str, ...], bytes] = {}
_compiled_lock = threading.Lock()


def compiled_filter(extra: tuple[str, ...] = ()) -> bytes:
    """:func:`compile_filter` of ``extra``, compiled in a child process (with the daemon's
    usual variants, so one child serves a daemon's start), once per process.

    Raises SeccompUnavailableError with the child's reason if it cannot compile.
    """
    with _compiled_lock:
        if extra not in _compiled:
            _compiled.update(_compile_in_child(tuple(dict.fromkeys((*_VARIANTS, extra)))))
        return _compiled[extra]


def _compile_in_child(variants: tuple[tuple[str, ...], ...]) -> dict[tuple[str, ...], bytes]:
    # The child finds this tree as the parent did; appended, so it shadows nothing.
    boot = (
        "import sys; sys.path.append(sys.argv[1]); "
        "from node.provider.seccomp import _main; sys.exit(_main(sys.argv[2:]))"
    )
    root = str(Path(__file__).resolve().parents[2])
    args = [sys.executable, "-c", boot, root, *(",".join(v) for v in variants)]
    try:
        proc = subprocess.run(args, capture_output=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SeccompUnavailableError(f"cannot run the seccomp filter compiler: {exc}") from exc
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SeccompUnavailableError(reason)
    out, programs = proc.stdout, {}
    for variant in variants:
        size = int.from_bytes(out[:4], "big")
        program, out = out[4 : 4 + size], out[4 + size :]
        if not program or len(program) % 8 or len(program) != size:
            raise SeccompUnavailableError("the seccomp filter compiler produced no valid program")
        programs[variant] = program
    return programs


def _main(variants: list[str]) -> int:
    """The child: each argument a comma-separated list of extra system calls refused;
    writes each compiled program, length first (4 bytes, big-endian), to stdout."""
    out = sys.stdout.buffer
    try:
        programs = [compile_filter(tuple(v.split(",")) if v else ()) for v in variants]
    except SeccompUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 3
    for program in programs:
        out.write(len(program).to_bytes(4, "big") + program)
    out.flush()
    return 0
