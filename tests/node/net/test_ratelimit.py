"""Per-peer token buckets, driven by a stepped clock (no sleeping)."""

from __future__ import annotations

from node.net.ratelimit import RateLimiter


def drain(limiter: RateLimiter, key: str, now_s: float) -> int:
    """How many messages ``key`` may send right now (stops at the first refusal)."""
    n = 0
    while limiter.allow(key, now_s):
        n += 1
        assert n < 10_000
    return n


class TestRateLimiter:
    def test_a_burst_then_the_sustained_rate(self) -> None:
        lim = RateLimiter(rate=2.0, burst=3)
        now = 1000.0
        assert drain(lim, "a", now) == 3
        assert not lim.allow("a", now)
        now += 0.25  # half a token
        assert not lim.allow("a", now)
        now += 0.25  # one token
        assert lim.allow("a", now)
        assert not lim.allow("a", now)
        now += 2.0  # four tokens, but the bucket holds three
        assert drain(lim, "a", now) == 3

    def test_refusals_do_not_cost_tokens(self) -> None:
        lim = RateLimiter(rate=1.0, burst=1)
        assert lim.allow("a", 0.0)
        for _ in range(100):
            assert not lim.allow("a", 0.5)
        assert lim.allow("a", 1.0)

    def test_peers_have_separate_buckets(self) -> None:
        lim = RateLimiter(rate=1.0, burst=2)
        assert drain(lim, "flooder", 0.0) == 2
        assert drain(lim, "honest", 0.0) == 2

    def test_long_idle_refills_only_to_the_burst(self) -> None:
        lim = RateLimiter(rate=100.0, burst=5)
        assert drain(lim, "a", 0.0) == 5
        assert drain(lim, "a", 86_400.0) == 5

    def test_evicted_keys_start_again_with_a_full_bucket(self) -> None:
        lim = RateLimiter(rate=0.001, burst=2, max_keys=2)
        assert drain(lim, "a", 0.0) == 2
        lim.allow("b", 0.0)
        lim.allow("c", 0.0)  # three keys: the least recently used ("a") goes
        assert drain(lim, "a", 0.0) == 2

    def test_recently_used_keys_are_not_evicted(self) -> None:
        lim = RateLimiter(rate=0.001, burst=2, max_keys=2)
        assert drain(lim, "a", 0.0) == 2
        lim.allow("b", 0.0)
        assert not lim.allow("a", 0.0)  # "a" is now the most recent
        lim.allow("c", 0.0)  # evicts "b"
        assert not lim.allow("a", 0.0)

    def test_a_clock_stepping_back_does_not_lock_a_peer_out(self) -> None:
        """The node feeds wall-clock time; an NTP step backwards must not drain buckets."""
        lim = RateLimiter(rate=1.0, burst=2)
        assert lim.allow("a", 10_000.0)
        assert lim.allow("a", 6_400.0)  # the clock stepped back an hour: one token left
        assert not lim.allow("a", 6_400.0)
        assert lim.allow("a", 6_401.0)  # and it refills at the normal rate from there
