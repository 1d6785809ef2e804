"""Write docs/test-vectors.json: sealed envelopes a compatible client must reproduce.

    python docs/gen_test_vectors.py           # rewrite the file
    python docs/gen_test_vectors.py --check   # exit 1 if the file is out of date

Everything is fixed, so the output is byte-for-byte stable: the two keys are the
RFC 8032 section 7.1 TEST 1 and TEST 2 secret keys (so an Ed25519 library can be
checked against the RFC first), timestamps are a fixed base plus one second per
vector, and nonces are the first 16 bytes of SHA-256 over a fixed label. Bodies hold
no byte-string fields, so each vector is plain JSON. Later vectors refer to earlier
ones by envelope hash (accept -> award, receipt -> task_result, the countersigned
receipt -> the provider's receipt), exactly as the live protocol chains them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from protocol.envelope import open_envelope, seal, signed_bytes
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES, body_to_wire

OUT = Path(__file__).with_name("test-vectors.json")

# RFC 8032 section 7.1, TEST 1 and TEST 2 secret keys.
PROVIDER_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
TENANT_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
HOUR_MS = 3_600_000


def _nonce(i: int) -> bytes:
    return hashlib.sha256(b"mercato test vector nonce %d" % i).digest()[:16]


def _sorted_deep(value: Any) -> Any:
    # Key order of the JSON file matches the wire order, for readers comparing the two.
    if isinstance(value, dict):
        return {k: _sorted_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_deep(v) for v in value]
    return value


def build() -> list[dict[str, Any]]:
    """Every vector, in order; later bodies hash earlier envelopes."""
    provider = Identity.from_seed(PROVIDER_SEED)
    tenant = Identity.from_seed(TENANT_SEED)
    p, t = provider.node_id, tenant.node_id
    spec_hash = hashlib.sha256(b"sweep.yaml of the worked example").hexdigest()
    workspace_hash = hashlib.sha256(b"workspace archive of the worked example").hexdigest()
    output_hash = hashlib.sha256(b"trial output").hexdigest()
    vectors: list[dict[str, Any]] = []

    def add(name: str, who: Identity, type_: str, body: dict[str, Any], to: str | None) -> str:
        i = len(vectors)
        ts, nonce = T0 + i * 1000, _nonce(i)
        model = MESSAGE_TYPES[type_].model_validate(body)
        wire = _sorted_deep(body_to_wire(model))
        envelope = seal(who, model, now_ms=ts, nonce=nonce, to=to)
        payload = signed_bytes(
            type_=type_, sender_key=who.public_key, recipient=to, ts_ms=ts, nonce=nonce, body=wire
        )
        opened = open_envelope(envelope, now_ms=ts, replay=None, recipient=to)
        assert opened.body == model  # the generator never publishes a vector it cannot open
        vectors.append(
            {
                "name": name,
                "seed": who.seed().hex(),
                "public_key": who.public_key.hex(),
                "node_id": who.node_id,
                "type": type_,
                "body": wire,
                "recipient": to,
                "timestamp_ms": ts,
                "nonce": nonce.hex(),
                "signed_bytes": payload.hex(),
                "signature": who.sign(payload).hex(),
                "envelope": envelope.hex(),
                "envelope_sha256": opened.digest,
            }
        )
        return opened.digest

    add(
        "tenant says hello to a provider (no address: it may sit behind NAT)",
        tenant,
        "hello",
        {"role": "tenant", "address": None, "agent": "mercato/0.1.0"},
        p,
    )
    add(
        "provider advertises one 8-GPU node, to anyone",
        provider,
        "advert",
        {
            "provider": p,
            "address": "http://203.0.113.7:7400",
            "devices": [
                {
                    # NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOP/s dense BF16.
                    "model": "H100-SXM",
                    "kind": "gpu",
                    "ids": [f"gpu{i}" for i in range(8)],
                    "free": ["gpu2", "gpu3", "gpu7"],
                    "memory_bytes": 80_000_000_000,
                    "fp16_flops": 989_000_000_000_000,
                    "memory_bandwidth": 3_350_000_000_000,
                    "price_floor": 2_100_000,
                }
            ],
            # NVLink 4: 900 GB/s total per GPU, 450 GB/s per direction.
            "interconnect": {"kind": "nvlink", "bandwidth": 450_000_000_000, "gang_size": 8},
            "seq": 42,
            "expires_ms": T0 + 300_000,
        },
        None,
    )
    add(
        "provider answers with the peers it knows",
        provider,
        "peer_list",
        {"peers": [{"node_id": p, "address": "http://203.0.113.7:7400", "role": "provider"}]},
        t,
    )
    add(
        "tenant asks for adverts newer than the two it holds (packed digest)",
        tenant,
        "directory_request",
        {
            # 40-byte records sorted by provider: 32 ASCII node-id bytes, seq u64 BE.
            "digest": b"".join(
                n.encode("ascii") + seq.to_bytes(8, "big")
                for n, seq in sorted([(p, 41), ("a" * 32, 1_763_000_000_123)])
            ),
            "limit": 100,
        },
        p,
    )
    add(
        "tenant calls for bids on 3 GPUs for a sweep",
        tenant,
        "order",
        {
            "order_id": "ord-7f3a",
            "tenant": t,
            "job_spec_hash": spec_hash,
            "workload": "sweep",
            "requirement": {"kind": "gpu", "min_memory_bytes": 24_000_000_000},
            "units": 3,
            "max_price": 2_500_000,
            "bid_deadline_ms": T0 + 6000,
            "expected_flop": 3_000_000_000_000_000_000,
            "lease_ms": HOUR_MS,
        },
        p,
    )
    add(
        "provider bids 2.1 credits per device-hour",
        provider,
        "bid",
        {
            "order_id": "ord-7f3a",
            "bid_id": "bid-01",
            "provider": p,
            "units": 3,
            "devices": ["gpu2", "gpu3", "gpu7"],
            "model": "H100-SXM",
            "price": 2_100_000,
            "expires_ms": T0 + 36_000,
        },
        t,
    )
    add(
        "provider declines to bid on another order",
        provider,
        "no_bid",
        {
            "order_id": "ord-80c1",
            "provider": p,
            "reason": "price_below_floor",
            "detail": "floor is 2.1 credits/device-hour — ask again later",
        },
        t,
    )
    award_hash = add(
        "tenant awards the bid",
        tenant,
        "award",
        {
            "order_id": "ord-7f3a",
            "bid_id": "bid-01",
            "lease_id": "lease-9",
            "provider": p,
            "units": 3,
            "price": 2_100_000,
            "heartbeat_interval_ms": 5000,
            "lease_end_ms": T0 + 8000 + HOUR_MS,
        },
        p,
    )
    add(
        "provider accepts: the award and this accept make the lease",
        provider,
        "accept",
        {
            "lease_id": "lease-9",
            "order_id": "ord-7f3a",
            "award_hash": award_hash,
            "start_ms": T0 + 8500,
        },
        t,
    )
    add(
        "provider declines an award whose devices are gone",
        provider,
        "decline",
        {"lease_id": "lease-10", "order_id": "ord-80c2", "reason": "Gerät belegt"},
        t,
    )
    add(
        "tenant releases a losing bid",
        tenant,
        "release",
        {"order_id": "ord-7f3a", "bid_id": "bid-02", "reason": "lost the auction"},
        p,
    )
    add(
        "tenant assigns a trial",
        tenant,
        "task_assign",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0003",
            "job_spec_hash": spec_hash,
            "workspace_hash": workspace_hash,
            "command": ["python", "train.py", "--lr", "0.001"],
            "env": {"WANDB_MODE": "offline"},
            "timeout_ms": HOUR_MS,
        },
        p,
    )
    add(
        "provider reports the trial running",
        provider,
        "task_status",
        {"lease_id": "lease-9", "task_id": "trial-0003", "state": "running"},
        t,
    )
    add(
        "tenant heartbeats the lease",
        tenant,
        "heartbeat",
        {"lease_id": "lease-9", "seq": 12, "running": ["trial-0003"]},
        p,
    )
    result_hash = add(
        "provider returns the result; metrics mix floats and an int",
        provider,
        "task_result",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0003",
            "state": "succeeded",
            "exit_code": 0,
            # 1520.0 is a float with an integral value: it must stay float 64 on the wire.
            "metrics": {"val_loss": 0.2317, "accuracy": 0.1, "throughput": 1520.0, "epochs": 10},
            "usage": {
                "wall_ms": 61_000,
                "cpu_ms": 58_250,
                "device_ms": 183_000,
                "max_rss_bytes": 2_147_483_648,
                "output_bytes": 5120,
            },
            "started_ms": T0 + 9000,
            "finished_ms": T0 + 70_000,
            "output_hash": output_hash,
        },
        t,
    )
    add(
        "provider reports a trial killed by a signal",
        provider,
        "task_result",
        {
            "lease_id": "lease-9",
            "task_id": "trial-0004",
            "state": "failed",
            "exit_code": -9,
            "usage": {"wall_ms": 1500, "cpu_ms": 1200, "device_ms": 4500},
            "started_ms": T0 + 9000,
            "finished_ms": T0 + 10_500,
        },
        t,
    )
    # ceil(183_000 device-ms x 2_100_000 micro-credits/device-hour / 3_600_000 ms/hour)
    amount = -(-183_000 * 2_100_000 // HOUR_MS)
    receipt = {
        "lease_id": "lease-9",
        "task_id": "trial-0003",
        "provider": p,
        "tenant": t,
        "device_ms": 183_000,
        "price": 2_100_000,
        "amount": amount,
        "result_hash": result_hash,
    }
    receipt_hash = add("provider signs the receipt", provider, "receipt", receipt, t)
    add(
        "tenant countersigns the receipt",
        tenant,
        "receipt",
        {**receipt, "countersigns": receipt_hash},
        p,
    )
    add(
        "tenant cancels the rest of the sweep",
        tenant,
        "cancel",
        {"lease_id": "lease-9", "reason": "sweep finished"},
        p,
    )
    return vectors


def render(vectors: list[dict[str, Any]]) -> str:
    """The file's exact text."""
    return json.dumps(vectors, indent=2, ensure_ascii=False, default=_bin) + "\n"


def _bin(value: object) -> dict[str, str]:
    # JSON has no byte strings: a body's bin value is written {"$bin": "<hex>"}.
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


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
