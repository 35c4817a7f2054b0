"""Run ``/run/<id>?step=N``: headline numbers, charts, the drift vocabulary (which tokens carry
the KL over the steps shown, and between two steps), alert timeline, annotations, the token
log-ratio heatmap over steps and, at a chosen step, the stored samples with every response
token coloured by log p - log q (red: the policy makes it more likely than the reference)
and a table of the tokens that carry the divergence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from dash import Dash, Input, Output, Patch, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from monitor.charts import figures as F
from monitor.charts import tables as T
from monitor.charts.panel import panel_specs
from monitor.charts.view import parse_query, to_query
from monitor.dashboard import ids
from monitor.dashboard.data import DashboardData, user_message
from monitor.dashboard.pages.common import badge, error_box, fmt, fmt_time, info_box, page
from monitor.dashboard.panel import register_panel
from monitor.dashboard.panel_layout import panel_controls, panel_layout
from monitor.dashboard.settings import DashboardSettings
from monitor.dashboard.vocabulary import register_vocabulary, vocabulary_section
from monitor.errors import KlmonError
from monitor.store.domain import Sample

RUN_CHARTS = ("kl", "estimators", "reward", "length")
MAX_SAMPLES_SHOWN = 8
HEADLINES = (
    ("kl_mean", "KL (nats/seq)"),
    ("kl_p95", "KL p95"),
    ("k3", "k3 (per token)"),
    ("neg_kl_frac", "share KL < 0"),
    ("reward_mean", "reward"),
    ("resp_len_mean", "length (tokens)"),
    ("top1pct_share", "top-1% share"),
)


def _edges() -> Any:
    try:
        from monitor.divergence import HIST_EDGES

        return HIST_EDGES
    except ImportError:  # pragma: no cover - divergence is part of klmon
        return None


def sample_card(sample: Sample) -> html.Div:
    cells = T.token_cells(sample.tokens, sample.policy_logprobs, sample.ref_logprobs)
    spans = [
        html.Span(
            c.text,
            className="tok",
            style={"backgroundColor": c.color},
            title=f"log p {c.logp:.3f}  log q {c.logq:.3f}  log p - log q {c.diff:+.3f}",
        )
        for c in cells
    ]
    top = T.top_tokens(cells)
    total = sum(c.diff for c in cells)
    table = html.Table(
        [
            html.Thead(
                html.Tr([html.Th(h) for h in ("pos", "token", "log p", "log q", "log p - log q")])
            ),
            html.Tbody(
                [
                    html.Tr(
                        [
                            html.Td(str(int(r["position"]))),
                            html.Td(html.Code(str(r["token"]))),
                            html.Td(f"{r['log p']:.3f}"),
                            html.Td(f"{r['log q']:.3f}"),
                            html.Td(f"{r['difference']:+.3f}"),
                        ]
                    )
                    for r in top.to_dict(orient="records")
                ]
            ),
        ],
        className="top-tokens",
    )
    return html.Div(
        className="sample",
        children=[
            html.Div(
                [
                    html.Strong(
                        f"{sample.kind} sample, sequence {sample.seq_index} (rank {sample.rank})"
                    ),
                    f"  KL {sample.kl_seq:.3f} nats",
                    f"  (sum of token log-ratios {total:.3f})",
                    f"  reward {fmt(sample.reward)}" if sample.reward is not None else "",
                ],
                className="sample-head",
            ),
            html.Div(
                [html.Span("prompt ", className="label"), html.Span(sample.prompt or "")],
                className="prompt",
            ),
            html.Div([html.Span("response ", className="label"), *spans], className="response"),
            html.Details([html.Summary("tokens carrying the divergence"), table], open=True),
        ],
    )


def samples_view(samples: Sequence[Sample], step: int | None, note: str | None) -> list[Any]:
    out: list[Any] = []
    if note:
        out.append(info_box(note))
    if step is None:
        return out
    if not samples:
        out.append(info_box(f"no samples stored at step {step}"))
        return out
    out.append(
        html.P(
            f"{len(samples)} stored sample(s) at step {step}, highest KL first"
            + (f" (showing {MAX_SAMPLES_SHOWN})" if len(samples) > MAX_SAMPLES_SHOWN else ""),
        )
    )
    out += [sample_card(s) for s in samples[:MAX_SAMPLES_SHOWN]]
    return out


def _annotation_list(data: DashboardData, run_id: int) -> Any:
    ann = data.annotations([run_id])
    if ann.empty:
        return html.P("No notes yet.", className="hint")
    return html.Ul(
        [
            html.Li(
                [
                    dcc.Link(f"step {int(r['step'])}", href=f"/run/{run_id}?step={int(r['step'])}"),
                    f" — {r['author']}: " if r["author"] else " — ",
                    html.Span(str(r["text"]), className="note-text"),
                    html.Span(f"  ({fmt_time(r['created_at'])})", className="hint"),
                ]
            )
            for r in ann.to_dict(orient="records")
        ],
        className="notes",
    )


def _events_table(data: DashboardData, run_id: int) -> Any:
    ev = data.events(run_ids=[run_id], limit=200)
    if ev.empty:
        return html.P("No alerts on this run.", className="hint")
    rows = []
    for r in ev.to_dict(orient="records"):
        step = (
            r["fired_step"]
            if r["fired_step"] is not None and r["fired_step"] == r["fired_step"]
            else r["start_step"]
        )
        rows.append(
            html.Tr(
                [
                    html.Td(str(r["state"])),
                    html.Td(str(r["severity"])),
                    html.Td(str(r["rule"])),
                    html.Td(dcc.Link(f"step {int(step)}", href=f"/run/{run_id}?step={int(step)}")),
                    html.Td(fmt(r["value"])),
                    html.Td(str(r["message"])),
                ]
            )
        )
    return html.Table(
        [
            html.Thead(
                html.Tr(
                    [html.Th(h) for h in ("state", "severity", "rule", "step", "value", "message")]
                )
            ),
            html.Tbody(rows),
        ],
        className="events",
    )


def layout(
    data: DashboardData, settings: DashboardSettings, run_id: int, search: str | None
) -> html.Div:
    view, warnings = parse_query(search)
    state = data.run_state(run_id)  # NotFound -> router message
    info = state.info
    view = replace(view, runs=(run_id,), metrics=())
    specs = panel_specs(view, {}, RUN_CHARTS)
    now = data.current_kl(run_id)
    kl_card = html.Div(
        [
            html.Div(
                "KL now" + (f" ({now.quantity.label()})" if now is not None else ""),
                className="k",
            ),
            html.Div(fmt(None if now is None else now.value), className="v"),
        ],
        className="card kl-now",
    )
    headline = html.Div(
        [kl_card]
        + [
            html.Div(
                [html.Div(label, className="k"), html.Div(fmt(state.last.get(col)), className="v")],
                className="card",
            )
            for col, label in HEADLINES
        ]
        + [
            html.Div(
                [
                    html.Div("last step", className="k"),
                    html.Div(fmt(state.last_step), className="v"),
                ],
                className="card",
            ),
            html.Div(
                [
                    html.Div("last update", className="k"),
                    html.Div(fmt_time(state.last_wall or info.last_seen_at), className="v small"),
                ],
                className="card",
            ),
        ],
        className="cards",
    )
    steps, counts = data.histograms(run_id)
    first_sample, last_sample = data.sample_step_range(run_id)
    step = data.sample_step(run_id, view.step)
    note = None
    if view.step is not None and step is not None and step != view.step:
        note = f"no samples at step {view.step}: showing the nearest stored step, {step}"
    elif step is None:
        note = "This run has no stored samples."
    samples = data.samples(run_id, step) if step is not None else []
    events = data.events(run_ids=[run_id], limit=200)
    config = T.flatten_config(info.config)
    return page(
        f"Run {info.name}",
        *(error_box(w) for w in warnings),
        dcc.Store(id=ids.RUN_ID_STORE, data=run_id),
        html.Div(
            [
                html.Span(f"project {info.project}", className="meta"),
                html.Span(f"#{info.id}", className="meta"),
                badge(state.status),
                html.Span(f"source {info.source}", className="meta"),
                html.Span("tags: " + ", ".join(str(t) for t in info.tags), className="meta")
                if info.tags
                else None,
                dcc.Link("compare with…", href=f"/compare?runs={run_id}", className="meta"),
            ],
            className="run-meta",
        ),
        headline,
        html.Details(
            [
                html.Summary("configuration"),
                html.Table(
                    [html.Tr([html.Th(k), html.Td(v)]) for k, v in config.items()],
                    className="config",
                ),
            ]
        )
        if config
        else None,
        panel_controls(ids.PANEL_RUN, view),
        *panel_layout(ids.PANEL_RUN, view, specs, settings.refresh_seconds),
        html.H3("Drift vocabulary"),
        vocabulary_section(data, run_id, view),
        html.H3("Tokens"),
        dcc.Graph(
            id=ids.RUN_HEATMAP,
            figure=F.histogram_heatmap(steps, counts, _edges(), step=step),
            config={"displaylogo": False},
        ),
        None
        if len(steps)
        else html.P("No token histograms stored for this run.", className="hint"),
        html.Div(
            className="toolbar",
            children=[
                html.Label("step", htmlFor=ids.RUN_STEP),
                dcc.Input(
                    id=ids.RUN_STEP,
                    type="number",
                    min=0,
                    step=1,
                    value=step,
                    debounce=True,
                    style={"width": "140px"},
                ),
                html.Button("◀ previous", id=ids.RUN_PREV, n_clicks=0, className="button"),
                html.Button("next ▶", id=ids.RUN_NEXT, n_clicks=0, className="button"),
                html.A(
                    "link to this step",
                    id=ids.RUN_STEP_LINK,
                    href=f"/run/{run_id}" + (f"?step={step}" if step is not None else ""),
                    className="permalink",
                ),
                html.Span(
                    f"samples stored at steps {first_sample}..{last_sample}"
                    if first_sample is not None
                    else "",
                    className="hint",
                ),
            ],
        ),
        html.Div(samples_view(samples, step, note), id=ids.RUN_SAMPLES),
        html.H3("Alerts"),
        dcc.Graph(
            id=ids.RUN_TIMELINE,
            figure=F.alert_timeline(events, state.last_step),
            config={"displaylogo": False},
        )
        if not events.empty
        else None,
        _events_table(data, run_id),
        html.H3("Notes"),
        html.Div(_annotation_list(data, run_id), id=ids.RUN_ANN_LIST),
        html.Div(
            className="toolbar",
            children=[
                dcc.Input(
                    id=ids.RUN_ANN_STEP,
                    type="number",
                    min=0,
                    step=1,
                    value=step,
                    placeholder="step",
                ),
                dcc.Input(
                    id=ids.RUN_ANN_AUTHOR, type="text", placeholder="your name", maxLength=200
                ),
                dcc.Textarea(
                    id=ids.RUN_ANN_TEXT,
                    placeholder="what happened at this step (post-mortem finding)",
                    maxLength=10_000,
                    className="note-input",
                ),
                html.Button("Add note", id=ids.RUN_ANN_ADD, n_clicks=0, className="button primary"),
                html.Span(id=ids.RUN_ANN_MSG),
            ],
        ),
    )


def _click_step(click: Any) -> int | None:
    try:
        x = click["points"][0]["x"]
        return round(float(x))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def register(app: Dash, data: DashboardData, settings: DashboardSettings) -> None:
    register_panel(
        app,
        data,
        panel=ids.PANEL_RUN,
        permalink=lambda v: f"/run/{v.runs[0] if v.runs else 0}" + to_query(replace(v, runs=())),
        chart_keys=RUN_CHARTS,
        max_buckets=settings.max_buckets,
    )
    register_vocabulary(app, data)

    @app.callback(
        Output(ids.RUN_SAMPLES, "children"),
        Output(ids.RUN_STEP, "value"),
        Output(ids.RUN_STEP_LINK, "href"),
        Output(ids.RUN_HEATMAP, "figure"),
        Output(ids.RUN_ANN_STEP, "value"),
        Input(ids.RUN_STEP, "value"),
        Input(ids.RUN_PREV, "n_clicks"),
        Input(ids.RUN_NEXT, "n_clicks"),
        Input(ids.RUN_HEATMAP, "clickData"),
        Input(ids.graph(ids.PANEL_RUN, "kl"), "clickData"),
        State(ids.RUN_ID_STORE, "data"),
        prevent_initial_call=True,
    )
    def choose_step(
        value: Any, _p: Any, _n: Any, heat_click: Any, kl_click: Any, run_id: Any
    ) -> Any:
        try:
            rid = int(run_id)
        except (TypeError, ValueError):
            raise PreventUpdate from None
        trig = ctx.triggered_id
        try:
            current = None
            if value is not None:
                try:
                    current = int(value)
                except (TypeError, ValueError):
                    current = None
            if trig in (ids.RUN_PREV, ids.RUN_NEXT) and current is not None:
                direction = -1 if trig == ids.RUN_PREV else 1
                step = data.sample_step(rid, current, direction)
                step = current if step is None else step
            elif trig == ids.RUN_HEATMAP:
                step = data.sample_step(rid, _click_step(heat_click))
            elif isinstance(trig, dict):
                step = data.sample_step(rid, _click_step(kl_click))
            else:
                step = data.sample_step(rid, current)
            note = None
            if (
                trig == ids.RUN_STEP
                and current is not None
                and step is not None
                and step != current
            ):
                note = f"no samples at step {current}: showing the nearest stored step, {step}"
            samples = data.samples(rid, step) if step is not None else []
        except KlmonError as exc:
            return error_box(user_message(exc)), no_update, no_update, no_update, no_update
        heat = Patch()
        if step is not None:
            heat["layout"]["shapes"] = F.step_marker(step)
        href = f"/run/{rid}" + (f"?step={step}" if step is not None else "")
        return samples_view(samples, step, note), step, href, heat, step

    @app.callback(
        Output(ids.RUN_ANN_LIST, "children"),
        Output(ids.RUN_ANN_MSG, "children"),
        Output(ids.RUN_ANN_TEXT, "value"),
        Input(ids.RUN_ANN_ADD, "n_clicks"),
        State(ids.RUN_ANN_STEP, "value"),
        State(ids.RUN_ANN_TEXT, "value"),
        State(ids.RUN_ANN_AUTHOR, "value"),
        State(ids.RUN_ID_STORE, "data"),
        prevent_initial_call=True,
    )
    def add_note(n: Any, step: Any, text_: Any, author: Any, run_id: Any) -> Any:
        if not n:
            raise PreventUpdate
        try:
            rid, st = int(run_id), int(step)
        except (TypeError, ValueError):
            return (
                no_update,
                error_box("give the step the note is about (a whole number)"),
                no_update,
            )
        if st < 0:
            return no_update, error_box("the step must be 0 or more"), no_update
        try:
            from monitor.dashboard.auth import current_user

            who = (str(author).strip() if author else "") or current_user()
            data.add_annotation(rid, st, str(text_ or ""), who)
            return (
                _annotation_list(data, rid),
                html.Span(f"note added at step {st}", className="ok"),
                "",
            )
        except KlmonError as exc:
            return no_update, error_box(user_message(exc)), no_update
