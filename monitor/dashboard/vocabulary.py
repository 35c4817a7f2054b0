"""The drift vocabulary on the run page and on Compare: which tokens carry the run's
``log p - log q`` over the whole batch (the token ledger, ``monitor.store.vocabulary``).

* run page: a heatmap of the top tokens over the step range the KL chart shows (zooming the
  KL chart re-reads it: the chart's relayoutData drives the range; while the run is running
  and not zoomed, the panel's live interval extends it to the newest step), and a table of what
  changed between two steps, typed or picked by clicking two points of the KL chart;
* Compare: the same table for run A (before) vs run B (after) over the view's range.

A run logged without ``token_ids`` has no ledger: the panel says so and how to get one.
Tokens are text made visible by ``monitor.formats.show_token``; Dash escapes what it shows.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from monitor.charts import figures as F
from monitor.charts import tables as T
from monitor.charts.view import View
from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.dashboard.pages.common import error_box, info_box
from monitor.dashboard.panel import relayout_x
from monitor.errors import KlmonError

#: Step buckets of the heatmap (fewer when the range has fewer steps) and tokens shown.
HEAT_BUCKETS = 40
HEAT_TOKENS = 16
#: Steps on each side of a "between these two steps" comparison, by default.
DEFAULT_WINDOW = 10
NO_LEDGER = (
    "No token ledger for this run: pass token_ids= to log_step (and tokenizer= to "
    "monitor.init) to see which tokens carry the KL."
)


def change_table(changes: pd.DataFrame, before: str, after: str) -> html.Div:
    """A "what changed" table (``token_changes``): tokens whose contribution grew most."""
    if changes.empty:
        return info_box(f"No token grew its share of the log-ratio from {before} to {after}.")
    head = [
        html.Th(h.replace("before", f"({before})").replace("after", f"({after})"))
        for _, h in T.CHANGE_HEADERS
    ]
    rows = []
    for r in T.token_change_rows(changes):
        cells = [
            html.Td(
                html.Code(r["token"], className="tok-special" if r["special"] else "tok-text"),
                title=f"token id {r['token_id']}" + (" (special token)" if r["special"] else ""),
            )
        ]
        cells += [html.Td(r[key]) for key, _ in T.CHANGE_HEADERS[1:]]
        rows.append(html.Tr(cells))
    return html.Div(
        [
            html.P(
                f"Tokens ranked by the growth of their log-ratio per 1k tokens, {before} -> "
                f"{after} ({changes.attrs.get('n_tokens_before', 0)} and "
                f"{changes.attrs.get('n_tokens_after', 0)} tokens).",
                className="hint",
            ),
            html.Table([html.Thead(html.Tr(head)), html.Tbody(rows)], className="vocab-changes"),
        ]
    )


def _heat(data: DashboardData, run_id: int, start: int, end: int) -> tuple[Any, str]:
    buckets = data.vocabulary_buckets(run_id, start, end, HEAT_BUCKETS, HEAT_TOKENS)
    frame = buckets.attrs.get("buckets")
    n = 0 if frame is None else int((frame["n_tokens"] > 0).sum())
    return F.vocabulary_heatmap(buckets), f"steps {start}..{end}" + (
        "" if n else ": no token ledger in this range"
    )


def vocabulary_section(data: DashboardData, run_id: int, view: View) -> html.Div:
    """The run page's panel, drawn over the view's range (or the whole run)."""
    last = data.run_state(run_id).last_step
    if last is None:
        return html.Div(info_box(NO_LEDGER), id=ids.VOCAB_SECTION)
    start = 0 if view.start is None else view.start
    end = last if view.end is None else max(view.end, start)
    buckets = data.vocabulary_buckets(run_id, start, end, HEAT_BUCKETS, HEAT_TOKENS)
    whole = (start, end) == (0, last)
    if buckets.empty and (whole or data.vocabulary_buckets(run_id, 0, last, 1, 1).empty):
        return html.Div(info_box(NO_LEDGER), id=ids.VOCAB_SECTION, className="vocab-empty")
    fig, text = _heat(data, run_id, start, end)  # the read above, from the cache
    a = min(last, DEFAULT_WINDOW * 5)  # after a typical warm-up
    return html.Div(
        id=ids.VOCAB_SECTION,
        children=[
            html.P(
                "Which tokens carry log p - log q over every token of the batch: the top "
                "tokens of the steps the KL chart shows (zoom it to narrow the range).",
                className="hint",
            ),
            html.Div(text, id=ids.VOCAB_RANGE, className="hint"),
            dcc.Store(id=ids.VOCAB_ZOOM, data=None),
            dcc.Graph(id=ids.VOCAB_HEATMAP, figure=fig, config={"displaylogo": False}),
            html.H4("Between these two steps"),
            html.Div(
                className="toolbar",
                children=[
                    html.Label("step A", htmlFor=ids.VOCAB_STEP_A),
                    dcc.Input(
                        id=ids.VOCAB_STEP_A,
                        type="number",
                        min=0,
                        step=1,
                        value=a,
                        debounce=True,
                        style={"width": "120px"},
                    ),
                    html.Label("step B", htmlFor=ids.VOCAB_STEP_B),
                    dcc.Input(
                        id=ids.VOCAB_STEP_B,
                        type="number",
                        min=0,
                        step=1,
                        value=last,
                        debounce=True,
                        style={"width": "120px"},
                    ),
                    html.Label("window (steps)", htmlFor=ids.VOCAB_WINDOW),
                    dcc.Input(
                        id=ids.VOCAB_WINDOW,
                        type="number",
                        min=1,
                        max=100_000,
                        step=1,
                        value=DEFAULT_WINDOW,
                        debounce=True,
                        style={"width": "90px"},
                    ),
                    html.Span(
                        "or click two points of the KL chart; each side is the window of steps "
                        "ending at its step",
                        className="hint",
                    ),
                ],
            ),
            html.Div(_changes(data, run_id, a, last, DEFAULT_WINDOW), id=ids.VOCAB_CHANGES),
        ],
    )


def _changes(data: DashboardData, run_id: int, a: Any, b: Any, window: Any) -> Any:
    try:
        sa, sb, w = int(a), int(b), int(window or DEFAULT_WINDOW)
    except (TypeError, ValueError):
        return info_box("Type two steps (whole numbers), or click two points of the KL chart.")
    if sa < 0 or sb < 0 or w < 1:
        return error_box("steps must be 0 or more and the window at least 1 step")
    try:
        df = data.vocabulary_changes(run_id, sa, sb, window=w)
    except KlmonError as exc:
        return error_box(user_message(exc))
    return change_table(df, f"step {sa}", f"step {sb}")


def compare_section(data: DashboardData, run_a: int, run_b: int, view: View) -> html.Div:
    """Compare's table: run A's tokens (before) vs run B's (after) over the view's range."""
    rng = (view.start, view.end)
    names = {r.id: r.name for r in data.runs([run_a, run_b])[0]}
    label_a, label_b = (f"{names.get(r, '?')} (#{r})" for r in (run_a, run_b))
    try:
        df = data.vocabulary_changes_between_runs(run_a, rng, run_b, rng)
    except KlmonError as exc:
        return html.Div(error_box(user_message(exc)), id=ids.CMP_VOCAB)
    if not df.attrs.get("n_tokens_before") and not df.attrs.get("n_tokens_after"):
        return html.Div(
            info_box("Neither run has a token ledger (log_step(..., token_ids=...))."),
            id=ids.CMP_VOCAB,
        )
    return html.Div(change_table(df, label_a, label_b), id=ids.CMP_VOCAB)


def register_vocabulary(app: Dash, data: DashboardData) -> None:
    """The run page's callbacks: the heatmap follows the KL chart's zoom; the table follows
    the two steps (typed, or two clicks on the KL chart)."""
    kl_graph = ids.graph(ids.PANEL_RUN, "kl")

    @app.callback(
        Output(ids.VOCAB_HEATMAP, "figure"),
        Output(ids.VOCAB_RANGE, "children"),
        Output(ids.VOCAB_ZOOM, "data"),
        Input(kl_graph, "relayoutData"),
        Input(ids.panel_id(ids.PANEL_RUN, "interval"), "n_intervals"),
        State(ids.panel_id(ids.PANEL_RUN, "view"), "data"),
        State(ids.panel_id(ids.PANEL_RUN, "x"), "value"),
        State(ids.RUN_ID_STORE, "data"),
        State(ids.VOCAB_ZOOM, "data"),
        prevent_initial_call=True,
    )
    def follow_zoom(
        relayout: Any, _tick: Any, view_data: Any, xmode: Any, run_id: Any, zoom: Any
    ) -> Any:
        """A zoom of the KL chart sets the range (a double click, back to the view's); a
        tick of the panel's live interval (on while the run is running) extends an
        unzoomed range to the newest step."""
        if ctx.triggered_id == kl_graph:
            ev = relayout_x(relayout)
            if ev is None or xmode == "wall":
                raise PreventUpdate
            zoom = None if ev[0] == "auto" else ev[1]
        elif zoom is not None:
            raise PreventUpdate  # live, but the person is looking at a fixed range
        try:
            rid = int(run_id)
            view = View.from_dict(view_data)
            last = data.run_state(rid).last_step
            if last is None:
                raise PreventUpdate
            if zoom is None:
                start = 0 if view.start is None else view.start
                end = last if view.end is None else view.end
            else:
                lo, hi = sorted(float(x) for x in zoom)
                start, end = max(0, math.floor(lo)), max(0, min(last, math.ceil(hi)))
            if end < start:
                raise PreventUpdate
            return *_heat(data, rid, start, end), zoom
        except (TypeError, ValueError, OverflowError):
            raise PreventUpdate from None
        except KlmonError as exc:
            return no_update, user_message(exc), no_update

    @app.callback(
        Output(ids.VOCAB_STEP_A, "value"),
        Output(ids.VOCAB_STEP_B, "value"),
        Input(kl_graph, "clickData"),
        State(ids.VOCAB_STEP_A, "value"),
        State(ids.VOCAB_STEP_B, "value"),
        prevent_initial_call=True,
    )
    def pick_steps(click: Any, a: Any, b: Any) -> Any:
        try:
            step = round(float(click["points"][0]["x"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise PreventUpdate from None
        if a is None or b is not None:
            return step, None  # a first click starts a new pair
        return a, step

    @app.callback(
        Output(ids.VOCAB_CHANGES, "children"),
        Input(ids.VOCAB_STEP_A, "value"),
        Input(ids.VOCAB_STEP_B, "value"),
        Input(ids.VOCAB_WINDOW, "value"),
        State(ids.RUN_ID_STORE, "data"),
        prevent_initial_call=True,
    )
    def between(a: Any, b: Any, window: Any, run_id: Any) -> Any:
        try:
            rid = int(run_id)
        except (TypeError, ValueError):
            raise PreventUpdate from None
        if a is not None and b is None:
            return info_box(f"step A is {a}: click a second point of the KL chart, or type B.")
        return _changes(data, rid, a, b, window)
