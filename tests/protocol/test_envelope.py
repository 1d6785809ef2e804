"""Sealed envelopes: round trips for every message type, and every way to be rejected."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import DEFAULT_LIMITS, Limits, decode, encode
from protocol.envelope import (
    NONCE_SIZE,
    RESENT_VERBATIM,
    Envelope,
    open_envelope,
    seal,
    signed_bytes,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.identity import Identity
from protocol.messages import MESSAGE_TYPES, Body, body_to_wire
from protocol.replay import ReplayGuard

NOW = 1_700_000_000_000
PROVIDER = Identity.from_seed(bytes(range(32)))
TENANT = Identity.from_seed(bytes(range(1, 33)))
MALLORY = Identity.from_seed(b"\x66" * 32)
NONCE = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
SHA = hashlib.sha256(b"job spec").hexdigest()

# H100 SXM figures from NVIDIA's H100 datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOP/s dense
# BF16, NVLink 900 GB/s total (450 GB/s per direction).
H100 = m.DeviceGroup(
    model="H100-SXM",
    kind="gpu",
    ids=[f"gpu{i}" for i in range(8)],
    free=["gpu2", "gpu3", "gpu7"],
    memory_bytes=80_000_000_000,
    fp16_flops=989_000_000_000_000,
    memory_bandwidth=3_350_000_000_000,
    price_floor=2_100_000,
)
ADVERT = m.Advert(
    provider=PROVIDER.node_id,
    address="http://203.0.113.7:7400",
    devices=[H100],
    interconnect=m.Interconnect(kind="nvlink", bandwidth=450_000_000_000, gang_size=8),
    seq=42,
    expires_ms=NOW + 300_000,
)

#: One realistic body per message type (test_examples_cover_every_type keeps it complete).
EXAMPLES: dict[str, Body] = {
    "hello": m.Hello(role="tenant", address=None, agent="mercato/0.1.0"),
    "peer_list": m.PeerList(
        peers=[
            m.PeerInfo(node_id=PROVIDER.node_id, address="http://203.0.113.7:7400", role="provider")
        ]
    ),
    "advert": ADVERT,
    "directory_request": m.DirectoryRequest(
        digest=m.pack_digest({PROVIDER.node_id: 41}), limit=100
    ),
    "directory": m.Directory(
        adverts=[seal(PROVIDER, ADVERT, now_ms=NOW - 5000, nonce=b"\x07" * 16)],
        wanted=[TENANT.node_id],
        more=True,
    ),
    "order": m.Order(
        order_id="ord-7f3a",
        tenant=TENANT.node_id,
        job_spec_hash=SHA,
        workload="sweep",
        requirement=m.Requirement(kind="gpu", min_memory_bytes=24_000_000_000),
        units=16,
        max_price=2_500_000,
        bid_deadline_ms=NOW + 2000,
        lease_ms=3_600_000,
    ),
    "bid": m.Bid(
        order_id="ord-7f3a",
        bid_id="bid-01",
        provider=PROVIDER.node_id,
        units=3,
        devices=["gpu2", "gpu3", "gpu7"],
        model="H100-SXM",
        price=2_100_000,
        expires_ms=NOW + 30_000,
    ),
    "no_bid": m.NoBid(
        order_id="ord-7f3a", provider=PROVIDER.node_id, reason="price_below_floor", detail="2.1"
    ),
    "award": m.Award(
        order_id="ord-7f3a",
        bid_id="bid-01",
        lease_id="lease-9",
        provider=PROVIDER.node_id,
        units=3,
        price=2_100_000,
        heartbeat_interval_ms=5000,
        lease_end_ms=NOW + 3_600_000,
    ),
    "accept": m.Accept(lease_id="lease-9", order_id="ord-7f3a", award_hash=SHA, start_ms=NOW),
    "decline": m.Decline(lease_id="lease-9", order_id="ord-7f3a", reason="devices gone"),
    "release": m.Release(order_id="ord-7f3a", bid_id="bid-02", reason="lost the auction"),
    "task_assign": m.TaskAssign(
        lease_id="lease-9",
        task_id="trial-0003",
        job_spec_hash=SHA,
        workspace_hash=SHA,
        command=["python", "train.py", "--lr", "0.001"],
        env={"WANDB_MODE": "offline"},
        timeout_ms=3_600_000,
    ),
    "task_status": m.TaskStatus(lease_id="lease-9", task_id="trial-0003", state="running"),
    "task_query": m.TaskQuery(
        lease_id="lease-9", task_id="trial-0003", log_offset=1024, wait_ms=10_000
    ),
    "workspace_chunk": m.WorkspaceChunk(
        lease_id="lease-9",
        workspace_hash="c" * 64,
        offset=0,
        total_size=3,
        data=b"tar",
    ),
    "workspace_status": m.WorkspaceStatus(workspace_hash="c" * 64, received=3, complete=True),
    "task_result": m.TaskResult(
        lease_id="lease-9",
        task_id="trial-0003",
        state="succeeded",
        exit_code=0,
        metrics={"val_loss": 0.2317, "accuracy": 0.9412, "epochs": 10},
        usage=m.Usage(wall_ms=61_000, cpu_ms=58_000, device_ms=61_000, max_rss_bytes=2 << 30),
        started_ms=NOW - 61_000,
        finished_ms=NOW,
        output_hash=SHA,
    ),
    "receipt": m.Receipt(
        lease_id="lease-9",
        task_id="trial-0003",
        provider=PROVIDER.node_id,
        tenant=TENANT.node_id,
        device_ms=61_000,
        price=2_100_000,
        amount=35_584,  # ceil(61_000 * 2_100_000 / 3_600_000)
        result_hash=SHA,
    ),
    "debit_note": m.DebitNote(
        lease_id="lease-9",
        provider=PROVIDER.node_id,
        tenant=TENANT.node_id,
        seq=1,
        device_ms=60_000,
        price=2_100_000,
        amount=35_000,  # ceil(60_000 * 2_100_000 / 3_600_000)
    ),
    "heartbeat": m.Heartbeat(lease_id="lease-9", seq=12, running=["trial-0003"]),
    "cancel": m.Cancel(lease_id="lease-9", task_id="trial-0003", reason="sweep finished"),
    "price_update": m.PriceUpdate(floors={"H100-SXM": 2_400_000, "L4": 380_000}),
    "sync_query": m.SyncQuery(lease_id="lease-9", task_id="w0", seq=3, wait_ms=10_000),
    "sync_chunk": m.SyncChunk(
        lease_id="lease-9", task_id="w0", seq=3, blob_hash=SHA, offset=0, total_size=4, data=b"MDL1"
    ),
    "sync_status": m.SyncStatus(lease_id="lease-9", task_id="w0", seq=3, received=4, complete=True),
}

#: Who sends each type; open_envelope insists that signer and named party agree.
SENDER = {
    name: PROVIDER
    if name
    in {
        "advert",
        "bid",
        "no_bid",
        "accept",
        "decline",
        "task_status",
        "task_result",
        "receipt",
        "workspace_status",
        "sync_status",
    }
    else TENANT
    for name in EXAMPLES
}


def open_(
    data: bytes,
    *,
    now: int = NOW,
    guard: ReplayGuard | None = None,
    recipient: str | None = PROVIDER.node_id,
    limits: Limits = DEFAULT_LIMITS,
) -> Envelope:
    return open_envelope(
        data,
        now_ms=now,
        replay=ReplayGuard() if guard is None else guard,
        recipient=recipient,
        limits=limits,
    )


def code_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        open_(data, **kwargs)
    return info.value.code


def seal_raw(
    identity: Identity,
    type_: str,
    body: Any,
    *,
    ts: int = NOW,
    nonce: bytes = NONCE,
    to: str | None = PROVIDER.node_id,
) -> bytes:
    """Sign any body, valid or not, exactly as a peer with its own encoder would."""
    payload = signed_bytes(
        type_=type_, sender_key=identity.public_key, recipient=to, ts_ms=ts, nonce=nonce, body=body
    )
    fields = {
        "body": body,
        "from": identity.public_key,
        "nonce": nonce,
        "sig": identity.sign(payload),
        "to": to,
        "ts": ts,
        "type": type_,
        "v": 1,
    }
    return encode(fields)


def bid_wire(**changes: Any) -> dict[str, Any]:
    return {**body_to_wire(EXAMPLES["bid"]), **changes}


def resign(fields: dict[str, Any], identity: Identity = PROVIDER) -> bytes:
    """Re-sign an edited envelope map so only the edit (not the signature) is wrong."""
    fields = dict(fields)
    fields.pop("sig", None)
    fields["sig"] = identity.sign(encode(fields))
    return encode(fields)


def corrupt_signature(data: bytes) -> bytes:
    """Flip one bit of the signature, leaving every other byte as it was."""
    sig = decode(data)["sig"]
    at = data.index(sig) + 10
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


BID_TO_TENANT = seal(PROVIDER, EXAMPLES["bid"], now_ms=NOW, nonce=NONCE, to=TENANT.node_id)


class TestRoundTrip:
    def test_examples_cover_every_type(self) -> None:
        assert set(EXAMPLES) == set(MESSAGE_TYPES)
        for name, body in EXAMPLES.items():
            assert type(body) is MESSAGE_TYPES[name]

    @pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
    def test_seal_then_open_gives_back_the_body(self, type_: str) -> None:
        body, sender = EXAMPLES[type_], SENDER[type_]
        data = seal(sender, body, now_ms=NOW, nonce=NONCE, to=PROVIDER.node_id)
        env = open_(data)
        assert env.type == type_
        assert env.body == body
        assert env.sender == sender.node_id
        assert env.sender_key == sender.public_key
        assert env.recipient == PROVIDER.node_id
        assert (env.ts_ms, env.nonce, env.raw) == (NOW, NONCE, data)
        assert env.digest == hashlib.sha256(data).hexdigest()

    @given(
        type_=st.sampled_from(sorted(MESSAGE_TYPES)),
        ts=st.integers(0, 2**63 - 1),
        nonce=st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
        addressed=st.booleans(),
    )
    def test_round_trip_for_any_time_nonce_and_recipient(
        self, type_: str, ts: int, nonce: bytes, addressed: bool
    ) -> None:
        to = PROVIDER.node_id if addressed else None
        data = seal(SENDER[type_], EXAMPLES[type_], now_ms=ts, nonce=nonce, to=to)
        env = open_(data, now=ts)
        assert (env.body, env.ts_ms, env.nonce, env.recipient) == (EXAMPLES[type_], ts, nonce, to)
        assert seal(SENDER[type_], env.body, now_ms=ts, nonce=nonce, to=to) == data

    @given(
        st.builds(
            m.Bid,
            order_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"),
            bid_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z"),
            provider=st.just(PROVIDER.node_id),
            units=st.integers(1, 100_000),
            devices=st.lists(st.from_regex(r"\Agpu[0-9]{1,4}\Z"), min_size=1, max_size=20),
            model=st.text(min_size=1, max_size=64),
            price=st.integers(0, 2**63 - 1),
            expires_ms=st.integers(0, 2**63 - 1),
        )
    )
    def test_round_trip_of_generated_bids(self, bid: m.Bid) -> None:
        assert open_(seal(PROVIDER, bid, now_ms=NOW, nonce=NONCE)).body == bid

    @given(
        st.dictionaries(
            st.text(min_size=1, max_size=64),
            st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**63), 2**63 - 1),
            max_size=20,
        )
    )
    def test_round_trip_keeps_metric_floats_and_ints_exact(
        self, metrics: dict[str, float | int]
    ) -> None:
        result = EXAMPLES["task_result"].model_copy(update={"metrics": metrics})
        got = open_(seal(PROVIDER, result, now_ms=NOW, nonce=NONCE)).body
        assert isinstance(got, m.TaskResult)
        for name, value in metrics.items():
            assert type(got.metrics[name]) is type(value)
            if isinstance(value, float):
                assert struct.pack(">d", got.metrics[name]) == struct.pack(">d", value)
            else:
                assert got.metrics[name] == value

    def test_wire_form_has_the_documented_fields(self) -> None:
        fields = decode(BID_TO_TENANT)
        assert list(fields) == ["body", "from", "nonce", "sig", "to", "ts", "type", "v"]
        assert fields["v"] == 1
        assert fields["type"] == "bid"
        assert fields["from"] == PROVIDER.public_key
        assert fields["to"] == TENANT.node_id
        assert fields["body"] == body_to_wire(EXAMPLES["bid"])
        assert len(fields["sig"]) == 64

    def test_signature_covers_the_map_without_sig(self) -> None:
        fields = decode(BID_TO_TENANT)
        sig = fields.pop("sig")
        expected = signed_bytes(
            type_="bid",
            sender_key=PROVIDER.public_key,
            recipient=TENANT.node_id,
            ts_ms=NOW,
            nonce=NONCE,
            body=body_to_wire(EXAMPLES["bid"]),
        )
        assert encode(fields) == expected
        assert sig == PROVIDER.sign(expected)

    def test_defaults_are_sent_on_the_wire(self) -> None:
        fields = decode(seal(TENANT, EXAMPLES["heartbeat"], now_ms=NOW, nonce=NONCE))
        assert fields["body"] == {"lease_id": "lease-9", "running": ["trial-0003"], "seq": 12}
        fields = decode(seal(TENANT, m.Heartbeat(lease_id="l", seq=0), now_ms=NOW, nonce=NONCE))
        assert fields["body"]["running"] == []

    def test_omitted_defaulted_fields_are_accepted(self) -> None:
        data = seal_raw(TENANT, "heartbeat", {"lease_id": "lease-9", "seq": 1})
        body = open_(data).body
        assert body == m.Heartbeat(lease_id="lease-9", seq=1, running=[])

    def test_replay_none_skips_time_and_nonce_checks(self) -> None:
        # For stored adverts re-verified long after they were sent.
        data = seal(PROVIDER, ADVERT, now_ms=NOW, nonce=NONCE)
        for _ in range(2):
            env = open_envelope(data, now_ms=NOW + 10**9, replay=None)
            assert env.body == ADVERT


class TestSealRefuses:
    @pytest.mark.parametrize("size", [0, 15, 17, 32])
    def test_nonce_of_wrong_size(self, size: int) -> None:
        with pytest.raises(LocalProtocolError):
            seal(TENANT, EXAMPLES["heartbeat"], now_ms=NOW, nonce=b"\x00" * size)

    @pytest.mark.parametrize("to", ["", "bob", PROVIDER.node_id.upper(), PROVIDER.node_id + "a"])
    def test_recipient_that_is_not_a_node_id(self, to: str) -> None:
        with pytest.raises(LocalProtocolError):
            seal(TENANT, EXAMPLES["heartbeat"], now_ms=NOW, nonce=NONCE, to=to)

    def test_base_body_is_not_a_message(self) -> None:
        with pytest.raises(LocalProtocolError):
            seal(TENANT, Body(), now_ms=NOW, nonce=NONCE)


class TestBitFlips:
    def test_every_single_bit_flip_is_rejected_with_a_protocol_error(self) -> None:
        assert open_(BID_TO_TENANT, recipient=TENANT.node_id).body == EXAMPLES["bid"]
        escaped: list[str] = []
        codes: set[str] = set()
        for bit in range(len(BID_TO_TENANT) * 8):
            mutated = bytearray(BID_TO_TENANT)
            mutated[bit // 8] ^= 0x80 >> (bit % 8)
            try:
                open_(bytes(mutated), recipient=TENANT.node_id)
            except RemoteProtocolError as e:
                codes.add(e.code)
            except Exception as e:  # the point of the test: nothing else may escape
                escaped.append(f"bit {bit}: {type(e).__name__}: {e}")
            else:
                escaped.append(f"bit {bit}: accepted")
        assert escaped == []
        # Flips land in headers, keys, scalars and the signature, so many checks fire.
        assert {"bad_signature", "malformed", "bad_envelope", "non_canonical"} <= codes


class TestRejections:
    """Each way a message can be wrong is rejected with its own code."""

    def test_forged_signature_by_another_key(self) -> None:
        fields = decode(BID_TO_TENANT)
        fields["sig"] = MALLORY.sign(encode({k: v for k, v in fields.items() if k != "sig"}))
        assert code_of(encode(fields), recipient=TENANT.node_id) == "bad_signature"

    def test_swapped_sender_key(self) -> None:
        data = seal(MALLORY, EXAMPLES["order"], now_ms=NOW, nonce=NONCE)
        fields = decode(data)
        fields["from"] = TENANT.public_key  # claim the tenant sent Mallory's order
        assert code_of(encode(fields)) == "bad_signature"

    @pytest.mark.parametrize("type_", ["advert", "bid", "no_bid", "order"])
    def test_body_naming_someone_else_as_the_signer(self, type_: str) -> None:
        # Mallory signs correctly, but the body claims to come from another node.
        data = seal(MALLORY, EXAMPLES[type_], now_ms=NOW, nonce=NONCE)
        assert code_of(data) == "sender_mismatch"

    def test_wrong_recipient(self) -> None:
        assert code_of(BID_TO_TENANT, recipient=PROVIDER.node_id) == "wrong_recipient"

    def test_unaddressed_message_is_for_everyone(self) -> None:
        data = seal(PROVIDER, ADVERT, now_ms=NOW, nonce=NONCE, to=None)
        assert open_(data, recipient=TENANT.node_id).recipient is None
        assert open_(data, recipient=MALLORY.node_id).body == ADVERT

    def test_no_recipient_given_accepts_any_address(self) -> None:
        assert open_(BID_TO_TENANT, recipient=None).recipient == TENANT.node_id

    def test_replayed_nonce(self) -> None:
        guard = ReplayGuard()
        open_(BID_TO_TENANT, guard=guard, recipient=TENANT.node_id)
        assert code_of(BID_TO_TENANT, guard=guard, recipient=TENANT.node_id) == "replay"

    def test_forgery_does_not_burn_the_nonce(self) -> None:
        guard = ReplayGuard()
        forged = corrupt_signature(BID_TO_TENANT)
        assert code_of(forged, guard=guard, recipient=TENANT.node_id) == "bad_signature"
        open_(BID_TO_TENANT, guard=guard, recipient=TENANT.node_id)  # still admitted

    def test_stale_timestamp(self) -> None:
        old = seal(TENANT, EXAMPLES["heartbeat"], now_ms=NOW - 120_001, nonce=NONCE)
        assert code_of(old) == "stale"

    def test_future_timestamp(self) -> None:
        ahead = seal(TENANT, EXAMPLES["heartbeat"], now_ms=NOW + 30_001, nonce=NONCE)
        assert code_of(ahead) == "future"

    def test_oversized_envelope(self) -> None:
        big = m.Directory(adverts=[b"\x00" * 600_000, b"\x00" * 600_000])
        data = seal(TENANT, big, now_ms=NOW, nonce=NONCE)
        assert len(data) > DEFAULT_LIMITS.max_size
        assert code_of(data) == "too_large"

    def test_deeply_nested_body(self) -> None:
        nested: Any = "x"
        for _ in range(40):
            nested = [nested]
        data = seal_raw(TENANT, "heartbeat", {"lease_id": "l", "seq": 1, "running": nested})
        assert code_of(data) == "too_deep"
        assert code_of(b"\x81\xa4body" + b"\x91" * 50_000 + b"\xc0") == "too_deep"

    @pytest.mark.parametrize(
        ("change", "why"),
        [
            ({"units": "3"}, "string for an int"),
            ({"units": 3.0}, "float for an int"),
            ({"units": True}, "bool for an int"),
            ({"units": 0}, "below the minimum"),
            ({"units": 100_001}, "above the maximum"),
            ({"price": 2.1}, "float for a price"),
            ({"price": -1}, "negative price"),
            ({"price": None}, "nil for a required int"),
            ({"provider": "not-a-node-id"}, "bad node id"),
            ({"devices": []}, "empty list"),
            ({"devices": "gpu2"}, "string for a list"),
            ({"model": b"H100-SXM"}, "bin for a string"),
            ({"bid_id": "-starts-with-dash"}, "identifier pattern"),
        ],
    )
    def test_wrong_field_type_or_range(self, change: dict[str, Any], why: str) -> None:
        data = seal_raw(PROVIDER, "bid", bid_wire(**change))
        assert code_of(data) == "invalid_field", why

    def test_missing_field(self) -> None:
        body = bid_wire()
        del body["price"]
        assert code_of(seal_raw(PROVIDER, "bid", body)) == "invalid_field"

    def test_unknown_body_field(self) -> None:
        data = seal_raw(PROVIDER, "bid", bid_wire(discount=5))
        assert code_of(data) == "unknown_field"

    @pytest.mark.parametrize(
        "body",
        [
            bid_wire(discount=5, price="cheap"),  # unknown after an invalid one
            {k: v for k, v in bid_wire(aaa=1).items() if k != "units"},  # and a missing one
            {**bid_wire(units=0), "zzz": None},
        ],
    )
    def test_an_unknown_field_wins_over_an_invalid_one(self, body: dict[str, Any]) -> None:
        """docs/protocol.md section 6, step 13: unknown fields are reported first."""
        assert code_of(seal_raw(PROVIDER, "bid", body)) == "unknown_field"

    def test_an_unknown_nested_field_wins_over_an_invalid_top_level_one(self) -> None:
        body = body_to_wire(ADVERT)
        body["seq"] = -1
        body["devices"][0]["colour"] = "green"
        assert code_of(seal_raw(PROVIDER, "advert", body)) == "unknown_field"

    def test_unknown_nested_field(self) -> None:
        body = body_to_wire(ADVERT)
        body["devices"][0]["colour"] = "green"
        assert code_of(seal_raw(PROVIDER, "advert", body)) == "unknown_field"

    def test_invalid_nested_record(self) -> None:
        body = body_to_wire(ADVERT)
        body["devices"][0]["free"] = ["gpu99"]  # not one of its ids
        assert code_of(seal_raw(PROVIDER, "advert", body)) == "invalid_field"

    @pytest.mark.parametrize(
        ("digest", "why"),
        [
            (m.pack_digest({PROVIDER.node_id: 1})[:-1], "length not a multiple of 40"),
            (b"A" * 32 + bytes(8), "node id outside the base32 alphabet"),
            (b"a" * 32 + b"\x80" + bytes(7), "seq above 2^63-1"),
            (b"b" * 32 + bytes(8) + b"a" * 32 + bytes(8), "records not sorted"),
            (b"a" * 32 + bytes(8) + b"a" * 32 + bytes(8), "a provider twice"),
            (b"a" * 40 * 20_001, "more than 20,000 records"),
        ],
    )
    def test_malformed_packed_digest(self, digest: bytes, why: str) -> None:
        data = seal_raw(PROVIDER, "directory_request", {"digest": digest, "limit": 10})
        assert code_of(data) == "invalid_field", why

    def test_checked_digests_are_remembered_but_rejections_are_not(self) -> None:
        # Good digests are memoised (nodes in sync send the same bytes); a bad one must
        # fail every time, also right after a good digest of the same length passed.
        good = m.pack_digest({PROVIDER.node_id: 1, TENANT.node_id: 2})
        bad = good[40:] + good[:40]  # the same two records, out of order
        for _ in range(2):
            req = open_(seal_raw(PROVIDER, "directory_request", {"digest": good, "limit": 10}))
            assert isinstance(req.body, m.DirectoryRequest)
            data = seal_raw(PROVIDER, "directory_request", {"digest": bad, "limit": 10})
            assert code_of(data) == "invalid_field"

    def test_digest_memo_keeps_at_most_its_bytes(self) -> None:
        memo = m._DigestMemo(max_bytes=100)
        first, second, third = (bytes([i]) * 40 for i in range(3))
        for d in (first, second, third):
            memo.add(d)
        assert first not in memo
        assert second in memo
        assert third in memo
        memo.add(b"x" * 101)  # larger than the whole memo: not kept
        assert b"x" * 101 not in memo
        assert third in memo

    def test_packed_digest_round_trip(self) -> None:
        held = {TENANT.node_id: 2**63 - 1, PROVIDER.node_id: 0, "a" * 32: 1_700_000_000_000}
        packed = m.pack_digest(held)
        assert len(packed) == 3 * m.DIGEST_RECORD
        req = open_(seal_raw(PROVIDER, "directory_request", {"digest": packed, "limit": 10}))
        assert isinstance(req.body, m.DirectoryRequest)
        assert list(m.unpack_digest(req.body.digest)) == sorted(held.items())

    def test_unknown_message_type(self) -> None:
        data = seal_raw(PROVIDER, "bribe", {"amount": 1})
        assert code_of(data) == "unknown_type"

    def test_trailing_bytes(self) -> None:
        assert code_of(BID_TO_TENANT + b"\x00", recipient=TENANT.node_id) == "malformed"

    def test_not_msgpack_at_all(self) -> None:
        assert code_of(b'{"type": "bid"}') == "malformed"

    def test_ext_type_in_body(self) -> None:
        fields = decode(BID_TO_TENANT)
        raw = msgpack.packb(
            {**fields, "body": {**fields["body"], "model": msgpack.ExtType(1, b"")}},
            use_bin_type=True,
        )
        assert code_of(raw, recipient=TENANT.node_id) == "malformed"


def packed(fields: dict[str, Any], order: list[str] | None = None) -> bytes:
    """msgpack with the caller's key order (msgpack keeps insertion order)."""
    keys = order or sorted(fields)
    data: bytes = msgpack.packb({k: fields[k] for k in keys}, use_bin_type=True)
    return data


class TestNonCanonical:
    """A peer's encoder that differs from the canonical one is rejected, not tolerated."""

    def test_unsorted_keys(self) -> None:
        fields = decode(BID_TO_TENANT)
        raw = packed(fields, order=list(reversed(list(fields))))
        assert code_of(raw, recipient=TENANT.node_id) == "non_canonical"

    def test_duplicate_keys(self) -> None:
        raw = bytearray(BID_TO_TENANT)
        raw[0] += 1  # the map claims one more pair ...
        raw += encode("v") + encode(1)  # ... and repeats the last key, "v"
        assert code_of(bytes(raw), recipient=TENANT.node_id) == "duplicate_key"

    def test_non_minimal_integer(self) -> None:
        fields = decode(BID_TO_TENANT)
        canonical = packed(fields)
        assert canonical == BID_TO_TENANT
        # v = 1 as uint8 (0xcc 0x01) instead of positive fixint 0x01
        raw = canonical[:-1] + b"\xcc\x01"
        assert code_of(raw, recipient=TENANT.node_id) == "non_canonical"

    def test_float32(self) -> None:
        result = EXAMPLES["task_result"].model_copy(update={"metrics": {"lr": 0.5}})
        data = seal(PROVIDER, result, now_ms=NOW, nonce=NONCE)
        f64 = b"\xcb" + struct.pack(">d", 0.5)
        assert data.count(f64) == 1
        raw = data.replace(f64, b"\xca" + struct.pack(">f", 0.5))  # same value, 32 bits
        assert code_of(raw) == "non_canonical"


class TestEnvelopeShape:
    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("from", b"\x01" * 31),
            ("from", PROVIDER.node_id),
            ("nonce", b"\x01" * 15),
            ("nonce", 7),
            ("sig", b"\x01" * 63),
            ("ts", 1.7e12),
            ("ts", True),
            ("ts", "1700000000000"),
            ("to", "tenant"),
            ("to", TENANT.public_key),
            ("type", b"bid"),
            ("body", [1, 2]),
            ("v", "1"),
        ],
    )
    def test_field_of_wrong_type_or_size(self, key: str, value: Any) -> None:
        fields = decode(BID_TO_TENANT)
        fields[key] = value
        data = encode(fields) if key == "sig" else resign(fields)
        assert code_of(data, recipient=TENANT.node_id) == "bad_envelope"

    @pytest.mark.parametrize("key", ["body", "from", "nonce", "sig", "to", "ts", "type", "v"])
    def test_missing_field(self, key: str) -> None:
        fields = decode(BID_TO_TENANT)
        del fields[key]
        assert code_of(encode(fields), recipient=TENANT.node_id) == "bad_envelope"

    def test_extra_field(self) -> None:
        fields = decode(BID_TO_TENANT)
        fields["priority"] = 1
        assert code_of(resign(fields), recipient=TENANT.node_id) == "bad_envelope"

    @pytest.mark.parametrize("value", [[], "envelope", 1, None, b"\x00"])
    def test_not_a_map(self, value: Any) -> None:
        assert code_of(encode(value)) == "bad_envelope"

    @pytest.mark.parametrize("version", [0, 2, 255])
    def test_other_protocol_version(self, version: int) -> None:
        fields = decode(BID_TO_TENANT)
        fields["v"] = version
        assert code_of(resign(fields), recipient=TENANT.node_id) == "bad_version"


class TestCheckOrder:
    """docs/protocol.md promises this order; implementers and operators rely on it."""

    def test_timestamp_before_signature(self) -> None:
        fields = decode(seal(MALLORY, EXAMPLES["heartbeat"], now_ms=NOW - 10**7, nonce=NONCE))
        fields["from"] = TENANT.public_key
        assert code_of(encode(fields)) == "stale"

    def test_signature_before_recipient(self) -> None:
        fields = decode(BID_TO_TENANT)
        fields["sig"] = bytes(64)
        assert code_of(encode(fields), recipient=MALLORY.node_id) == "bad_signature"

    def test_signature_before_body(self) -> None:
        data = corrupt_signature(seal_raw(PROVIDER, "bid", bid_wire(discount=5)))
        assert code_of(data) == "bad_signature"

    def test_recipient_before_replay(self) -> None:
        guard = ReplayGuard()
        open_(BID_TO_TENANT, guard=guard, recipient=TENANT.node_id)
        assert code_of(BID_TO_TENANT, guard=guard, recipient=MALLORY.node_id) == "wrong_recipient"

    def test_replay_before_body(self) -> None:
        guard = ReplayGuard()
        bad = seal_raw(PROVIDER, "bid", bid_wire(discount=5))
        assert code_of(bad, guard=guard) == "unknown_field"
        assert code_of(bad, guard=guard) == "replay"

    def test_type_before_signature(self) -> None:
        fields = decode(BID_TO_TENANT)
        fields["type"] = "bribe"
        assert code_of(encode(fields), recipient=TENANT.node_id) == "unknown_type"


class TestResentVerbatim:
    """docs/protocol.md section 5: a task_result reply may arrive again as the same bytes."""

    RESULT = seal(PROVIDER, EXAMPLES["task_result"], now_ms=NOW, nonce=NONCE, to=TENANT.node_id)

    def open_reply(self, data: bytes, guard: ReplayGuard, now: int = NOW) -> Envelope:
        return open_envelope(
            data, now_ms=now, replay=guard, recipient=TENANT.node_id, verbatim=RESENT_VERBATIM
        )

    def test_the_same_result_twice_and_long_after_is_taken(self) -> None:
        guard = ReplayGuard()
        first = self.open_reply(self.RESULT, guard)
        assert self.open_reply(self.RESULT, guard).digest == first.digest
        assert self.open_reply(self.RESULT, guard, now=NOW + 86_400_000).body == first.body
        assert len(guard) == 0  # nothing remembered for documents

    def test_everything_but_freshness_is_still_checked(self) -> None:
        guard = ReplayGuard()
        with pytest.raises(RemoteProtocolError, match="bad_signature"):
            self.open_reply(corrupt_signature(self.RESULT), guard)
        other = seal(PROVIDER, EXAMPLES["task_result"], now_ms=NOW, nonce=NONCE, to="a" * 32)
        with pytest.raises(RemoteProtocolError, match="wrong_recipient"):
            self.open_reply(other, guard)

    def test_other_replies_are_still_fresh_once(self) -> None:
        guard = ReplayGuard()
        status = seal(PROVIDER, EXAMPLES["task_status"], now_ms=NOW, nonce=NONCE)
        self.open_reply(status, guard)
        with pytest.raises(RemoteProtocolError, match="replay"):
            self.open_reply(status, guard)

    def test_as_a_request_a_repeated_result_is_a_replay(self) -> None:
        guard = ReplayGuard()
        open_envelope(self.RESULT, now_ms=NOW, replay=guard, recipient=TENANT.node_id)
        with pytest.raises(RemoteProtocolError, match="replay"):
            open_envelope(self.RESULT, now_ms=NOW, replay=guard, recipient=TENANT.node_id)
