"""market.serving: replica health stepped through time, placement and retry rules."""

from __future__ import annotations

import pytest

from market.serving import (
    FAILS_TO_UNHEALTHY,
    LOST_AFTER_MS,
    ReplicaHealth,
    ReplicaState,
    exclusions,
    pick,
    retryable,
)


class TestReplicaHealth:
    def test_ready_after_a_good_probe_out_after_failures_back_after_one(self) -> None:
        h = ReplicaHealth(started_ms=0, ready_timeout_ms=10_000)
        assert h.probe(False, 100) is ReplicaState.STARTING
        assert h.probe(True, 200) is ReplicaState.READY
        for i in range(FAILS_TO_UNHEALTHY - 1):
            assert h.probe(False, 300 + i) is ReplicaState.READY
        assert h.probe(False, 400) is ReplicaState.UNHEALTHY
        assert h.probe(True, 500) is ReplicaState.READY
        assert h.ready_ms == 200

    def test_never_ready_in_time_is_lost(self) -> None:
        h = ReplicaHealth(started_ms=1_000, ready_timeout_ms=5_000)
        assert h.tick(5_999) is ReplicaState.STARTING
        assert h.tick(6_000) is ReplicaState.LOST
        assert "not ready" in h.why
        assert h.probe(True, 6_001) is ReplicaState.LOST  # final

    def test_unhealthy_too_long_is_lost(self) -> None:
        h = ReplicaHealth(started_ms=0, ready_timeout_ms=5_000)
        h.probe(True, 0)
        now = 0
        for _ in range(FAILS_TO_UNHEALTHY):
            now += 1_000
            h.probe(False, now)
        assert h.state is ReplicaState.UNHEALTHY
        assert h.tick(LOST_AFTER_MS - 1) is ReplicaState.UNHEALTHY
        assert h.tick(LOST_AFTER_MS) is ReplicaState.LOST

    def test_provider_gone_and_stop_are_final(self) -> None:
        h = ReplicaHealth(started_ms=0, ready_timeout_ms=5_000)
        h.lost(10, "heartbeats stopped")
        h.stop(20)
        assert h.state is ReplicaState.LOST
        assert h.why == "heartbeats stopped"


class TestPlacementAndRetries:
    def test_spread_replicas_avoid_each_others_providers(self) -> None:
        assert exclusions(["a", "b"], ["c"], spread=True) == ["c", "a", "b"]
        assert exclusions(["a", "b"], ["c"], spread=False) == ["c"]

    def test_pick_the_least_busy_untried_ready_replica(self) -> None:
        assert pick(["r1", "r2"], {"r1": 3, "r2": 1}, []) == "r2"
        assert pick(["r1", "r2"], {"r1": 3, "r2": 1}, ["r2"]) == "r1"
        assert pick(["r1"], {}, ["r1"]) is None

    @pytest.mark.parametrize(
        ("method", "sent", "ok"),
        [("GET", True, True), ("POST", False, True), ("POST", True, False), ("PUT", True, True)],
    )
    def test_only_unsent_or_idempotent_requests_are_retried(
        self, method: str, sent: bool, ok: bool
    ) -> None:
        assert retryable(method, sent) is ok
