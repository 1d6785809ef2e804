"""The status page: the status document rendered as HTML by templates/page.html.j2.

The page loads nothing else and runs no script (its Content-Security-Policy forbids
both; node.operator.status_page serves it); plots are inline SVG (node.operator.plots)
and a ``<meta refresh>`` reloads it every few seconds. Every value is escaped by the
template engine (node.operator.templating), never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup
from pydantic import JsonValue

from node.operator.document import StatusDocument, SweepView, metric_value
from node.operator.plots import sweep_plots
from node.operator.templating import ENV, fmt

#: Task rows drawn on the page (the plots still use every finished task of the document).
MAX_TASK_ROWS = 200
#: Metrics shown per task row.
MAX_ROW_METRICS = 6
STATUS_PATH = "/status.json"


@dataclass(frozen=True)
class SweepPlots:
    sweep: SweepView
    plots: list[Markup]


def _value(v: float | str) -> str:
    number = metric_value(v)
    return fmt(number) if number is not None else str(v)


def _params(params: dict[str, JsonValue]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _metrics(metrics: dict[str, int | float]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in list(metrics.items())[:MAX_ROW_METRICS])


def _outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in outcomes.items())


ENV.filters["params"] = _params
ENV.filters["metrics"] = _metrics
ENV.filters["outcomes"] = _outcomes


def render_page(doc: StatusDocument, refresh_s: int = 5) -> str:
    """The status page of ``doc``."""
    active = [t for t in doc.tasks if t.active]
    finished = [t for t in doc.tasks if not t.active]
    by_id = {t.task_id: t for t in finished}
    return ENV.get_template("page.html.j2").render(
        doc=doc,
        now=doc.now_ms,
        refresh_s=int(refresh_s),
        provider=doc.role == "provider",
        free=sum(1 for d in doc.devices if d.state == "free"),
        active_leases=sum(1 for x in doc.leases if x.state == "active"),
        running=sum(1 for t in doc.tasks if t.state == "running"),
        finished=len(finished),
        task_rows=(active + finished)[:MAX_TASK_ROWS],
        task_total=len(doc.tasks),
        max_task_rows=MAX_TASK_ROWS,
        sweeps=[SweepPlots(s, sweep_plots(s, by_id)) for s in doc.sweeps],
        status_path=STATUS_PATH,
    )
