"""The log a provider sends in ``task_status``: whatever bytes a trial printed, every
piece fits the ``log`` field (65,536 bytes of UTF-8) and the tenant can open the reply.

Before, a trial printing 60,000 invalid bytes produced 60,000 replacement characters
(180,000 bytes of UTF-8): the provider's reply was refused by the tenant's codec as
``too_long`` (or, once the schema counted bytes, the provider failed building it).
"""

from __future__ import annotations

import pytest

from node.provider.work import LOG_CHUNK, log_piece
from protocol.envelope import open_envelope, seal
from protocol.identity import Identity
from protocol.messages import MAX_STR_BYTES, TaskStatus

PROVIDER = Identity.from_seed(bytes(range(32)))
TENANT = Identity.from_seed(bytes(range(1, 33)))
NOW = 1_700_000_000_000

LOGS = {
    "invalid bytes": b"\xff" * 200_000,
    "text": b"epoch 1 loss 0.5\n" * 10_000,
    "three-byte characters": "€".encode() * 50_000,
    "four-byte characters": "🙂".encode() * 40_000,
    "mixed": (b"ok \xe2\x82" + "ü".encode() + b"\x80\xc3") * 30_000,
}


def pieces(log: bytes) -> list[tuple[str, int]]:
    out, offset = [], 0
    while offset < len(log):
        text, offset = log_piece(log, offset)
        out.append((text, offset))
    return out


@pytest.mark.parametrize("name", list(LOGS))
class TestLogPieces:
    def test_every_piece_seals_and_opens(self, name: str) -> None:
        for i, (text, offset) in enumerate(pieces(LOGS[name])):
            assert len(text.encode()) <= MAX_STR_BYTES
            body = TaskStatus(
                lease_id="lease-9", task_id="t1", state="running", log=text, log_offset=offset
            )
            raw = seal(PROVIDER, body, now_ms=NOW, nonce=i.to_bytes(16, "big"), to=TENANT.node_id)
            assert open_envelope(raw, now_ms=NOW, replay=None).body == body

    def test_pieces_cover_the_log_and_make_progress(self, name: str) -> None:
        log = LOGS[name]
        offsets = [offset for _, offset in pieces(log)]
        assert offsets[-1] == len(log)
        assert all(b > a for a, b in zip([0, *offsets], offsets, strict=False))


@pytest.mark.parametrize("name", ["text", "three-byte characters", "four-byte characters"])
def test_valid_utf8_arrives_intact_across_pieces(name: str) -> None:
    log = LOGS[name]
    assert "".join(text for text, _ in pieces(log)) == log.decode()


def test_a_piece_of_plain_text_is_a_full_chunk() -> None:
    text, offset = log_piece(b"x" * 100_000, 0)
    assert offset == LOG_CHUNK
    assert text == "x" * LOG_CHUNK
