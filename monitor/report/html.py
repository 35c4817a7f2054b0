"""The post-mortem report as one self-contained HTML file: it opens offline, without a server.

Charts are the dashboard's own (the Compare page's panel, ``monitor.charts.panel``),
as interactive plotly figures with plotly.js inlined once; should the panel not be usable,
they fall back to the static PNG charts of ``monitor.charts.png`` as data URIs. Every
piece of user text (run names, config, prompts, tokens, alert messages, notes) is escaped.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable, Sequence
from typing import Any

from monitor import __version__
from monitor.formats import UTC_MINUTES, utc_text
from monitor.report.data import (
    EVENT_TABLE_HEADERS,
    ReportData,
    describe_value,
    event_cells,
)

log = logging.getLogger("monitor.report")

Progress = Callable[[int], None]
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px auto; max-width: 1200px; color: #1f2328; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
border-bottom: 1px solid #e4e7eb; padding-bottom: 4px; } h3 { font-size: 15px; }
.meta { color: #57606a; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #e4e7eb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr.differs td { background: #fff5d6; } tr.differs td:first-child { font-weight: 600; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
          margin-right: 6px; }
.sev-critical { color: #d62728; font-weight: 600; } .sev-warning { color: #c25e00; }
.sev-info { color: #1f77b4; }
.tokens { line-height: 1.9; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: 13px; background: #fff; border: 1px solid #e4e7eb; padding: 8px;
          white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; padding: 1px 0; margin-right: 3px; }
.prompt { color: #57606a; font-size: 13px; margin: 4px 0; }
.chart { margin: 8px 0 16px 0; } img.chart { max-width: 100%; }
.legend-scale span { padding: 1px 6px; margin-right: 4px; font-size: 12px; }
"""


def esc(value: Any) -> str:
    """User text for HTML (text and attribute values)."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(ts: float | None) -> str:
    return utc_text(ts, UTC_MINUTES)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] = ()
) -> str:
    """A table of already escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Plotly:
    """Turns figures into HTML divs; plotly.js goes inline with the first one only."""

    def __init__(self) -> None:
        self.included = False

    def div(self, fig: Any, height: int | None = None) -> str:
        import plotly.io as pio

        out = pio.to_html(
            fig,
            include_plotlyjs=not self.included,
            full_html=False,
            config=PLOTLY_CONFIG,
            validate=False,
            default_height=f"{height}px" if height else "100%",
        )
        self.included = True
        return f'<div class="chart">{out}</div>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------- sections


def _summary(data: ReportData) -> str:
    rows = []
    for r in data.runs:
        rows.append(
            [
                f'<span class="swatch" style="background:{esc(r.color)}"></span>{esc(r.label)}',
                *r.summary_cells(esc),
                esc(len(r.notes)),
            ]
        )
    return _table(
        [
            "run",
            "id",
            "project",
            "status",
            "steps",
            "last KL (kl_mean)",
            "last k3",
            "last reward",
            "alerts",
            "notes",
        ],
        rows,
    )


def _compare_figures(data: ReportData) -> list[tuple[str, Any]]:
    """The Compare page's charts for these runs and range: [(title, figure dict)]."""
    from monitor.charts.panel import build_panel, panel_specs
    from monitor.charts.view import View
    from monitor.report.panel_source import StorePanelSource

    assert data.db is not None
    view = View(runs=tuple(data.run_ids), start=data.start, end=data.end)
    specs = panel_specs(view, {})
    out = build_panel(
        StorePanelSource(data.db),
        view,
        specs,
        labels={r.info.id: r.label for r in data.runs},
        max_buckets=600,
    )
    return [(spec.title, out.figures[spec.key]) for spec in specs if spec.key in out.figures]


def _static_charts(data: ReportData) -> list[tuple[str, bytes]]:
    from monitor.charts.png import frontier_png, has_data, time_chart_png
    from monitor.charts.specs import CHARTS, FRONTIER_X_TITLE

    out = []
    for spec in CHARTS:
        if spec.kind == "frontier":
            if has_data(data.runs, ["kl_mean", "reward_mean"]):
                out.append(
                    (
                        spec.title,
                        frontier_png(data.runs, spec.title, spec.y_title, FRONTIER_X_TITLE),
                    )
                )
            continue
        cols = [ln.column for ln in spec.lines]
        if not has_data(data.runs, cols):
            continue
        lines = [(ln.column, ln.label, ln.dash) for ln in spec.lines]
        out.append(
            (spec.title, time_chart_png(spec.title, spec.y_title, lines, data.runs, band=spec.band))
        )
    return out


def _charts(data: ReportData, plotly: _Plotly) -> str:
    try:
        figures = _compare_figures(data)
    except (ImportError, AttributeError, TypeError) as exc:  # the panel's API moved
        log.warning("report: dashboard charts unavailable (%s); drawing static charts", exc)
        return "".join(_img(png, title) for title, png in _static_charts(data))
    parts = []
    for _title, fig in figures:
        traces = fig["data"] if isinstance(fig, dict) else fig.data
        if not traces:
            continue  # a quantity none of these runs logged
        parts.append(plotly.div(fig))
    return "".join(parts)


def _alerts(data: ReportData, plotly: _Plotly) -> str:
    from monitor.charts.figures import alert_timeline

    parts = []
    for r in data.runs:
        parts.append(f"<h3>{esc(r.label)}</h3>")
        if r.events.empty:
            parts.append("<p>No alert fired in this range.</p>")
            continue
        parts.append(plotly.div(alert_timeline(r.events, r.last_step)))
        rows = []
        for e in r.events.itertuples(index=False):
            rows.append(event_cells(e, esc, _severity))
        parts.append(_table(EVENT_TABLE_HEADERS, rows))
    return "".join(parts)


def _severity(severity: Any) -> str:
    return f'<span class="sev-{esc(severity)}">{esc(severity)}</span>'


def _annotations(data: ReportData) -> str:
    rows = [
        [esc(r.label), esc(n.step), esc(n.text), esc(n.author or "-"), esc(_when(n.created_at))]
        for r in data.runs
        for n in r.notes
    ]
    if not rows:
        return "<p>No annotations in this range.</p>"
    return _table(["run", "step", "note", "author", "written"], rows)


def _token_html(sample: Any) -> str:
    from monitor.charts.tables import token_cells

    cells = token_cells(sample.tokens, sample.policy_logprobs, sample.ref_logprobs)
    return "".join(
        f'<span class="tok" style="background:{esc(c.color)}" '
        f'title="{esc(f"log p {c.logp:.3f}, log q {c.logq:.3f}, log p - log q {c.diff:+.3f}")}">'
        f"{esc(c.text)}</span>"
        for c in cells
    )


def _samples(data: ReportData) -> str:
    from monitor.charts.tables import token_cells
    from monitor.report.data import carrier_tokens

    parts = [
        '<p class="legend-scale">Token colour: log p - log q of the policy against the '
        'reference: <span style="background:rgba(214,39,40,0.8)">policy far more likely</span>'
        '<span style="background:rgba(214,39,40,0.2)">more likely</span>'
        '<span style="background:rgba(31,119,180,0.2)">less likely</span>'
        '<span style="background:rgba(31,119,180,0.8)">far less likely</span> '
        "(hover a token for its numbers).</p>"
    ]
    for r in data.runs:
        parts.append(f"<h3>{esc(r.label)}</h3>")
        if not r.samples:
            parts.append("<p>No stored samples in this range.</p>")
            continue
        for s in r.samples:
            reward = "" if s.reward is None else f", reward {describe_value(s.reward)}"
            parts.append(
                f"<p><b>step {esc(s.step)}</b>: sequence KL {esc(describe_value(s.kl_seq))} "
                f"nats{esc(reward)} ({esc(s.kind)} sample, sequence {esc(s.seq_index)})</p>"
            )
            if s.prompt:
                parts.append(f'<p class="prompt">prompt: {esc(s.prompt)}</p>')
            parts.append(f'<div class="tokens">{_token_html(s)}</div>')
            top = carrier_tokens(token_cells(s.tokens, s.policy_logprobs, s.ref_logprobs))
            rows = [
                [esc(tok), esc(uses), esc(f"{lp:.3f}"), esc(f"{lq:.3f}"), esc(f"{total:+.3f}")]
                for tok, uses, lp, lq, total in top
            ]
            parts.append(
                _table(["token", "uses", "mean log p", "mean log q", "sum of log p - log q"], rows)
            )
    return "".join(parts)


def _config(data: ReportData) -> str:
    table = data.config_table()
    labels = [r.label for r in data.runs]
    rows, classes = [], []
    for rec in table.itertuples(index=False):
        values = list(rec)
        field = values[0]
        cells = [esc(field), *(esc(v) for v in values[1 : 1 + len(labels)])]
        rows.append(cells)
        classes.append("differs" if values[-1] else "")
    note = "<p>Rows where the runs differ are highlighted.</p>" if any(classes) else ""
    return note + _table(["field", *(esc(lb) for lb in labels)], rows, classes)


def _vocabulary(data: ReportData) -> str:
    from monitor.charts.tables import CHANGE_HEADERS
    from monitor.report.data import NO_LEDGER, VOCAB_HEADERS, VOCAB_INTRO, vocabulary_rows

    def token(text: str, special: bool) -> str:
        return f'<code class="{"tok-special" if special else "tok"}">{esc(text)}</code>'

    parts = [f"<p>{esc(VOCAB_INTRO)}</p>"]
    for r in data.runs:
        parts.append(f"<h3>{esc(r.label)}</h3>")
        if r.vocabulary.empty:
            parts.append(f"<p>{esc(NO_LEDGER)}</p>")
            continue
        top, grew = vocabulary_rows(r, token, esc)
        parts.append(_table(list(VOCAB_HEADERS), top))
        if grew:
            parts.append(_table([esc(h) for _, h in CHANGE_HEADERS], grew))
    return "".join(parts)


def _heatmaps(data: ReportData, plotly: _Plotly) -> str:
    from monitor.charts.figures import histogram_heatmap
    from monitor.divergence import HIST_EDGES

    parts = []
    for r in data.runs:
        if not len(r.hist_steps):
            continue
        fig = histogram_heatmap(r.hist_steps, r.hist_counts, HIST_EDGES)
        fig.update_layout(title={"text": f"{esc(r.label)}: token log-ratio distribution"})
        parts.append(plotly.div(fig))
    return "".join(parts) or "<p>No token histograms in this range.</p>"


def render_html(data: ReportData, *, progress: Progress | None = None) -> str:
    """The whole report as one HTML document."""
    plotly = _Plotly()
    sections: list[tuple[str, Callable[[], str]]] = [
        ("Runs", lambda: _summary(data)),
        ("Charts", lambda: _charts(data, plotly)),
        ("Alerts", lambda: _alerts(data, plotly)),
        ("Annotations", lambda: _annotations(data)),
        ("Worst samples (where alerts fired, then largest |KL|)", lambda: _samples(data)),
        ("Drift vocabulary", lambda: _vocabulary(data)),
        ("Token log-ratio distribution", lambda: _heatmaps(data, plotly)),
        ("Configuration side by side", lambda: _config(data)),
    ]
    body = []
    for title, make in sections:
        body.append(f"<h2>{esc(title)}</h2>{make()}")
        if progress:
            progress(1)
    meta = (
        f"{esc(data.range_text())} · generated {esc(_when(data.generated_at))} by klmon "
        f"{esc(__version__)} · KL in nats (kl_mean: per-sequence sum of log p - log q, "
        "batch mean; k3: per-token, always >= 0)"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(data.title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(data.title)}</h1><p class="meta">{meta}</p>{"".join(body)}'
        "</body></html>\n"
    )


#: Progress steps ``render_html`` reports.
HTML_STEPS = 8
