"""The DiLoCo outer-step messages refuse what they must at the boundary."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.messages import MAX_SYNC_BLOB, SyncChunk, SyncQuery, SyncStatus

SHA = "a" * 64


def chunk(**over: object) -> SyncChunk:
    fields: dict[str, object] = {
        "lease_id": "lease-9",
        "task_id": "w0",
        "seq": 1,
        "blob_hash": SHA,
        "offset": 0,
        "total_size": 4,
        "data": b"MDL1",
    }
    fields.update(over)
    return SyncChunk.model_validate(fields)


class TestSyncChunk:
    def test_a_good_chunk_validates(self) -> None:
        assert chunk().total_size == 4

    def test_data_past_total_size_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="past total_size"):
            chunk(offset=1)

    def test_more_than_512_kib_of_data_is_refused(self) -> None:
        with pytest.raises(ValidationError):
            chunk(data=b"x" * (512 * 1024 + 1), total_size=1 << 20)

    def test_a_blob_above_the_wire_cap_is_refused(self) -> None:
        with pytest.raises(ValidationError):
            chunk(total_size=MAX_SYNC_BLOB + 1)

    @pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, ""])
    def test_a_malformed_hash_is_refused(self, bad: str) -> None:
        with pytest.raises(ValidationError):
            chunk(blob_hash=bad)

    def test_seq_is_bounded(self) -> None:
        with pytest.raises(ValidationError):
            chunk(seq=1_000_001)
        with pytest.raises(ValidationError):
            chunk(seq=-1)

    def test_unknown_fields_are_refused(self) -> None:
        with pytest.raises(ValidationError):
            chunk(compression="int8")


class TestSyncQueryAndStatus:
    def test_a_long_poll_is_bounded(self) -> None:
        with pytest.raises(ValidationError):
            SyncQuery(lease_id="l", task_id="w0", seq=0, wait_ms=30_001)

    def test_strict_types(self) -> None:
        with pytest.raises(ValidationError):
            SyncStatus.model_validate(
                {"lease_id": "l", "task_id": "w0", "seq": "1", "received": 0, "complete": False}
            )
