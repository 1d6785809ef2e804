"""/metrics says what prometheus_client itself would say for the same counts.

The daemon counts in plain Python and imports prometheus_client only to write a scrape
(node.net.metrics): a Prometheus server, a Grafana board or an alert rule must not see
any difference from the Counter, Gauge and Histogram of prometheus_client.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from node.net.metrics import NodeMetrics


def _same_operations_both_ways() -> tuple[str, str]:
    ours = NodeMetrics()
    registry = CollectorRegistry(auto_describe=True)
    theirs = {
        "peers": Gauge("mercato_peers", "Peers this node knows", registry=registry),
        "adverts": Gauge("mercato_adverts", "Live adverts in the directory", registry=registry),
    }
    for name, doc, label in (
        ("mercato_messages_in", "Accepted incoming messages", "type"),
        ("mercato_messages_out", "Outgoing requests", "type"),
        (
            "mercato_rejections",
            "Rejected incoming messages (and relayed adverts) by error code",
            "code",
        ),
        ("mercato_send_failures", "Outgoing requests that failed", "code"),
        (
            "mercato_settlement_events",
            "Debit notes signed, countersigned and lapsed; bills refused (and why not paid)",
            "event",
        ),
        (
            "mercato_metric_values_dropped",
            "Metric values trials printed that this provider did not keep, by reason",
            "reason",
        ),
    ):
        theirs[name] = Counter(name, doc, [label], registry=registry)
    theirs["free"] = Gauge(
        "mercato_free_units", "Devices this provider can still sell", registry=registry
    )
    doc = "Requests to tenants' services by outcome (ok, 5xx, refused codes, unavailable)"
    requests_ours = ours.counter("mercato_service_requests", doc, ["outcome"])
    theirs["requests"] = Counter("mercato_service_requests", doc, ["outcome"], registry=registry)
    doc = "Time from a request's arrival to its service's answer head"
    latency_ours = ours.histogram("mercato_service_latency_seconds", doc)
    latency_theirs = Histogram("mercato_service_latency_seconds", doc, registry=registry)

    for metric, value in ((ours.peers, 3), (theirs["peers"], 3)):
        metric.set(value)
    ours.adverts.set(2.5)
    theirs["adverts"].set(2.5)
    ours.adverts.inc(2)
    theirs["adverts"].inc(2)
    for kind in ("advert", "order", "advert", 'we"ird\\name\n'):
        ours.messages_in.labels(kind).inc()
        theirs["mercato_messages_in"].labels(kind).inc()
    ours.rejections.labels("bad_signature").inc(3)
    theirs["mercato_rejections"].labels("bad_signature").inc(3)
    ours.settlement.labels("signed").inc(0.5)
    theirs["mercato_settlement_events"].labels("signed").inc(0.5)
    requests_ours.labels("ok").inc()
    theirs["requests"].labels("ok").inc()
    for seconds in (0.001, 0.005, 0.3, 2.0, 99.0):
        latency_ours.observe(seconds)
        latency_theirs.observe(seconds)
    return ours.render().decode(), generate_latest(registry).decode()


def _without_created_values(text: str) -> str:
    # When a series began differs by the microseconds between the two; its presence,
    # name, labels and place do not.
    return re.sub(r"^(\S+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.M)


class TestMetricsExposition:
    def test_a_scrape_reads_as_prometheus_client_writes_it(self) -> None:
        ours, theirs = _same_operations_both_ways()
        assert "mercato_service_latency_seconds_created" in theirs
        assert _without_created_values(ours) == _without_created_values(theirs)

    def test_created_series_follow_prometheus_clients_switch(self) -> None:
        code = (
            "from node.net.metrics import NodeMetrics\n"
            "m = NodeMetrics(); m.rejections.labels('x').inc()\n"
            "m.histogram('h', 'h').observe(1)\n"
            "print(m.render().decode())\n"
        )
        env = {"PROMETHEUS_DISABLE_CREATED_SERIES": "True", "PATH": ""}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert "mercato_rejections_total" in out
        assert "_created" not in out

    def test_counters_refuse_to_go_down_and_labels_must_match(self) -> None:
        metrics = NodeMetrics()
        with pytest.raises(ValueError, match="non-negative"):
            metrics.rejections.labels("x").inc(-1)
        with pytest.raises(ValueError, match="expected 1 label values"):
            metrics.rejections.labels("x", "y")
        with pytest.raises(ValueError, match="duplicate"):
            metrics.counter("mercato_rejections", "again")
        metrics.rejections.labels("x").inc(2)
        assert metrics.rejection_counts() == {"x": 2}
