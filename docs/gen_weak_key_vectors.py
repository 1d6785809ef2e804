"""Write docs/weak-key-vectors.json: envelopes a receiver must refuse with ``weak_key``.

    python docs/gen_weak_key_vectors.py           # rewrite the file
    python docs/gen_weak_key_vectors.py --check   # exit 1 if the file is out of date

Each vector is a `hello` envelope whose ``from`` is a small-order or non-canonically
encoded Ed25519 key (docs/protocol.md section 3). Where the key is small-order, the
signature is the "universal" one (R = the neutral point, S = 0) that plain RFC 8032
verification accepts for any message under that key: a receiver that skips the key
check accepts the forgery. Everything is fixed, so the output is byte-for-byte stable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from protocol import codec

OUT = Path(__file__).with_name("weak-key-vectors.json")
T0 = 1_700_000_000_000
P = 2**255 - 19
UNIVERSAL_SIG = bytes([1]) + bytes(63)  # R = neutral point (y = 1), S = 0

#: (name, y, sign bit of x): the key is y little-endian with the sign in the top bit.
KEYS = [
    ("neutral point (order 1), 01 00..00", 1, 0),
    ("point of order 2, y = p - 1", P - 1, 0),
    ("point of order 4, y = 0", 0, 0),
    ("point of order 4, y = 0, x negative", 0, 1),
    (
        "point of order 8",
        0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
        0,
    ),
    ("neutral point encoded non-canonically, y = p + 1", P + 1, 0),
    ("non-canonical y = 2^255 - 1", 2**255 - 1, 1),
]


def build() -> list[dict[str, Any]]:
    vectors = []
    for i, (name, y, sign) in enumerate(KEYS):
        key = (y | (sign << 255)).to_bytes(32, "little")
        ts = T0 + 1000 * i
        envelope = codec.encode(
            {
                "body": {"address": None, "agent": "forger/1", "role": "tenant"},
                "from": key,
                "nonce": hashlib.sha256(b"mercato weak key nonce %d" % i).digest()[:16],
                "sig": UNIVERSAL_SIG,
                "to": None,
                "ts": ts,
                "type": "hello",
                "v": 1,
            }
        )
        vectors.append(
            {
                "name": f"hello signed by a weak key: {name}",
                "public_key": key.hex(),
                "envelope": envelope.hex(),
                "now_ms": ts,
                "error": "weak_key",
            }
        )
    return vectors


def render(vectors: list[dict[str, Any]]) -> str:
    return json.dumps(vectors, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    text = render(build())
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python {__file__}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
