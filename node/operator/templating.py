"""The one Jinja2 environment of the operator view: every value is escaped by construction.

``autoescape=True`` escapes whatever a template prints (tenants' commands, parameters,
metric names, task ids) unless it is :class:`markupsafe.Markup`, which only our own
templates produce (an SVG plot rendered here and embedded in the page). Undefined
names are errors, not empty text, so a renamed field cannot vanish from the page.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined

from market.settlement import format_credits

ENV = Environment(
    loader=PackageLoader("node.operator", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)
ENV.filters["credits"] = format_credits


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


ENV.globals["ago"] = ago
ENV.filters["fmt"] = fmt
