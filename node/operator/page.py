"""The status page: the status document rendered as HTML by templates/page.html.j2.

The page loads nothing else and runs no script (its Content-Security-Policy forbids
both; node.operator.status_page serves it); plots are inline SVG (node.operator.plots)
and a ``<meta refresh>`` reloads it every few seconds. Every value is escaped by the
template engine (node.operator.templating), never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from node.operator.document import STATUS_PATH, StatusDocument, SweepView
from node.operator.plots import sweep_plots
from node.operator.templating import ENV

#: Task rows drawn on the page (the plots still use every finished task of the document).
MAX_TASK_ROWS = 200


@dataclass(frozen=True)
class SweepPlots:
    sweep: SweepView
    plots: list[Markup]


def render_page(doc: StatusDocument, refresh_s: int = 5) -> str:
    """The status page of ``doc``."""
    active = [t for t in doc.tasks if t.active]
    finished = [t for t in doc.tasks if not t.active]

    def plots(sweep: SweepView) -> SweepPlots:
        trials = {t.task_id: t for t in finished if t.job == sweep.job}
        return SweepPlots(sweep, sweep_plots(sweep, trials))

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
        sweeps=[plots(s) for s in doc.sweeps],
        status_path=STATUS_PATH,
    )
