"""The dashboard app without a browser: the factory, pages for URLs (good and garbage), the
callbacks as the browser POSTs them, authentication, and `klmon serve`. SQLite and
PostgreSQL."""

from __future__ import annotations

import base64
import importlib
import json
import sys
import time
from typing import Any

import numpy as np
import plotly
import pytest
from click.testing import CliRunner
from support.realdata_path import REALDATA

from monitor.charts.specs import CHARTS
from monitor.charts.view import View, parse_query, to_query
from monitor.dashboard import DashboardSettings, create_app, ids
from monitor.dashboard.app import render_page
from monitor.dashboard.data import (
    RUN_OVERVIEW_COLUMNS,
    DashboardData,
    derive_status,
    user_message,
)
from monitor.dashboard.settings import is_loopback
from monitor.errors import ConfigError, DatabaseUnavailable, StoreError
from monitor.ingest.importers import import_path
from monitor.store import series as store_series
from monitor.store.database import Database
from monitor.store.drilldown import add_annotation, write_histograms, write_samples
from monitor.store.models import AlertEventRow
from monitor.store.runs import get_or_create_run, set_run_status
from monitor.store.steps import write_steps

EVIL = "<script>alert(1)</script>"


def seed(db: Database, *, steps: int = 300, running: bool = False) -> dict[str, int]:
    """Two runs (one named like an XSS attempt), samples, histograms, a note, an alert."""
    now = time.time()
    a = get_or_create_run(db, "proj", "ppo-good", config={"kl_coef": 0.05, "lr": 1e-6})
    b = get_or_create_run(db, "proj", EVIL, config={"kl_coef": 0.1, "lr": 1e-6}, tags=[EVIL])
    for run, scale in ((a, 1.0), (b, 2.0)):
        rows = [
            {
                "step": s,
                "wall_time": now - (steps - s) * 1.0,
                "kl_mean": scale * (1 - np.exp(-s / 50)) + (5.0 if s == 123 else 0.0),
                "kl_p05": 0.5 * scale,
                "kl_p95": 1.5 * scale,
                "k1": 0.01 * scale,
                "k2": 0.012 * scale,
                "k3": 0.011 * scale,
                "reward_mean": np.sqrt(s) / 10,
                "policy_nll": 1.2,
                "resp_len_mean": 40.0,
                "top1pct_share": 0.05,
            }
            for s in range(steps)
        ]
        write_steps(db, run.id, rows)
        if not running:
            set_run_status(db, run.id, "finished")
    write_samples(
        db,
        a.id,
        [
            {
                "step": 100,
                "seq_index": 0,
                "kind": "top",
                "kl_seq": 2.4,
                "reward": 1.0,
                "prompt": "Say hi <img src=x onerror=alert(2)>",
                "response": "Good day",
                "tokens": ["Good", " day"],
                "policy_logprobs": [-0.8, -0.4],
                "ref_logprobs": [-1.5, -2.1],
            }
        ],
    )
    write_histograms(db, a.id, [(s, [1, 2, 3, 4]) for s in range(0, steps, 10)])
    add_annotation(db, a.id, 150, "bad batch <b>here</b>", author="ana")
    with db.session() as s:
        s.add(
            AlertEventRow(
                run_id=b.id,
                rule="kl_budget",
                detector="budget",
                severity="critical",
                state="firing",
                start_step=120,
                fired_step=123,
                value=7.0,
                message=f"KL 7 over budget {EVIL}",
                causes=[],
                started_at=now,
                fired_at=now,
            )
        )
    return {"a": a.id, "b": b.id}


@pytest.fixture
def app(db: Database, db_url: str):
    return create_app(DashboardSettings(db_url=db_url), db=db)


def dump(component: Any) -> str:
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


# --------------------------------------------------------------------------- callbacks


class Callbacks:
    """POSTs callbacks to the app's server the way the browser's renderer does."""

    def __init__(self, app: Any) -> None:
        self.client = app.server.test_client()
        self.deps = self.client.get("/_dash-dependencies").get_json()

    def output_of(self, *needles: str) -> str:
        return next(d["output"] for d in self.deps if all(n in d["output"] for n in needles))

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        r = self.client.post("/_dash-update-component", json=body)
        return r.status_code, (r.get_json() or {}).get("response", {}) if r.data else {}

    @staticmethod
    def gid(panel: str, chart: str) -> dict[str, str]:
        return {"chart": chart, "panel": panel, "type": "kl-graph"}

    def render(
        self,
        panel: str,
        view: View,
        keys: list[str],
        *,
        relayout: dict[str, Any] | None = None,
        live: Any = None,
    ) -> tuple[int, dict[str, Any]]:
        pid = lambda n: ids.panel_id(panel, n)  # noqa: E731
        trig = (
            json.dumps(self.gid(panel, keys[0]), sort_keys=True, separators=(",", ":"))
            + ".relayoutData"
            if relayout
            else f"{pid('smooth')}.value"
        )
        return self.post(
            {
                "output": self.output_of(f"{pid('live')}.data...", ".figure"),
                "outputs": [
                    [{"id": self.gid(panel, k), "property": "figure"} for k in keys],
                    {"id": pid("live"), "property": "data"},
                    {"id": pid("interval"), "property": "disabled"},
                    {"id": pid("msg"), "property": "children"},
                    {"id": pid("permalink"), "property": "href"},
                    {"id": pid("smooth-value"), "property": "children"},
                    [{"id": ids.chart_box(panel, k), "property": "style"} for k in keys],
                    {"id": pid("empty"), "property": "children"},
                ],
                "inputs": [
                    {"id": pid("smooth"), "property": "value", "value": view.smooth},
                    {"id": pid("x"), "property": "value", "value": view.x},
                    {
                        "id": pid("klaxis"),
                        "property": "value",
                        "value": "log" if view.kl_log else "linear",
                    },
                    [
                        {
                            "id": self.gid(panel, k),
                            "property": "relayoutData",
                            "value": relayout if i == 0 else None,
                        }
                        for i, k in enumerate(keys)
                    ],
                ],
                "changedPropIds": [trig],
                "state": [
                    {"id": pid("view"), "property": "data", "value": view.to_dict()},
                    {"id": pid("live"), "property": "data", "value": live},
                ],
            }
        )

    def live(self, panel: str, keys: list[str], live: Any) -> tuple[int, dict[str, Any]]:
        pid = lambda n: ids.panel_id(panel, n)  # noqa: E731
        return self.post(
            {
                "output": self.output_of(".extendData", f'"{panel}"'),
                "outputs": [
                    [{"id": self.gid(panel, k), "property": "extendData"} for k in keys],
                    {"id": pid("live"), "property": "data"},
                    {"id": pid("status"), "property": "children"},
                ],
                "inputs": [{"id": pid("interval"), "property": "n_intervals", "value": 1}],
                "changedPropIds": [f"{pid('interval')}.n_intervals"],
                "state": [{"id": pid("live"), "property": "data", "value": live}],
            }
        )

    def simple(
        self,
        output: str,
        inputs: dict[str, Any],
        state: dict[str, Any] | None = None,
        changed: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """A callback with plain string ids: ``inputs``/``state`` map 'id.prop' to values."""
        d = next(d for d in self.deps if d["output"] == output)
        outs = []
        for part in output.strip(".").split("..."):
            part = part.split("@")[0]
            cid, _, prop = part.rpartition(".")
            outs.append({"id": cid, "property": prop})

        def entries(spec: list[dict[str, Any]], values: dict[str, Any]) -> list[dict[str, Any]]:
            return [{**e, "value": values.get(f"{e['id']}.{e['property']}")} for e in spec]

        return self.post(
            {
                "output": output,
                "outputs": outs if output.startswith("..") else outs[0],
                "inputs": entries(d["inputs"], inputs),
                "state": entries(d["state"], state or {}),
                "changedPropIds": [changed or next(iter(inputs))],
            }
        )


def fig_of(resp: dict[str, Any], panel: str, chart: str) -> dict[str, Any]:
    key = json.dumps(Callbacks.gid(panel, chart), sort_keys=True, separators=(",", ":"))
    return resp[key]["figure"]


def ys(fig: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for tr in fig["data"]:
        y = tr.get("y")
        if isinstance(y, dict):
            out += np.frombuffer(base64.b64decode(y["bdata"]), dtype="<f4").tolist()
        elif isinstance(y, list):
            out += [v for v in y if v is not None]
    return out


# --------------------------------------------------------------------------- tests


def test_pages_render_and_show_user_text_literally(app, db: Database) -> None:
    r = seed(db)
    data, settings = app.klmon_data, app.klmon_settings
    pages = {
        "/": "",
        "/compare": f"?runs={r['a']},{r['b']}&smooth=0.9",
        f"/run/{r['a']}": "?step=100",
        f"/run/{r['b']}": "",
        "/alerts": "",
    }
    for path, query in pages.items():
        text = dump(render_page(data, settings, path, query))
        assert "dangerously" not in text
        assert "Something went wrong" not in text, path
    runs_text = dump(render_page(data, settings, "/", ""))
    assert json.dumps(EVIL)[1:-1] in runs_text  # the literal name, as a JSON string
    run_text = dump(render_page(data, settings, f"/run/{r['a']}", "?step=100"))
    assert "Say hi <img src=x onerror=alert(2)>" in run_text  # prompt as text
    # the response's tokens as text, whitespace made visible (show_token)
    assert '"children": "Good"' in run_text and f'"children": {json.dumps("␣day")}' in run_text
    assert "+1.700" in run_text and "+0.700" in run_text  # the top tokens table
    cmp_text = dump(render_page(data, settings, "/compare", f"?runs={r['a']},{r['b']}"))
    assert "config.kl_coef" in cmp_text and "differs" in cmp_text


def test_garbage_urls_give_messages_not_traces(app, db: Database) -> None:
    seed(db)
    data, settings = app.klmon_data, app.klmon_settings
    cases = {
        ("/run/99999", ""): "run 99999 does not exist",
        ("/run/abc", ""): "There is no page at /run/abc",
        ("/nowhere", ""): "There is no page at /nowhere",
        ("/compare", "?runs=abc,99999"): "No runs to compare",
        ("/compare", "?runs=1&from=-5&to=x&smooth=7&x=zz"): "ignored from=-5",
        ("/compare", f"?runs=1&from=0&to={10**30}"): "outside",
        ("/compare", "?runs=1&from=500&to=10"): "from is after to",
        ("/compare", "?" + "a" * 5000): "ignored a query string",
        ("/run/1", "?step=-3"): "ignored step=-3",
    }
    for (path, query), expected in cases.items():
        text = dump(render_page(data, settings, path, query))
        assert expected in text, (path, query)
        assert "Traceback" not in text


def test_query_round_trip_and_validation() -> None:
    view, warnings = parse_query("?runs=3,7,9,7&from=0&to=5000&smooth=0.9&x=wall&metrics=loss,lr")
    assert view == View((3, 7, 9), 0, 5000, 0.9, "wall", ("loss", "lr"), None)
    assert warnings == []
    assert parse_query(to_query(view))[0] == view
    view, warnings = parse_query("?runs=" + ",".join(str(i) for i in range(40)))
    assert len(view.runs) == 12 and "first 12" in warnings[0]
    assert View.from_dict({"runs": ["1; DROP"], "x": "<b>"}).runs == ()
    assert View.from_dict("nonsense") == View()


def test_compare_render_zoom_and_live_callbacks(app, db: Database) -> None:
    r = seed(db, steps=3000, running=True)
    cb = Callbacks(app)
    view = View((r["a"], r["b"]), smooth=0.9)
    keys = ["kl", "estimators", "reward", "frontier"]
    status, resp = cb.render("cmp", view, keys)
    assert status == 200
    kl = fig_of(resp, "cmp", "kl")
    names = {t.get("name") for t in kl["data"] if t.get("showlegend", True) and t.get("name")}
    assert names == {
        f"ppo-good (#{r['a']})",
        f"&lt;script&gt;alert(1)&lt;/script&gt; (#{r['b']})",
    }
    assert max(ys(kl)) == pytest.approx(2 * (1 - np.exp(-123 / 50)) + 5, rel=1e-5)  # the spike
    live = resp[ids.panel_id("cmp", "live")]["data"]
    assert live["runs"][str(r["a"])]["level"] > 0 and live["runs"][str(r["a"])]["follow"]
    assert resp[ids.panel_id("cmp", "interval")]["disabled"] is False
    assert resp[ids.panel_id("cmp", "permalink")]["href"].startswith("/compare?runs=")
    # a zoom on one chart moves all of them, at a finer level
    status, zoomed = cb.render(
        "cmp", view, keys, relayout={"xaxis.range[0]": 100, "xaxis.range[1]": 400}, live=live
    )
    assert status == 200
    for k in ("kl", "estimators", "reward"):
        assert fig_of(zoomed, "cmp", k)["layout"]["xaxis"]["range"] == [100, 400]
    zlive = zoomed[ids.panel_id("cmp", "live")]["data"]
    assert zlive["runs"][str(r["a"])]["level"] == 0 and zlive["zoom"] == [100, 400]
    assert zoomed[ids.panel_id("cmp", "interval")]["disabled"] is True  # a closed range
    # autosize events change nothing
    status, _ = cb.render("cmp", view, keys, relayout={"autosize": True}, live=live)
    assert status == 204
    # live: new steps only, appended to the tail traces
    now = time.time()
    write_steps(
        db,
        r["a"],
        [
            {"step": s, "wall_time": now, "kl_mean": 0.5, "reward_mean": 1.0}
            for s in range(3000, 3020)
        ],
    )
    status, ext = cb.live("cmp", keys, live)
    assert status == 200
    key = json.dumps(Callbacks.gid("cmp", "kl"), sort_keys=True, separators=(",", ":"))
    update, indices = ext[key]["extendData"]
    xs = [x for xs_ in update["x"] for x in xs_]
    assert indices and min(xs) >= 3000 and max(xs) <= 3019
    new_live = ext[ids.panel_id("cmp", "live")]["data"]
    assert new_live["runs"][str(r["a"])]["held"] == 3019
    status, again = cb.live("cmp", keys, new_live)  # nothing newer: nothing sent
    assert status in (200, 204)
    if status == 200:
        assert all("extendData" not in v for v in again.values())


def test_live_state_from_the_browser_is_validated(app, db: Database) -> None:
    seed(db)
    cb = Callbacks(app)
    for bad in (None, "x", {"x": "step"}, {"x": "nope", "runs": {}, "tails": {}}):
        status, _ = cb.live("cmp", ["kl"], bad)
        assert status == 204


def test_run_page_step_and_annotation_callbacks(app, db: Database) -> None:
    r = seed(db)
    cb = Callbacks(app)
    out = cb.output_of(f"{ids.RUN_SAMPLES}.children", f"{ids.RUN_STEP}.value")
    status, resp = cb.simple(
        out, {f"{ids.RUN_STEP}.value": 97}, {f"{ids.RUN_ID_STORE}.data": r["a"]}
    )
    assert status == 200
    assert resp[ids.RUN_STEP]["value"] == 100  # the nearest step with samples
    assert "no samples at step 97" in dump(resp[ids.RUN_SAMPLES]["children"])
    assert resp[ids.RUN_STEP_LINK]["href"] == f"/run/{r['a']}?step=100"
    out = cb.output_of(f"{ids.RUN_ANN_LIST}.children")
    status, resp = cb.simple(
        out,
        {f"{ids.RUN_ANN_ADD}.n_clicks": 1},
        {
            f"{ids.RUN_ANN_STEP}.value": 42,
            f"{ids.RUN_ANN_TEXT}.value": "KL jumped <i>here</i>",
            f"{ids.RUN_ANN_AUTHOR}.value": "bo",
            f"{ids.RUN_ID_STORE}.data": r["a"],
        },
    )
    assert status == 200
    assert "KL jumped <i>here</i>" in dump(resp[ids.RUN_ANN_LIST]["children"])
    status, resp = cb.simple(
        out,
        {f"{ids.RUN_ANN_ADD}.n_clicks": 2},
        {
            f"{ids.RUN_ANN_STEP}.value": 42,
            f"{ids.RUN_ANN_TEXT}.value": "  ",
            f"{ids.RUN_ID_STORE}.data": r["a"],
        },
    )
    assert "annotation text is empty" in dump(resp[ids.RUN_ANN_MSG]["children"])


def test_alerts_acknowledge_and_silence(app, db: Database) -> None:
    r = seed(db)
    cb = Callbacks(app)
    ev = app.klmon_data.events(state="open")
    assert len(ev) == 1
    row = {"id": int(ev["id"][0]), "run_id": r["b"], "rule": "kl_budget"}
    out = cb.output_of(f"{ids.ALERTS_GRID}.rowData")
    state = {
        f"{ids.ALERTS_GRID}.selectedRows": [row],
        f"{ids.ALERTS_WHO}.value": "",
        f"{ids.ALERTS_SILENCE_FOR}.value": "3600",
    }
    status, resp = cb.simple(
        out,
        {f"{ids.ALERTS_STATE}.value": "open", f"{ids.ALERTS_ACK}.n_clicks": 1},
        state,
        changed=f"{ids.ALERTS_ACK}.n_clicks",
    )
    assert status == 200
    rows = resp[ids.ALERTS_GRID]["rowData"]
    assert rows[0]["acknowledged_by"] == "dashboard"
    assert rows[0]["open"] == f"[run at step](/run/{r['b']}?step=123)"
    assert rows[0]["run"] == f"{EVIL} (#{r['b']})"  # shown as text by the grid
    status, resp = cb.simple(
        out,
        {f"{ids.ALERTS_STATE}.value": "open", f"{ids.ALERTS_SILENCE}.n_clicks": 1},
        state,
        changed=f"{ids.ALERTS_SILENCE}.n_clicks",
    )
    assert resp[ids.ALERTS_GRID]["rowData"][0]["silenced"] == "yes"
    assert "silenced 1 rule(s) for 1 hour" in dump(resp[ids.ALERTS_MSG]["children"])


def test_runs_page_compare_button_opens_the_selection(app, db: Database) -> None:
    r = seed(db)
    cb = Callbacks(app)
    out = cb.output_of(f"{ids.URL}.href")
    _, resp = cb.simple(
        out,
        {f"{ids.RUNS_COMPARE}.n_clicks": 1},
        {f"{ids.RUNS_GRID}.selectedRows": [{"id": r["a"]}, {"id": r["b"]}, {"id": "x"}]},
    )
    assert resp[ids.URL]["href"] == f"/compare?runs={r['a']},{r['b']}"
    overview = app.klmon_data.runs_overview()
    assert set(overview["status"]) == {"finished"}
    assert overview.loc[overview["id"] == r["b"], "open_alerts"].item() == 1
    assert all(len(s) > 0 for s in overview["kl_trend"])


# --------------------------------------------------------------------------- safety


def test_errors_never_show_the_database_url() -> None:
    url = "postgresql://klmon:s3cret@db.internal:5432/klmon"
    for exc in (
        DatabaseUnavailable(f"database {url} is unavailable: timeout"),
        StoreError(f"database {url}: relation does not exist"),
        RuntimeError(f"boom {url}"),
    ):
        msg = user_message(exc)
        assert "s3cret" not in msg and "db.internal" not in msg and "postgresql" not in msg


def test_healthz_and_unreachable_database(app, db: Database, monkeypatch) -> None:
    client = app.server.test_client()
    assert client.get("/healthz").data == b"ok\n"

    def down(*a: Any, **k: Any) -> Any:
        raise DatabaseUnavailable("database postgresql://u:pw@host/db is unavailable")

    monkeypatch.setattr(app.klmon_data, "runs_overview", down)
    page = dump(render_page(app.klmon_data, app.klmon_settings, "/", ""))
    assert "The database is unavailable right now" in page and "pw@host" not in page
    monkeypatch.setattr(db, "begin", down)
    r = client.get("/healthz")
    assert r.status_code == 503 and b"host" not in r.data


def test_basic_auth_token_and_security_headers(db: Database, db_url: str) -> None:
    app = create_app(
        DashboardSettings(db_url=db_url, user="ana", password="correct horse", token="t" * 32),
        db=db,
    )
    c = app.server.test_client()
    r = c.get("/")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert c.get("/healthz").status_code == 200  # for the container's healthcheck
    basic = base64.b64encode(b"ana:correct horse").decode()
    wrong = base64.b64encode(b"ana:wrong").decode()
    assert c.get("/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    ok = c.get("/", headers={"Authorization": f"Basic {basic}"})
    assert ok.status_code == 200
    assert ok.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in ok.headers["Content-Security-Policy"]
    assert c.get("/", headers={"Authorization": "Bearer " + "t" * 32}).status_code == 200
    c2 = app.server.test_client()
    r = c2.get("/compare?runs=1&token=" + "t" * 32)
    assert r.status_code == 303 and r.headers["Location"] == "/compare?runs=1"
    assert "t" * 32 not in r.headers["Set-Cookie"]  # a digest, not the token
    assert c2.get("/compare?runs=1").status_code == 200  # the cookie now
    assert app.server.test_client().get("/?token=nope").status_code == 401


def test_settings_refuse_unsafe_exposure() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    DashboardSettings(db_url="sqlite://").check_exposure()
    with pytest.raises(ConfigError, match="without authentication"):
        DashboardSettings(db_url="sqlite://", host="0.0.0.0").check_exposure()
    DashboardSettings(db_url="sqlite://", host="0.0.0.0", insecure=True).check_exposure()
    DashboardSettings(db_url="sqlite://", host="0.0.0.0", token="x" * 20).check_exposure()
    with pytest.raises(ConfigError, match="set together"):
        DashboardSettings(db_url="sqlite://", user="a")
    with pytest.raises(ConfigError, match="at least 16"):
        DashboardSettings(db_url="sqlite://", token="short")
    env = {"KLMON_DB_URL": "sqlite:///x.db", "KLMON_DASHBOARD_REFRESH_S": "nope"}
    with pytest.raises(ConfigError, match="not a number"):
        DashboardSettings.from_env(env)
    s = DashboardSettings.from_env(
        {"KLMON_DB_URL": "sqlite:///x.db", "KLMON_DASHBOARD_INSECURE": "1"}
    )
    assert s.insecure and s.db_url == "sqlite:///x.db"


def test_stalled_is_derived_from_the_usual_step_interval() -> None:
    now = 10_000.0
    assert derive_status("running", now - 30, now - 30, 1.0, now) == "running"
    assert derive_status("running", now - 500, now - 500, 1.0, now) == "stalled"
    assert derive_status("running", now - 500, now - 500, 60.0, now) == "running"  # slow steps
    assert derive_status("finished", now - 1e6, None, None, now) == "finished"
    assert derive_status("running", None, None, None, now) == "running"


def test_serve_command_is_safe_by_default(db_url: str, monkeypatch) -> None:
    from monitor.cli import main

    for var in ("KLMON_DASHBOARD_USER", "KLMON_DASHBOARD_PASSWORD", "KLMON_DASHBOARD_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KLMON_DASHBOARD_INSECURE", raising=False)
    runner = CliRunner()
    res = runner.invoke(main, ["serve", "--db", db_url, "--host", "0.0.0.0"])
    assert res.exit_code != 0 and "without authentication" in res.output
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("dash.Dash.run", lambda self, **kw: calls.append(kw))
    res = runner.invoke(main, ["serve", "--db", db_url, "--port", "8123"])
    assert res.exit_code == 0, res.output
    assert calls == [
        {
            "host": "127.0.0.1",
            "port": 8123,
            "debug": False,
            "dev_tools_ui": False,
            "dev_tools_props_check": False,
        }
    ]
    assert "s3cret" not in res.output
    res = runner.invoke(main, ["serve", "--db", db_url, "--host", "0.0.0.0", "--insecure"])
    assert res.exit_code == 0 and calls[-1]["host"] == "0.0.0.0"


def test_wsgi_entry_point_reads_the_environment(db_url: str, monkeypatch) -> None:
    monkeypatch.setenv("KLMON_DB_URL", db_url)
    for var in ("KLMON_DASHBOARD_USER", "KLMON_DASHBOARD_PASSWORD", "KLMON_DASHBOARD_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KLMON_DASHBOARD_TOKEN", raising=False)
    sys.modules.pop("monitor.dashboard.wsgi", None)
    with pytest.raises(ConfigError, match="without authentication"):
        importlib.import_module("monitor.dashboard.wsgi")
    monkeypatch.setenv("KLMON_DASHBOARD_TOKEN", "z" * 24)
    sys.modules.pop("monitor.dashboard.wsgi", None)
    wsgi = importlib.import_module("monitor.dashboard.wsgi")
    assert wsgi.server.test_client().get("/healthz").status_code == 200
    assert wsgi.server.test_client().get("/").status_code == 401
    sys.modules.pop("monitor.dashboard.wsgi", None)


def test_extra_metric_with_its_meaning_and_wall_time_axis(app, db: Database) -> None:
    from datetime import UTC, datetime

    from monitor.store.metric_info import MetricInfo, write_metric_info
    from monitor.store.steps import write_metrics

    r = seed(db, steps=3000, running=True)
    write_metrics(db, r["a"], [(s, "loss", 1.0 / (1 + s)) for s in range(0, 3000, 2)])
    write_metric_info(
        db,
        r["a"],
        [MetricInfo("loss", source="trl-ppo", scale="token-mean", description="policy loss")],
    )
    cb = Callbacks(app)
    view = View((r["a"], r["b"]), x="wall", metrics=("loss",))
    keys = ["kl", "m0"]
    status, resp = cb.render("cmp", view, keys)
    assert status == 200
    m0 = fig_of(resp, "cmp", "m0")
    assert m0["layout"]["yaxis"]["title"]["text"] == "loss (from trl-ppo, scale token-mean)"
    assert m0["layout"]["title"]["text"] == "Metric loss: policy loss"
    assert m0["layout"]["xaxis"]["type"] == "date"
    assert {t.get("legendgroup") for t in m0["data"] if t.get("legendgroup")} == {f"r{r['a']}"}
    live = resp[ids.panel_id("cmp", "live")]["data"]
    # a zoom on a wall-time axis arrives as date strings
    now = time.time()

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    status, zoomed = cb.render(
        "cmp",
        view,
        keys,
        relayout={"xaxis.range[0]": iso(now - 2000), "xaxis.range[1]": iso(now - 1800)},
        live=live,
    )
    assert status == 200
    rng = fig_of(zoomed, "cmp", "kl")["layout"]["xaxis"]["range"]
    assert rng[0] == pytest.approx((now - 2000) * 1000, abs=1000)
    assert zoomed[ids.panel_id("cmp", "live")]["data"]["runs"][str(r["a"])]["level"] == 0
    # live: new metric rows arrive as new points at their (interpolated) wall time
    write_metrics(db, r["a"], [(s, "loss", 0.0) for s in range(3000, 3010)])
    write_steps(
        db, r["a"], [{"step": s, "wall_time": now + 5, "kl_mean": 1.0} for s in range(3000, 3010)]
    )
    status, ext = cb.live("cmp", keys, live)
    key = json.dumps(Callbacks.gid("cmp", "m0"), sort_keys=True, separators=(",", ":"))
    update, _ = ext[key]["extendData"]
    assert all(x > 1e12 for xs in update["x"] for x in xs)  # milliseconds since the epoch


# --------------------------------------------------------------------------- scalar-only runs


def _import_grpo_pair(db: Database) -> dict[str, int]:
    """The two real TRL GRPO logs of ../shared/realdata, imported as `klmon import` does:
    KL only as k3 (TRL's `kl`), reward and length; no kl_mean, no token statistics."""
    if not (REALDATA / "INDEX.md").is_file():
        pytest.skip(f"real training logs not found at {REALDATA}")
    return {
        f: import_path(db, REALDATA / f"{f}.trainer_state.json", project="real").run.id
        for f in ("gemma3_grpo_abdo", "chaos_economy_grpo")
    }


def test_query_carries_the_kl_axis_scale() -> None:
    view, warnings = parse_query("?runs=1,2&klaxis=log")
    assert view.kl_log and warnings == []
    assert "klaxis=log" in to_query(view) and parse_query(to_query(view))[0] == view
    assert View.from_dict(view.to_dict()) == view
    view, warnings = parse_query("?runs=1&klaxis=cubic")
    assert not view.kl_log and "klaxis" in warnings[0]


def test_compare_two_imported_grpo_runs_draws_what_they_have(app, db: Database) -> None:
    r = _import_grpo_pair(db)
    a, b = r["gemma3_grpo_abdo"], r["chaos_economy_grpo"]
    cb = Callbacks(app)
    keys = [c.key for c in CHARTS]
    status, resp = cb.render("cmp", View((a, b)), keys)
    assert status == 200
    kl = fig_of(resp, "cmp", "kl")
    assert kl["layout"]["yaxis"]["title"]["text"] == "KL, nats per token (k3 from kl)"
    assert max(ys(kl)) == pytest.approx(0.0686791875399649, rel=1e-6)  # gemma3 at step 130
    frontier = fig_of(resp, "cmp", "frontier")
    assert len(frontier["data"]) == 4  # history and tail per run
    assert "k3 from kl" in frontier["layout"]["xaxis"]["title"]["text"]
    # charts nobody has data for collapse to a line that says what fills them
    styles = {
        json.loads(k)["chart"]: v["style"]
        for k, v in resp.items()
        if k.startswith("{") and "kl-chart-box" in k
    }
    hidden = {k for k, st in styles.items() if st == {"display": "none"}}
    assert hidden == {"nll", "concentration", "rollout_gap"}
    lines = dump(resp[ids.panel_id("cmp", "empty")]["children"])
    assert "Rollout gap (inference engine vs trainer): no data for these runs" in lines
    assert "filled by rollout_gap (log_step(rollout_logprobs=...)" in lines
    # every chart autoranges over the same extent: both runs' steps (5..250)
    for k in keys:
        if k != "frontier":
            xaxis = fig_of(resp, "cmp", k)["layout"]["xaxis"]
            assert xaxis["autorangeoptions"] == {"include": [5.0, 250.0]}, k
    # the log toggle: KL axes only, and in the permalink
    status, logged = cb.render("cmp", View((a, b), kl_log=True), keys)
    assert status == 200
    assert fig_of(logged, "cmp", "kl")["layout"]["yaxis"]["type"] == "log"
    assert fig_of(logged, "cmp", "estimators")["layout"]["yaxis"]["type"] == "log"
    assert "type" not in fig_of(logged, "cmp", "reward")["layout"]["yaxis"]
    assert "klaxis=log" in logged[ids.panel_id("cmp", "permalink")]["href"]


def test_runs_overview_and_compare_table_give_the_kl_with_its_unit(app, db: Database) -> None:
    r = _import_grpo_pair(db)
    overview = app.klmon_data.runs_overview().set_index("id")
    for rid in r.values():
        assert overview.loc[rid, "kl_quantity"] == "k3 from kl, nats/token"
        assert overview.loc[rid, "last_kl"] > 0 and overview.loc[rid, "kl_trend"]
    page = dump(
        render_page(
            app.klmon_data,
            app.klmon_settings,
            "/compare",
            f"?runs={r['gemma3_grpo_abdo']},{r['chaos_economy_grpo']}",
        )
    )
    assert "0.0212395 (k3 from kl, nats/token)" in page
    run_page = dump(
        render_page(app.klmon_data, app.klmon_settings, f"/run/{r['gemma3_grpo_abdo']}", "")
    )
    assert "KL now (k3 from kl, nats/token)" in run_page


def _overview_run_by_run(data: DashboardData, run_ids: list[int]) -> list[dict[str, Any]]:
    """The Runs page rows as the page computed them before, one run at a time: its state
    from its latest 21 step rows, its current KL and a 12-bucket sparkline of that KL (the
    run's own, read alone)."""
    from monitor.charts.tables import sparkline

    out = []
    for rid in run_ids:
        st = data.run_state(rid)
        now = data.current_kl(rid) if st.last_step is not None else None
        trend = ""
        if now is not None:
            col = now.quantity.column
            trend = sparkline(store_series.read_sparklines(data.db, {rid: col})[rid])
        out.append(
            {
                "id": rid,
                "status": st.status,
                "last_step": st.last_step,
                "last_update": max(
                    (t for t in (st.last_wall, st.info.last_seen_at) if t is not None),
                    default=None,
                ),
                "last_kl": None if now is None else now.value,
                "kl_quantity": None if now is None else now.quantity.label(),
                "last_reward": st.last.get("reward_mean"),
                "kl_trend": trend,
            }
        )
    return out


def test_runs_overview_reads_all_runs_at_once_with_the_same_rows(db: Database) -> None:
    """The Runs page builds from the run counters and batched reads; every column equals
    the run-by-run computation: short and long runs, gaps, a run without steps, one with
    only k3, one still running whose rollups are behind (then caught up)."""
    from monitor.store.runs import list_run_ids

    seed(db)
    _import_grpo_pair(db)
    now = time.time()
    get_or_create_run(db, "proj", "empty")
    short = get_or_create_run(db, "proj", "short")
    write_steps(
        db, short.id, [{"step": s, "wall_time": now + s, "kl_mean": s / 3} for s in range(5)]
    )
    long = get_or_create_run(db, "proj", "long-gappy")
    write_steps(
        db,
        long.id,
        [
            {"step": s, "wall_time": now - 5000 + s, "kl_mean": np.sin(s / 90), "k3": 0.1}
            for s in range(0, 3001, 3)
        ]
        + [{"step": 3002, "wall_time": now, "reward_mean": 0.5}],
    )
    data = DashboardData(db, clock=lambda: now)
    for _ in range(2):  # first with rollups behind, then with them up to date
        new = data._runs_overview()
        assert list(new.columns) == RUN_OVERVIEW_COLUMNS
        data.clear_cache()
        old = _overview_run_by_run(data, list_run_ids(db))
        data.clear_cache()
        assert len(new) == len(old) == 7
        for got, want in zip(new.to_dict("records"), old, strict=True):
            for key, value in want.items():
                g = got[key]
                g = None if isinstance(g, float) and np.isnan(g) else g
                assert g == value, (got["name"], key, g, value)
    assert new.set_index("name").loc["long-gappy", "kl_trend"]
    assert new.set_index("name").loc["empty", "kl_trend"] == ""
