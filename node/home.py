"""The node's home directory: its identity key, its store and its logs.

Layout (``MERCATO_HOME``, default ``~/.mercato``, mode 0700)::

    identity.pem   Ed25519 private key, PKCS#8 PEM, mode 0600
    node.sqlite    the node's store (see node.store)
    logs/          daemon logs

The key file is treated the way OpenSSH treats ``~/.ssh/id_*``: a key that group or
others can access is refused rather than used, because anyone who can read it can
sign leases, bids and receipts as this node.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm

from node import keycodec
from protocol.errors import LocalProtocolError, MercatoError
from protocol.identity import Identity

#: In a node's home while its daemon runs (node.daemon writes it atomically once it
#: serves, removes it on close): the daemon's address, pid and control URL, as JSON.
READY_FILE = "daemon.json"

HOME_ENV = "MERCATO_HOME"
DEFAULT_HOME_NAME = ".mercato"
KEY_FILE = "identity.pem"
STORE_FILE = "node.sqlite"
LOG_DIR = "logs"

_DIR_MODE = 0o700
_KEY_MODE = 0o600
# A PKCS#8 PEM Ed25519 key is 119 bytes; anything near this cap is not a key file.
_MAX_KEY_FILE_SIZE = 64 * 1024


class KeyFileError(MercatoError):
    """The identity key file exists but cannot be used (unreadable or not an Ed25519 key)."""

    code = "key_file"


class InsecureKeyFileError(KeyFileError):
    """The identity key file is accessible by group or others; it is refused, not used."""

    code = "insecure_key_file"


def resolve_home(env: Mapping[str, str] | None = None) -> Path:
    """The home directory: ``$MERCATO_HOME`` if set and non-empty, else ``~/.mercato``."""
    environ = os.environ if env is None else env
    configured = environ.get(HOME_ENV, "")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / DEFAULT_HOME_NAME


class NodeHome:
    """A node's home directory; creating one creates the directory (0700) and ``logs/``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # mkdir's mode is filtered by the umask, which can only remove bits: at most 0700.
        self.path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self.log_dir.mkdir(mode=_DIR_MODE, exist_ok=True)

    @property
    def key_path(self) -> Path:
        """The identity key file (PKCS#8 PEM)."""
        return self.path / KEY_FILE

    @property
    def store_path(self) -> Path:
        """The SQLite store file."""
        return self.path / STORE_FILE

    @property
    def log_dir(self) -> Path:
        """The directory for daemon logs."""
        return self.path / LOG_DIR

    def load_or_create_identity(self, *, codec_in_child: bool = False) -> Identity:
        """Load this node's identity, generating and saving a new one on first run.

        Raises InsecureKeyFileError if the key file is accessible by group or others,
        and KeyFileError if it cannot be read or does not hold an Ed25519 key.

        ``codec_in_child``: the PEM is read or written by cryptography in a short-lived
        child (node.keycodec), so a daemon that runs for months never holds the codec
        (~1.2 MB); a CLI command, done in a moment, converts it here.
        """
        try:
            return self._load(codec_in_child)
        except FileNotFoundError:
            pass
        identity = Identity.generate()
        if codec_in_child:
            try:
                pem = keycodec.pem_from_seed(identity.seed())
            except keycodec.KeyCodecError as e:
                raise KeyFileError(f"cannot write key file {self.key_path}: {e}") from e
        else:
            pem = identity.to_pem()
        if self._install(pem):
            return identity
        # Another process created the key between our load and our install: use theirs.
        try:
            return self._load(codec_in_child)
        except FileNotFoundError as e:
            # e.g. a dangling symlink: the name exists, but there is no file behind it.
            raise KeyFileError(f"cannot read key file {self.key_path}: {e.strerror}") from e

    def _load(self, codec_in_child: bool = False) -> Identity:
        """Read and check the key file; FileNotFoundError means there is none yet."""
        path = self.key_path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from e
        try:
            # fstat on the open descriptor, so the mode checked is the file's we read.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise InsecureKeyFileError(
                    f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}, so group or "
                    f"others can access it and it is refused; restrict it with "
                    f"`chmod 600 {path}`"
                )
            if st.st_size > _MAX_KEY_FILE_SIZE:
                raise KeyFileError(f"key file {path} is {st.st_size} bytes: not a key file")
            data = _read_all(fd, _MAX_KEY_FILE_SIZE)
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from e
        finally:
            os.close(fd)
        try:
            if codec_in_child:
                return Identity.from_seed(keycodec.seed_from_pem(data))
            return Identity.from_pem(data)
        except keycodec.KeyCodecError as e:
            raise KeyFileError(f"cannot read key file {path}: {e}") from e
        except (ValueError, TypeError, UnsupportedAlgorithm, LocalProtocolError) as e:
            raise KeyFileError(
                f"key file {path} does not hold an unencrypted PKCS#8 PEM Ed25519 private "
                f"key; move it aside to let the node create a new identity"
            ) from e

    def _install(self, pem: bytes) -> bool:
        """Write ``pem`` as the key file unless one exists; False if one already did.

        The key is written in full to a private temporary file (created 0600 with
        O_EXCL, so it is never readable by others, not even empty), fsynced, then
        hard-linked to its final name. ``link`` never replaces an existing name, so a
        concurrent start cannot overwrite a key, and a crash never leaves a partial
        key file under the final name (at worst a stray temporary file).
        """
        tmp = self.path / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, _KEY_MODE)
        try:
            try:
                view = memoryview(pem)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.key_path)
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.path)
        return True


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, limit + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    # Makes the new directory entry durable: without it a power cut after the first
    # run can lose the key, and the node would come back with a different node id.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
