"""The components of a panel: its controls (smoothing, x axis, KL axis, permalink), its
chart boxes and stores, and the line per chart without data. Ids come from
``monitor.dashboard.ids``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dash import dcc, html

from monitor.charts import specs as S
from monitor.charts.view import View
from monitor.dashboard import ids


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
