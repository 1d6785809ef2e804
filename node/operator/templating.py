"""The one Jinja2 environment of the operator view: every value is escaped by construction.

``autoescape=True`` escapes whatever a template prints (tenants' commands, parameters,
metric names, task ids) unless it is :class:`markupsafe.Markup`, which only our own
templates produce (an SVG plot rendered here and embedded in the page). Undefined
names are errors, not empty text, so a renamed field cannot vanish from the page.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import JsonValue

from market.settlement import format_credits
from node.operator.document import Metric, metric_value

#: Metrics shown per task row.
MAX_ROW_METRICS = 6

ENV = Environment(
    loader=PackageLoader("node.operator", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)


def ago(now_ms: int, then_ms: int | None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``; empty when there is no time."""
    if not then_ms:
        return ""
    s = max(0, now_ms - then_ms) // 1000
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def fmt(value: float) -> str:
    """A metric or parameter value for people: four significant digits."""
    return f"{value:.4g}"


def params(values: dict[str, JsonValue]) -> str:
    """A trial's parameters as its command line gave them: ``lr=0.001 layers=3``."""
    return " ".join(f"{k}={v}" for k, v in sorted(values.items()))


def metrics(values: dict[str, Metric]) -> str:
    """The first few metrics of a task, numbers to four significant digits."""
    shown = list(values.items())[:MAX_ROW_METRICS]
    return ", ".join(
        f"{k}={v if (number := metric_value(v)) is None else fmt(number)}" for k, v in shown
    )


def outcomes(counts: dict[str, int]) -> str:
    """``3 succeeded, 1 failed``."""
    return ", ".join(f"{n} {state}" for state, n in counts.items())


ENV.globals["ago"] = ago
ENV.filters.update(
    credits=format_credits, fmt=fmt, params=params, metrics=metrics, outcomes=outcomes
)
