"""Workspaces: the job's directory packed as a deterministic, content-addressed tar.

The same files always give the same bytes (sorted entries, zeroed times and owners,
normalised modes), so the SHA-256 of the archive is its address: a provider that holds
it already is never sent it again. Unpacking refuses anything that could escape the
target directory (absolute paths, ``..``, links, devices), via tarfile's "data" filter
plus our own checks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from protocol.errors import BadWorkspaceError

#: Never packed: VCS data, caches, virtual environments, Mercato's own state.
DEFAULT_EXCLUDES = (
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    "*.pyc",
    ".venv",
    "venv",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".ipynb_checkpoints",
    "node_modules",
    ".mercato",
    "*.sqlite",
    ".DS_Store",
)
DEFAULT_MAX_BYTES = 64 << 20


class WorkspaceError(BadWorkspaceError):
    """A workspace is too large, unreadable, corrupt or unsafe to unpack (400 on the wire)."""


@dataclass(frozen=True)
class Workspace:
    """A packed workspace: its bytes, their SHA-256, and what went in."""

    data: bytes
    sha256: str
    files: int


def _excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(p, pat) for p in parts for pat in patterns)


def pack(
    root: Path,
    *,
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Workspace:
    """Pack ``root`` (regular files and directories only; symlinks are skipped)."""
    if not root.is_dir():
        raise WorkspaceError(f"workspace {root} is not a directory")
    entries: list[tuple[str, Path]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not _excluded(str((base / d).relative_to(root)), excludes)
            and not (base / d).is_symlink()
        )
        for name in sorted(filenames):
            path = base / name
            rel = str(path.relative_to(root))
            if _excluded(rel, excludes) or path.is_symlink() or not path.is_file():
                continue
            total += path.stat().st_size
            if total > max_bytes:
                raise WorkspaceError(
                    f"workspace {root} is larger than {max_bytes} bytes; exclude data files "
                    "(let trials read them from elsewhere) or raise the limit"
                )
            entries.append((rel, path))
    import tarfile  # here, not at the top: an idle provider daemon never holds it

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in sorted(entries):
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as f:
                tar.addfile(info, f)
    data = buf.getvalue()
    return Workspace(data=data, sha256=hashlib.sha256(data).hexdigest(), files=len(entries))


#: At most this many entries (files and directories) in a workspace, by default.
DEFAULT_MAX_FILES = 10_000
#: The only member types a workspace may hold: plain files and directories. GNU sparse
#: ('S'), continuation ('7'), links, devices and FIFOs are refused: a sparse member of a
#: few bytes in the archive expands to any size on disk (and in every trial's copy).
_PLAIN_TYPES = (b"0", b"\0", b"5")  # tarfile.REGTYPE, AREGTYPE, DIRTYPE


def unpack(
    data: bytes,
    expected_sha256: str,
    target: Path,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Verify ``data`` against its address and unpack it; see :func:`unpack_file`."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise WorkspaceError(f"workspace hash is {actual}, expected {expected_sha256}")
    return _extract(io.BytesIO(data), target, max_files, max_bytes)


def unpack_file(
    archive: Path,
    expected_sha256: str,
    target: Path,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> int:
    """Verify the archive at ``archive`` and unpack it into ``target`` (created).

    Blocking file-system work for up to ``max_files`` entries: call it in a thread,
    never on the event loop. Refuses, before writing anything, an archive with more
    than ``max_files`` entries, whose files add up to more than ``max_bytes``
    unpacked, or that holds anything but plain files and directories (sparse
    members included). Returns the unpacked size in bytes.
    """
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        raise WorkspaceError(f"workspace hash is {actual}, expected {expected_sha256}")
    with archive.open("rb") as f:
        return _extract(f, target, max_files, max_bytes)


def _extract(fileobj: IO[bytes], target: Path, max_files: int, max_bytes: int) -> int:
    import tarfile  # here, not at the top: an idle provider daemon never holds it

    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            # Read headers one by one so a flood of entries is refused at max_files + 1,
            # not after parsing all of them.
            while (member := tar.next()) is not None:
                members.append(member)
                if len(members) > max_files:
                    raise WorkspaceError(
                        f"workspace has more than {max_files} entries (this provider's limit)"
                    )
                if (
                    member.type == tarfile.GNUTYPE_SPARSE
                    or member.sparse is not None
                    or any(k.startswith("GNU.sparse") for k in member.pax_headers)
                ):
                    raise WorkspaceError(f"workspace entry {member.name!r} is a sparse file")
                if member.type not in _PLAIN_TYPES:
                    raise WorkspaceError(f"workspace entry {member.name!r} is not a plain file")
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise WorkspaceError(f"workspace entry {member.name!r} escapes the directory")
                total += member.size
                if total > max_bytes:
                    raise WorkspaceError(
                        f"workspace unpacks to more than {max_bytes} bytes (this provider's limit)"
                    )
            tar.extractall(target, members=members, filter="data")
    except tarfile.TarError as e:
        raise WorkspaceError(f"workspace archive is corrupt: {e}") from e
    return total
