"""A panel of time charts over one step range, built from what a ``PanelSource`` reads:
the dashboard's Compare and Run pages and the HTML report show the same figures.

``build_panel`` reads every shown run's series (runs in parallel), its best KL quantity and
the alert and note markers, and builds every chart of ``panel_specs``. Its ``live`` output
is the state a live update starts from (``monitor.dashboard.live``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from monitor.charts import figures as F
from monitor.charts import palette as P
from monitor.charts import specs as S
from monitor.charts.view import View
from monitor.store.current_kl import KLQuantity
from monitor.store.domain import RunInfo
from monitor.store.series import Series


class RunStateLike(Protocol):
    """A run's state as a panel needs it: the run itself (for ``info.status``)."""

    @property
    def info(self) -> RunInfo: ...


class PanelSource(Protocol):
    """The reads a panel makes (``monitor.dashboard.data.DashboardData`` caches them)."""

    def series(
        self,
        run_id: int,
        columns: Sequence[str],
        *,
        start: int | None = ...,
        end: int | None = ...,
        max_buckets: int = ...,
    ) -> Series: ...

    def metric_series(
        self,
        run_id: int,
        name: str,
        *,
        start: int | None = ...,
        end: int | None = ...,
        max_buckets: int = ...,
    ) -> Series: ...

    def run_state(self, run_id: int) -> RunStateLike: ...

    def best_kl(self, run_id: int) -> KLQuantity | None: ...

    def step_to_wall(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, wall times) to place markers on, and zoom, a wall-time axis."""
        ...

    def alert_markers(self, run_ids: Sequence[int]) -> pd.DataFrame:
        """Columns run_id, step, kind ("alert"), text."""
        ...

    def note_markers(self, run_ids: Sequence[int]) -> pd.DataFrame:
        """Columns run_id, step, kind ("note"), text."""
        ...


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
    data: PanelSource, run_id: int, wall_range: Sequence[float]
) -> tuple[int | None, int | None]:
    steps, walls = data.step_to_wall(run_id)
    if len(steps) < 2:
        return None, None
    lo = float(np.interp(wall_range[0], walls, steps))
    hi = float(np.interp(wall_range[1], walls, steps))
    pad = max(1.0, (steps[-1] - steps[0]) / 64)
    return max(0, int(lo - pad)), int(hi + pad)


def build_panel(
    data: PanelSource,
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


def _markers(data: PanelSource, run_ids: Sequence[int], xmode: str) -> pd.DataFrame:
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
