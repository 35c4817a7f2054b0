"""A panel of time charts over one step range: the Compare page's charts and the Run page's.

``View`` is what the URL says (runs, range, smoothing, x axis, extra metrics), parsed and
validated by ``parse_query``. ``build_panel`` reads the series and builds every figure (the
function the render callback and the benchmark call); ``extend_panel`` computes what a live
update appends. ``register_panel`` wires the callbacks of one panel into an app:

* render: on load, on a control change, and when a chart is zoomed (relayoutData with an x
  range): every chart gets the range and the data at the finer level;
* live: every few seconds while a shown run is running and the range is open-ended, append
  the steps newer than what the browser holds (``extendData`` on the tail traces only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlencode

import numpy as np
import pandas as pd
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from monitor.charts import figures as F
from monitor.charts import palette as P
from monitor.charts import specs as S
from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.errors import InvalidInput, KlmonError
from monitor.store.series import MAX_STEP

MAX_RUNS = 12
MAX_METRICS = 8
MAX_QUERY_LENGTH = 4000
LIVE_ROW_LIMIT = 20_000
X_MODES = ("step", "wall")
KL_AXES = ("linear", "log")


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class View:
    """What a panel shows; every field comes from the URL and is validated."""

    runs: tuple[int, ...] = ()
    start: int | None = None
    end: int | None = None
    smooth: float = 0.0
    x: str = "step"
    metrics: tuple[str, ...] = ()
    step: int | None = None
    kl_log: bool = False  # a log y axis on the KL charts (URL: klaxis=log)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runs"], d["metrics"] = list(self.runs), list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> View:
        """From a dcc.Store (browser-held, so checked like a query)."""
        if not isinstance(d, Mapping):
            return cls()
        view, _ = parse_params(
            {
                "runs": ",".join(str(r) for r in d.get("runs") or []),
                "from": d.get("start"),
                "to": d.get("end"),
                "smooth": d.get("smooth"),
                "x": d.get("x"),
                "metrics": ",".join(str(m) for m in d.get("metrics") or []),
                "step": d.get("step"),
                "klaxis": "log" if d.get("kl_log") is True else None,
            }
        )
        return view


def _int_param(name: str, raw: Any, warnings: list[str]) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        warnings.append(f"ignored {name}={str(raw)[:40]!r}: not a whole number")
        return None
    if not 0 <= value <= MAX_STEP:
        warnings.append(f"ignored {name}={value}: outside 0..{MAX_STEP}")
        return None
    return value


def parse_params(params: Mapping[str, Any]) -> tuple[View, list[str]]:
    """A View from single-valued parameters; problems become warnings, never errors."""
    warnings: list[str] = []
    runs: list[int] = []
    for tok in str(params.get("runs") or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if not tok.isdigit() or len(tok) > 12:
            warnings.append(f"ignored run {tok[:40]!r}: not a run id")
            continue
        if int(tok) not in runs:
            runs.append(int(tok))
    if len(runs) > MAX_RUNS:
        warnings.append(f"showing the first {MAX_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_RUNS]
    start = _int_param("from", params.get("from"), warnings)
    end = _int_param("to", params.get("to"), warnings)
    if start is not None and end is not None and start > end:
        warnings.append(f"ignored from={start} and to={end}: from is after to")
        start = end = None
    smooth = 0.0
    raw = params.get("smooth")
    if raw not in (None, ""):
        try:
            smooth = float(str(raw))
            if not (math.isfinite(smooth) and 0.0 <= smooth < 1.0):
                raise ValueError
        except ValueError:
            warnings.append(f"ignored smooth={str(raw)[:40]!r}: use a number in [0, 1)")
            smooth = 0.0
    x = str(params.get("x") or "step")
    if x not in X_MODES:
        warnings.append(f"ignored x={x[:40]!r}: use step or wall")
        x = "step"
    metrics: list[str] = []
    for name in str(params.get("metrics") or "").split(","):
        name = name.strip()
        if not name:
            continue
        if len(name) > 200:
            warnings.append("ignored a metric name longer than 200 characters")
            continue
        if name not in metrics:
            metrics.append(name)
    if len(metrics) > MAX_METRICS:
        warnings.append(f"showing the first {MAX_METRICS} of {len(metrics)} metrics")
        metrics = metrics[:MAX_METRICS]
    step = _int_param("step", params.get("step"), warnings)
    klaxis = str(params.get("klaxis") or "linear")
    if klaxis not in KL_AXES:
        warnings.append(f"ignored klaxis={klaxis[:40]!r}: use linear or log")
        klaxis = "linear"
    view = View(tuple(runs), start, end, round(smooth, 4), x, tuple(metrics), step, klaxis == "log")
    return view, warnings


def parse_query(search: str | None) -> tuple[View, list[str]]:
    """A View from a URL query string (``?runs=3,7&from=0&to=5000&smooth=0.9&x=step``)."""
    search = (search or "").lstrip("?")
    if len(search) > MAX_QUERY_LENGTH:
        return View(), [f"ignored a query string of {len(search)} characters"]
    try:
        qs = parse_qs(search, keep_blank_values=False, max_num_fields=32)
    except ValueError:
        return View(), ["ignored a query string with too many fields"]
    return parse_params({k: v[-1] for k, v in qs.items()})


def to_query(view: View) -> str:
    """The query string that reopens ``view`` (without the defaults)."""
    q: dict[str, Any] = {}
    if view.runs:
        q["runs"] = ",".join(str(r) for r in view.runs)
    if view.start is not None:
        q["from"] = view.start
    if view.end is not None:
        q["to"] = view.end
    if view.smooth:
        q["smooth"] = f"{view.smooth:g}"
    if view.x != "step":
        q["x"] = view.x
    if view.metrics:
        q["metrics"] = ",".join(view.metrics)
    if view.step is not None:
        q["step"] = view.step
    if view.kl_log:
        q["klaxis"] = "log"
    return "?" + urlencode(q, safe=",") if q else ""


# --------------------------------------------------------------------------- building


def panel_specs(
    view: View, metric_info: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None
) -> list[S.ChartSpec]:
    """The charts of a panel: the built-in ones (or those named by ``keys``) and one per
    extra metric of the view."""
    base = [c for c in S.CHARTS if keys is None or c.key in keys]
    extra = [
        S.metric_chart(i, name, dict(metric_info.get(name) or {}))
        for i, name in enumerate(view.metrics)
    ]
    return base + extra


@dataclass
class PanelOutput:
    figures: dict[str, Any]  # chart key -> go.Figure
    live: dict[str, Any]
    running: bool
    messages: list[str] = field(default_factory=list)
    #: Keys of the charts no shown run has data for (the page collapses them to a line).
    empty: list[str] = field(default_factory=list)


def _step_columns(specs: Sequence[S.ChartSpec]) -> tuple[str, ...]:
    cols: list[str] = []
    for s in specs:
        if s.key.startswith("m"):
            continue
        for c in s.columns:
            if c not in cols:
                cols.append(c)
    return tuple(cols)


def _wall_range_to_steps(
    data: DashboardData, run_id: int, wall_range: Sequence[float]
) -> tuple[int | None, int | None]:
    steps, walls = data.step_to_wall(run_id)
    if len(steps) < 2:
        return None, None
    lo = float(np.interp(wall_range[0], walls, steps))
    hi = float(np.interp(wall_range[1], walls, steps))
    pad = max(1.0, (steps[-1] - steps[0]) / 64)
    return max(0, int(lo - pad)), int(hi + pad)


def build_panel(
    data: DashboardData,
    view: View,
    specs: Sequence[S.ChartSpec],
    *,
    labels: Mapping[int, str],
    max_buckets: int,
    wall_range: Sequence[float] | None = None,
    uirevision: str = "klmon",
) -> PanelOutput:
    """Read every run's series for the view's range and build every chart."""
    messages: list[str] = []
    run_ids = [r for r in view.runs if r in labels]
    cols = _step_columns(specs)
    metric_specs = [s for s in specs if s.key.startswith("m")]
    runs: list[F.RunData] = []
    live_runs: dict[str, Any] = {}
    running = False

    def read(rid: int) -> tuple[Any, dict[str, Any], int | None, Any]:
        """One run's series, metric series, best KL and state (I/O: runs read in
        parallel)."""
        start, end = view.start, view.end
        if view.x == "wall" and wall_range is not None:
            start, end = _wall_range_to_steps(data, rid, wall_range)
        s = data.series(rid, cols or ("kl_mean",), start=start, end=end, max_buckets=max_buckets)
        metrics = {
            ms.key: data.metric_series(rid, name, start=start, end=end, max_buckets=max_buckets)
            for ms, name in zip(metric_specs, view.metrics, strict=True)
        }
        data.run_state(rid)
        return s, metrics, end, data.best_kl(rid)

    if len(run_ids) > 1:  # database round trips overlap; ~30% faster on PostgreSQL
        with ThreadPoolExecutor(max_workers=min(4, len(run_ids))) as pool:
            results = list(pool.map(read, run_ids))
    else:
        results = [read(rid) for rid in run_ids]
    for i, (rid, (s, metrics, end, kl)) in enumerate(zip(run_ids, results, strict=True)):
        extra: dict[str, tuple[int, Any, Any]] = {}
        mheld: dict[str, int | None] = {}
        for key, m in metrics.items():
            if not m.empty:
                extra[key] = (m.level, F.arrays(m.frame), _tail(m.tail, m.level))
            mheld[key] = m.last_step
        frame, tail = F.arrays(s.frame), _tail(s.tail, s.level)
        kl_column, kl_name = (kl.column, kl.name) if kl is not None else ("kl_mean", "kl_mean")
        runs.append(
            F.RunData(
                rid, labels[rid], P.run_color(i), s.level, frame, tail, extra, kl_column, kl_name
            )
        )
        state = data.run_state(rid)
        follows = end is None and state.info.status == "running"
        running = running or follows
        live_runs[str(rid)] = {
            "level": s.level,
            "held": s.last_step if s.last_step is not None else -1,
            "follow": follows,
            "metrics": {
                k: [extra[k][0] if k in extra else 0, v if v is not None else -1]
                for k, v in mheld.items()
            },
        }
    markers = _markers(data, run_ids, view.x)
    x_range: list[Any] | None = None
    if view.x == "wall" and wall_range is not None:
        x_range = [wall_range[0] * 1000.0, wall_range[1] * 1000.0]
    elif view.x == "step" and (view.start is not None or view.end is not None):
        ends = [
            float(np.max(part["step_end"]))
            for r in runs
            for part in (r.frame, r.tail)
            if len(part["step_end"])
        ]
        lo = view.start if view.start is not None else 0
        hi = view.end if view.end is not None else max(ends, default=lo)
        x_range = [lo, hi]
    extent = F.x_extent(runs, view.x) if x_range is None else None
    figures: dict[str, Any] = {}
    tails: dict[str, list[list[Any]]] = {}
    empty = [spec.key for spec in specs if not F.chart_has_data(spec, runs)]
    for spec in specs:
        if spec.kind == "frontier":
            fig = F.frontier_chart(runs, uirevision=uirevision, as_dict=True)
        else:
            fig = F.time_chart(
                spec,
                runs,
                smooth=view.smooth,
                xmode=view.x,
                x_range=x_range,
                x_extent=extent,
                log_y=view.kl_log,
                markers=markers,
                uirevision=uirevision,
                as_dict=True,
            )
        figures[spec.key] = fig
        tails[spec.key] = [
            [t["index"], t["run"], t["col"], t["kind"], *(t.get("ewma") or [0.0, 0.0])]
            for t in F.tail_traces(fig)
        ]
    live = {
        "x": view.x,
        "smooth": view.smooth,
        "runs": live_runs,
        "tails": tails,
        "metrics": {s.key: n for s, n in zip(metric_specs, view.metrics, strict=True)},
    }
    return PanelOutput(figures, live, running, messages, empty)


def _tail(tail: pd.DataFrame, level: int) -> F.Arrays:
    """A bucketed history's tail as one partial bucket (all quantities at once)."""
    t = F.arrays(tail)
    return F.merge_tail(t) if level > 0 else t


def _markers(data: DashboardData, run_ids: Sequence[int], xmode: str) -> pd.DataFrame:
    if not run_ids:
        return pd.DataFrame(columns=["run_id", "x", "kind", "text"])
    m = pd.concat([data.alert_markers(run_ids), data.note_markers(run_ids)], ignore_index=True)
    if m.empty:
        return pd.DataFrame(columns=["run_id", "x", "kind", "text"])
    if xmode == "wall":
        xs = []
        for rid, step in zip(m["run_id"], m["step"], strict=True):
            steps, walls = data.step_to_wall(int(rid))
            xs.append(float(np.interp(step, steps, walls)) * 1000.0 if len(steps) else np.nan)
        m["x"] = xs
    else:
        m["x"] = m["step"].astype(float)
    return m[np.isfinite(m["x"].astype(float))]


# --------------------------------------------------------------------------- live updates


def _valid_live(live: Any) -> dict[str, Any] | None:
    """The browser-held live state, if it has the shape build_panel gave it."""
    if not isinstance(live, dict):
        return None
    if live.get("x") not in X_MODES or not isinstance(live.get("runs"), dict):
        return None
    if not isinstance(live.get("tails"), dict):
        return None
    try:
        smooth = float(live.get("smooth") or 0.0)
    except (TypeError, ValueError):
        return None
    if not 0.0 <= smooth < 1.0:
        return None
    return live


def extend_panel(
    data: DashboardData, live: dict[str, Any], chart_keys: Sequence[str]
) -> tuple[list[Any], dict[str, Any], bool]:
    """What to append to each chart (an extendData value or None), the new live state, and
    whether anything changed. Reads only steps newer than the browser holds."""
    xmode, smooth = live["x"], float(live.get("smooth") or 0.0)
    runs: dict[str, Any] = live["runs"]
    new_rows: dict[int, pd.DataFrame] = {}
    new_metric_rows: dict[tuple[int, str], pd.DataFrame] = {}
    metric_names: dict[str, str] = live.get("metrics") or {}
    step_cols: set[str] = set()
    for key in chart_keys:
        if key.startswith("m"):
            continue
        for t in live["tails"].get(key, []):
            step_cols.add(str(t[2]))
        if key == "frontier":
            step_cols.add("reward_mean")
    from monitor.store.models import STEP_FLOAT_COLUMNS

    step_cols &= set(STEP_FLOAT_COLUMNS)
    changed = False
    for rid_s, r in runs.items():
        if not r.get("follow"):
            continue
        rid = int(rid_s)
        held = int(r.get("held", -1))
        rows = data.rows_after(rid, held, sorted(step_cols) or ["kl_mean"], LIVE_ROW_LIMIT)
        if not rows.empty:
            new_rows[rid] = F.arrays(rows)
            r["held"] = int(rows["step"].iloc[-1])
            changed = True
        for mkey, (mlevel, mheld) in list((r.get("metrics") or {}).items()):
            name = metric_names.get(mkey)
            if name is None:
                continue
            mrows = data.metric_rows_after(rid, name, int(mheld), LIVE_ROW_LIMIT)
            if not mrows.empty:
                new_metric_rows[(rid, mkey)] = F.arrays(_with_wall(data, rid, mrows))
                r["metrics"][mkey] = [mlevel, int(mrows["step"].iloc[-1])]
                changed = True
    out: list[Any] = []
    memo: dict[tuple[int, str, str], Any] = {}
    for key in chart_keys:
        xs: list[list[float]] = []
        ys: list[list[float]] = []
        idx: list[int] = []
        for t in live["tails"].get(key, []):
            index, rid, col, kind = int(t[0]), int(t[1]), str(t[2]), str(t[3])
            r = runs.get(str(rid)) or {}
            if key.startswith("m"):
                rows = new_metric_rows.get((rid, key))
                level = int((r.get("metrics") or {}).get(key, [0])[0])
                col = "value"
            else:
                rows = new_rows.get(rid)
                level = int(r.get("level", 0))
            if rows is None or not len(rows["step"]):
                continue
            if kind == "frontier":
                x, y = _frontier_live(rows, level, col)
            else:
                memo_key = (rid, key if key.startswith("m") else "", col)
                if memo_key not in memo:
                    memo[memo_key] = F.live_points(rows, col, level, xmode)
                lx, ly, mx, my = memo[memo_key]
                if kind == "raw":
                    x, y = lx, ly
                elif kind == "smooth":
                    sm, state = F.ewma(np.asarray(my, float), smooth, (float(t[4]), float(t[5])))
                    t[4], t[5] = state
                    x, y = mx, [float(v) for v in sm]
                else:  # band edges: means
                    x, y = mx, my
            if x:
                xs.append(x)
                ys.append(y)
                idx.append(index)
        out.append([{"x": xs, "y": ys}, idx] if idx else None)
    return out, live, changed


def _with_wall(data: DashboardData, run_id: int, rows: pd.DataFrame) -> pd.DataFrame:
    """Metric rows with a wall time interpolated from the run's steps (metrics have none)."""
    steps, walls = data.step_to_wall(run_id)
    rows = rows.copy()
    rows["wall_time"] = np.interp(rows["step"], steps, walls) if len(steps) else np.nan
    return rows


def _frontier_live(
    rows: F.Arrays, level: int, kl_column: str = "kl_mean"
) -> tuple[list[float], list[float]]:
    """New frontier points: per bucket (or row), sqrt of the mean KL (the run's KL column)
    and the mean reward."""
    if kl_column not in rows or "reward_mean" not in rows:
        return [], []
    kl, rw, st = rows[kl_column], rows["reward_mean"], rows["step"].astype(np.int64)
    ok = np.isfinite(kl) & np.isfinite(rw)
    kl, rw, st = kl[ok], rw[ok], st[ok]
    if not len(st):
        return [], []
    if level == 0:
        return np.sqrt(np.maximum(kl, 0.0)).tolist(), rw.tolist()
    g = st >> level
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    counts = np.diff(np.r_[starts, len(g)])
    mkl = np.add.reduceat(kl, starts) / counts
    mrw = np.add.reduceat(rw, starts) / counts
    return np.sqrt(np.maximum(mkl, 0.0)).tolist(), mrw.tolist()


# --------------------------------------------------------------------------- layout


def panel_controls(panel: str, view: View) -> html.Div:
    pid = lambda name: ids.panel_id(panel, name)  # noqa: E731
    return html.Div(
        className="controls",
        children=[
            html.Label(["Smoothing ", html.Span(id=pid("smooth-value"))], htmlFor=pid("smooth")),
            html.Div(
                dcc.Slider(
                    id=pid("smooth"),
                    min=0,
                    max=0.99,
                    step=0.01,
                    value=view.smooth,
                    marks={0: "0", 0.5: "0.5", 0.9: "0.9"},
                    tooltip={"placement": "bottom"},
                ),
                className="slider",
            ),
            html.Label("x axis", htmlFor=pid("x")),
            dcc.RadioItems(
                id=pid("x"),
                options=[
                    {"label": " step", "value": "step"},
                    {"label": " wall time", "value": "wall"},
                ],
                value=view.x,
                inline=True,
            ),
            html.Label("KL axis", htmlFor=pid("klaxis")),
            dcc.RadioItems(
                id=pid("klaxis"),
                options=[
                    {"label": " linear", "value": "linear"},
                    {"label": " log", "value": "log"},
                ],
                value="log" if view.kl_log else "linear",
                inline=True,
            ),
            html.A("link to this view", id=pid("permalink"), href="#", className="permalink"),
        ],
    )


def panel_layout(
    panel: str, view: View, specs: Sequence[S.ChartSpec], refresh_seconds: float
) -> list[Any]:
    pid = lambda name: ids.panel_id(panel, name)  # noqa: E731
    return [
        dcc.Store(id=pid("view"), data=view.to_dict()),
        dcc.Store(id=pid("live"), data=None),
        dcc.Interval(id=pid("interval"), interval=int(refresh_seconds * 1000), disabled=True),
        html.Div(id=pid("msg"), className="messages"),
        html.Div(id=pid("status"), className="live-status"),
        html.Div(
            className="charts",
            children=[
                html.Div(
                    dcc.Graph(
                        id=ids.graph(panel, spec.key),
                        figure={"data": [], "layout": {"height": 300}},
                        config={"displaylogo": False, "responsive": True},
                    ),
                    id=ids.chart_box(panel, spec.key),
                    className=f"chart chart-{spec.key}",
                )
                for spec in specs
            ],
        ),
        html.Ul(id=pid("empty"), className="empty-charts"),
    ]


def empty_lines(specs: Sequence[S.ChartSpec], empty: Sequence[str]) -> list[Any]:
    """One line per chart that no shown run has data for: its title and what fills it."""
    return [
        html.Li(
            f"{s.title}: no data for these runs" + (f"; filled by {s.fills}" if s.fills else ""),
            className=f"empty-{s.key}",
        )
        for s in specs
        if s.key in empty
    ]


# --------------------------------------------------------------------------- callbacks


def _relayout_x(rd: Mapping[str, Any] | None) -> tuple[str, Any] | None:
    """('range', [a, b]) or ('auto', None) from a relayoutData event, or None when the event
    does not change the x axis (autosize, a y-only zoom, a legend click)."""
    if not isinstance(rd, Mapping):
        return None
    if rd.get("xaxis.autorange") is True:
        return ("auto", None)
    a, b = rd.get("xaxis.range[0]"), rd.get("xaxis.range[1]")
    rng = rd.get("xaxis.range")
    if (a is None or b is None) and isinstance(rng, list | tuple) and len(rng) == 2:
        a, b = rng
    if a is None or b is None:
        return None
    return ("range", [a, b])


def _to_seconds(value: Any) -> float:
    """A plotly date-axis value (ISO string or ms) as Unix seconds."""
    if isinstance(value, int | float):
        return float(value) / 1000.0
    ts = pd.Timestamp(str(value))
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.timestamp()


def register_panel(
    app: Dash,
    data: DashboardData,
    *,
    panel: str,
    permalink: Callable[[View], str],
    chart_keys: Sequence[str] | None,
    max_buckets: int,
) -> None:
    """The render and live callbacks of one panel (``permalink``: the URL of a view)."""
    pid = lambda name: ids.panel_id(panel, name)  # noqa: E731

    @app.callback(
        Output(ids.graph_all(panel), "figure"),
        Output(pid("live"), "data"),
        Output(pid("interval"), "disabled"),
        Output(pid("msg"), "children"),
        Output(pid("permalink"), "href"),
        Output(pid("smooth-value"), "children"),
        Output(ids.chart_box_all(panel), "style"),
        Output(pid("empty"), "children"),
        Input(pid("smooth"), "value"),
        Input(pid("x"), "value"),
        Input(pid("klaxis"), "value"),
        Input(ids.graph_all(panel), "relayoutData"),
        State(pid("view"), "data"),
        State(pid("live"), "data"),
    )
    def render(
        smooth: Any, xmode: Any, klaxis: Any, relayouts: Any, view_data: Any, live: Any
    ) -> Any:
        view = View.from_dict(view_data)
        keys = [o["id"]["chart"] for o in ctx.outputs_list[0]]
        box_keys = [o["id"]["chart"] for o in ctx.outputs_list[6]]
        trig = ctx.triggered_id
        zoom = (live or {}).get("zoom") if isinstance(live, dict) else None
        wall_range = None
        if isinstance(trig, Mapping) and trig.get("type") == "kl-graph":
            if trig.get("chart") == "frontier":
                raise PreventUpdate
            pos = keys.index(trig["chart"]) if trig["chart"] in keys else -1
            ev = _relayout_x(relayouts[pos] if 0 <= pos < len(relayouts) else None)
            if ev is None:
                raise PreventUpdate
            zoom = None if ev[0] == "auto" else ev[1]
        elif trig in (pid("x"),):
            zoom = None
        try:
            smooth_v = float(smooth or 0.0)
        except (TypeError, ValueError):
            smooth_v = 0.0
        view, warnings = (
            View.from_dict(
                {
                    **view.to_dict(),
                    "smooth": smooth_v,
                    "x": xmode or view.x,
                    "kl_log": klaxis == "log",
                }
            ),
            [],
        )
        if zoom is not None:
            try:
                if view.x == "wall":
                    wall_range = sorted([_to_seconds(zoom[0]), _to_seconds(zoom[1])])
                else:
                    lo, hi = sorted(float(z) for z in zoom)
                    view = replace(
                        view,
                        start=max(0, min(MAX_STEP, math.floor(lo))),
                        end=max(0, min(MAX_STEP, math.ceil(hi))),
                    )
            except (TypeError, ValueError, OverflowError):
                zoom = None
        try:
            runs, missing = data.runs(view.runs)
            labels = {r.id: f"{r.name} (#{r.id})" for r in runs}
            info = data.metric_info(list(labels))
            specs = {s.key: s for s in panel_specs(view, info, chart_keys)}
            out = build_panel(
                data,
                view,
                [specs[k] for k in keys if k in specs],
                labels=labels,
                max_buckets=max_buckets,
                wall_range=wall_range,
                uirevision=f"{panel}-{view.x}-{'log' if view.kl_log else 'linear'}",
            )
        except (KlmonError, InvalidInput) as exc:
            return (
                [no_update] * len(keys),
                no_update,
                True,
                html.Div(user_message(exc), className="error"),
                no_update,
                f"{smooth_v:g}",
                [no_update] * len(box_keys),
                no_update,
            )
        out.live["zoom"] = zoom
        figs = [out.figures.get(k, {"data": [], "layout": {}}) for k in keys]
        notes = [*missing, *warnings, *out.messages]
        msg = html.Ul([html.Li(m) for m in notes]) if notes else None
        hidden = set(out.empty)
        return (
            figs,
            out.live,
            not out.running,
            msg,
            permalink(view),
            f"{smooth_v:g}",
            [{"display": "none"} if k in hidden else {} for k in box_keys],
            empty_lines(list(specs.values()), out.empty),
        )

    @app.callback(
        Output(ids.graph_all(panel), "extendData"),
        Output(pid("live"), "data", allow_duplicate=True),
        Output(pid("status"), "children"),
        Input(pid("interval"), "n_intervals"),
        State(pid("live"), "data"),
        prevent_initial_call=True,
    )
    def live_update(_n: Any, live: Any) -> Any:
        keys = [o["id"]["chart"] for o in ctx.outputs_list[0]]
        state = _valid_live(live)
        if state is None:
            raise PreventUpdate
        try:
            ext, state, changed = extend_panel(data, state, keys)
            status = _status_line(data, [int(r) for r in state["runs"]])
        except KlmonError as exc:
            return (
                [no_update] * len(keys),
                no_update,
                html.Span(user_message(exc), className="error"),
            )
        if not changed:
            return [no_update] * len(keys), no_update, status
        return [e if e is not None else no_update for e in ext], state, status


def _status_line(data: DashboardData, run_ids: Sequence[int]) -> list[Any]:
    now = time.time()
    parts: list[Any] = []
    for rid in run_ids:
        st = data.run_state(rid)
        ago = "" if st.last_wall is None else f", last step {_ago(now - st.last_wall)} ago"
        parts.append(
            html.Span(
                f"{st.info.name} (#{rid}): {st.status}, step {st.last_step}{ago}",
                className=f"status-{st.status}",
            )
        )
    return parts


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"
