"""Runs ``/``: every run with its status (stalled derived), last step and update, current KL
(the best KL quantity the run has, named with its unit) with a sparkline of its history,
reward and open alerts; filter, sort, select several and open them in Compare."""

from __future__ import annotations

from typing import Any

import pandas as pd
from dash import Dash, Input, Output, Patch, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from monitor.charts.view import MAX_RUNS
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

COLUMNS = [
    ID_COLUMN,
    link_column(80),
    {"field": "project", "headerName": "project", "width": 140},
    {"field": "name", "headerName": "run", "flex": 1, "minWidth": 180},
    {"field": "status", "headerName": "status", "width": 110},
    {
        "field": "last_step",
        "headerName": "last step",
        "width": 110,
        "filter": "agNumberColumnFilter",
    },
    {"field": "updated", "headerName": "last update (UTC)", "width": 190},
    {"field": "last_kl", "headerName": "KL now", "width": 110, "filter": "agNumberColumnFilter"},
    {"field": "kl_quantity", "headerName": "KL quantity, unit", "width": 190},
    {
        "field": "kl_trend",
        "headerName": "KL history",
        "width": 150,
        "filter": False,
        "sortable": False,
    },
    {
        "field": "last_reward",
        "headerName": "reward",
        "width": 110,
        "filter": "agNumberColumnFilter",
    },
    {
        "field": "open_alerts",
        "headerName": "open alerts",
        "width": 120,
        "filter": "agNumberColumnFilter",
    },
    {"field": "tags", "headerName": "tags", "width": 160},
    {"field": "source", "headerName": "source", "width": 110},
]


def rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Grid rows (plain JSON values). ``open`` is a markdown link built from the id only."""
    out = []
    for r in df.to_dict(orient="records"):
        out.append(
            {
                "id": int(r["id"]),
                "row_id": str(int(r["id"])),
                "open": f"[open](/run/{int(r['id'])})",
                "project": str(r["project"]),
                "name": str(r["name"]),
                "status": str(r["status"]),
                "last_step": None if pd.isna(r["last_step"]) else int(r["last_step"]),
                "updated": fmt_time(r["last_update"]),
                "last_kl": grid_number(r["last_kl"]),
                "kl_quantity": str(r["kl_quantity"] or ""),
                "kl_trend": str(r["kl_trend"] or ""),
                "last_reward": grid_number(r["last_reward"]),
                "open_alerts": int(r["open_alerts"]),
                "tags": str(r["tags"] or ""),
                "source": str(r["source"]),
            }
        )
    return out


def layout(data: DashboardData, settings: DashboardSettings) -> html.Div:
    df = data.runs_overview()
    grid = selectable_grid(
        ids.RUNS_GRID,
        rows(df),
        COLUMNS,
        style={"height": None if len(df) <= 25 else "760px"},
        domLayout="autoHeight" if len(df) <= 25 else "normal",
        pagination=len(df) > 25,
        paginationPageSize=20,
        quickFilterText="",
    )
    return page(
        "Runs",
        html.Div(
            className="toolbar",
            children=[
                dcc.Input(
                    id=ids.RUNS_FILTER,
                    type="search",
                    placeholder="filter runs (any column)",
                    debounce=False,
                    className="filter",
                ),
                html.Button(
                    "Compare selected",
                    id=ids.RUNS_COMPARE,
                    n_clicks=0,
                    disabled=True,
                    className="button primary",
                ),
                html.Span(id=ids.RUNS_MSG, className="hint"),
            ],
        ),
        grid if len(df) else html.P("No runs yet: log one with monitor.init(...).log_step(...)."),
        dcc.Interval(
            id=ids.RUNS_REFRESH, interval=int(max(5.0, settings.refresh_seconds * 2) * 1000)
        ),
    )


def register(app: Dash, data: DashboardData, settings: DashboardSettings) -> None:
    @app.callback(
        Output(ids.RUNS_COMPARE, "disabled"),
        Output(ids.RUNS_MSG, "children"),
        Input(ids.RUNS_GRID, "selectedRows"),
    )
    def selection(selected: Any) -> Any:
        n = len(selected or [])
        if n == 0:
            return True, "select runs with the checkboxes to compare them"
        if n > MAX_RUNS:
            return True, f"{n} selected: compare at most {MAX_RUNS} at once"
        return False, f"{n} selected"

    @app.callback(
        Output(ids.URL, "href", allow_duplicate=True),
        Input(ids.RUNS_COMPARE, "n_clicks"),
        State(ids.RUNS_GRID, "selectedRows"),
        prevent_initial_call=True,
    )
    def open_compare(n_clicks: Any, selected: Any) -> Any:
        if not n_clicks or not selected:
            raise PreventUpdate
        run_ids: list[int] = []
        for r in selected[:MAX_RUNS]:
            try:
                run_ids.append(int(r["id"]))
            except (KeyError, TypeError, ValueError):
                continue
        if not run_ids:
            raise PreventUpdate
        return "/compare?runs=" + ",".join(str(r) for r in run_ids)

    @app.callback(
        Output(ids.RUNS_GRID, "dashGridOptions"),
        Input(ids.RUNS_FILTER, "value"),
        prevent_initial_call=True,
    )
    def quick_filter(value: Any) -> Any:
        patch = Patch()
        patch["quickFilterText"] = str(value or "")[:200]
        return patch

    @app.callback(
        Output(ids.RUNS_GRID, "rowData"),
        Output(ids.RUNS_MSG, "children", allow_duplicate=True),
        Input(ids.RUNS_REFRESH, "n_intervals"),
        prevent_initial_call=True,
    )
    def refresh(_n: Any) -> Any:
        try:
            return rows(data.runs_overview()), no_update
        except Exception as exc:  # shown, never raised into the page
            return no_update, error_box(user_message(exc))
