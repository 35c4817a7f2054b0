"""Live updates of a panel: every few seconds while a shown run is running and the range is
open-ended, append the steps newer than what the browser holds (``extendData`` on the tail
traces only). ``extend_panel`` computes what to append from the state ``build_panel`` left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from monitor.charts import figures as F
from monitor.charts.view import X_MODES
from monitor.dashboard.data import DashboardData

LIVE_ROW_LIMIT = 20_000


def valid_live(live: Any) -> dict[str, Any] | None:
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
    from monitor.store.tables import STEP_FLOAT_COLUMNS

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
