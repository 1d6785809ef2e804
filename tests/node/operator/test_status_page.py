"""The provider's status page: what an operator sees in a browser while a sweep runs.

The end-to-end test starts a local cluster (real daemons), runs a small stdlib sweep
through `mercato submit`, and loads a provider's page in headless Chromium, checking
the rendered DOM. The other tests cover the page's logic (argv parsing, plots,
escaping, price floors) with real stores and engines, no browser.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from market.bidding import BidEngine, devices_from_groups
from market.settlement import format_credits
from node.cli import localcluster as cluster
from node.operator.document import StatusDocument, TaskView, parse_params, sweeps
from node.operator.page import render_page
from node.operator.plots import Point, svg_plot, sweep_plots
from node.operator.prices import PriceFloors
from node.provider.inventory import DeviceDecl, build_inventory
from node.store.node_store import Store
from protocol.errors import NotFoundError

JOB = Path(__file__).parents[1] / "jobs" / "status" / "sweep.yaml"
PAID_JOB = JOB.with_name("paid.yaml")
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)


class Dom(HTMLParser):
    """Just what a person reads off the page: texts by id, table rows, plots."""

    def __init__(self) -> None:
        super().__init__()
        self.text_by_id: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.plots: list[dict[str, Any]] = []
        self._ids: list[tuple[str, int]] = []
        self._table: str | None = None
        self._row: dict[str, Any] | None = None
        self._cell: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("meta", "link", "br", "img", "input", "hr"):
            return  # void elements have no end tag
        self._depth += 1
        if "id" in a:
            self._ids.append((a["id"], self._depth))
            self.text_by_id[a["id"]] = ""
        if tag == "table":
            self._table = a.get("id")
            self.rows.setdefault(self._table or "", [])
        elif tag == "tr" and "data-state" in a and self._table is not None:
            self._row = {"state": a["data-state"], "cells": []}
            self.rows[self._table].append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "svg" and "plot" in a.get("class", "").split():
            self.plots.append({"metric": a["data-metric"], "x": a["data-x"], "points": []})
        elif tag == "circle" and "point" in a.get("class", "").split():
            self.plots[-1]["points"].append("")

    def handle_endtag(self, tag: str) -> None:
        if self._ids and self._ids[-1][1] == self._depth:
            self._ids.pop()
        self._depth -= 1
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for ident, _ in self._ids:
            self.text_by_id[ident] += data
        if self._cell is not None:
            self._cell.append(data)
        # A point's tooltip is its <title>, the only text inside a circle.
        if self.plots and self.plots[-1]["points"] and self.lasttag == "title":
            pts = self.plots[-1]["points"]
            if pts[-1] == "":
                pts[-1] = data


def dom(html: str) -> Dom:
    parser = Dom()
    parser.feed(html)
    return parser


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


# --- in a browser ----------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
class TestStatusPageInChromium:
    def test_a_provider_page_shows_a_sweep_in_progress(self, tmp_path: Path) -> None:
        assert CHROMIUM is not None
        home = tmp_path / "home"
        env = {k: v for k, v in os.environ.items() if k != "MERCATO_PEER"}
        env["MERCATO_HOME"] = str(home)
        submit: subprocess.Popen[str] | None = None
        try:
            # As a developer does it (and so the daemons are not children of pytest).
            up = subprocess.run(
                [sys.executable, "-m", "node.cli", "cluster", "up", "--providers", "1"],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert up.returncode == 0, up.stderr + up.stdout
            rows = {r["name"]: r for r in cluster.status(home)}
            boot, prov = (SimpleNamespace(**rows[n]) for n in ("bootstrap", "provider-1"))
            page = prov.status_url
            assert page == prov.address + "/"
            assert boot.status_url == boot.address + "/"

            # A tenant runs a 5-trial sweep; the last trial holds for 30 s.
            submit = subprocess.Popen(
                [
                    *(sys.executable, "-m", "node.cli", "submit", str(JOB)),
                    *("--peer", boot.address, "--quiet", "--parallel", "4"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            deadline = time.monotonic() + 45
            while True:
                doc = http_json(prov.address + "/status.json")
                states = sorted(t["state"] for t in doc["tasks"])
                if states == ["running", "succeeded", "succeeded", "succeeded", "succeeded"]:
                    break
                assert submit.poll() is None, submit.communicate()[0]
                assert time.monotonic() < deadline, f"sweep did not progress: {states}"
                time.sleep(0.2)

            profile = tmp_path / "chromium"
            shown = subprocess.run(
                [
                    CHROMIUM,
                    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"),
                    *("--no-first-run", "--disable-background-networking"),
                    *("--disable-component-update", "--disable-sync"),
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=3000",
                    "--dump-dom",
                    page,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr[-2000:]
            d = dom(shown.stdout)

            # Who this is and whom it knows.
            assert d.text_by_id["node-id"] == prov.node_id
            assert d.text_by_id["peer-count"] == str(len(doc["peers"]))
            assert int(d.text_by_id["peer-count"]) >= 1  # the bootstrap node at least
            # The tenant's lease on both devices, active.
            (lease,) = d.rows["leases"]
            assert lease["state"] == "active"
            assert "2x RTX-4090" in lease["cells"]
            assert d.text_by_id["free-count"] == "0"
            # One row per task with its state; the slow trial is the running one.
            tasks = d.rows["tasks"]
            assert sorted(t["state"] for t in tasks) == states
            running = [t for t in tasks if t["state"] == "running"]
            assert len(running) == 1
            assert "x=30" in running[0]["cells"]
            finished = {c for t in tasks if t["state"] == "succeeded" for c in t["cells"]}
            assert {"x=0.5", "x=1", "x=2", "x=4"} <= finished
            # Plots: each metric over the trials and against x, one point per finished trial.
            plots = {(p["metric"], p["x"]): p["points"] for p in d.plots}
            assert set(plots) == {
                ("loss", "order"),
                ("loss", "x"),
                ("accuracy", "order"),
                ("accuracy", "x"),
            }
            assert all(len(points) == 4 for points in plots.values())
            # Each point says which trial it is: loss = (log2 x - 1)^2.
            tips = [t.split(": ", 1)[1] for t in plots[("loss", "x")]]
            assert sorted(tips) == sorted(
                ["loss=4 (x=0.5)", "loss=1 (x=1)", "loss=0 (x=2)", "loss=1 (x=4)"]
            )

            # The bootstrap node's page has no provider sections, only the network.
            with urllib.request.urlopen(boot.address + "/", timeout=10) as resp:
                assert resp.headers["Content-Type"].startswith("text/html")
                b = dom(resp.read().decode())
            assert b.text_by_id["node-id"] == boot.node_id
            assert "tasks" not in b.rows
            assert len(b.rows["adverts"]) == 1
        finally:
            if submit is not None and submit.poll() is None:
                submit.send_signal(signal.SIGINT)  # cancels the job, releases the lease
                try:
                    submit.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    submit.kill()
                    submit.communicate()
            cluster.down(home)


@pytest.mark.cluster
class TestLeaseHistory:
    def test_a_paid_lease_still_shows_the_trials_it_ran(self, tmp_path: Path) -> None:
        """After the sweep, its lease is ended and paid: the page keeps what ran under it."""
        home = tmp_path / "home"
        env = {k: v for k, v in os.environ.items() if k != "MERCATO_PEER"}
        env["MERCATO_HOME"] = str(home)
        try:
            up = subprocess.run(
                [sys.executable, "-m", "node.cli", "cluster", "up", "--providers", "1"],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert up.returncode == 0, up.stderr + up.stdout
            rows = {r["name"]: r for r in cluster.status(home)}
            boot, prov = (SimpleNamespace(**rows[n]) for n in ("bootstrap", "provider-1"))
            submit = subprocess.run(
                [
                    *(sys.executable, "-m", "node.cli", "submit", str(PAID_JOB)),
                    *("--peer", boot.address, "--quiet"),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert submit.returncode == 0, submit.stderr + submit.stdout

            def settled() -> Any:
                doc = http_json(prov.address + "/status.json")
                done = doc["leases"] and all(x["state"] == "ended" for x in doc["leases"])
                paid = doc["earnings"]["receipts"] == doc["earnings"]["countersigned"] > 0
                return doc if done and paid else None

            deadline = time.monotonic() + 30
            while (doc := settled()) is None:
                assert time.monotonic() < deadline, "the lease was not released and paid"
                time.sleep(0.2)

            # JSON: per lease, the trials that ran, how each ended, what was paid.
            (lease,) = doc["leases"]
            assert lease["tasks"] == 3
            assert lease["outcomes"] == {"succeeded": 3}
            assert sorted(t["state"] for t in lease["history"]) == ["succeeded"] * 3
            assert all(t["exit_code"] == 0 for t in lease["history"])
            assert lease["paid"] == doc["earnings"]["earned"] > 0
            assert lease["awaiting"] == 0
            assert len(doc["tasks"]) == 3  # and the task table keeps them

            # The page: the lease row says the same to a person.
            with urllib.request.urlopen(prov.address + "/", timeout=10) as resp:
                d = dom(resp.read().decode())
            (row,) = d.rows["leases"]
            assert row["state"] == "ended"
            tasks_cell, paid_cell = row["cells"][6], row["cells"][7]
            assert tasks_cell.startswith("3 tasks: 3 succeeded"), tasks_cell
            for t in lease["history"]:
                assert t["task_id"] in tasks_cell
            assert paid_cell == f"{format_credits(lease['paid'])} paid"
            assert "tasks-empty" not in d.text_by_id
            assert sorted(t["state"] for t in d.rows["tasks"]) == ["succeeded"] * 3
        finally:
            cluster.down(home)


# --- logic (no daemon) ---------------------------------------------------------------


class TestParams:
    def test_wandb_args_become_typed_params(self) -> None:
        argv = ["/usr/bin/env", "python3", "train.py", "--lr=0.001", "--layers=3"]
        argv += ["--kernel=rbf", "--bn=True", "--x", "7"]  # `--x 7` is not --key=value
        assert parse_params(argv) == {"lr": 0.001, "layers": 3, "kernel": "rbf", "bn": True}

    def test_args_json_and_json_files(self) -> None:
        assert parse_params(["python3", "t.py", '{"a": 1, "b": "z"}']) == {"a": 1, "b": "z"}
        assert parse_params(["python3", "t.py"], {"params.json": '{"c": 2.5}'}) == {"c": 2.5}
        assert parse_params(["python3", "t.py"], {"notes.txt": "not json"}) == {}

    def test_nan_and_inf_stay_text(self) -> None:
        assert parse_params(["p", "--a=nan", "--b=inf"]) == {"a": "nan", "b": "inf"}


def task(n: int, x: float, loss: float, job: str = "j" * 64, **extra: Any) -> TaskView:
    row: dict[str, Any] = {
        "task_id": f"t{n}",
        "lease_id": "lease-1",
        "tenant": "t" * 32,
        "job": job,
        "state": "succeeded",
        "devices": ["gpu0"],
        "argv": ["python3", "t.py", f"--x={x}"],
        "params": {"x": x},
        "metrics": {"loss": loss},
        "detail": "",
        "started_ms": 1000 * n,
        "finished_ms": 1000 * n + 500,
        "exit_code": 0,
        "wall_ms": 500,
    }
    row.update(extra)
    return TaskView.model_validate(row)


class TestPlots:
    def test_one_point_per_trial_in_finish_order(self) -> None:
        tasks = [task(3, 4.0, 1.0), task(1, 0.5, 4.0), task(2, 2.0, 0.0)]
        (sweep,) = sweeps(tasks)
        assert sweep.trials == ["t1", "t2", "t3"]
        plots = [dom(p).plots[0] for p in sweep_plots(sweep, {t.task_id: t for t in tasks})]
        assert [(p["metric"], p["x"], len(p["points"])) for p in plots] == [
            ("loss", "order", 3),
            ("loss", "x", 3),
        ]

    def test_sweeps_are_kept_apart_and_unfinished_tasks_are_not_plotted(self) -> None:
        tasks = [
            task(1, 1.0, 1.0, job="a" * 64),
            task(2, 1.0, 1.0, job="b" * 64),
            task(3, 1.0, 1.0, job="b" * 64, state="running", finished_ms=None),
        ]
        groups = sorted((s.job[0], len(s.trials), s.running) for s in sweeps(tasks))
        assert groups == [("a", 1, 0), ("b", 1, 1)]

    def test_a_long_sweep_draws_every_point_but_only_recent_rows(self) -> None:
        tasks = [task(n, float(n), float(n % 7)) for n in range(1, 251)]
        doc = {"node_id": "n" * 32, "role": "provider", "now_ms": 10**6, "tasks": tasks}
        d = dom(render_page(StatusDocument.model_validate({**doc, "sweeps": sweeps(tasks)})))
        assert len(d.rows["tasks"]) == 200
        assert [len(p["points"]) for p in d.plots] == [250, 250]

    def test_wide_parameter_ranges_use_a_log_axis(self) -> None:
        points = [Point(x, 1.0, str(x)) for x in (1e-4, 1e-2, 1.0)]
        svg = svg_plot(points, title="t", x_label="lr", y_label="l", metric="l", x_key="lr")
        assert "lr (log)" in svg
        narrow = [Point(x, 1.0, str(x)) for x in (0.5, 1.0, 4.0)]
        svg = svg_plot(narrow, title="t", x_label="lr", y_label="l", metric="l", x_key="lr")
        assert "(log)" not in svg


class TestPageEscaping:
    def test_tenant_text_never_becomes_markup(self) -> None:
        evil = "<script>alert(1)</script>"
        doc = {
            "node_id": "n" * 32,
            "role": "provider",
            "address": "http://127.0.0.1:1",
            "now_ms": 10_000,
            "started_ms": 0,
            "peers": [],
            "adverts": [],
            "devices": [],
            "leases": [
                {
                    "lease_id": "lease-1",
                    "tenant": "t" * 32,
                    "model": evil,
                    "units": 1,
                    "devices": ["gpu0"],
                    "price": 1000,
                    "state": "ended",
                    "start_ms": 0,
                    "end_ms": 1,
                    "updated_ms": 1,
                    "accruing": 0,
                    "tasks": 1,
                    "outcomes": {evil: 1},
                    "history": [
                        {
                            "task_id": "t<b>1",
                            "state": evil,
                            "exit_code": 0,
                            "wall_ms": 500,
                            "finished_ms": 1500,
                        }
                    ],
                    "paid": 1000,
                }
            ],
            "earnings": None,
            "tasks": [
                task(
                    1,
                    1.0,
                    1.0,
                    argv=["python3", evil],
                    params={evil: 1.5},
                    metrics={evil: 2.0},
                    detail=evil,
                    task_id="t<b>1",
                )
            ],
        }
        page = render_page(StatusDocument.model_validate({**doc, "sweeps": sweeps(doc["tasks"])}))
        assert "<script" not in page
        assert "&lt;script&gt;" in page
        d = dom(page)
        (row,) = d.rows["tasks"]
        assert row["cells"][0] == "t<b>1"  # shown as text, exactly
        assert d.plots[0]["metric"] == evil
        (lease,) = d.rows["leases"]
        assert f"1x {evil}" in lease["cells"]
        assert lease["cells"][6].startswith(f"1 task: 1 {evil}")
        assert f"t<b>1 {evil}, exit 0, 0.5 s" in lease["cells"][6]


class TestPriceFloors:
    """Real engine and store: an operator's floor applies, persists, and yields to the config."""

    def make(self, store: Store, floor: int) -> BidEngine:
        decl = DeviceDecl(model="RTX-4090", count=2, price_floor=floor, simulated=True)
        inv = build_inventory([decl], None, detect=False)
        groups = inv.device_groups(free=set(inv.ids))
        return BidEngine("p" * 32, devices_from_groups(groups), inv.interconnect_message())

    def test_update_restore_reset_and_config_change(self, tmp_path: Path) -> None:
        with Store(tmp_path / "node.sqlite") as store:
            engine = self.make(store, 350_000)
            floors = PriceFloors(engine, store)
            floors.restore()
            floors.update({"RTX-4090": 500_000})
            assert {g.price_floor for g in engine.device_groups()} == {500_000}
            with pytest.raises(NotFoundError, match="this provider sells RTX-4090"):
                floors.update({"H100-SXM": 1})

            # A restart with the same config: the operator's floor comes back.
            again = self.make(store, 350_000)
            PriceFloors(again, store).restore()
            assert {d.price_floor for d in again.devices.values()} == {500_000}

            # A restart after the config's floor changed: the config wins.
            edited = self.make(store, 400_000)
            f = PriceFloors(edited, store)
            f.restore()
            assert {d.price_floor for d in edited.devices.values()} == {400_000}
            assert [r.model_dump() for r in f.rows()] == [
                {"model": "RTX-4090", "floor": 400_000, "config_floor": 400_000, "override": False}
            ]
            f.update({"RTX-4090": 450_000})
            f.update({}, reset=True)
            assert f.current() == {"RTX-4090": 400_000}


class TestUnavailableDevices:
    def test_a_free_device_withheld_from_sale_is_shown_unavailable(self) -> None:
        """A Slurm provider takes devices of a drained node out of the engine's free set
        (node.daemon ``_withhold_unavailable``): the page must not call them free."""
        from node.operator.document import _devices

        decl = DeviceDecl(model="RTX-4090", count=2, price_floor=1, simulated=True)
        inv = build_inventory([decl], None, detect=False)
        engine = BidEngine(
            "p" * 32,
            devices_from_groups(inv.device_groups(free=set(inv.ids))),
            inv.interconnect_message(),
        )
        withheld = sorted(engine.free)[0]
        engine.free.discard(withheld)
        states = {d.id: d.state for d in _devices(engine, None)}
        assert states[withheld] == "unavailable"
        assert sorted(states.values()) == ["free", "unavailable"]
        doc = StatusDocument(role="provider", devices=_devices(engine, None))
        assert 'data-state="unavailable"' in render_page(doc)
