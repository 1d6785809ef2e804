"""Prometheus metrics of one node (its own registry, so many nodes fit in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

CONTENT_TYPE: str = CONTENT_TYPE_LATEST


class NodeMetrics:
    """Counters and gauges the daemon exposes on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("mercato_peers", "Peers this node knows", registry=r)
        self.adverts = Gauge("mercato_adverts", "Live adverts in the directory", registry=r)
        self.messages_in = Counter(
            "mercato_messages_in", "Accepted incoming messages", ["type"], registry=r
        )
        self.messages_out = Counter(
            "mercato_messages_out", "Outgoing requests", ["type"], registry=r
        )
        self.rejections = Counter(
            "mercato_rejections",
            "Rejected incoming messages (and relayed adverts) by error code",
            ["code"],
            registry=r,
        )
        self.send_failures = Counter(
            "mercato_send_failures", "Outgoing requests that failed", ["code"], registry=r
        )
        self.settlement = Counter(
            "mercato_settlement_events",
            "Debit notes signed, countersigned and lapsed; bills refused (and why not paid)",
            ["event"],
            registry=r,
        )
        self.metric_values_dropped = Counter(
            "mercato_metric_values_dropped",
            "Metric values trials printed that this provider did not keep, by reason",
            ["reason"],
            registry=r,
        )
        self.free_units = Gauge(
            "mercato_free_units", "Devices this provider can still sell", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def rejection_counts(self) -> dict[str, int]:
        """code -> count, for tests and status output."""
        out: dict[str, int] = {}
        for metric in self.rejections.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels["code"]] = int(s.value)
        return out
