"""The drift vocabulary where people read it: the run page's panel and Compare's table, the
alert emails and the Alerts page, the post-mortem report; on a simulated run that learns to
repeat 'help' and '!!' (monitor.simulate's reward_hacking) and a healthy one, on SQLite and
PostgreSQL. Browser tests of the panel's callbacks are in tests/test_dashboard_browser.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from support.alerts import T0, Clock, ListSender
from support.db import simulated_ledger_run

from monitor.alerts import AlertEngine, AlertSettings, load_rules
from monitor.alerts.render import RunLabel, render
from monitor.charts.tables import vocabulary_line
from monitor.charts.view import View
from monitor.dashboard import DashboardSettings
from monitor.dashboard import ids as I
from monitor.dashboard.app import render_page
from monitor.dashboard.data import DashboardData
from monitor.dashboard.pages.alerts import rows as alert_rows
from monitor.dashboard.pages.alerts import token_notes
from monitor.dashboard.vocabulary import NO_LEDGER, compare_section, vocabulary_section
from monitor.report import collect, render_html, render_markdown
from monitor.store import step_vocabulary, token_changes
from monitor.store.alerts import AlertEvent, list_events
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run, set_run_status
from monitor.store.steps import write_steps
from monitor.store.vocabulary_notes import StepVocabulary

ONSET = 60
LAST = 119


@pytest.fixture
def runs(db_url: str, tmp_path) -> dict[str, int]:
    hack = simulated_ledger_run(db_url, tmp_path / "s1", "hack", "reward_hacking", onset=ONSET)
    healthy = simulated_ledger_run(db_url, tmp_path / "s2", "healthy", "healthy", onset=None)
    return {"hack": hack, "healthy": healthy}


def dump(component) -> str:
    return json.dumps(component.to_plotly_json(), default=lambda o: o.to_plotly_json())


def test_what_changed_names_the_repeated_tokens(db: Database, runs) -> None:
    ch = token_changes(db, runs["hack"], 19, LAST, window=20, k=5)
    assert ch["token"].tolist()[:2] == ["help", "!!"]  # texts follow their ids
    assert (ch["per_1k_after"].iloc[:2] > 10 * ch["per_1k_before"].iloc[:2]).all()
    v = step_vocabulary(db, runs["hack"], LAST)
    assert v.top["token"].iloc[0] in ("help", "!!")
    line = vocabulary_line(v.top, v.changes)
    assert line.startswith("carried by ") and "'help'" in line and "'!!'" in line
    assert "since warm-up: 'help'" in line and "per 1k tokens" in line
    # a healthy run is carried by many words, none of them the hack's
    calm = step_vocabulary(db, runs["healthy"], LAST)
    assert "help" not in calm.top["token"].tolist()


def test_run_page_panel_and_its_empty_state(db: Database, runs) -> None:
    data = DashboardData(db)
    text = dump(vocabulary_section(data, runs["hack"], View(runs=(runs["hack"],))))
    assert I.VOCAB_HEATMAP in text and I.VOCAB_CHANGES in text
    assert '"help"' in text and "vocab-changes" in text  # the heatmap's rows, the table
    later = View(runs=(runs["hack"],), start=200, end=300)  # past its last step
    outside = dump(vocabulary_section(data, runs["hack"], later))
    assert I.VOCAB_HEATMAP in outside and "no token ledger in this range" in outside
    bare = get_or_create_run(db, "sim", "no-ids")
    write_steps(db, bare.id, [{"step": s, "wall_time": T0 + s, "kl_mean": 1.0} for s in range(5)])
    empty = dump(vocabulary_section(data, bare.id, View(runs=(bare.id,))))
    assert NO_LEDGER in empty and I.VOCAB_HEATMAP not in empty


def test_compare_shows_run_b_against_run_a(db: Database, runs) -> None:
    data = DashboardData(db)
    query = f"?runs={runs['healthy']},{runs['hack']}"
    page = dump(render_page(data, DashboardSettings(db_url=db.url), "/compare", query))
    assert I.CMP_VOCAB in page
    table = dump(compare_section(data, runs["healthy"], runs["hack"], View()))
    assert '"children": "help"' in table and '"children": "!!"' in table
    assert "healthy (#" in table and "hack (#" in table
    reverse = dump(compare_section(data, runs["hack"], runs["healthy"], View()))
    assert '"children": "help"' not in reverse  # B (healthy) does not carry help more than A


def test_alert_emails_and_the_alerts_page_name_the_tokens(db: Database, runs) -> None:
    sender = ListSender()
    set_run_status(db, runs["hack"], "finished", now=T0)
    eng = AlertEngine(
        db,
        load_rules(),
        settings=AlertSettings(nodata_after=1e9),
        clock=Clock(T0),
        senders={"email": sender},
    )
    eng.run_once([runs["hack"]])
    ev = list_events(db, run_id=runs["hack"])
    assert "vocabulary-concentration" in set(ev["rule"])
    assert sender.sent, "no email"
    payload = next(n.payload for n in sender.sent if "vocabulary" in n.payload["text"])
    assert "Drift vocabulary at step" in payload["text"] and "'help'" in payload["text"]
    assert "Drift vocabulary at step" in payload["html"] and "&#x27;help&#x27;" in payload["html"]
    grid = alert_rows(ev, token_notes(DashboardData(db), ev))
    assert any("carried by" in r["tokens"] and "'help'" in r["tokens"] for r in grid)


def test_token_text_in_an_email_is_escaped_and_made_visible() -> None:
    top = pd.DataFrame(
        {"token_id": [5, 6], "token": ["<img src=x onerror=alert(1)>\n", "<|eos|>"]}
    ).assign(share_pos=[0.6, 0.3])
    vocab = StepVocabulary(7, top, top.iloc[0:0])
    fired = AlertEvent(
        *(1, 1, "vocabulary-concentration", "vocabulary_concentration", "warning", "firing"),
        *(5, 7, None, 7, 0.9, 0.6, 0.9, "5 tokens carry 90%", (), T0, T0, None, None, None),
        *(False, False),
    )
    out = render(RunLabel(1, "p", "r"), [fired], [], vocabulary=vocab)
    assert "<img" not in out.html and "&lt;img␣src=x␣onerror=alert(1)&gt;↵" in out.html
    assert "'<img␣src=x␣onerror=alert(1)>↵' 60%" in out.text
    assert "<|eos|> (special) 30%" in out.text
    assert out.webhook["vocabulary"].startswith("Drift vocabulary at step 7: carried by")


def test_report_has_a_vocabulary_section_per_run(db: Database, runs, tmp_path) -> None:
    data = collect(db, [str(runs["healthy"]), str(runs["hack"])])
    html_text = render_html(data)
    assert "<h2>Drift vocabulary</h2>" in html_text
    section = html_text[html_text.index("<h2>Drift vocabulary</h2>") :]
    assert section.count("<h3>") >= 2 and ">help</code>" in section
    [md_path, *_] = render_markdown(data, tmp_path / "r.md")
    md = md_path.read_text(encoding="utf-8")
    part = md[md.index("## Drift vocabulary") : md.index("## Configuration")]
    assert "`help`" in part and "`!!`" in part and part.count("### ") == 2


def test_heatmap_rows_are_escaped_visible_and_ranked() -> None:
    from monitor.charts.figures import vocabulary_heatmap

    df = pd.DataFrame(
        {
            "token_id": [1, 1, 2, 3, 4],
            "token": ["<b>x</b>", "<b>x</b>", "<|eos|>", " a", " a"],
            "bucket": [0, 1, 1, 0, 1],
            "step_lo": [0, 5, 5, 0, 5],
            "step_hi": [4, 9, 9, 4, 9],
            "count": [3, 4, 1, 2, 2],
            "lr_sum": [5.0, 6.0, 1.0, 0.5, 0.2],
            "share_pos": [0.5, 0.6, 0.1, 0.05, 0.02],
        }
    )
    df.attrs["buckets"] = pd.DataFrame({"bucket": [0, 1], "step_lo": [0, 5], "step_hi": [4, 9]})
    fig = vocabulary_heatmap(df).to_dict()
    [trace] = fig["data"]
    # least first (plotly draws the last row on top): ids 4, 3 share a text, so the id tells
    assert list(trace["y"]) == ["␣a", "␣a #3", "<i>&lt;|eos|&gt;</i>", "&lt;b&gt;x&lt;/b&gt;"]
    assert trace["z"][3] == [0.5, 0.6] and trace["z"][2] == [None, 0.1]
    assert fig["layout"]["xaxis"]["range"] == [-0.5, 9.5]
    empty = vocabulary_heatmap(df.iloc[0:0]).to_dict()
    assert empty["data"] == [] and empty["layout"]["annotations"]


def test_vocabulary_line_without_a_ledger_is_empty() -> None:
    empty = pd.DataFrame(columns=["token_id", "token", "share_pos"])
    assert vocabulary_line(empty) == ""
    top = pd.DataFrame({"token_id": [9], "token": [None], "share_pos": [0.5]})
    assert vocabulary_line(top) == "carried by '#9' 50%"


def test_heatmap_follows_the_kl_zoom_and_live_ticks_only_when_unzoomed(
    db: Database, db_url: str, runs
) -> None:
    """The run page's heatmap callback, POSTed the way the browser's renderer does."""
    from monitor.dashboard import create_app

    app = create_app(DashboardSettings(db_url=db_url), db=db)
    client = app.server.test_client()
    deps = client.get("/_dash-dependencies").get_json()
    output = next(d["output"] for d in deps if f"{I.VOCAB_ZOOM}.data" in d["output"])
    kl = {"chart": "kl", "panel": I.PANEL_RUN, "type": "kl-graph"}
    pid = lambda n: I.panel_id(I.PANEL_RUN, n)  # noqa: E731

    def post(trigger: str, relayout: object, zoom: object) -> tuple[int, dict]:
        body = {
            "output": output,
            "outputs": [
                {"id": I.VOCAB_HEATMAP, "property": "figure"},
                {"id": I.VOCAB_RANGE, "property": "children"},
                {"id": I.VOCAB_ZOOM, "property": "data"},
            ],
            "inputs": [
                {"id": kl, "property": "relayoutData", "value": relayout},
                {"id": pid("interval"), "property": "n_intervals", "value": 3},
            ],
            "changedPropIds": [trigger],
            "state": [
                {
                    "id": pid("view"),
                    "property": "data",
                    "value": View(runs=(runs["hack"],)).to_dict(),
                },
                {"id": pid("x"), "property": "value", "value": "step"},
                {"id": I.RUN_ID_STORE, "property": "data", "value": runs["hack"]},
                {"id": I.VOCAB_ZOOM, "property": "data", "value": zoom},
            ],
        }
        r = client.post("/_dash-update-component", json=body)
        return r.status_code, (r.get_json() or {}).get("response", {}) if r.data else {}

    kl_trigger = json.dumps(kl, sort_keys=True, separators=(",", ":")) + ".relayoutData"
    code, resp = post(kl_trigger, {"xaxis.range[0]": 80.4, "xaxis.range[1]": 109.6}, None)
    assert code == 200 and resp[I.VOCAB_RANGE]["children"] == "steps 80..110"
    assert resp[I.VOCAB_ZOOM]["data"] == [80.4, 109.6]
    assert resp[I.VOCAB_HEATMAP]["figure"]["layout"]["xaxis"]["range"] == [79.5, 110.5]
    code, resp = post(f"{pid('interval')}.n_intervals", None, None)  # live, unzoomed
    assert code == 200 and resp[I.VOCAB_RANGE]["children"] == f"steps 0..{LAST}"
    code, _ = post(f"{pid('interval')}.n_intervals", None, [80.4, 109.6])  # live, zoomed
    assert code == 204
    code, resp = post(kl_trigger, {"xaxis.autorange": True}, [80.4, 109.6])  # double click
    assert code == 200 and resp[I.VOCAB_ZOOM]["data"] is None
    assert resp[I.VOCAB_RANGE]["children"] == f"steps 0..{LAST}"
