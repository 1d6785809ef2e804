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
import tarfile
from dataclasses import dataclass
from pathlib import Path

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


def unpack(data: bytes, expected_sha256: str, target: Path) -> None:
    """Verify ``data`` against its address and unpack it into ``target`` (created)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise WorkspaceError(f"workspace hash is {actual}, expected {expected_sha256}")
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise WorkspaceError(f"workspace entry {member.name!r} is not a plain file")
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise WorkspaceError(f"workspace entry {member.name!r} escapes the directory")
            tar.extractall(target, filter="data")
    except tarfile.TarError as e:
        raise WorkspaceError(f"workspace archive is corrupt: {e}") from e
