"""Alerts ``/alerts``: alert episodes with state, run, rule, step, value, message and the
tokens that carry the log-ratio at that step (the drift vocabulary, for runs with a token
ledger); select some to acknowledge them or silence their rule on their run; each links to
the run at the step it fired."""

from __future__ import annotations

from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.dashboard.pages.common import (
    ID_COLUMN,
    error_box,
    fmt_time,
    grid_number,
    link_column,
    page,
    selectable_grid,
)
from monitor.dashboard.settings import DashboardSettings
from monitor.errors import KlmonError

STATE_CHOICES = {
    "open": "open (pending or firing)",
    "firing": "firing",
    "resolved": "resolved",
    "all": "all",
}
#: Episodes (newest first) whose row names the tokens at their step: a page of the grid.
TOKEN_ROWS = 50
SILENCE_CHOICES = {"3600": "1 hour", "14400": "4 hours", "86400": "1 day", "604800": "1 week"}

COLUMNS = [
    ID_COLUMN,
    link_column(130),
    {"field": "state", "headerName": "state", "width": 100},
    {"field": "severity", "headerName": "severity", "width": 100},
    {"field": "run", "headerName": "run", "width": 180},
    {"field": "rule", "headerName": "rule", "width": 160},
    {"field": "step", "headerName": "step", "width": 100, "filter": "agNumberColumnFilter"},
    {"field": "value", "headerName": "value", "width": 100, "filter": "agNumberColumnFilter"},
    {
        "field": "threshold",
        "headerName": "threshold",
        "width": 110,
        "filter": "agNumberColumnFilter",
    },
    {"field": "peak", "headerName": "peak", "width": 150},
    {
        "field": "message",
        "headerName": "message",
        "flex": 1,
        "minWidth": 260,
        "wrapText": True,
        "autoHeight": True,
    },
    {
        "field": "tokens",
        "headerName": "tokens at the step",
        "flex": 1,
        "minWidth": 260,
        "wrapText": True,
        "autoHeight": True,
    },
    {"field": "started", "headerName": "started (UTC)", "width": 180},
    {"field": "acknowledged_by", "headerName": "acknowledged by", "width": 150},
    {"field": "silenced", "headerName": "silenced", "width": 100},
]


def _int(v: Any) -> int | None:
    if v is None or v is pd.NA:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _peak(value: Any, step: int | None) -> str:
    """The episode's peak level and step, e.g. ``17.8 at step 70`` (empty when unknown)."""
    v = grid_number(value)
    return "" if v is None or step is None else f"{v:.3g} at step {step}"


def _step(r: dict[str, Any]) -> int | None:
    step = _int(r.get("fired_step"))
    return _int(r.get("start_step")) if step is None else step


def token_notes(data: DashboardData, ev: pd.DataFrame) -> dict[tuple[int, int], str]:
    """The drift vocabulary line of the first ``TOKEN_ROWS`` episodes, by (run, step)."""
    out: dict[tuple[int, int], str] = {}
    for r in ev.head(TOKEN_ROWS).to_dict(orient="records"):
        step = _step(r)
        if step is not None:
            out[(int(r["run_id"]), step)] = data.vocabulary_note(int(r["run_id"]), step)
    return out


def rows(
    ev: pd.DataFrame, tokens: dict[tuple[int, int], str] | None = None
) -> list[dict[str, Any]]:
    """Grid rows. The ``open`` link is built from integers only (markdown-safe); ``tokens``:
    the drift vocabulary line of (run, step) (``token_notes``), shown as plain text."""
    out = []
    for r in ev.to_dict(orient="records"):
        step = _step(r)
        run_id = int(r["run_id"])
        out.append(
            {
                "id": int(r["id"]),
                "row_id": str(int(r["id"])),
                "run_id": run_id,
                "open": f"[run at step](/run/{run_id}?step={step})"
                if step is not None
                else f"[run](/run/{run_id})",
                "state": str(r["state"]),
                "severity": str(r["severity"]),
                "run": f"{r['run_name']} (#{run_id})",
                "rule": str(r["rule"]),
                "step": step,
                "value": grid_number(r.get("value")),
                "threshold": grid_number(r.get("threshold")),
                "peak": _peak(r.get("peak_value"), _int(r.get("peak_step"))),
                "message": str(r.get("message") or ""),
                "tokens": (tokens or {}).get((run_id, step), "") if step is not None else "",
                "started": fmt_time(r.get("started_at")),
                "acknowledged_by": str(r.get("acknowledged_by") or ""),
                "silenced": "yes" if r.get("silenced") else "",
            }
        )
    return out


def _state_arg(choice: str) -> str | list[str] | None:
    return None if choice == "all" else ("open" if choice == "open" else choice)


def layout(data: DashboardData, settings: DashboardSettings) -> html.Div:
    ev = data.events(state="open")
    return page(
        "Alerts",
        html.Div(
            className="toolbar",
            children=[
                dcc.RadioItems(
                    id=ids.ALERTS_STATE,
                    options=[{"label": f" {v}", "value": k} for k, v in STATE_CHOICES.items()],
                    value="open",
                    inline=True,
                ),
            ],
        ),
        selectable_grid(
            ids.ALERTS_GRID,
            rows(ev, token_notes(data, ev)),
            COLUMNS,
            style={"height": "560px"},
            pagination=True,
            paginationPageSize=50,
        ),
        html.Div(
            className="toolbar",
            children=[
                dcc.Input(
                    id=ids.ALERTS_WHO,
                    type="text",
                    placeholder="your name",
                    maxLength=200,
                    style={"width": "200px"},
                ),
                html.Button(
                    "Acknowledge selected",
                    id=ids.ALERTS_ACK,
                    n_clicks=0,
                    className="button primary",
                ),
                html.Span("silence their rule on their run for", className="hint"),
                dcc.Dropdown(
                    id=ids.ALERTS_SILENCE_FOR,
                    options=[{"label": v, "value": k} for k, v in SILENCE_CHOICES.items()],
                    value="3600",
                    clearable=False,
                    className="small-dropdown",
                ),
                html.Button(
                    "Silence selected", id=ids.ALERTS_SILENCE, n_clicks=0, className="button"
                ),
            ],
        ),
        html.Div(id=ids.ALERTS_MSG),
        dcc.Interval(
            id=ids.ALERTS_INTERVAL, interval=int(max(5.0, settings.refresh_seconds * 3) * 1000)
        ),
    )


def _selected(selected: Any) -> list[dict[str, Any]]:
    out = []
    for r in selected or []:
        try:
            out.append(
                {"id": int(r["id"]), "run_id": int(r["run_id"]), "rule": str(r["rule"])[:100]}
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def register(app: Dash, data: DashboardData, settings: DashboardSettings) -> None:
    @app.callback(
        Output(ids.ALERTS_GRID, "rowData"),
        Output(ids.ALERTS_MSG, "children"),
        Input(ids.ALERTS_STATE, "value"),
        Input(ids.ALERTS_INTERVAL, "n_intervals"),
        Input(ids.ALERTS_ACK, "n_clicks"),
        Input(ids.ALERTS_SILENCE, "n_clicks"),
        State(ids.ALERTS_GRID, "selectedRows"),
        State(ids.ALERTS_WHO, "value"),
        State(ids.ALERTS_SILENCE_FOR, "value"),
        prevent_initial_call=True,
    )
    def update(
        choice: Any, _n: Any, ack: Any, sil: Any, selected: Any, who: Any, seconds: Any
    ) -> Any:
        from dash import ctx

        from monitor.dashboard.auth import current_user

        if choice not in STATE_CHOICES:
            raise PreventUpdate
        trig = ctx.triggered_id
        message: Any = no_update
        picked = _selected(selected)
        by = (str(who).strip()[:200] if who else "") or current_user()
        try:
            if trig == ids.ALERTS_ACK:
                if not picked:
                    message = error_box("select the alerts to acknowledge first")
                else:
                    n = data.acknowledge([p["id"] for p in picked], by)
                    message = html.Span(f"acknowledged {n} alert(s) as {by}", className="ok")
            elif trig == ids.ALERTS_SILENCE:
                if str(seconds) not in SILENCE_CHOICES:
                    raise PreventUpdate
                if not picked:
                    message = error_box("select the alerts whose rules to silence first")
                else:
                    n = data.silence([(p["run_id"], p["rule"]) for p in picked], float(seconds), by)
                    message = html.Span(
                        f"silenced {n} rule(s) for {SILENCE_CHOICES[str(seconds)]}", className="ok"
                    )
            ev = data.events(state=_state_arg(choice))
            notes = token_notes(data, ev)
        except KlmonError as exc:
            return no_update, error_box(user_message(exc))
        return rows(ev, notes), message
