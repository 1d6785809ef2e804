"""Prometheus metrics of one node (its own registry, so many nodes fit in one process).

The daemon counts here, in plain Python; prometheus_client, which writes the exposition
format, is imported by the first scrape of ``/metrics`` (or the first :meth:`collect`).
Importing it at start cost every idle daemon ~0.6 MB (it loads its HTTP server, WSGI
and process collectors with it) for a page most nodes serve rarely or never
(docs/benchmarks.md, "Idle provider RSS"). What a scrape reads is what
prometheus_client's own Counter, Gauge and Histogram write for the same counts, series
and ``_created`` timestamps alike (tests/node/net/test_metrics.py compares the two).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

#: prometheus_client's default histogram buckets (seconds).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def _use_created() -> bool:
    # prometheus_client's own switch for the `_created` series, read as it reads it.
    flag = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower()
    return flag not in ("true", "1", "t")


def content_type() -> str:
    """The Content-Type of :meth:`NodeMetrics.render` (prometheus_client's latest)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)


class _Value:
    """One series: a counter's or a gauge's value, or a histogram's buckets and sum."""

    __slots__ = ("_lock", "buckets", "created", "value")

    def __init__(self, buckets: int = 0) -> None:
        self._lock = threading.Lock()
        self.value = 0.0  # the count, the gauge's value, or the histogram's sum
        self.created = time.time()
        self.buckets = [0.0] * buckets

    def inc(self, amount: float = 1) -> None:
        """Add to a counter; a negative amount is refused, as prometheus_client does."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self.value += amount

    def add(self, amount: float) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)


class _GaugeValue(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        self.add(amount)

    def dec(self, amount: float = 1) -> None:
        self.add(-amount)


class _HistogramValue(_Value):
    __slots__ = ("_bounds",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(len(bounds))
        self._bounds = bounds

    def observe(self, amount: float) -> None:
        with self._lock:
            self.value += amount
            for i, bound in enumerate(self._bounds):
                if amount <= bound:
                    self.buckets[i] += 1
                    break


class _Metric:
    """A metric and its series by label values (``labels(...)``, as in prometheus_client)."""

    kind: Literal["counter", "gauge", "histogram"]

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._series[()] = self._new()

    def _new(self) -> Any:
        return _Value()

    def labels(self, *values: object) -> Any:
        """The series of these label values (made on first use)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, self._new())
        return series

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: use labels(...) first")
        return self._series[()]

    def collect(self) -> list[Metric]:
        """This metric as prometheus_client's metric family (imports prometheus_client)."""
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)

    def _family(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _use_created()
        for key, series in list(self._series.items()):
            family.add_metric(key, series.value, created=series.created if created else None)
        return family


class Gauge(_Metric):
    kind = "gauge"

    def _new(self) -> Any:
        return _GaugeValue()

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._only().dec(amount)

    def _family(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, series in list(self._series.items()):
            family.add_metric(key, series.value)
        return family


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        self._bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames)

    def _new(self) -> Any:
        return _HistogramValue(self._bounds)

    def observe(self, amount: float) -> None:
        self._only().observe(amount)

    def _family(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.samples import Sample
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _use_created()
        for key, series in list(self._series.items()):
            counts, acc = [], 0.0
            for bound, n in zip(self._bounds, series.buckets, strict=True):
                acc += n
                counts.append((floatToGoString(bound), acc))  # type: ignore[no-untyped-call]
            family.add_metric(key, counts, series.value)
            if created:  # the Histogram of prometheus_client also writes when it began
                labels = dict(zip(self.labelnames, key, strict=True))
                family.samples.append(Sample(self.name + "_created", labels, series.created))
        return family


class NodeMetrics:
    """Counters and gauges the daemon exposes on /metrics."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self.peers = self.gauge("mercato_peers", "Peers this node knows")
        self.adverts = self.gauge("mercato_adverts", "Live adverts in the directory")
        self.messages_in = self.counter(
            "mercato_messages_in", "Accepted incoming messages", ["type"]
        )
        self.messages_out = self.counter("mercato_messages_out", "Outgoing requests", ["type"])
        self.rejections = self.counter(
            "mercato_rejections",
            "Rejected incoming messages (and relayed adverts) by error code",
            ["code"],
        )
        self.send_failures = self.counter(
            "mercato_send_failures", "Outgoing requests that failed", ["code"]
        )
        self.settlement = self.counter(
            "mercato_settlement_events",
            "Debit notes signed, countersigned and lapsed; bills refused (and why not paid)",
            ["event"],
        )
        self.metric_values_dropped = self.counter(
            "mercato_metric_values_dropped",
            "Metric values trials printed that this provider did not keep, by reason",
            ["reason"],
        )
        self.free_units = self.gauge("mercato_free_units", "Devices this provider can still sell")

    def _add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"duplicate metric {metric.name}")
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        """A new counter of this node (``name`` without ``_total``)."""
        metric = Counter(name, documentation, labelnames)
        self._add(metric)
        return metric

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        """A new gauge of this node."""
        metric = Gauge(name, documentation, labelnames)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """A new histogram of this node."""
        metric = Histogram(name, documentation, labelnames, buckets)
        self._add(metric)
        return metric

    def collect(self) -> Iterator[Metric]:
        """Every metric as prometheus_client's metric families, in the order made."""
        for metric in list(self._metrics):
            yield from metric.collect()

    def render(self) -> bytes:
        """The Prometheus text exposition (prometheus_client's ``generate_latest``)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # a collector: it has collect()
        out: bytes = generate_latest(registry)
        return out

    def rejection_counts(self) -> dict[str, int]:
        """code -> count, for tests and status output."""
        return {key[0]: int(s.value) for key, s in list(self.rejections._series.items())}
