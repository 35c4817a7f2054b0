"""The dashboard as a person uses it, in headless Chromium (Dash's testing tools over
selenium): open Runs, select two runs, open Compare and see both; open a Run at a step and
see coloured tokens; watch a live run gain points without a reload; a run named like a
script is shown as text and never runs; the drift vocabulary follows the KL chart's zoom,
compares two steps and two runs. Screenshots of each page go to
test-artifacts/screenshots/ (gitignored)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from support.db import simulated_ledger_run
from support.realdata_path import REALDATA

from monitor.dashboard import DashboardSettings, create_app
from monitor.ingest.importers import import_path
from monitor.store.database import Database
from monitor.store.drilldown import add_annotation, write_histograms, write_samples
from monitor.store.models import AlertEventRow
from monitor.store.runs import get_or_create_run, set_run_status
from monitor.store.steps import write_steps

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1800",
)
EVIL = "<script>window.__xss = 1; alert(1)</script>"
EVIL_IMG = '<img src=x onerror="window.__xss = 2">'


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    """The browser tests run on SQLite only: the app and the test share one file."""
    return sqlite_db


@pytest.fixture
def duo(dash_thread_server, tmp_path):
    """Dash's browser + server pair, headless Chromium with the flags that work as root."""
    from dash.testing.composite import DashComposite

    binary = _chromium()
    if binary is None or shutil.which("chromedriver") is None:
        pytest.fail(
            "chromium and chromedriver are needed for the browser tests (.ci/run installs them)"
        )
    opts = Options()
    opts.binary_location = binary
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    with DashComposite(
        server=dash_thread_server,
        browser="Chrome",
        headless=True,
        options=[opts],
        download_path=str(tmp_path),
        percy_run=False,
        wait_timeout=30,
    ) as dc:
        yield dc


def write(db: Database, run_id: int, steps: range, scale: float = 1.0) -> None:
    now = time.time()
    write_steps(
        db,
        run_id,
        [
            {
                "step": s,
                "wall_time": now - (steps.stop - s) * 0.5,
                "kl_mean": scale * (1 - np.exp(-s / 80)) + (4.0 if s == 150 else 0.0),
                "kl_p05": 0.4 * scale,
                "kl_p95": 1.6 * scale,
                "k1": 0.010 * scale,
                "k2": 0.012 * scale,
                "k3": 0.011 * scale,
                "reward_mean": np.sqrt(s) / 10,
                "policy_nll": 1.1,
                "resp_len_mean": 40.0 + (s % 7),
                "top1pct_share": 0.05,
            }
            for s in steps
        ],
    )


def seed(db: Database) -> dict[str, int]:
    a = get_or_create_run(db, "rlhf", "ppo-beta0.05", config={"kl_coef": 0.05, "lr": 1e-6})
    b = get_or_create_run(db, "rlhf", EVIL, config={"kl_coef": 0.1, "lr": 1e-6}, tags=[EVIL_IMG])
    c = get_or_create_run(db, "rlhf", "grpo-baseline", config={"kl_coef": 0.02})
    for run, scale in ((a, 1.0), (b, 2.0), (c, 0.5)):
        write(db, run.id, range(0, 400), scale)
        set_run_status(db, run.id, "finished")
    write_samples(
        db,
        a.id,
        [
            {
                "step": 200,
                "seq_index": 3,
                "kind": "top",
                "kl_seq": 2.4,
                "reward": 0.9,
                "prompt": "Greet the user " + EVIL_IMG,
                "response": "Good day",
                "tokens": ["Good", " day", "!"],
                "policy_logprobs": [-0.8, -0.4, -0.1],
                "ref_logprobs": [-1.5, -2.1, -0.05],
            }
        ],
    )
    write_histograms(
        db,
        a.id,
        [
            (
                s,
                [
                    int(x)
                    for x in np.histogram(
                        np.random.default_rng(s).normal(0.2, 1, 500), bins=80, range=(-10, 10)
                    )[0]
                ],
            )
            for s in range(0, 400, 5)
        ],
    )
    add_annotation(db, a.id, 150, "loader restarted: near-duplicate prompts", author="ana")
    with db.session() as s:
        s.add(
            AlertEventRow(
                run_id=b.id,
                rule="kl_spike",
                detector="spike",
                severity="warning",
                state="firing",
                start_step=150,
                fired_step=150,
                value=5.9,
                message="KL 5.9 is 8 robust sigmas above its trailing median " + EVIL,
                causes=[],
                started_at=time.time(),
                fired_at=time.time(),
            )
        )
    return {"a": a.id, "b": b.id, "c": c.id}


def shot(duo: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.8)  # let plotly finish drawing
    duo.driver.save_screenshot(str(SHOTS / f"{name}.png"))


def no_script_ran(duo: Any) -> None:
    try:
        text = duo.driver.switch_to.alert.text
    except NoAlertPresentException:
        text = None
    assert text is None, f"an alert() dialog opened ({text!r}): user text ran as script"
    assert duo.driver.execute_script("return window.__xss === undefined")


def severe_errors(duo: Any) -> list[str]:
    return [
        e["message"]
        for e in duo.driver.get_log("browser")
        if e["level"] == "SEVERE" and "favicon" not in e["message"]
    ]


def graph_data(duo: Any, chart: str) -> list[dict[str, Any]]:
    """The traces plotly draws for a chart (``_fullData``: typed arrays decoded, x filled in
    from x0/dx), after any live updates."""
    return duo.driver.execute_script(
        "const gd = document.querySelector(arguments[0]);"
        "if (!gd || !gd._fullData) return null;"
        "return gd._fullData.map(t => ({name: t.name, meta: t.meta || null,"
        " n: (t.y && t.y.length) || 0,"
        " x: (t.x && t.x.length) ? Array.from(t.x).slice(-3) : null}));",
        f".chart-{chart} .js-plotly-plot",
    )


def svg_text(duo: Any, css: str) -> str | None:
    """The text of a plotly SVG element, read in the page: plotly redraws its SVG (a relayout
    replaces the nodes), so a WebDriver element found a moment before can be stale."""
    return duo.driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css
    )


def wait_until(fn, timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # the page is still loading
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_select_two_runs_and_compare_them(duo, db: Database) -> None:
    r = seed(db)
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    duo.wait_for_element(".ag-row", timeout=30)
    wait_until(
        lambda: (
            len(duo.driver.find_elements(By.CSS_SELECTOR, ".ag-center-cols-container .ag-row")) == 3
        ),
        what="3 rows",
    )
    # the run named like a script is listed as text, and never ran
    assert EVIL in duo.driver.find_element(By.CSS_SELECTOR, ".ag-center-cols-container").text
    no_script_ran(duo)
    shot(duo, "runs")
    for rid in (r["a"], r["b"]):
        box = duo.driver.find_element(
            By.CSS_SELECTOR,
            f".ag-pinned-left-cols-container .ag-row[row-id='{rid}'] input, "
            f".ag-center-cols-container .ag-row[row-id='{rid}'] input.ag-checkbox-input",
        )
        box.click()
    duo.wait_for_text_to_equal("#runs-msg", "2 selected")
    duo.find_element("#runs-compare").click()
    wait_until(lambda: "/compare?runs=" in duo.driver.current_url, what="the compare URL")
    assert duo.driver.current_url.endswith(f"/compare?runs={r['a']},{r['b']}")

    def both_traces() -> bool:
        data = graph_data(duo, "kl") or []
        names = {t["name"] for t in data if t["n"]}
        return any("ppo-beta0.05" in (n or "") for n in names) and any(
            "alert(1)" in (n or "") for n in names
        )

    wait_until(both_traces, what="both runs on the KL chart")
    legend = svg_text(duo, ".chart-kl .legend") or ""
    assert "ppo-beta0.05" in legend and "<script>" in legend  # literal text in the legend
    assert EVIL in duo.driver.find_element(By.CSS_SELECTOR, "table.summary").text
    diff_rows = duo.driver.find_elements(By.CSS_SELECTOR, "table.summary tr.differs th")
    assert "config.kl_coef" in [th.text for th in diff_rows]
    no_script_ran(duo)
    shot(duo, "compare")
    assert not severe_errors(duo)


def test_run_page_colours_each_token_by_its_log_ratio(duo, db: Database) -> None:
    r = seed(db)
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    duo.driver.get(duo.server_url + f"/run/{r['a']}?step=200")
    duo.wait_for_element(".response .tok", timeout=30)
    toks = duo.driver.find_elements(By.CSS_SELECTOR, ".response .tok")
    assert [t.text for t in toks] == ["Good", "␣day", "!"]  # whitespace made visible
    bgs = [t.value_of_css_property("background-color") for t in toks]
    assert bgs[0].startswith("rgba(214, 39, 40") and bgs[1].startswith("rgba(214, 39, 40")
    assert bgs[2].startswith("rgba(31, 119, 180")  # log p < log q: blue
    assert float(bgs[1].split(",")[-1].rstrip(")")) > float(bgs[0].split(",")[-1].rstrip(")"))
    table = duo.driver.find_element(By.CSS_SELECTOR, "table.top-tokens").text
    assert table.index("day") < table.index("Good")  # 1.7 nats before 0.7
    assert "+1.700" in table and "+0.700" in table
    assert (
        "(sum of token log-ratios 2.350)"
        in duo.driver.find_element(By.CSS_SELECTOR, ".sample-head").text
    )
    assert EVIL_IMG in duo.driver.find_element(By.CSS_SELECTOR, ".prompt").text
    duo.wait_for_element(".chart-kl .js-plotly-plot .scatterlayer .trace", timeout=30)
    duo.wait_for_element("#run-heatmap .heatmaplayer", timeout=30)
    no_script_ran(duo)
    shot(duo, "run")
    # the next-step button moves to the next stored step (none after 200: stays)
    duo.find_element("#run-prev").click()
    duo.wait_for_contains_text("#run-samples", "at step 200")
    assert not severe_errors(duo)


def test_live_run_gains_points_without_a_reload(duo, db: Database) -> None:
    run = get_or_create_run(db, "rlhf", "live-run")
    write(db, run.id, range(0, 120))
    app = create_app(DashboardSettings(db_url=db.url, refresh_seconds=1.0), db=db)
    duo.start_server(app)
    duo.driver.get(duo.server_url + f"/compare?runs={run.id}")
    wait_until(lambda: graph_data(duo, "kl"), what="the KL chart")
    duo.driver.execute_script("window.__same_page = true;")
    # a person zooms the y axis: the zoom must survive live updates
    duo.driver.execute_script(
        "Plotly.relayout(document.querySelector('.chart-kl .js-plotly-plot'),"
        " {'yaxis.range': [-1, 9]});"
    )

    def tail_len() -> int:
        data = graph_data(duo, "kl") or []
        return sum(t["n"] for t in data if t["meta"] and t["meta"].get("kind") == "raw")

    before = tail_len()
    for k in range(3):
        write(db, run.id, range(120 + 10 * k, 130 + 10 * k))
        time.sleep(0.3)
    wait_until(lambda: tail_len() >= before + 30, what="30 new points on the tail")
    last_x = [t["x"] for t in graph_data(duo, "kl") if t["meta"] and t["meta"].get("kind") == "raw"]
    assert max(x for xs in last_x for x in xs) == 149
    assert duo.driver.execute_script("return window.__same_page === true")  # no reload
    yr = duo.driver.execute_script(
        "return document.querySelector('.chart-kl .js-plotly-plot').layout.yaxis.range"
    )
    assert yr == [-1, 9]
    assert "live-run" in duo.find_element("#cmp-status").text
    shot(duo, "live")
    # a run that stops sending steps is shown as stalled
    set_run_status(db, run.id, "running", now=time.time() - 3600)
    with db.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE steps SET wall_time = wall_time - 3600 WHERE run_id = {run.id}"
        )
    app.klmon_data.clear_cache()
    write(db, run.id, range(150, 151))
    with db.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE steps SET wall_time = wall_time - 3600 WHERE run_id = {run.id}"
        )
    app.klmon_data.clear_cache()
    duo.wait_for_contains_text("#cmp-status", "stalled", timeout=20)


def test_alerts_page_acknowledges_and_links_to_the_run(duo, db: Database) -> None:
    r = seed(db)
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    duo.driver.get(duo.server_url + "/alerts")
    duo.wait_for_element(".ag-center-cols-container .ag-row", timeout=30)
    grid = duo.driver.find_element(By.CSS_SELECTOR, ".ag-center-cols-container").text
    assert "kl_spike" in grid and EVIL in grid
    no_script_ran(duo)
    box = duo.driver.find_element(By.CSS_SELECTOR, ".ag-row input.ag-checkbox-input")
    box.click()
    duo.find_element("#alerts-ack").click()
    duo.wait_for_contains_text("#alerts-msg", "acknowledged 1 alert(s)")
    shot(duo, "alerts")
    link = duo.driver.find_element(By.CSS_SELECTOR, ".ag-center-cols-container a")
    assert link.get_attribute("href").endswith(f"/run/{r['b']}?step=150")
    assert not severe_errors(duo)


def visible_charts(duo: Any) -> dict[str, Any]:
    """For each chart box shown on the page: its x range and y axis type as plotly drew
    them (hidden boxes are left out)."""
    return duo.driver.execute_script(
        "const out = {};"
        "document.querySelectorAll('.chart').forEach(box => {"
        "  const gd = box.querySelector('.js-plotly-plot');"
        "  if (box.offsetParent === null || !gd || !gd._fullLayout) return;"
        "  const key = [...box.classList].find(c => c.startsWith('chart-')).slice(6);"
        "  out[key] = {x: gd._fullLayout.xaxis.range, y: gd._fullLayout.yaxis.type,"
        "    n: gd._fullData.filter(t => t.y && t.y.length).length};"
        "});"
        "return out;"
    )


def test_two_imported_grpo_runs_compare_on_what_they_have(duo, db: Database) -> None:
    """Two real TRL GRPO logs (KL only as TRL's `kl`, i.e. k3 per token; no kl_mean, no
    token statistics): the KL chart and the frontier draw k3 and say so, the charts nobody
    has data for collapse to a line, every chart shows the same steps, and the KL axis goes
    log with one click."""
    if not (REALDATA / "INDEX.md").is_file():
        pytest.skip(f"real training logs not found at {REALDATA}")
    a, b = (
        import_path(db, REALDATA / f"{f}.trainer_state.json").run.id
        for f in ("gemma3_grpo_abdo", "chaos_economy_grpo")
    )
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    # Runs: a current KL with its quantity and unit for both
    duo.wait_for_element(".ag-center-cols-container .ag-row", timeout=30)
    wait_until(
        lambda: (
            duo.driver.find_element(By.CSS_SELECTOR, ".ag-center-cols-container").text.count(
                "k3 from kl, nats/token"
            )
            == 2
        ),
        what="the KL quantity of both runs on the Runs page",
    )
    duo.driver.get(duo.server_url + f"/compare?runs={a},{b}")

    def drawn() -> dict[str, Any] | None:
        charts = visible_charts(duo)
        return charts if charts.get("kl", {}).get("n", 0) >= 2 else None

    charts = wait_until(drawn, what="the KL chart with both runs")
    assert set(charts) == {"kl", "estimators", "reward", "frontier", "length"}
    assert all(c["n"] > 0 for c in charts.values()), charts  # no chart of markers only
    empty = duo.find_element("#cmp-empty").text
    for title in ("Policy NLL", "KL concentration", "Rollout gap"):
        assert f"{title}" in empty and "no data for these runs" in empty
    assert svg_text(duo, ".chart-kl .ytitle") == "KL, nats per token (k3 from kl)"
    assert "k3 from kl" in (svg_text(duo, ".chart-frontier .xtitle") or "")
    frontier = graph_data(duo, "frontier")
    assert sum(1 for t in frontier if t["n"]) >= 2  # both runs have points
    # the x ranges of the time charts agree (gemma3 logs steps 10..250, chaos 5..200)
    ranges = {k: tuple(round(v, 6) for v in c["x"]) for k, c in charts.items() if k != "frontier"}
    assert len(set(ranges.values())) == 1, ranges
    lo, hi = next(iter(ranges.values()))
    assert lo <= 5 and hi >= 250
    shot(duo, "compare-grpo-linear")
    # one click: log KL axes, in the permalink too; other charts stay linear
    duo.driver.find_element(By.CSS_SELECTOR, "#cmp-klaxis input[value='log']").click()
    wait_until(lambda: visible_charts(duo)["kl"]["y"] == "log", what="a log KL axis")
    charts = visible_charts(duo)
    assert charts["estimators"]["y"] == "log" and charts["reward"]["y"] == "linear"
    assert "klaxis=log" in duo.find_element("#cmp-permalink").get_attribute("href")
    shot(duo, "compare-grpo-log")
    assert not severe_errors(duo)


def heatmap_state(duo: Any) -> dict[str, Any] | None:
    """The drift vocabulary heatmap's x range and row labels, as plotly drew them."""
    return duo.driver.execute_script(
        "const gd = document.querySelector('#vocab-heatmap .js-plotly-plot');"
        "if (!gd || !gd._fullLayout || !gd._fullData || !gd._fullData.length) return null;"
        "return {range: gd._fullLayout.xaxis.range, y: Array.from(gd._fullData[0].y)};"
    )


def type_step(duo: Any, css: str, value: int) -> None:
    box = duo.find_element(css)
    # replace the text in one go (clear() would send an empty value first); a debounced
    # input sends its value on Enter
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)


def test_drift_vocabulary_follows_the_kl_zoom_and_compares_steps(
    duo, db: Database, tmp_path
) -> None:
    hack = simulated_ledger_run(db.url, tmp_path / "s1", "hack", "reward_hacking", onset=60)
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    duo.driver.get(duo.server_url + f"/run/{hack}")
    state = wait_until(lambda: heatmap_state(duo), what="the drift vocabulary heatmap")
    assert "help" in state["y"] and "!!" in state["y"]  # tokens shown as text
    assert state["range"][0] < 1 and state["range"][1] > 118  # the whole run
    duo.wait_for_contains_text("#vocab-range", "steps 0..119")
    # zoom the KL chart: the heatmap follows. The panel may still be redrawing the chart it
    # found a moment ago (a relayout of a replaced node reaches no callback): zoom again
    # every few seconds until the range follows.
    tried: list[float] = []

    def zoomed() -> bool:
        if "steps 80..110" in duo.find_element("#vocab-range").text:
            return True
        if not tried or time.time() - tried[-1] > 3:
            tried.append(time.time())
            duo.driver.execute_script(
                "Plotly.relayout(document.querySelector('.chart-kl .js-plotly-plot'),"
                " {'xaxis.range': [80, 110]});"
            )
        return False

    wait_until(zoomed, what="the heatmap range to follow the KL zoom")
    zoomed = wait_until(
        lambda: (s := heatmap_state(duo)) and s["range"][1] < 112 and s,
        what="the heatmap on the zoomed range",
    )
    assert zoomed["range"][0] > 78 and zoomed["y"][-1] in ("help", "!!")  # top row: the hack
    # the table between two typed steps
    type_step(duo, "#vocab-window", 20)
    type_step(duo, "#vocab-step-a", 30)
    type_step(duo, "#vocab-step-b", 119)
    duo.wait_for_contains_text("#vocab-changes", "step 30 -> step 119")
    rows = duo.driver.find_elements(By.CSS_SELECTOR, "#vocab-changes table.vocab-changes tbody tr")
    first = [r.find_element(By.CSS_SELECTOR, "code").text for r in rows[:3]]
    assert "help" in first and "!!" in first

    # or click two points of the KL chart: the first starts a pair, the second ends it
    def click_kl(x: int) -> None:
        duo.driver.execute_script(
            "const gd = document.querySelector('.chart-kl .js-plotly-plot');"
            "gd.emit('plotly_click', {points: [{x: arguments[0], y: 1, curveNumber: 0,"
            " pointNumber: arguments[0], data: gd.data[0], fullData: gd._fullData[0]}]});",
            x,
        )

    def value(css: str) -> str:
        return duo.driver.execute_script("return document.querySelector(arguments[0]).value", css)

    click_kl(40)
    duo.wait_for_contains_text("#vocab-changes", "step A is 40: click a second point")
    assert value("#vocab-step-a") == "40" and value("#vocab-step-b") == ""
    click_kl(100)
    duo.wait_for_contains_text("#vocab-changes", "step 40 -> step 100")
    no_script_ran(duo)
    shot(duo, "run-vocabulary")
    assert not severe_errors(duo)


def test_compare_shows_the_drift_vocabulary_of_run_b_against_run_a(
    duo, db: Database, tmp_path
) -> None:
    calm = simulated_ledger_run(db.url, tmp_path / "s1", "calm", "healthy", onset=None)
    hack = simulated_ledger_run(db.url, tmp_path / "s2", "hack", "reward_hacking", onset=60)
    app = create_app(DashboardSettings(db_url=db.url), db=db)
    duo.start_server(app)
    duo.driver.get(duo.server_url + f"/compare?runs={calm},{hack}")
    duo.wait_for_element("#cmp-vocab table.vocab-changes", timeout=30)
    text = duo.find_element("#cmp-vocab").text
    assert f"calm (#{calm}) -> hack (#{hack})" in text
    tokens = [c.text for c in duo.driver.find_elements(By.CSS_SELECTOR, "#cmp-vocab tbody code")]
    assert tokens[:2] in (["help", "!!"], ["!!", "help"])
    shot(duo, "compare-vocabulary")
    assert not severe_errors(duo)
