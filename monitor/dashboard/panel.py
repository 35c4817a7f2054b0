"""The callbacks of a panel of charts. ``register_panel`` wires one panel into an app:

* render: on load, on a control change, and when a chart is zoomed (relayoutData with an x
  range): every chart gets the range and the data at the finer level
  (``monitor.charts.panel.build_panel``);
* live: every few seconds while a shown run is running and the range is open-ended, append
  the steps newer than what the browser holds (``monitor.dashboard.live.extend_panel``).

What a panel shows is a ``monitor.charts.view.View``; its components are in
``monitor.dashboard.panel_layout``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from monitor.charts.panel import build_panel, panel_specs
from monitor.charts.view import View
from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.dashboard.live import extend_panel, valid_live
from monitor.dashboard.panel_layout import empty_lines
from monitor.errors import InvalidInput, KlmonError
from monitor.store.series import MAX_STEP


def relayout_x(rd: Mapping[str, Any] | None) -> tuple[str, Any] | None:
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
            ev = relayout_x(relayouts[pos] if 0 <= pos < len(relayouts) else None)
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
        state = valid_live(live)
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
