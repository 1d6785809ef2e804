"""The node's key file (PKCS#8 PEM) to its Ed25519 seed and back, in a short-lived child.

A daemon reads or writes its key file once, at start, and cryptography's serialization
module and the PEM codec behind it would then stay resident for the daemon's lifetime
(~1.2 MB of an idle provider, docs/benchmarks.md "Idle provider RSS"). node.home runs
this module as a program instead: the file is still parsed and written by cryptography
alone, and only the 32-byte seed crosses the pipe between the daemon and its own child.
It imports nothing of Mercato's, so the child starts in a tenth of a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SEED_SIZE = 32
#: The child's exit status when the input is not an unencrypted PKCS#8 Ed25519 key.
NOT_A_KEY = 3
#: Bound on the child's run (an interpreter's start and one conversion).
TIMEOUT_S = 60.0


class KeyCodecError(RuntimeError):
    """The child could not run or answered nonsense (not: the file holds no key)."""


def seed_from_pem(pem: bytes) -> bytes:
    """The seed of a PKCS#8 PEM Ed25519 private key.

    Raises ValueError (with cryptography's reason) if ``pem`` is not one.
    """
    seed = _run("seed", pem)
    if len(seed) != SEED_SIZE:
        raise KeyCodecError(f"the key codec answered {len(seed)} bytes, not a seed")
    return seed


def pem_from_seed(seed: bytes) -> bytes:
    """The unencrypted PKCS#8 PEM of the Ed25519 key with this seed."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"a seed is {SEED_SIZE} bytes")
    pem = _run("pem", seed)
    if not pem.startswith(b"-----BEGIN PRIVATE KEY-----"):
        raise KeyCodecError("the key codec answered no PEM private key")
    return pem


def _run(mode: str, data: bytes) -> bytes:
    # The child finds this module as the parent did; appended, so it shadows nothing.
    boot = (
        "import sys; sys.path.append(sys.argv[1]); "
        "from node.keycodec import main; sys.exit(main(sys.argv[2]))"
    )
    root = str(Path(__file__).resolve().parents[1])
    try:
        proc = subprocess.run(
            [sys.executable, "-c", boot, root, mode],
            input=data,
            capture_output=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeyCodecError(f"cannot run the key codec: {exc}") from exc
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    reason = lines[-1] if lines else f"exit status {proc.returncode}"
    if proc.returncode == NOT_A_KEY:
        raise ValueError(reason)
    if proc.returncode != 0:
        raise KeyCodecError(f"the key codec failed: {reason}")
    return proc.stdout


def main(mode: str) -> int:
    """The child: stdin to stdout, ``seed`` (PEM in, seed out) or ``pem`` (seed in)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = sys.stdin.buffer.read()
    if mode == "seed":
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            print(f"not a key: {exc}", file=sys.stderr)
            return NOT_A_KEY
        if not isinstance(key, Ed25519PrivateKey):
            print("key file does not hold an Ed25519 private key", file=sys.stderr)
            return NOT_A_KEY
        out = key.private_bytes_raw()
    elif mode == "pem":
        out = Ed25519PrivateKey.from_private_bytes(data).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0
