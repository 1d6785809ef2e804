"""Replay protection: a timestamp window plus the nonces seen inside it.

A message is accepted only if ``now - window <= ts <= now + skew`` and its
(sender, nonce) pair was not seen before. A pair needs remembering only while its
timestamp is inside the window: after that the timestamp check alone rejects a
replay. So entries expire with the window and memory is bounded by the window,
not by how long the node runs.

Under a flood the window could still hold many entries, so the guard also has a
hard cap. When it is full the oldest entry is evicted and the *floor* is raised to
its timestamp: from then on anything at or below the floor is rejected as stale.
This keeps the guarantee (no replay is ever accepted) at the price of rejecting
some old-but-honest messages during the flood. The floor is reported in the error.
"""

from __future__ import annotations

import heapq
from collections import deque

from protocol.errors import FutureError, ReplayError, StaleError


class ReplayGuard:
    """Rejects stale, future and replayed (sender, nonce) pairs. Time is passed in (ms)."""

    def __init__(
        self, window_ms: int = 120_000, skew_ms: int = 30_000, max_entries: int = 1_000_000
    ) -> None:
        if window_ms <= 0 or skew_ms < 0 or max_entries <= 0:
            raise ValueError("window_ms and max_entries must be positive, skew_ms >= 0")
        self.window_ms = window_ms
        self.skew_ms = skew_ms
        self.max_entries = max_entries
        self._seen: set[tuple[bytes, bytes]] = set()
        # The same pairs ordered by timestamp, for expiry and eviction, in two parts:
        # those that arrived in timestamp order (the common case: one queue, O(1) at
        # both ends and cache-friendly) and the late ones (a min-heap). The oldest
        # entry is the older of the two heads.
        self._in_order: deque[tuple[int, tuple[bytes, bytes]]] = deque()
        self._late: list[tuple[int, tuple[bytes, bytes]]] = []
        self._floor_ms = -(2**63)

    def __len__(self) -> int:
        return len(self._seen)

    def check_time(self, ts_ms: int, now_ms: int) -> None:
        """Cheap pre-check before the signature is verified."""
        if ts_ms > now_ms + self.skew_ms:
            raise FutureError(
                f"timestamp {ts_ms} is {ts_ms - now_ms} ms ahead; skew allowed is {self.skew_ms}"
            )
        if ts_ms < now_ms - self.window_ms or ts_ms <= self._floor_ms:
            lowest = max(now_ms - self.window_ms, self._floor_ms + 1)
            raise StaleError(f"timestamp {ts_ms} is older than the accepted minimum {lowest}")

    def admit(self, sender: bytes, nonce: bytes, ts_ms: int, now_ms: int) -> None:
        """Check the window and the nonce, then remember the pair. Raises on rejection."""
        horizon = now_ms - self.window_ms
        queue, late = self._in_order, self._late
        if (queue and queue[0][0] < horizon) or (late and late[0][0] < horizon):
            self._expire(horizon)
        self.check_time(ts_ms, now_ms)
        key = (sender, nonce)
        seen = self._seen
        if key in seen:
            raise ReplayError("this sender already used this nonce inside the replay window")
        seen.add(key)
        if not queue or ts_ms >= queue[-1][0]:
            queue.append((ts_ms, key))
        else:
            heapq.heappush(late, (ts_ms, key))
        while len(seen) > self.max_entries:
            old_ts, old_key = self._pop_oldest()
            seen.discard(old_key)
            self._floor_ms = max(self._floor_ms, old_ts)

    def _pop_oldest(self) -> tuple[int, tuple[bytes, bytes]]:
        queue, late = self._in_order, self._late
        if late and (not queue or late[0][0] < queue[0][0]):
            return heapq.heappop(late)
        return queue.popleft()

    def _expire(self, horizon_ms: int) -> None:
        queue, late = self._in_order, self._late
        while (queue and queue[0][0] < horizon_ms) or (late and late[0][0] < horizon_ms):
            _, key = self._pop_oldest()
            self._seen.discard(key)
