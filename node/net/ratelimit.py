"""Per-peer token buckets. Time is passed in, so tests step it instead of sleeping."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """A token bucket per key, holding at most ``max_keys`` buckets (LRU-evicted).

    A bucket refills at ``rate`` tokens per second up to ``burst``; a message costs one.
    An evicted key simply starts again with a full bucket, which bounds memory without
    ever blocking an honest peer.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now_s: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now_s))
        # The node passes wall-clock time: a step backwards (NTP) must not drain the bucket.
        tokens = min(self.burst, tokens + max(0.0, now_s - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now_s)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed
