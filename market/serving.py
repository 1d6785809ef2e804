"""Replicas of a service: their health, where the next one goes, which one answers.

Pure decisions for node.tenant.serve (issue 20): no I/O, no clock; every call takes
``now_ms``. A replica is a lease on one provider running the service; the gateway
sends requests only to READY replicas and replaces a LOST one.

States (one table, ``TRANSITIONS``)::

    STARTING --probe ok--> READY --FAILS_TO_UNHEALTHY probes fail--> UNHEALTHY
    UNHEALTHY --probe ok--> READY
    STARTING --ready_timeout passes--> LOST      (never became ready)
    UNHEALTHY --LOST_AFTER_MS without a good probe--> LOST
    any --provider gone (heartbeats, task ended)--> LOST
    LOST and STOPPED are final: a replacement is a new Replica.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

#: A service's socket: a plain relative name in its work directory (``$MERCATO_SERVICE_SOCKET``).
#: Here, not in market.jobspec, so that the provider checks it without loading the job
#: file's models (an idle daemon does not hold them: docs/benchmarks.md, "Idle provider RSS").
SOCKET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: Failed probes in a row that take a READY replica out of the rotation.
FAILS_TO_UNHEALTHY = 2
#: How long an UNHEALTHY replica may stay so before it is replaced.
LOST_AFTER_MS = 15_000
#: Methods the gateway may send again to another replica after a failure (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    LOST = "lost"
    STOPPED = "stopped"


_S = ReplicaState
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    _S.STARTING: frozenset({_S.READY, _S.LOST, _S.STOPPED}),
    _S.READY: frozenset({_S.UNHEALTHY, _S.LOST, _S.STOPPED}),
    _S.UNHEALTHY: frozenset({_S.READY, _S.LOST, _S.STOPPED}),
    _S.LOST: frozenset(),
    _S.STOPPED: frozenset(),
}


@dataclass
class ReplicaHealth:
    """One replica's health, driven by probe results and ``now_ms``."""

    started_ms: int
    ready_timeout_ms: int
    state: ReplicaState = ReplicaState.STARTING
    fails: int = 0  # failed probes in a row
    last_ok_ms: int | None = None
    ready_ms: int | None = None  # first time it was ready
    why: str = ""
    history: list[tuple[int, ReplicaState]] = field(default_factory=list)

    def _go(self, to: ReplicaState, now_ms: int, why: str = "") -> None:
        if to is self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise ValueError(f"replica cannot go from {self.state} to {to}")
        self.state, self.why = to, why
        self.history.append((now_ms, to))

    @property
    def final(self) -> bool:
        return not TRANSITIONS[self.state]

    def probe(self, ok: bool, now_ms: int, why: str = "") -> ReplicaState:
        """Record one probe of the health path (ok: a 2xx answer through the provider)."""
        if self.final:
            return self.state
        if ok:
            self.fails, self.last_ok_ms = 0, now_ms
            if self.ready_ms is None:
                self.ready_ms = now_ms
            self._go(ReplicaState.READY, now_ms)
        else:
            self.fails += 1
            if self.state is ReplicaState.READY and self.fails >= FAILS_TO_UNHEALTHY:
                self._go(ReplicaState.UNHEALTHY, now_ms, why)
        return self.tick(now_ms)

    def tick(self, now_ms: int) -> ReplicaState:
        """Apply the deadlines: never ready in time, or unhealthy for too long."""
        if self.state is ReplicaState.STARTING:
            if now_ms - self.started_ms >= self.ready_timeout_ms:
                self._go(ReplicaState.LOST, now_ms, f"not ready within {self.ready_timeout_ms} ms")
        elif self.state is ReplicaState.UNHEALTHY:
            since = self.last_ok_ms if self.last_ok_ms is not None else self.started_ms
            if now_ms - since >= LOST_AFTER_MS:
                self._go(ReplicaState.LOST, now_ms, f"unhealthy for {LOST_AFTER_MS} ms")
        return self.state

    def lost(self, now_ms: int, why: str) -> None:
        """The provider is gone (missed heartbeats) or the service's task ended."""
        if not self.final:
            self._go(ReplicaState.LOST, now_ms, why)

    def stop(self, now_ms: int) -> None:
        if not self.final:
            self._go(ReplicaState.STOPPED, now_ms, "stopped by the tenant")


def exclusions(
    live_providers: Sequence[str], failed_providers: Sequence[str], spread: bool
) -> list[str]:
    """Providers a new replica must not be leased on.

    Spread replicas never share a provider (one machine dying takes one replica); a
    replica is never put back on a provider that lost it during this serve.
    """
    out = list(failed_providers)
    if spread:
        out += [p for p in live_providers if p not in out]
    return out


def pick(ready: Sequence[str], in_flight: dict[str, int], tried: Sequence[str]) -> str | None:
    """The replica for the next request: the least busy ready one not tried yet.

    Ties go to the first in ``ready`` (the caller rotates it for round robin).
    """
    best: str | None = None
    for r in ready:
        if r in tried:
            continue
        if best is None or in_flight.get(r, 0) < in_flight.get(best, 0):
            best = r
    return best


def retryable(method: str, sent: bool) -> bool:
    """Whether a failed request may go to another replica.

    Not sent at all (the connection failed): always. Sent and then lost: only an
    idempotent method, which the service may safely see twice.
    """
    return not sent or method.upper() in IDEMPOTENT
