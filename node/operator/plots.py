"""The sweep plots of the status page: inline SVG, one scatter plot per metric and axis.

For every sweep that ran here (node.operator.document ``SweepView``), each numeric
metric is plotted over the trials (in finish order) and against each numeric
parameter. The geometry is computed here; templates/plot.svg.j2 draws it, escaping
every label (metric and parameter names are the tenant's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from markupsafe import Markup

from node.operator.document import SweepView, TaskView, metric_value
from node.operator.templating import ENV, fmt


@dataclass(frozen=True)
class Point:
    """One finished trial in a plot."""

    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Tick:
    at: str  # the coordinate, formatted
    text: str


@dataclass(frozen=True)
class Dot:
    cx: str
    cy: str
    label: str


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def svg_plot(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    metric: str,
    x_key: str,
    connect: bool = False,
    width: int = 340,
    height: int = 210,
) -> Markup:
    """A scatter plot as inline SVG: one ``circle.point`` per point, with a tooltip.

    The x axis is logarithmic when every x is positive and they span two decades or
    more (learning rates, regularisation strengths).
    """
    left, right, top, bottom = 52, 12, 24, 36
    pw, ph = width - left - right, height - top - bottom
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 100

    def tx(v: float) -> float:
        return math.log10(v) if log_x else v

    x0, x1 = _range([tx(v) for v in xs]) if xs else (0.0, 1.0)
    y0, y1 = _range(ys) if ys else (0.0, 1.0)

    def sx(v: float) -> str:
        return f"{left + (tx(v) - x0) / (x1 - x0) * pw:.1f}"

    def sy(v: float) -> str:
        return f"{top + (1 - (v - y0) / (y1 - y0)) * ph:.1f}"

    # The y axis: the data's lowest, middle and highest value; x: its lowest and highest.
    y_ticks = sorted({min(ys), (min(ys) + max(ys)) / 2, max(ys)}) if ys else []
    x_ticks = sorted({min(xs), max(xs)}) if xs else []
    dots = [Dot(sx(p.x), sy(p.y), p.label) for p in points]
    return Markup(
        ENV.get_template("plot.svg.j2").render(
            width=width,
            height=height,
            left=left,
            top=top,
            pw=pw,
            ph=ph,
            mid_x=f"{left + pw / 2:.1f}",
            mid_y=f"{top + ph / 2:.1f}",
            title=title,
            x_label=x_label + (" (log)" if log_x else ""),
            y_label=y_label,
            metric=metric,
            x_key=x_key,
            y_ticks=[Tick(sy(v), fmt(v)) for v in y_ticks],
            x_ticks=[Tick(sx(v), fmt(v)) for v in x_ticks],
            line=" ".join(f"{d.cx},{d.cy}" for d in dots) if connect and len(dots) > 1 else "",
            dots=dots,
        )
    )


def _label(t: TaskView, metric: str, y: float) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(t.params.items()))
    return f"{t.task_id}: {metric}={fmt(y)} ({params})"


def sweep_plots(sweep: SweepView, tasks: Mapping[str, TaskView]) -> list[Markup]:
    """Each metric of ``sweep`` over its trials, then against each numeric parameter.

    ``tasks`` are the document's task rows by task id; a trial not among them (the
    document was cut) is left out.
    """
    trials = [tasks[i] for i in sweep.trials if i in tasks]
    out = []
    for metric in sweep.metrics:
        order = [
            Point(i + 1, y, _label(t, metric, y))
            for i, t in enumerate(trials)
            if (y := metric_value(t.metrics.get(metric))) is not None
        ]
        out.append(
            svg_plot(
                order,
                title=f"{metric} by trial",
                x_label="trial (finish order)",
                y_label=metric,
                metric=metric,
                x_key="order",
                connect=True,
            )
        )
        for param in sweep.params:
            pts = [
                Point(x, y, _label(t, metric, y))
                for t in trials
                if (x := metric_value(t.params.get(param))) is not None
                and (y := metric_value(t.metrics.get(metric))) is not None
            ]
            out.append(
                svg_plot(
                    pts,
                    title=f"{metric} vs {param}",
                    x_label=param,
                    y_label=metric,
                    metric=metric,
                    x_key=param,
                )
            )
    return out
