"""Figure builders are pure functions: DataFrames in, figures out, tested without a browser."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from monitor.charts import figures as F
from monitor.charts import palette as P
from monitor.charts import specs as S
from monitor.charts import tables as T


def decode(arr: object) -> np.ndarray:
    """A trace array as numpy, whether a typed-array spec or a list."""
    if isinstance(arr, dict) and "bdata" in arr:
        dt = {"f4": "<f4", "f8": "<f8", "i4": "<i4"}[arr["dtype"]]
        out = np.frombuffer(base64.b64decode(arr["bdata"]), dtype=dt).astype(float)
        if "shape" in arr:
            out = out.reshape([int(x) for x in arr["shape"].split(",")])
        return out
    return np.asarray(arr if arr is not None else [], dtype=float)


def raw_frame(steps: np.ndarray, **cols: np.ndarray) -> pd.DataFrame:
    """A level-0 Series frame (every row its own bucket)."""
    data = {
        "step": steps.astype(float),
        "step_end": steps.astype(float),
        "n": np.ones(len(steps)),
        "wall_min": 1.7e9 + steps * 2.0,
        "wall_max": 1.7e9 + steps * 2.0,
    }
    for c, v in cols.items():
        data[c], data[f"{c}__min"], data[f"{c}__max"] = v, v, v
    return pd.DataFrame(data)


def bucket_frame(steps: np.ndarray, level: int, **cols: np.ndarray) -> pd.DataFrame:
    """Buckets of 2**level steps with min/max/mean, dense from the first bucket."""
    b = steps >> level
    first, last = int(b.min()), int(b.max())
    rows = []
    for bk in range(first, last + 1):
        m = b == bk
        row = {
            "step": float(bk << level),
            "step_end": float(((bk + 1) << level) - 1),
            "n": float(m.sum()),
            "wall_min": 1.7e9 + 2.0 * (bk << level),
            "wall_max": 1.7e9 + 2.0 * (((bk + 1) << level) - 1),
        }
        for c, v in cols.items():
            vals = v[m]
            row[c] = vals.mean() if len(vals) else np.nan
            row[f"{c}__min"] = vals.min() if len(vals) else np.nan
            row[f"{c}__max"] = vals.max() if len(vals) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def empty_like(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[0:0]


def traces(fig: go.Figure | dict) -> list[dict]:
    return fig["data"] if isinstance(fig, dict) else [t.to_plotly_json() for t in fig.data]


# --------------------------------------------------------------------------- smoothing


def test_ewma_matches_pandas_and_continues_across_calls() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=500)
    x[[10, 11, 200]] = np.nan
    w = 0.9
    out, _ = F.ewma(x, w)
    ref = pd.Series(x).ewm(alpha=1 - w, adjust=True, ignore_na=True).mean().to_numpy()
    ok = np.isfinite(x)
    assert np.allclose(out[ok], ref[ok])
    assert np.isnan(out[~ok]).all()
    a, state = F.ewma(x[:300], w)
    b, _ = F.ewma(x[300:], w, state)
    assert np.allclose(np.r_[a, b][ok], out[ok])
    same, _ = F.ewma(x, 0.0)
    assert np.allclose(same[ok], x[ok])
    # a long series with a weight near 1 stays finite (no w**-k overflow)
    long, _ = F.ewma(np.ones(100_000), 0.999)
    assert np.allclose(long, 1.0)


# --------------------------------------------------------------------------- time charts


def test_bucketed_chart_keeps_the_spike_and_sends_only_y() -> None:
    steps = np.arange(100_000)
    kl = np.full(len(steps), 1.0)
    kl[54_321] = 50.0
    frame = bucket_frame(steps, 8, kl_mean=kl, kl_p05=kl - 0.5, kl_p95=kl + 0.5)
    run = F.RunData(3, "run <b>one</b>", P.run_color(0), 8, frame, empty_like(frame))
    fig = F.time_chart(S.CHARTS_BY_KEY["kl"], [run], smooth=0.0)
    assert isinstance(fig, go.Figure)
    data = traces(fig)
    line = next(t for t in data if t.get("showlegend", True) and t.get("name"))
    assert "x" not in line and line["dx"] == 128 and line["x0"] == 64  # x0 + i * dx
    y = decode(line["y"])
    assert len(y) == 2 * len(frame)  # min and max per bucket
    assert y.max() == 50.0
    # the run name is shown literally, never as markup
    assert line["name"] == "run &lt;b&gt;one&lt;/b&gt;"
    # band traces: p05 below, p95 filled to it
    fills = [t for t in data if t.get("fill") == "tonexty"]
    assert fills and all(t["hoverinfo"] == "skip" for t in fills)
    # the figure serialises compactly: typed arrays, no default template
    payload = fig.to_json()
    assert '"bdata"' in payload and len(payload) < 20_000
    assert F.time_chart(S.CHARTS_BY_KEY["kl"], [run], as_dict=True)["layout"]["template"] == {}


def test_raw_chart_smoothing_and_tail_traces_for_live_updates() -> None:
    steps = np.arange(0, 300, 2)
    kl = np.linspace(0, 3, len(steps))
    frame = raw_frame(steps[:100], kl_mean=kl[:100])
    tail = raw_frame(steps[100:], kl_mean=kl[100:])
    run = F.RunData(7, "r7", "#123456", 0, frame, tail)
    fig = F.time_chart(S.CHARTS_BY_KEY["kl"], [run], smooth=0.6, as_dict=True)
    data = fig["data"]
    hist_raw = data[0]
    assert hist_raw["x0"] == 0 and hist_raw["dx"] == 2  # evenly spaced raw steps
    assert hist_raw["opacity"] < 0.5  # raw line faint behind the smoothed one
    tails = F.tail_traces(fig)
    kinds = sorted(t["kind"] for t in tails)
    assert kinds == ["raw", "smooth"]
    raw_tail = data[next(t["index"] for t in tails if t["kind"] == "raw")]
    # the tail starts at the history's last point, so the line has no gap
    assert raw_tail["x"] == steps[99:].astype(float).tolist()
    assert raw_tail["y"][0] == pytest.approx(kl[99], rel=1e-6)
    smooth_tail = next(t for t in tails if t["kind"] == "smooth")
    # the EWMA state continues exactly where the browser's line ends
    whole, _ = F.ewma(kl, 0.6)
    assert np.isclose(data[smooth_tail["index"]]["y"][-1], whole[-1])
    num, den = smooth_tail["ewma"]
    nxt, _ = F.ewma(np.array([5.0]), 0.6, (num, den))
    full, _ = F.ewma(np.r_[kl, 5.0], 0.6)
    assert np.isclose(nxt[0], full[-1])


def test_wall_time_axis_uses_dates_and_markers_sit_on_the_axis() -> None:
    steps = np.arange(50)
    frame = raw_frame(steps, reward_mean=np.sin(steps / 5.0))
    run = F.RunData(1, "a", "#1f77b4", 0, frame, empty_like(frame))
    markers = pd.DataFrame(
        {
            "run_id": [1, 1, 99],
            "x": [1.7e12, 1.7e12 + 20_000, 0],
            "kind": ["alert", "note", "alert"],
            "text": ["spike <script>alert(1)</script>", "bad batch", "other run"],
        }
    )
    fig = F.time_chart(
        S.CHARTS_BY_KEY["reward"], [run], xmode="wall", markers=markers, as_dict=True
    )
    assert fig["layout"]["xaxis"]["type"] == "date"
    assert decode(fig["data"][0]["x"])[0] == pytest.approx(1.7e12)
    marks = [t for t in fig["data"] if t.get("yaxis") == "y2"]
    assert {m["name"] for m in marks} == {"alerts", "notes"}
    alert = next(m for m in marks if m["name"] == "alerts")
    assert alert["text"] == ["spike &lt;script&gt;alert(1)&lt;/script&gt;"]  # escaped
    assert len(fig["layout"]["shapes"]) == 1  # the note's vertical line


def test_chart_without_data_says_so() -> None:
    frame = raw_frame(np.arange(5), kl_mean=np.arange(5.0))
    run = F.RunData(1, "a", "#1f77b4", 0, frame, empty_like(frame))
    fig = F.time_chart(S.CHARTS_BY_KEY["rollout_gap"], [run], as_dict=True)
    assert fig["data"] == []
    assert fig["layout"]["annotations"][0]["text"] == "no data for these runs"


def test_frontier_plots_reward_against_sqrt_kl() -> None:
    steps = np.arange(10)
    kl = np.array([0, 1, 4, 9, 16, 25, np.nan, 36, -1, 49], dtype=float)
    frame = raw_frame(steps, kl_mean=kl, reward_mean=np.arange(10.0))
    run = F.RunData(1, "a", "#1f77b4", 0, frame, empty_like(frame))
    fig = F.frontier_chart([run], as_dict=True)
    x, y = decode(fig["data"][0]["x"]), decode(fig["data"][0]["y"])
    assert x.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7]  # negative KL clipped to 0
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert F.tail_traces(fig)[0]["kind"] == "frontier"


def test_live_points_keep_extremes_of_each_bucket() -> None:
    rows = pd.DataFrame(
        {
            "step": np.arange(100, 132, dtype=float),
            "wall_time": 1.7e9 + np.arange(32.0),
            "kl_mean": np.r_[np.ones(10), 9.0, np.ones(10), -3.0, np.ones(10)],
        }
    )
    x, _, _, _ = F.live_points(rows, "kl_mean", 0, "step")
    assert len(x) == 32 and x[0] == 100
    x, y, mx, _ = F.live_points(rows, "kl_mean", 4, "step")  # 16-step buckets
    assert max(y) == 9.0 and min(y) == -3.0
    assert len(x) <= 2 * 3 and x == sorted(x)
    assert len(mx) == 3  # buckets 96-111, 112-127, 128-143
    assert F.live_points(rows, "kl_mean", 4, "wall")[0][0] >= 1.7e12


def test_metric_charts_name_the_source_meaning() -> None:
    info = {"source": "trl-grpo", "estimator": "k3", "scale": "token-mean", "quantity": None}
    spec = S.metric_chart(0, "kl", info)
    assert spec.key == "m0"
    assert spec.y_title == "kl (from trl-grpo, estimator k3, scale token-mean)"
    assert S.metric_axis_title("loss", None) == "loss (as logged)"
    assert S.metric_chart(1, "x", {"description": "a note"}).title == "Metric x: a note"


# --------------------------------------------------------------------------- run page


def test_good_day_tokens_carry_the_divergence() -> None:
    """The example of docs/ARCHITECTURE.md: 'Good' (-0.8 vs -1.5), 'day' (-0.4 vs -2.1): 2.4."""
    cells = T.token_cells(["Good", " day"], [-0.8, -0.4], [-1.5, -2.1])
    assert [round(c.diff, 6) for c in cells] == [0.7, 1.7]
    assert round(sum(c.diff for c in cells), 6) == 2.4
    assert all(c.color.startswith("rgba(214,39,40") for c in cells)  # red: policy prefers
    assert T.diverging_color(-1.0).startswith("rgba(31,119,180")
    top = T.top_tokens(cells)
    assert top["token"].tolist() == ["␣day", "Good"]  # whitespace made visible (show_token)
    assert top.columns.tolist() == ["position", "token", "log p", "log q", "difference"]
    # missing token strings fall back to positions
    assert T.token_cells(None, [-1.0], [-1.0])[0].text == "#0"


def test_histogram_heatmap_and_alert_timeline() -> None:
    steps = np.array([0, 10, 20])
    counts = np.array([[1, 3, 0, 0], [0, 4, 4, 0], [0, 0, 1, 7]])
    fig = F.histogram_heatmap(steps, counts, np.linspace(-2, 2, 5), step=10)
    tr = fig.to_plotly_json()["data"][0]
    z = decode(tr["z"])
    assert z.shape == (4, 3)  # bins x steps
    assert z[1, 0] == pytest.approx(np.log10(0.75))
    assert np.isnan(z[3, 0])  # an empty bin is blank, not -inf
    assert fig.layout.shapes[0].x0 == 10
    events = pd.DataFrame(
        {
            "rule": ["kl_budget", "kl_spike"],
            "severity": ["critical", "warning"],
            "state": ["firing", "resolved"],
            "start_step": [100, 30],
            "end_step": pd.array([None, 40], dtype="Int64"),
            "message": ["KL <over> budget", "spike"],
        }
    )
    tl = F.alert_timeline(events, last_step=150).to_plotly_json()
    bars = {t["name"]: t for t in tl["data"]}
    assert bars["critical"]["base"] == [100.0] and bars["critical"]["x"] == [50.0]
    assert bars["warning"]["x"] == [10.0]
    assert "&lt;over&gt;" in bars["critical"]["text"][0]


# --------------------------------------------------------------------------- tables


def test_sparkline_and_comparison_table() -> None:
    assert T.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == T.SPARK_CHARS
    assert T.sparkline([np.nan]) == ""
    assert T.sparkline([2.0, 2.0]) == T.SPARK_CHARS[3] * 2
    runs = [
        {
            "label": "a (#1)",
            "project": "p",
            "name": "a",
            "config": {"kl_coef": 0.05, "opt": {"lr": 1e-6}, "seed": 1},
            "tags": ["x"],
        },
        {
            "label": "b (#2)",
            "project": "p",
            "name": "b",
            "config": {"kl_coef": 0.05, "opt": {"lr": 3e-6}},
            "tags": ["x"],
        },
    ]
    df = T.comparison_table(runs)
    differs = dict(zip(df["field"], df["differs"], strict=True))
    assert differs["config.opt.lr"] and differs["config.seed"]
    assert not differs["config.kl_coef"] and not differs["tags"]
    assert df.loc[df["field"] == "config.seed", "b (#2)"].item() == "—"
    json.dumps(df.to_dict(orient="records"))  # plain values, renderable as text


def test_a_tail_merges_into_one_partial_bucket() -> None:
    tail = F.arrays(
        pd.DataFrame(
            {
                "step": [1024.0, 1536.0, 1600.0],
                "step_end": [1535.0, 1599.0, 1600.0],
                "n": [512.0, 64.0, 1.0],
                "wall_min": [1.0, 2.0, np.nan],
                "wall_max": [1.5, 2.5, np.nan],
                "kl_mean": [1.0, 2.0, 9.0],
                "kl_mean__min": [0.5, 1.5, 9.0],
                "kl_mean__max": [3.0, 2.5, 9.0],
                "k1": [np.nan, np.nan, np.nan],
                "k1__min": [np.nan] * 3,
                "k1__max": [np.nan] * 3,
            }
        )
    )
    m = F.merge_tail(tail)
    assert m["step"].tolist() == [1024.0] and m["step_end"].tolist() == [1600.0]
    assert m["kl_mean__min"][0] == 0.5 and m["kl_mean__max"][0] == 9.0
    assert m["kl_mean"][0] == pytest.approx((512 * 1 + 64 * 2 + 9) / 577)
    assert np.isnan(m["k1"][0]) and m["wall_max"][0] == 2.5
    x, y, _, _ = F.tail_points(m, "kl_mean", "step")
    assert y == [0.5, 9.0] and x == [1024 + 577 / 4, 1024 + 3 * 577 / 4]


# --------------------------------------------------------------------------- scalar-only runs


def grpo_like(run_id: int, steps: np.ndarray, k3: np.ndarray, color: str = "#d62728"):
    """An imported GRPO run: k3 (TRL's kl), reward and length; no kl_mean, no token stats."""
    frame = raw_frame(steps, k3=k3, reward_mean=np.linspace(0, 1, len(steps)))
    return F.RunData(
        run_id, f"grpo{run_id}", color, 0, frame, empty_like(frame), {}, "k3", "k3 from kl"
    )


def test_kl_chart_draws_a_runs_per_token_kl_when_it_has_no_kl_mean() -> None:
    k3 = np.array([0.001, 0.002, 0.004, 17.8, 0.003])
    run = grpo_like(1, np.arange(10, 60, 10), k3)
    fig = F.time_chart(S.CHARTS_BY_KEY["kl"], [run], as_dict=True)
    line = next(t for t in fig["data"] if t.get("name") and t.get("showlegend", True))
    assert decode(line["y"]).tolist() == pytest.approx(k3.tolist(), rel=1e-6)
    assert line["name"] == "grpo1"  # one quantity: named in the axis title
    assert "yaxis" not in line
    assert fig["layout"]["yaxis"]["title"]["text"] == "KL, nats per token (k3 from kl)"
    assert not any(t.get("fill") for t in fig["data"])  # the p05-p95 band is kl_mean's
    assert fig["layout"]["title"]["text"] == "KL to the reference"
    assert F.chart_has_data(S.CHARTS_BY_KEY["kl"], [run])


def test_kl_chart_puts_per_token_runs_on_their_own_axis_beside_kl_mean() -> None:
    steps = np.arange(20)
    live_frame = raw_frame(
        steps, kl_mean=np.full(20, 6.0), kl_p05=np.full(20, 2.0), kl_p95=np.full(20, 9.0)
    )
    live = F.RunData(1, "ppo", "#1f77b4", 0, live_frame, empty_like(live_frame))
    grpo = grpo_like(2, steps, np.full(20, 0.01))
    fig = F.time_chart(S.CHARTS_BY_KEY["kl"], [live, grpo], as_dict=True)
    named = {t["name"]: t for t in fig["data"] if t.get("name") and t.get("showlegend", True)}
    assert set(named) == {"ppo · kl_mean, nats/seq", "grpo2 · k3 from kl, nats/token"}
    assert named["grpo2 · k3 from kl, nats/token"].get("yaxis") == "y3"
    assert "yaxis" not in named["ppo · kl_mean, nats/seq"]
    lay = fig["layout"]
    assert lay["yaxis"]["title"]["text"] == "KL, nats per sequence (kl_mean)"
    assert lay["yaxis3"]["title"]["text"] == "KL, nats per token (k3 from kl)"
    assert lay["yaxis3"]["side"] == "right" and lay["yaxis3"]["overlaying"] == "y"
    # the band belongs to the kl_mean run only; the per-token run's tail is on y3 too
    assert {t["legendgroup"] for t in fig["data"] if t.get("fill")} == {"r1"}
    tails = [t for t in fig["data"] if isinstance(t.get("meta"), dict)]
    assert all(t.get("yaxis") == "y3" for t in tails if t["meta"]["run"] == 2)


def test_log_toggle_sets_log_axes_on_kl_charts_only() -> None:
    steps = np.arange(10, 60, 10)
    run = grpo_like(1, steps, np.array([0.001, 0.002, 0.004, 17.8, 0.003]))
    for key in ("kl", "estimators"):
        fig = F.time_chart(S.CHARTS_BY_KEY[key], [run], log_y=True, as_dict=True)
        assert fig["layout"]["yaxis"]["type"] == "log"
        assert fig["layout"]["yaxis"]["title"]["text"].endswith(" (log scale)")
        lin = F.time_chart(S.CHARTS_BY_KEY[key], [run], as_dict=True)
        assert "type" not in lin["layout"]["yaxis"]
    reward = F.time_chart(S.CHARTS_BY_KEY["reward"], [run], log_y=True, as_dict=True)
    assert "type" not in reward["layout"]["yaxis"]


def test_frontier_uses_whatever_kl_a_run_has_and_says_which() -> None:
    steps = np.arange(5)
    run = grpo_like(1, steps, np.array([0.0, 0.01, 0.04, np.nan, 0.09]))
    fig = F.frontier_chart([run], as_dict=True)
    assert decode(fig["data"][0]["x"]).tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3], rel=1e-6)
    assert fig["data"][0]["name"] == "grpo1 · sqrt(k3 from kl)"
    assert fig["layout"]["xaxis"]["title"]["text"] == "sqrt(KL): k3 from kl, sqrt(nats per token)"
    assert F.tail_traces(fig)[0]["col"] == "k3"  # live updates extend from k3
    assert F.chart_has_data(S.CHARTS_BY_KEY["frontier"], [run])
    no_reward = F.RunData(
        2,
        "b",
        "#000000",
        0,
        raw_frame(steps, k3=np.ones(5)),
        empty_like(raw_frame(steps)),
        {},
        "k3",
        "k3",
    )
    assert not F.chart_has_data(S.CHARTS_BY_KEY["frontier"], [no_reward])


def test_charts_without_data_for_any_run_are_found() -> None:
    run = grpo_like(1, np.arange(5), np.full(5, 0.01))
    empty = [c.key for c in S.CHARTS if not F.chart_has_data(c, [run])]
    assert empty == ["nll", "length", "concentration", "rollout_gap"]
    assert all(S.CHARTS_BY_KEY[k].fills for k in empty)  # each says what would fill it
    other = F.RunData(
        2,
        "b",
        "#000000",
        0,
        raw_frame(np.arange(3), policy_nll=np.ones(3)),
        empty_like(raw_frame(np.arange(3))),
    )
    assert F.chart_has_data(S.CHARTS_BY_KEY["nll"], [run, other])  # one run is enough


def test_every_chart_of_a_panel_spans_the_same_x_extent() -> None:
    a = grpo_like(1, np.arange(10, 260, 10), np.full(25, 0.01))
    frame_b = raw_frame(np.arange(5, 205, 5), policy_nll=np.ones(40))
    metric = raw_frame(np.arange(0, 300, 50), value=np.ones(6))
    b = F.RunData(
        2, "b", "#000000", 0, frame_b, empty_like(frame_b), {"m0": (0, metric, metric[:0])}
    )
    assert F.x_extent([a, b]) == (0.0, 250.0)
    assert F.x_extent([a, b], "wall") == (pytest.approx(1.7e12), pytest.approx((1.7e9 + 500) * 1e3))
    assert F.x_extent([]) is None
    for key in ("kl", "reward", "nll"):
        fig = F.time_chart(S.CHARTS_BY_KEY[key], [a, b], x_extent=(0.0, 250.0), as_dict=True)
        assert fig["layout"]["xaxis"]["autorangeoptions"] == {"include": [0.0, 250.0]}
    zoomed = F.time_chart(
        S.CHARTS_BY_KEY["kl"], [a, b], x_range=[20, 40], x_extent=(0.0, 250.0), as_dict=True
    )
    assert zoomed["layout"]["xaxis"]["range"] == [20, 40]
    assert "autorangeoptions" not in zoomed["layout"]["xaxis"]


def test_frontier_gives_per_token_runs_their_own_x_axis_beside_kl_mean() -> None:
    steps = np.arange(5)
    frame = raw_frame(steps, kl_mean=np.full(5, 4.0), reward_mean=np.ones(5))
    live = F.RunData(1, "ppo", "#1f77b4", 0, frame, empty_like(frame))
    grpo = grpo_like(2, steps, np.full(5, 0.04))
    fig = F.frontier_chart([live, grpo], as_dict=True)
    by_run = {t["legendgroup"]: t for t in fig["data"] if t.get("showlegend", True)}
    assert "xaxis" not in by_run["r1"] and by_run["r2"]["xaxis"] == "x2"
    assert decode(by_run["r2"]["x"]).tolist() == pytest.approx([0.2] * 5, rel=1e-6)
    lay = fig["layout"]
    assert lay["xaxis"]["title"]["text"] == "sqrt(KL): kl_mean, sqrt(nats per sequence)"
    assert lay["xaxis2"]["title"]["text"] == "sqrt(KL): k3 from kl, sqrt(nats per token)"
    assert lay["xaxis2"]["overlaying"] == "x" and lay["xaxis2"]["side"] == "top"
