"""Compare ``/compare?runs=3,7,9&from=0&to=5000&smooth=0.9&x=step&metrics=loss``: one chart per
quantity with the runs overlaid (a consistent colour per run), zoom shared by all charts,
EWMA smoothing, step or wall-time x, extra metrics by name, and a runs-as-columns table
where the rows that differ between the runs are highlighted, and the tokens that carry more of
the second run's log-ratio than of the first's (the drift vocabulary, run A vs run B)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dash import Dash, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from monitor.charts import palette as P
from monitor.charts import tables as T
from monitor.charts.panel import panel_specs
from monitor.charts.view import View, parse_query, to_query
from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData
from monitor.dashboard.pages.common import badge, error_box, info_box, page
from monitor.dashboard.panel import register_panel
from monitor.dashboard.panel_layout import panel_controls, panel_layout
from monitor.dashboard.settings import DashboardSettings
from monitor.dashboard.vocabulary import compare_section


def _kl_text(data: DashboardData, run_id: int) -> str | None:
    """``0.0473 (k3 from kl, nats/token)``: the run's current KL with which it is."""
    now = data.current_kl(run_id)
    return None if now is None else f"{now.value:.6g} ({now.quantity.label()})"


def summary_table(data: DashboardData, run_ids: list[int], labels: dict[int, str]) -> html.Table:
    runs = []
    for rid in run_ids:
        st = data.run_state(rid)
        runs.append(
            {
                "label": labels[rid],
                "project": st.info.project,
                "name": st.info.name,
                "status": st.status,
                "last_step": st.last_step,
                "last_kl": _kl_text(data, rid),
                "last_reward": st.last.get("reward_mean"),
                "tags": st.info.tags,
                "config": st.info.config,
            }
        )
    df = T.comparison_table(runs)
    cols = [c for c in df.columns if c not in ("field", "differs")]
    head = html.Thead(html.Tr([html.Th("")] + [html.Th(c) for c in cols]))
    body = html.Tbody(
        [
            html.Tr(
                [html.Th(row["field"])] + [html.Td(row[c]) for c in cols],
                className="differs" if row["differs"] else None,
            )
            for row in df.to_dict(orient="records")
        ]
    )
    return html.Table([head, body], id=ids.CMP_SUMMARY, className="summary")


def layout(data: DashboardData, settings: DashboardSettings, search: str | None) -> html.Div:
    view, warnings = parse_query(search)
    runs, missing = data.runs(view.runs)
    notes = [*warnings, *missing]
    if not runs:
        return page(
            "Compare",
            *(error_box(n) for n in notes),
            info_box("No runs to compare: pick some on the Runs page."),
            dcc.Link("Runs", href="/"),
        )
    run_ids = [r.id for r in runs]
    view = replace(view, runs=tuple(run_ids))
    labels = {r.id: f"{r.name} (#{r.id})" for r in runs}
    info = data.metric_info(run_ids)
    specs = panel_specs(view, info)
    chips = [
        html.Span(
            [
                html.Span(className="swatch", style={"backgroundColor": P.run_color(i)}),
                dcc.Link(labels[r.id], href=f"/run/{r.id}"),
                " ",
                badge(data.run_state(r.id).status),
            ],
            className="chip",
        )
        for i, r in enumerate(runs)
    ]
    metric_options = [{"label": n, "value": n} for n in data.metric_names(run_ids)]
    return page(
        "Compare",
        *(error_box(n) for n in notes),
        html.Div(chips, className="chips"),
        panel_controls(ids.PANEL_CMP, view),
        html.Div(
            className="controls",
            children=[
                html.Label("Extra metrics", htmlFor=ids.CMP_METRICS),
                dcc.Dropdown(
                    id=ids.CMP_METRICS,
                    options=metric_options,
                    value=list(view.metrics),
                    multi=True,
                    placeholder="add a logged metric by name",
                    className="metric-dropdown",
                ),
            ],
        ),
        *panel_layout(ids.PANEL_CMP, view, specs, settings.refresh_seconds),
        html.H3("What differs between these runs"),
        summary_table(data, run_ids, labels),
        *(
            [
                html.H3(f"Drift vocabulary: {labels[run_ids[1]]} vs {labels[run_ids[0]]}"),
                compare_section(data, run_ids[0], run_ids[1], view),
            ]
            if len(run_ids) >= 2
            else []
        ),
    )


def register(app: Dash, data: DashboardData, settings: DashboardSettings) -> None:
    register_panel(
        app,
        data,
        panel=ids.PANEL_CMP,
        permalink=lambda v: "/compare" + to_query(v),
        chart_keys=None,
        max_buckets=settings.max_buckets,
    )

    @app.callback(
        Output(ids.URL, "search", allow_duplicate=True),
        Input(ids.CMP_METRICS, "value"),
        State(ids.panel_id(ids.PANEL_CMP, "view"), "data"),
        State(ids.panel_id(ids.PANEL_CMP, "smooth"), "value"),
        State(ids.panel_id(ids.PANEL_CMP, "x"), "value"),
        prevent_initial_call=True,
    )
    def pick_metrics(names: Any, view_data: Any, smooth: Any, xmode: Any) -> Any:
        view = View.from_dict(view_data)
        chosen = [str(n) for n in (names or []) if isinstance(n, str)]
        if tuple(chosen) == view.metrics:
            raise PreventUpdate
        new = View.from_dict(
            {**view.to_dict(), "metrics": chosen, "smooth": smooth or 0.0, "x": xmode or view.x}
        )
        return to_query(new)
