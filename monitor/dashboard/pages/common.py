"""Pieces every page uses: message boxes, number formatting, status badges."""

from __future__ import annotations

import math
from typing import Any

import dash_ag_grid as dag
from dash import html

from monitor.formats import UTC_SECONDS, number_text, utc_text

STATUS_CLASS = {
    "running": "badge running",
    "stalled": "badge stalled",
    "finished": "badge finished",
    "crashed": "badge crashed",
}


def error_box(message: str) -> html.Div:
    return html.Div(message, className="error", role="alert")


def info_box(message: str) -> html.Div:
    return html.Div(message, className="info")


def page(title: str, *children: Any) -> html.Div:
    return html.Div([html.H2(title), *children], className="page")


def badge(status: str) -> html.Span:
    return html.Span(status, className=STATUS_CLASS.get(status, "badge"))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: '-' when missing, whole numbers in full."""
    return number_text(value, digits, whole=True)


#: The row id as a grid column (numeric filter).
ID_COLUMN = {"field": "id", "headerName": "id", "width": 80, "filter": "agNumberColumnFilter"}


def link_column(width: int) -> dict[str, Any]:
    """The grid's ``open`` column: each row's markdown link (built from integers only)."""
    return {
        "field": "open",
        "headerName": "",
        "width": width,
        "cellRenderer": "markdown",
        "filter": False,
        "sortable": False,
    }


def selectable_grid(
    grid_id: str,
    rows: list[dict[str, Any]],
    columns: list[dict[str, Any]],
    *,
    style: dict[str, Any],
    **options: Any,
) -> dag.AgGrid:
    """A sortable, filterable grid of ``rows`` keyed by their ``row_id``, with a checkbox per
    row for selecting several; ``options`` are further AG Grid options."""
    return dag.AgGrid(
        id=grid_id,
        rowData=rows,
        columnDefs=columns,
        defaultColDef={"sortable": True, "filter": True, "resizable": True},
        getRowId="params.data.row_id",
        dashGridOptions={
            "rowSelection": {"mode": "multiRow", "checkboxes": True, "headerCheckbox": True},
            "animateRows": False,
            **options,
        },
        style=style,
    )


def grid_number(v: Any) -> float | None:
    """A number for a grid cell (JSON): rounded to 6 decimals, None when missing or not finite."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def fmt_time(ts: Any) -> str:
    """Unix seconds as 'YYYY-MM-DD HH:MM:SS UTC' ('' when missing)."""
    return utc_text(ts, UTC_SECONDS, missing="")
