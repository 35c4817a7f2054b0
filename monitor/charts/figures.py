"""Pure figure builders: DataFrames in, ``go.Figure`` out. No database, no Dash.

Time charts take one ``RunData`` per run: the ``frame`` and ``tail`` of a
``monitor.store.series.Series`` (columns ``step``, ``step_end``, ``n``, ``wall_min``,
``wall_max`` and per quantity ``q``, ``q__min``, ``q__max``). Each line of each run is drawn as

* a *history* trace: at a bucket level, a min/max zig-zag (two points per bucket, so a
  one-step spike keeps its height) on an implicit x (``x0 + i * dx``, only y is sent);
  at the raw level, the points themselves;
* a *tail* trace (plain lists, explicit x) for what follows, which live updates extend;
* with smoothing, an EWMA of the bucket means (TensorBoard-style, debiased) over the same
  two parts, and the zig-zag faint behind it.

Tail traces carry ``meta`` (run, column, kind, EWMA state) so a live update knows which
trace index to extend and how. Numbers are sent as float32 typed arrays (x of wall time as
float64) to keep payloads small. User text (run names, messages) is escaped: plotly renders a
few HTML-like tags in labels.
"""

from __future__ import annotations

import base64
import html
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from monitor.charts.palette import SEVERITY_COLORS
from monitor.charts.specs import (
    CHARTS_BY_KEY,
    FRONTIER_X_TITLE,
    PER_SEQUENCE,
    PER_TOKEN,
    ChartSpec,
    Line,
    kl_unit,
)
from monitor.formats import show_token

MAX_MARKERS = 200
#: A Series frame as columns of numpy arrays (see ``arrays``).
Arrays = dict[str, np.ndarray]
#: The colour of the line that marks the selected step.
STEP_MARKER_COLOR = "#d62728"


def esc(text: Any) -> str:
    """User text for a plotly label: shown literally, never interpreted as markup."""
    return html.escape("" if text is None else str(text), quote=False)


# --------------------------------------------------------------------------- smoothing


def ewma(
    values: np.ndarray, weight: float, state: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, tuple[float, float]]:
    """Debiased exponential moving average (TensorBoard's smoothing with ``weight`` in [0,1)).

    ``state`` = (numerator, denominator) carries it across calls: ``ewma(a + b)`` equals
    ``ewma(a)`` followed by ``ewma(b, state=...)``. NaN points stay NaN and do not count.
    """
    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    num, den = state
    if weight <= 0:
        ok = np.isfinite(v)
        out[ok] = v[ok]
        if ok.any():
            num, den = float(v[ok][-1]), 1.0
        return out, (num, den)
    ok = np.flatnonzero(np.isfinite(v))
    if len(ok) == 0:
        return out, (num, den)
    x = v[ok]
    n = len(x)
    # num_i = w*num_{i-1} + x_i, den_i = w*den_{i-1} + 1, in closed form per block so that
    # w**k stays representable.
    block = max(1, int(600 / max(1e-9, -math.log(weight)))) if weight < 1 else n
    res = np.empty(n)
    for s in range(0, n, block):
        xb = x[s : s + block]
        k = np.arange(1, len(xb) + 1)
        wk = weight**k
        cum = np.cumsum(xb * weight ** (-k)) * wk
        nums = cum + num * wk
        dens = (1 - wk) / (1 - weight) + den * wk
        res[s : s + len(xb)] = nums / dens
        num, den = float(nums[-1]), float(dens[-1])
    out[ok] = res
    return out, (num, den)


# --------------------------------------------------------------------------- time charts


@dataclass(frozen=True)
class RunData:
    """One run's data for the charts of a panel (see the module docstring)."""

    run_id: int
    label: str
    color: str
    level: int
    frame: pd.DataFrame | Arrays
    tail: pd.DataFrame | Arrays
    #: For a metric chart, the metric's own frame and tail (column ``value``).
    extra: dict[str, tuple[int, Any, Any]] = field(default_factory=dict)
    #: The run's best KL column (one of KL_COLUMNS) and what to call it in a legend
    #: (``k3 from kl``): the KL chart and the frontier draw it.
    kl_column: str = "kl_mean"
    kl_name: str = "kl_mean"


def typed(a: Any, dtype: str = "<f4") -> dict[str, str]:
    """A numpy array as a plotly.js typed array (base64): 4 bytes a number instead of ~10
    as JSON text. float32 for y; int32 or float64 for x."""
    arr = np.ascontiguousarray(np.asarray(a), dtype=dtype)
    code = {"<f4": "f4", "<f8": "f8", "<i4": "i4"}[dtype]
    spec = {"dtype": code, "bdata": base64.b64encode(arr.tobytes()).decode("ascii")}
    if arr.ndim == 2:  # a heatmap's z: rows, columns
        spec["shape"] = f"{arr.shape[0]}, {arr.shape[1]}"
    return spec


def _f32(a: Any) -> dict[str, str]:
    return typed(a, "<f4")


def _xs(a: Any) -> dict[str, str]:
    """x values as a compact typed array: int32 steps when exact, else float64."""
    v = np.asarray(a, dtype=float)
    if len(v) and np.isfinite(v).all() and np.all(v == np.round(v)) and np.abs(v).max() < 2**31:
        return typed(v, "<i4")
    return typed(v, "<f8")


def arrays(frame: pd.DataFrame | Arrays) -> Arrays:
    """A Series frame's columns as float64 numpy views (pandas column access costs ~20 us
    each; a panel reads thousands)."""
    if isinstance(frame, dict):
        return frame
    if frame.empty:
        z = np.zeros(0)
        return dict.fromkeys(frame.columns, z)
    a = frame.to_numpy(dtype=float, copy=False)
    return {c: a[:, i] for i, c in enumerate(frame.columns)}


def zigzag(frame: pd.DataFrame | Arrays, column: str) -> np.ndarray:
    """(min, max) per bucket interleaved: the y of a spike-preserving line."""
    f = arrays(frame)
    lo, hi = f[f"{column}__min"], f[f"{column}__max"]
    y = np.empty(2 * len(lo))
    y[0::2] = lo
    y[1::2] = hi
    return y


def tail_points(
    tail: pd.DataFrame | Arrays, column: str, xmode: str, *, merge: bool = False
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, y) of the zig-zag and (x, y) of the means for the tail rows (raw rows give one
    point each, buckets two). Plain lists: live updates extend them. ``merge``: the whole
    tail as one partial bucket (what follows a bucketed history is narrower than a bucket,
    so a pixel or two: two points instead of one per stored piece)."""
    t = arrays(tail)
    if column not in t or not len(t[column]):
        return [], [], [], []
    if merge and len(t[column]) > 1:
        t = _merge_rows(t, column)  # callers that did not merge_tail already
    n, avg = t["n"], t[column]
    lo, hi = t[f"{column}__min"], t[f"{column}__max"]
    s0, s1 = t["step"], t["step_end"]
    bucket = s1 > s0
    ok = (n > 0) & np.isfinite(avg)
    if xmode == "wall":
        xa, xb = t["wall_min"] * 1000.0, t["wall_max"] * 1000.0
        ok &= np.isfinite(xa) & np.isfinite(xb)
        xm = (xa + xb) / 2
    else:
        width = s1 - s0 + 1
        xa = np.where(bucket, s0 + width / 4, s0)
        xb = s0 + 3 * width / 4
        xm = s0 + (width - 1) / 2
    ya = np.where(bucket, lo, avg)
    keep = np.stack([ok, ok & bucket], axis=1)
    xs = np.stack([xa, xb], axis=1)[keep]
    ys = np.stack([ya, hi], axis=1)[keep]
    return xs.tolist(), _r32(ys), xm[ok].tolist(), avg[ok].tolist()


def merge_tail(t: Arrays) -> Arrays:
    """Every quantity of a tail (buckets and raw steps) as one bucket: min of mins, max of
    maxes, mean weighted by rows; what follows a bucketed history is narrower than one of
    its buckets."""
    if "n" not in t or len(t["n"]) <= 1:
        return t
    n = t["n"]
    out: Arrays = {
        "step": np.array([t["step"].min()]),
        "step_end": np.array([t["step_end"].max()]),
        "n": np.array([n.sum()]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        out["wall_min"] = np.array([np.nanmin(t["wall_min"])])
        out["wall_max"] = np.array([np.nanmax(t["wall_max"])])
        for c in t:
            if c.endswith("__min"):
                out[c] = np.array([np.nanmin(t[c])])
            elif c.endswith("__max"):
                out[c] = np.array([np.nanmax(t[c])])
            elif c not in out:
                v = t[c]
                ok = np.isfinite(v)
                w = n[ok].sum()
                out[c] = np.array([float(np.sum(v[ok] * n[ok]) / w) if w > 0 else np.nan])
    return out


def _merge_rows(t: Arrays, column: str) -> Arrays:
    """Rows (buckets and raw steps) as one bucket: min of mins, max of maxes, weighted mean."""
    avg, n = t[column], t["n"]
    ok = np.isfinite(avg) & (n > 0)
    if not ok.any():
        return {k: v[:0] for k, v in t.items()}
    with np.errstate(invalid="ignore"):
        row = {
            "step": np.array([t["step"].min()]),
            "step_end": np.array([t["step_end"].max()]),
            "n": np.array([n[ok].sum()]),
            "wall_min": np.array(
                [np.nanmin(t["wall_min"]) if np.isfinite(t["wall_min"]).any() else np.nan]
            ),
            "wall_max": np.array(
                [np.nanmax(t["wall_max"]) if np.isfinite(t["wall_max"]).any() else np.nan]
            ),
            column: np.array([float(np.sum(avg[ok] * n[ok]) / np.sum(n[ok]))]),
            f"{column}__min": np.array([np.nanmin(t[f"{column}__min"][ok])]),
            f"{column}__max": np.array([np.nanmax(t[f"{column}__max"][ok])]),
        }
    return row


def _regular_x(x: np.ndarray) -> dict[str, Any]:
    """x as x0/dx when evenly spaced (nothing sent per point), else a typed array."""
    if len(x) >= 2:
        d = np.diff(x)
        if d[0] > 0 and np.all(d == d[0]):
            return {"x0": float(x[0]), "dx": float(d[0])}
    return {"x": _xs(x)}


@dataclass(frozen=True)
class _History:
    """A line's history: trace kwargs of the zig-zag and of the means, the means, and the
    last drawn point of each (where its tail trace starts, so the two join)."""

    raw_kw: dict[str, Any]
    mean_kw: dict[str, Any]
    means: np.ndarray
    mean_x: np.ndarray
    last_raw: tuple[float, float] | None


def _last_point(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    ok = np.flatnonzero(np.isfinite(y) & np.isfinite(x))
    if not len(ok):
        return None
    i = ok[-1]
    return float(x[i]), float(np.float32(y[i]))


def _history_xy(frame: Arrays, level: int, column: str, xmode: str) -> _History:
    means = frame[column]
    if level == 0:
        if xmode == "wall":
            x = frame["wall_min"] * 1000.0
            xkw: dict[str, Any] = {"x": typed(x, "<f8")}
        else:
            x = frame["step"]
            xkw = _regular_x(x)
        return _History({**xkw, "y": _f32(means)}, xkw, means, x, _last_point(x, means))
    y = zigzag(frame, column)
    size = 1 << level
    if xmode == "wall":
        w0, w1 = frame["wall_min"] * 1000.0, frame["wall_max"] * 1000.0
        xr = np.empty(2 * len(w0))
        xr[0::2], xr[1::2] = w0, w1
        xm = (w0 + w1) / 2
        return _History(
            {"x": typed(xr, "<f8"), "y": _f32(y)},
            {"x": typed(xm, "<f8")},
            means,
            xm,
            _last_point(xr, y),
        )
    start = float(frame["step"][0]) if len(frame["step"]) else 0.0
    x0r, x0m = start + size / 4, start + (size - 1) / 2
    xr = x0r + np.arange(len(y)) * (size / 2)
    xm = x0m + np.arange(len(means)) * size
    return _History(
        {"x0": x0r, "dx": size / 2, "y": _f32(y)},
        {"x0": x0m, "dx": size},
        means,
        xm,
        _last_point(xr, y),
    )


def _r32(values: Any) -> list[float]:
    """Values rounded as the float32 history is, so a tail continues a flat line exactly."""
    return np.asarray(values, dtype=np.float32).astype(float).tolist()


def _join(
    point: tuple[float, float] | None, xs: list[float], ys: list[float]
) -> tuple[list[float], list[float]]:
    """A tail trace that starts at the history's last point, so the line has no gap."""
    if point is None:
        return xs, ys
    return [point[0], *xs], [point[1], *ys]


def _trace(kind: str, **kw: Any) -> dict[str, Any]:
    """A trace dict without None values; scatter is plotly.js's default type."""
    out = {k: v for k, v in kw.items() if v is not None}
    if kind != "scatter":
        out["type"] = kind
    return out


def _figure(
    traces: list[dict[str, Any]], layout: dict[str, Any], as_dict: bool = False
) -> go.Figure | dict[str, Any]:
    """A Figure without plotly's per-attribute validation (50x faster for ~100 traces;
    the dicts here are plotly.js's own schema), or the plain dict (``as_dict``), which a
    callback returns as is: the hot path skips go.Figure's copy on serialisation."""
    if not traces:
        layout.setdefault("annotations", []).append(
            {
                "text": "no data for these runs",
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
            }
        )
    fig = {"data": traces, "layout": layout}
    return fig if as_dict else go.Figure(fig, _validate=False)


def _base_layout(title: str, y_title: str, x_title: str, uirevision: str) -> dict[str, Any]:
    return {
        "title": {"text": esc(title), "font": {"size": 14}, "x": 0.07, "xanchor": "left"},
        "template": {},
        "margin": {"l": 64, "r": 16, "t": 36, "b": 48},
        "height": 330,
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "xaxis": {
            "title": {"text": x_title, "font": {"size": 11}, "standoff": 4},
            "gridcolor": "#eee",
            "zeroline": False,
        },
        "yaxis": {
            "title": {"text": esc(y_title), "font": {"size": 11}},
            "gridcolor": "#eee",
            "zeroline": False,
        },
        "yaxis2": {
            "overlaying": "y",
            "range": [0, 1],
            "fixedrange": True,
            "visible": False,
        },
        "legend": {"orientation": "h", "y": -0.24, "yanchor": "top", "font": {"size": 11}},
        "hovermode": "closest",
        "uirevision": uirevision,
        "showlegend": True,
    }


def x_title(xmode: str) -> str:
    return "wall time (UTC)" if xmode == "wall" else "step"


def time_chart(
    spec: ChartSpec,
    runs: Sequence[RunData],
    *,
    smooth: float = 0.0,
    xmode: str = "step",
    x_range: Sequence[Any] | None = None,
    x_extent: Sequence[float] | None = None,
    log_y: bool = False,
    markers: pd.DataFrame | None = None,
    uirevision: str = "klmon",
    as_dict: bool = False,
) -> go.Figure | dict[str, Any]:
    """A chart of ``spec`` over step (or wall time) with one trace family per run.

    ``x_range``: a fixed x range (a zoom). ``x_extent``: without one, the x extent of every
    chart of the panel (``x_extent``), which the autorange always includes, so the charts of
    a panel agree on x even when a run has no data for this one. ``log_y``: a log y axis on
    a KL chart (``spec.kl_axis``); values <= 0 are not drawn there. ``markers``: alert and
    annotation markers (columns run_id, x, kind (alert | note), text), drawn as symbols at
    the foot of the chart and, for notes, a dotted vertical line.

    A ``best_kl`` chart draws each run's ``kl_column``, named in the y title with its unit
    (and in the legend when the runs use different ones); when the runs mix kl_mean (nats
    per sequence) with per-token estimators, the per-token ones go on a second y axis on
    the right, so no two units share an axis.
    """
    traces: list[dict[str, Any]] = []
    title = spec.title
    if spec.best_kl and spec.band and not any(r.kl_column == "kl_mean" for r in runs):
        title = title.split(" (band")[0]  # the band is kl_mean's; none here
    layout = _base_layout(title, spec.y_title, x_title(xmode), uirevision)
    if xmode == "wall":
        layout["xaxis"]["type"] = "date"
    if x_range is not None:
        layout["xaxis"]["range"] = list(x_range)
        layout["xaxis"]["autorange"] = False
    else:
        layout["xaxis"]["autorange"] = True
        if x_extent is not None:
            layout["xaxis"]["autorangeoptions"] = {"include": [float(v) for v in x_extent]}
    log = log_y and spec.kl_axis
    if log:
        layout["yaxis"]["type"] = "log"
        if not spec.best_kl:  # _kl_axes writes the best-KL titles
            layout["yaxis"]["title"]["text"] += " (log scale)"
    axis_of: dict[int, str] = {}
    if spec.best_kl:
        axis_of = _kl_axes(spec, runs, layout, log)
    many_lines = len(spec.lines) > 1
    # the legend names each run's KL quantity when they differ (else the axis title does)
    mixed_kl = spec.best_kl and len({r.kl_name for r in runs}) > 1
    for run in runs:
        if spec.key.startswith("m"):
            if spec.key not in run.extra:
                continue
            level, frame_df, tail_df = run.extra[spec.key]
        else:
            level, frame_df, tail_df = run.level, run.frame, run.tail
        frame, tail = arrays(frame_df), arrays(tail_df)
        lines = spec.lines
        band = spec.band
        if spec.best_kl:
            lines = (Line(run.kl_column, f"{run.kl_name}, {_short_unit(run.kl_column)}"),)
            band = spec.band if run.kl_column == "kl_mean" else None
        yaxis = axis_of.get(run.run_id)
        if band:
            _add_band(traces, run, band, level, frame, tail, xmode)
        for ln in lines:
            if ln.column not in frame:
                continue
            if mixed_kl:
                name = f"{esc(run.label)} · {esc(ln.label)}"
            else:
                name = f"{esc(run.label)} · {ln.label}" if many_lines else esc(run.label)
            _add_line(traces, run, ln, name, level, frame, tail, xmode, smooth, yaxis)
    _add_markers(traces, layout, markers, runs)
    return _figure(traces, layout, as_dict)


def _short_unit(column: str) -> str:
    return "nats/seq" if column == "kl_mean" else "nats/token"


def _kl_axes(
    spec: ChartSpec, runs: Sequence[RunData], layout: dict[str, Any], log: bool
) -> dict[int, str]:
    """The y axis title of a best-KL chart from the units its runs use, and, when they mix
    both units, a right-hand axis ``y3`` for the per-token runs (run id -> "y3")."""
    shown = [r for r in runs if _has_data(arrays(r.frame), arrays(r.tail), r.kl_column)]
    per_seq = sorted({r.kl_name for r in shown if r.kl_column == "kl_mean"})
    per_tok = sorted({r.kl_name for r in shown if r.kl_column != "kl_mean"})
    suffix = " (log scale)" if log else ""
    if per_tok and not per_seq:
        layout["yaxis"]["title"]["text"] = esc(f"KL, {PER_TOKEN} ({', '.join(per_tok)}){suffix}")
        return {}
    if per_seq and per_tok:
        layout["yaxis"]["title"]["text"] = esc(f"KL, {PER_SEQUENCE} ({', '.join(per_seq)}){suffix}")
        layout["yaxis3"] = {
            "title": {
                "text": esc(f"KL, {PER_TOKEN} ({', '.join(per_tok)}){suffix}"),
                "font": {"size": 11},
            },
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "zeroline": False,
            **({"type": "log"} if log else {}),
        }
        layout["margin"]["r"] = 64
        return {r.run_id: "y3" for r in shown if r.kl_column != "kl_mean"}
    if suffix:
        layout["yaxis"]["title"]["text"] += esc(suffix)
    return {}


def x_extent(runs: Sequence[RunData], xmode: str = "step") -> tuple[float, float] | None:
    """(first, last) x of any run's data (steps, or wall time in ms), over the step frames,
    tails and metric series: what every chart of a panel shows when not zoomed."""
    lo, hi = math.inf, -math.inf
    for run in runs:
        parts = [run.frame, run.tail] + [p for _, f, t in run.extra.values() for p in (f, t)]
        for part in parts:
            a = arrays(part)
            if "n" not in a or not len(a["n"]):
                continue
            ok = a["n"] > 0
            if xmode == "wall":
                if "wall_min" not in a:
                    continue
                a0, a1 = a["wall_min"][ok] * 1000.0, a["wall_max"][ok] * 1000.0
            else:
                a0, a1 = a["step"][ok], a["step_end"][ok]
            a0, a1 = a0[np.isfinite(a0)], a1[np.isfinite(a1)]
            if len(a0):
                lo = min(lo, float(a0.min()))
            if len(a1):
                hi = max(hi, float(a1.max()))
    return (lo, hi) if lo <= hi else None


def chart_has_data(spec: ChartSpec, runs: Sequence[RunData]) -> bool:
    """Whether any run has a value to draw on the chart (alert markers do not count)."""
    for run in runs:
        if spec.kind == "frontier":
            col = run.kl_column
            if len(frontier_points(run.frame, col)[0]) or len(frontier_points(run.tail, col)[0]):
                return True
            continue
        if spec.key.startswith("m"):
            if spec.key in run.extra:
                _, f, t = run.extra[spec.key]
                if _has_data(arrays(f), arrays(t), "value"):
                    return True
            continue
        frame, tail = arrays(run.frame), arrays(run.tail)
        cols = [run.kl_column] if spec.best_kl else [ln.column for ln in spec.lines]
        if any(_has_data(frame, tail, c) for c in cols):
            return True
    return False


def _has_data(frame: Arrays, tail: Arrays, column: str) -> bool:
    return bool(
        (column in frame and np.isfinite(frame[column]).any())
        or (column in tail and np.isfinite(tail[column]).any())
    )


def _add_line(
    traces: list[dict[str, Any]],
    run: RunData,
    ln: Line,
    name: str,
    level: int,
    frame: pd.DataFrame,
    tail: pd.DataFrame,
    xmode: str,
    smooth: float,
    yaxis: str | None = None,
) -> None:
    if not _has_data(frame, tail, ln.column):
        return
    hist = _history_xy(frame, level, ln.column, xmode)
    raw_kw, mean_kw, means = hist.raw_kw, hist.mean_kw, hist.means
    tx, ty, mx, my = tail_points(tail, ln.column, xmode, merge=level > 0)
    tx, ty = _join(hist.last_raw, tx, ty)
    smoothing = smooth > 0
    # Every byte here repeats for each trace (~100 a chart): defaults are left out, hover
    # uses plotly's default label (x, y and the name).
    group = f"r{run.run_id}"
    style: dict[str, Any] = {"color": run.color, "width": 1.2 if smoothing else 1.5}
    if ln.dash != "solid":
        style["dash"] = ln.dash
    common: dict[str, Any] = {"name": name, "legendgroup": group, "mode": "lines", "line": style}
    if yaxis:
        common["yaxis"] = yaxis
    if smoothing:
        common["opacity"] = 0.25
    traces.append(_trace("scatter", showlegend=False if smoothing else None, **common, **raw_kw))
    traces.append(
        _trace(
            "scatter",
            x=tx,
            y=ty,
            showlegend=False,
            meta={"run": run.run_id, "col": ln.column, "kind": "raw"},
            **common,
        )
    )
    if not smoothing:
        return
    hist_s, state = ewma(means, smooth)
    tail_s, state = ewma(np.asarray(my, dtype=float), smooth, state)
    smx, smy = _join(_last_point(hist.mean_x, hist_s), mx, _r32(tail_s))
    sstyle = {**style, "width": 2}
    scommon = {"name": name, "legendgroup": group, "mode": "lines", "line": sstyle}
    if yaxis:
        scommon["yaxis"] = yaxis
    traces.append(_trace("scatter", y=_f32(hist_s), connectgaps=True, **scommon, **mean_kw))
    traces.append(
        _trace(
            "scatter",
            x=smx,
            y=smy,
            showlegend=False,
            meta={"run": run.run_id, "col": ln.column, "kind": "smooth", "ewma": list(state)},
            **scommon,
        )
    )


def _add_band(
    traces: list[dict[str, Any]],
    run: RunData,
    band: tuple[str, str],
    level: int,
    frame: pd.DataFrame,
    tail: pd.DataFrame,
    xmode: str,
) -> None:
    lo_col, hi_col = band
    if not (_has_data(frame, tail, lo_col) and _has_data(frame, tail, hi_col)):
        return
    group = f"r{run.run_id}"
    fill = _rgba(run.color, 0.15)
    for part in ("history", "tail"):
        for col, kind in ((lo_col, "lo"), (hi_col, "hi")):
            hist = _history_xy(frame, level, col, xmode)
            if part == "history":
                kw: dict[str, Any] = {**hist.mean_kw, "y": _f32(hist.means)}
            else:
                _, _, mx, my = tail_points(tail, col, xmode, merge=level > 0)
                mx, my = _join(_last_point(hist.mean_x, hist.means), mx, _r32(my))
                kw = {"x": mx, "y": my, "meta": {"run": run.run_id, "col": col, "kind": kind}}
            traces.append(
                _trace(
                    "scatter",
                    mode="lines",
                    line={"width": 0},
                    fill="tonexty" if kind == "hi" else None,
                    fillcolor=fill if kind == "hi" else None,
                    showlegend=False,
                    legendgroup=group,
                    hoverinfo="skip",
                    **kw,
                )
            )


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _add_markers(
    traces: list[dict[str, Any]],
    layout: dict[str, Any],
    markers: pd.DataFrame | None,
    runs: Sequence[RunData],
) -> None:
    if markers is None or markers.empty:
        return
    colors = {r.run_id: r.color for r in runs}
    m = markers[markers["run_id"].isin(colors)].head(MAX_MARKERS)
    shapes = []
    for kind, symbol in (("alert", "triangle-up"), ("note", "diamond")):
        part = m[m["kind"] == kind]
        if part.empty:
            continue
        traces.append(
            _trace(
                "scatter",
                x=part["x"].tolist(),
                y=[0.03] * len(part),
                yaxis="y2",
                mode="markers",
                marker={
                    "symbol": symbol,
                    "size": 11,
                    "color": [colors[r] for r in part["run_id"]],
                    "line": {"width": 1, "color": "#333"},
                },
                text=[esc(t) for t in part["text"]],
                hovertemplate="%{text}<extra></extra>",
                name="alerts" if kind == "alert" else "notes",
                showlegend=False,
            )
        )
        if kind == "note":
            shapes += [
                {
                    "type": "line",
                    "xref": "x",
                    "yref": "paper",
                    "x0": x,
                    "x1": x,
                    "y0": 0,
                    "y1": 1,
                    "line": {"color": "#777", "width": 1, "dash": "dot"},
                }
                for x in part["x"].tolist()
            ]
    if shapes:
        layout["shapes"] = shapes


def frontier_chart(
    runs: Sequence[RunData], *, uirevision: str = "klmon", as_dict: bool = False
) -> go.Figure | dict[str, Any]:
    """Reward against sqrt(KL) per run, one point per bucket (or step): a healthy run climbs
    roughly linearly; flattening while KL grows is reward-model over-optimisation. Each run
    uses its best KL quantity (``kl_column``), named in its legend entry and the x title;
    when runs mix kl_mean with per-token estimators, the per-token ones get their own x
    axis at the top (sqrt of nats per token), so no two units share an axis."""
    traces: list[dict[str, Any]] = []
    layout = _base_layout(
        CHARTS_BY_KEY["frontier"].title,
        CHARTS_BY_KEY["frontier"].y_title,
        FRONTIER_X_TITLE,
        uirevision,
    )
    shown = [
        r
        for r in runs
        if len(frontier_points(r.frame, r.kl_column)[0])
        or len(frontier_points(r.tail, r.kl_column)[0])
    ]
    units = {kl_unit(r.kl_column) for r in shown}
    top = {PER_TOKEN} if len(units) > 1 else set()
    used: dict[str, str] = {}
    used_top: dict[str, str] = {}
    for run in shown:
        col = run.kl_column
        x, y, _ = frontier_points(run.frame, col)
        tx, ty, _ = frontier_points(run.tail, col)
        on_top = kl_unit(col) in top
        (used_top if on_top else used)[run.kl_name] = kl_unit(col)
        name = esc(f"{run.label} · sqrt({run.kl_name})")
        common = {
            "name": name,
            "legendgroup": f"r{run.run_id}",
            "mode": "markers",
            "marker": {"size": 4, "color": run.color, "opacity": 0.6},
            "hovertemplate": f"{name}<br>sqrt(KL) %{{x:.3g}}, reward %{{y:.4g}}<extra></extra>",
        }
        if on_top:
            common["xaxis"] = "x2"
        traces.append(_trace("scatter", x=_f32(x), y=_f32(y), **common))
        traces.append(
            _trace(
                "scatter",
                x=tx.tolist(),
                y=ty.tolist(),
                showlegend=False,
                meta={"run": run.run_id, "col": col, "kind": "frontier"},
                **common,
            )
        )
    if used:
        layout["xaxis"]["title"]["text"] = esc(frontier_x_title(used))
    if used_top:
        layout["xaxis2"] = {
            "title": {"text": esc(frontier_x_title(used_top)), "font": {"size": 11}},
            "overlaying": "x",
            "side": "top",
            "showgrid": False,
            "zeroline": False,
        }
        layout["margin"]["t"] = 64
    return _figure(traces, layout, as_dict)


def frontier_x_title(used: dict[str, str]) -> str:
    """``sqrt(KL): k3 from kl, sqrt(nats per token)``: which KL each run's x is."""
    by_unit: dict[str, list[str]] = {}
    for name, unit in used.items():
        by_unit.setdefault(unit, []).append(name)
    parts = [f"{', '.join(sorted(n))}, sqrt({u})" for u, n in sorted(by_unit.items())]
    return "sqrt(KL): " + "; ".join(parts)


def frontier_points(
    frame: pd.DataFrame | Arrays, kl_column: str = "kl_mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sqrt(max(KL, 0)), reward, step) of the rows where both are known; KL from
    ``kl_column``."""
    f = arrays(frame)
    if kl_column not in f or "reward_mean" not in f or not len(f[kl_column]):
        z = np.zeros(0)
        return z, z, z
    kl, rw = f[kl_column], f["reward_mean"]
    ok = np.isfinite(kl) & np.isfinite(rw)
    return np.sqrt(np.maximum(kl[ok], 0.0)), rw[ok], f["step"][ok]


def live_points(
    rows: pd.DataFrame | Arrays, column: str, level: int, xmode: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """What a live update appends for one line: new raw rows, grouped into buckets of
    ``2**level`` steps when the chart is bucketed (min and max at their own steps, so the
    tail stays spike-preserving and grows by at most two points per bucket and update).

    ``rows``: step, wall_time and the column. Returns (x, y) of the line and (x, y) of the
    means (for the smoothed line).
    """
    r = arrays(rows)
    if column not in r or not len(r[column]):
        return [], [], [], []
    vals = r[column]
    ok = np.isfinite(vals)
    steps = r["step"][ok].astype(np.int64)
    vals = vals[ok]
    if not len(steps):
        return [], [], [], []
    if xmode == "wall":
        wall = r["wall_time"][ok] if "wall_time" in r else np.full(len(vals), np.nan)
        xv = wall * 1000.0
    else:
        xv = steps.astype(float)
    if level == 0:
        return xv.tolist(), _r32(vals), xv.tolist(), vals.tolist()
    groups = steps >> level
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], len(groups)]
    counts = ends - starts
    # argmin / argmax per group, vectorised: sort within groups by value
    gid = np.repeat(np.arange(len(starts)), counts)
    order_lo = np.lexsort((vals, gid))
    order_hi = np.lexsort((-vals, gid))
    i_lo, i_hi = order_lo[starts], order_hi[starts]
    first, second = np.minimum(i_lo, i_hi), np.maximum(i_lo, i_hi)
    keep2 = first != second
    idx = np.stack([first, second], axis=1)[np.stack([np.ones_like(keep2), keep2], axis=1)]
    mx = np.add.reduceat(xv, starts) / counts
    my = np.add.reduceat(vals, starts) / counts
    return xv[idx].tolist(), _r32(vals[idx]), mx.tolist(), my.tolist()


def tail_traces(fig: go.Figure | dict[str, Any]) -> list[dict[str, Any]]:
    """The traces a live update extends: index, run, column, kind and EWMA state."""
    data = fig["data"] if isinstance(fig, dict) else fig.data
    out = []
    for i, tr in enumerate(data):
        meta = tr.get("meta") if isinstance(tr, dict) else tr.meta
        if isinstance(meta, dict) and "kind" in meta:
            out.append({"index": i, **meta})
    return out


# --------------------------------------------------------------------------- run page


def histogram_heatmap(
    steps: np.ndarray,
    counts: np.ndarray,
    edges: np.ndarray,
    *,
    step: int | None = None,
    uirevision: str = "heatmap",
) -> go.Figure:
    """Token log-ratio histograms over steps: x step, y log p - log q bin, colour the share
    of the step's tokens in the bin (log colour scale). ``step`` draws a marker line."""
    traces: list[dict[str, Any]] = []
    layout = _base_layout(
        "Token log-ratio distribution over steps",
        "log p - log q per token (nats)",
        "step",
        uirevision,
    )
    layout["height"] = 320
    layout.pop("yaxis2")
    if len(steps) and counts.size:
        totals = counts.sum(axis=1, keepdims=True).astype(float)
        share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        with np.errstate(divide="ignore"):
            z = np.where(share > 0, np.log10(share), np.nan)
        nb = counts.shape[1]
        e = np.asarray(edges, dtype=float)
        centers = (e[:-1] + e[1:]) / 2 if len(e) == nb + 1 else np.arange(nb, dtype=float)
        traces.append(
            _trace(
                "heatmap",
                x=_xs(steps),
                y=_f32(centers),
                z=_f32(z.T),
                colorscale="Viridis",
                colorbar={"title": {"text": "log10 share"}},
                hovertemplate=(
                    "step %{x}<br>log-ratio %{y:.2f}<br>log10 share %{z:.2f}<extra></extra>"
                ),
            )
        )
    if step is not None:
        layout["shapes"] = step_marker(step)
    return _figure(traces, layout)


def step_marker(step: int) -> list[dict[str, Any]]:
    """The layout shapes that mark ``step`` on a step axis: a full-height line."""
    return [
        {
            "type": "line",
            "xref": "x",
            "yref": "paper",
            "x0": step,
            "x1": step,
            "y0": 0,
            "y1": 1,
            "line": {"color": STEP_MARKER_COLOR, "width": 2},
        }
    ]


def alert_timeline(events: pd.DataFrame, last_step: int | None) -> go.Figure:
    """Alert episodes of a run as bars from the step they went pending to the step they
    resolved (or the run's last step while open), one row per rule, coloured by severity.

    ``events``: rule, severity, state, start_step, end_step, message."""
    traces: list[dict[str, Any]] = []
    layout = _base_layout("Alert timeline", "rule", "step", "timeline")
    layout.pop("yaxis2")
    layout["height"] = max(160, 60 + 28 * (events["rule"].nunique() if not events.empty else 1))
    layout["yaxis"]["type"] = "category"
    layout["showlegend"] = False
    if not events.empty:
        for sev, part in events.groupby("severity"):
            start = part["start_step"].astype(float).to_numpy()
            end = part["end_step"].astype("Float64").astype(float).to_numpy()
            open_end = float(last_step) if last_step is not None else start
            end = np.where(np.isfinite(end), end, open_end)
            traces.append(
                _trace(
                    "bar",
                    base=start.tolist(),
                    x=np.maximum(end - start, 1).tolist(),
                    y=[esc(r) for r in part["rule"]],
                    orientation="h",
                    marker={"color": SEVERITY_COLORS.get(str(sev), "#7f7f7f")},
                    text=[
                        f"{esc(s)}: {esc(m)}"
                        for s, m in zip(part["state"], part["message"], strict=True)
                    ],
                    hovertemplate="%{y}<br>steps %{base}-%{x}<br>%{text}<extra></extra>",
                    textposition="none",
                    name=esc(sev),
                )
            )
    return _figure(traces, layout)


def vocabulary_heatmap(buckets: pd.DataFrame, *, uirevision: str = "vocabulary") -> go.Figure:
    """The drift vocabulary over steps: y the range's top tokens (largest contribution on
    top), x the step buckets, colour each token's share of the bucket's positive log-ratio
    mass. ``buckets``: ``read_token_ledger_buckets`` (columns token_id, token, bucket,
    step_lo, step_hi, count, lr_sum, share_pos; ``attrs["buckets"]`` every bucket).
    Token labels are made visible (``show_token``) and escaped; special tokens in italics."""
    layout = _base_layout(
        "Drift vocabulary: who carries log p - log q", "token", "step", uirevision
    )
    layout.pop("yaxis2")
    frame = buckets.attrs.get("buckets")
    if buckets.empty or frame is None or frame.empty:
        layout["height"] = 200
        return _figure([], layout)
    order = (
        buckets.groupby("token_id")["lr_sum"].sum().sort_values(ascending=True, kind="stable").index
    )
    texts = dict(zip(buckets["token_id"], buckets["token"], strict=False))
    labels: list[str] = []
    for tid in order:
        shown = show_token(texts.get(tid), int(tid))
        label = esc(shown.text)
        label = f"<i>{label}</i>" if shown.special else label
        labels.append(label if label not in labels else f"{label} #{int(tid)}")
    row = {tid: i for i, tid in enumerate(order)}
    n_b = len(frame)
    share = np.full((len(order), n_b), np.nan)
    lr = np.full((len(order), n_b), np.nan)
    count = np.zeros((len(order), n_b))
    r = buckets["token_id"].map(row).to_numpy()
    b = buckets["bucket"].to_numpy()
    share[r, b] = buckets["share_pos"].to_numpy()
    lr[r, b] = buckets["lr_sum"].to_numpy()
    count[r, b] = buckets["count"].to_numpy()
    lo, hi = frame["step_lo"].to_numpy(), frame["step_hi"].to_numpy()
    layout["height"] = max(260, 90 + 22 * len(order))
    layout["yaxis"] = {**layout.get("yaxis", {}), "type": "category", "automargin": True}
    layout["xaxis"] = {
        **layout.get("xaxis", {}),
        "range": [float(lo[0]) - 0.5, float(hi[-1]) + 0.5],
    }
    trace = _trace(
        "heatmap",
        x=((lo + hi) / 2).tolist(),
        y=labels,
        z=np.where(np.isfinite(share), share, None).tolist(),
        customdata=np.dstack(
            [np.broadcast_to(lo, share.shape), np.broadcast_to(hi, share.shape), count, lr]
        ).tolist(),
        zmin=0.0,
        colorscale="YlOrRd",
        reversescale=True,  # dark red: the tokens that carry the most
        colorbar={"title": {"text": "share of the positive log-ratio"}, "tickformat": ".0%"},
        hovertemplate=(
            "%{y}<br>steps %{customdata[0]}..%{customdata[1]}<br>share %{z:.1%}"
            "<br>count %{customdata[2]}<br>sum log p - log q %{customdata[3]:.3g}<extra></extra>"
        ),
    )
    return _figure([trace], layout)
