"""ReplayGuard, driven by stepping ``now`` (milliseconds); nothing sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import RemoteProtocolError
from protocol.replay import ReplayGuard

T0 = 1_700_000_000_000
ALICE = b"A" * 32
BOB = b"B" * 32


def nonce(i: int) -> bytes:
    return i.to_bytes(16, "big")


def rejection(guard: ReplayGuard, sender: bytes, n: bytes, ts: int, now: int) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        guard.admit(sender, n, ts, now)
    return info.value.code


class TestWindow:
    def test_defaults_are_the_documented_ones(self) -> None:
        guard = ReplayGuard()
        assert (guard.window_ms, guard.skew_ms, guard.max_entries) == (120_000, 30_000, 1_000_000)

    def test_fresh_message_is_admitted_once(self) -> None:
        guard = ReplayGuard()
        guard.admit(ALICE, nonce(1), T0, T0)
        assert rejection(guard, ALICE, nonce(1), T0, T0 + 1) == "replay"
        assert len(guard) == 1

    def test_nonces_are_per_sender(self) -> None:
        guard = ReplayGuard()
        guard.admit(ALICE, nonce(1), T0, T0)
        guard.admit(BOB, nonce(1), T0, T0)
        assert len(guard) == 2

    def test_edges_of_the_window_are_inclusive(self) -> None:
        guard = ReplayGuard(window_ms=1000, skew_ms=100)
        guard.admit(ALICE, nonce(1), T0 - 1000, T0)
        guard.admit(ALICE, nonce(2), T0 + 100, T0)
        assert rejection(guard, ALICE, nonce(3), T0 - 1001, T0) == "stale"
        assert rejection(guard, ALICE, nonce(4), T0 + 101, T0) == "future"

    def test_check_time_rejects_without_remembering(self) -> None:
        guard = ReplayGuard(window_ms=1000, skew_ms=100)
        guard.check_time(T0, T0)
        with pytest.raises(RemoteProtocolError) as info:
            guard.check_time(T0 - 5000, T0)
        assert info.value.code == "stale"
        assert len(guard) == 0

    def test_a_replay_after_its_pair_is_forgotten_is_still_rejected_as_stale(self) -> None:
        guard = ReplayGuard(window_ms=1000, skew_ms=100)
        guard.admit(ALICE, nonce(1), T0, T0)
        later = T0 + 5000
        guard.admit(BOB, nonce(9), later, later)  # expiry happens on admit
        assert len(guard) == 1
        assert rejection(guard, ALICE, nonce(1), T0, later) == "stale"

    @pytest.mark.parametrize(
        "kwargs", [{"window_ms": 0}, {"skew_ms": -1}, {"max_entries": 0}, {"window_ms": -5}]
    )
    def test_nonsense_settings_are_refused(self, kwargs: dict[str, int]) -> None:
        with pytest.raises(ValueError, match="positive"):
            ReplayGuard(**kwargs)


class TestMemory:
    def test_memory_drops_back_once_time_passes_the_window(self) -> None:
        guard = ReplayGuard(window_ms=10_000, skew_ms=1000)
        for i in range(5000):
            guard.admit(ALICE, nonce(i), T0, T0)
        assert len(guard) == 5000
        now = T0 + 10_001
        guard.admit(BOB, nonce(0), now, now)
        assert len(guard) == 1

    def test_steady_traffic_is_bounded_by_the_window_not_the_uptime(self) -> None:
        # 10 messages per simulated second for 10 simulated minutes, 60 s window.
        guard = ReplayGuard(window_ms=60_000, skew_ms=1000)
        now, i, peak = T0, 0, 0
        for _ in range(600):
            for _ in range(10):
                guard.admit(ALICE, nonce(i), now, now)
                i += 1
            peak = max(peak, len(guard))
            now += 1000
        assert i == 6000
        assert peak <= 61 * 10

    def test_future_dated_entries_expire_too(self) -> None:
        guard = ReplayGuard(window_ms=1000, skew_ms=500)
        guard.admit(ALICE, nonce(1), T0 + 500, T0)
        now = T0 + 1501
        guard.admit(BOB, nonce(1), now, now)
        assert len(guard) == 1


class TestHardCap:
    def test_cap_evicts_the_oldest_and_raises_the_floor(self) -> None:
        guard = ReplayGuard(window_ms=60_000, skew_ms=1000, max_entries=3)
        for i in range(4):
            guard.admit(ALICE, nonce(i), T0 + i, T0 + 10)
        assert len(guard) == 3
        # nonce 0 was evicted; replaying it must still fail, now on the floor
        assert rejection(guard, ALICE, nonce(0), T0, T0 + 10) == "stale"
        # the floor also costs honest old messages during the flood, by design
        assert rejection(guard, BOB, nonce(100), T0, T0 + 10) == "stale"
        assert rejection(guard, ALICE, nonce(1), T0 + 1, T0 + 10) == "replay"
        guard.admit(BOB, nonce(100), T0 + 1, T0 + 10)
        assert len(guard) == 3

    @given(
        st.lists(
            st.tuples(
                st.sampled_from([ALICE, BOB]),
                st.integers(0, 5),  # few nonces, so collisions are frequent
                st.integers(-3000, 3000),  # ts relative to now
                st.integers(0, 1500),  # how far now advances first
            ),
            max_size=80,
        )
    )
    def test_no_signed_message_is_ever_admitted_twice(
        self, steps: list[tuple[bytes, int, int, int]]
    ) -> None:
        # A signed message is (sender, nonce, ts): the exact bytes an attacker can replay.
        guard = ReplayGuard(window_ms=2000, skew_ms=500, max_entries=4)
        admitted: set[tuple[bytes, int, int]] = set()
        now = T0
        for sender, n, rel_ts, advance in steps:
            now += advance
            msg = (sender, n, now + rel_ts)
            for attempt in (msg, *admitted):  # also replay everything admitted so far
                code = None
                try:
                    guard.admit(attempt[0], nonce(attempt[1]), attempt[2], now)
                except RemoteProtocolError as e:
                    code = e.code
                if code is not None:
                    assert code in {"stale", "future", "replay"}
                    continue
                assert attempt not in admitted, f"replay accepted: {attempt}"
                admitted.add(attempt)
            assert len(guard) <= guard.max_entries
