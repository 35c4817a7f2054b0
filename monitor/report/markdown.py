"""The post-mortem report as Markdown with PNG charts written next to it, for pasting into
an incident doc (the images travel as files: ``report.md`` refers to ``report-kl.png``...).

User text is escaped for Markdown and for the HTML most renderers allow inside it, so a
run name like ``<script>`` or ``a|b`` shows literally and never breaks a table; tokens are
code spans whose fences are longer than any backtick run in them, so no token (double
backticks included) can close its span and let the rest through as live HTML.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor import __version__
from monitor.formats import UTC_MINUTES, utc_text
from monitor.report.data import (
    EVENT_TABLE_HEADERS,
    ReportData,
    describe_value,
    event_cells,
)

Progress = Callable[[int], None]

#: Inline Markdown punctuation; md() output never starts a line, so list and heading
#: markers (-, +, #, digits) need no escape.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(value: Any) -> str:
    """Text for Markdown (tables included): HTML characters as entities, Markdown
    punctuation backslash-escaped, line breaks as spaces."""
    text = "" if value is None else str(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return re.sub(r"[\r\n]+", " ", text)


def md_code(value: Any) -> str:
    """Inline code that shows any content literally: the fence is one backtick longer than
    the longest run of backticks inside (so no run inside can close it), with a space inside
    each fence when the content starts or ends with a backtick or a space (CommonMark strips
    exactly one). Pipes are escaped for tables, line breaks become spaces."""
    text = re.sub(r"[\r\n]+", " ", "" if value is None else str(value)).replace("|", "\\|")
    if not text:
        return ""
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.strip(" ") and (text[0] in "` " or text[-1] in "` ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _when(ts: float | None) -> str:
    return utc_text(ts, UTC_MINUTES)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "chart"


def chart_pngs(data: ReportData) -> list[tuple[str, str, bytes]]:
    """(key, title, PNG) of every chart with data, then the alert timeline."""
    from monitor.charts.png import alert_timeline_png, frontier_png, has_data, time_chart_png
    from monitor.charts.specs import CHARTS, FRONTIER_X_TITLE

    out = []
    for spec in CHARTS:
        if spec.kind == "frontier":
            if has_data(data.runs, ["kl_mean", "reward_mean"]):
                png = frontier_png(data.runs, spec.title, spec.y_title, FRONTIER_X_TITLE)
                out.append((spec.key, spec.title, png))
            continue
        if not has_data(data.runs, [ln.column for ln in spec.lines]):
            continue
        lines = [(ln.column, ln.label, ln.dash) for ln in spec.lines]
        png = time_chart_png(spec.title, spec.y_title, lines, data.runs, band=spec.band)
        out.append((spec.key, spec.title, png))
    out.append(("alerts", "Alert timeline", alert_timeline_png(data.runs)))
    return out


def render_markdown(
    data: ReportData, path: str | Path, *, progress: Progress | None = None
) -> list[Path]:
    """Write the report to ``path`` and its charts next to it (``<stem>-<chart>.png``).
    Returns the files written, the Markdown first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda n: None)
    lines: list[str] = [f"# {md(data.title)}", ""]
    lines.append(
        f"{md(data.range_text())} · generated {_when(data.generated_at)} by klmon {__version__}"
        " · KL in nats (kl\\_mean: per-sequence sum of log p − log q, batch mean; k3: per"
        " token, always ≥ 0)"
    )
    lines += ["", "## Runs", ""]
    rows = []
    for r in data.runs:
        rows.append([md(r.label), *r.summary_cells(md)])
    lines.append(
        _table(
            [
                "run",
                "id",
                "project",
                "status",
                "steps",
                "last KL",
                "last k3",
                "last reward",
                "alerts",
            ],
            rows,
        )
    )
    tick(1)

    written = [path]
    lines += ["## Charts", ""]
    for key, title, png in chart_pngs(data):
        name = f"{path.stem}-{_slug(key)}.png"
        (path.parent / name).write_bytes(png)
        written.append(path.parent / name)
        lines += [f"![{md(title)}]({name})", ""]
    tick(1)

    lines += ["## Alerts", ""]
    rows = [
        [md(r.label), *event_cells(e, md)]
        for r in data.runs
        for e in r.events.itertuples(index=False)
    ]
    if rows:
        lines.append(_table(["run", *EVENT_TABLE_HEADERS], rows))
    else:
        lines += ["No alert fired in this range.", ""]
    tick(1)

    lines += ["## Annotations", ""]
    rows = [
        [md(r.label), str(n.step), md(n.text), md(n.author or "-"), _when(n.created_at)]
        for r in data.runs
        for n in r.notes
    ]
    lines.append(
        _table(["run", "step", "note", "author", "written"], rows)
        if rows
        else "No annotations in this range.\n"
    )
    tick(1)

    lines += [
        "## Worst samples",
        "",
        "Per run: the sample at each step where an alert "
        "fired, then those of largest |KL|; below each, the tokens that carry its KL.",
        "",
    ]
    from monitor.charts.tables import token_cells
    from monitor.report.data import carrier_tokens

    for r in data.runs:
        lines += [f"### {md(r.label)}", ""]
        if not r.samples:
            lines += ["No stored samples in this range.", ""]
        for s in r.samples:
            reward = "" if s.reward is None else f", reward {describe_value(s.reward)}"
            lines.append(
                f"**Step {s.step}**: sequence KL {describe_value(s.kl_seq)} nats{reward} "
                f"({md(s.kind)} sample)"
            )
            lines.append("")
            if s.prompt:
                lines += [f"> prompt: {md(s.prompt)}", ">"]
            cells = token_cells(s.tokens, s.policy_logprobs, s.ref_logprobs)
            response = " ".join(c.text for c in cells) if s.tokens else (s.response or "")
            lines += [f"> {md(response)}", ""]
            rows = [
                [md_code(tok), str(uses), f"{lp:.3f}", f"{lq:.3f}", f"{total:+.3f}"]
                for tok, uses, lp, lq, total in carrier_tokens(cells)
            ]
            lines.append(
                _table(["token", "uses", "mean log p", "mean log q", "sum of log p − log q"], rows)
            )
    tick(1)

    lines += _vocabulary(data)
    tick(1)

    lines += ["## Configuration side by side", "", "Rows where the runs differ are in bold.", ""]
    table = data.config_table()
    labels = [r.label for r in data.runs]
    rows = []
    for rec in table.itertuples(index=False, name=None):
        field, values, differs = rec[0], rec[1 : 1 + len(labels)], rec[-1]
        cells = [md(field), *(md(v) for v in values)]
        if differs:
            cells = [f"**{c}**" if c else c for c in cells]
        rows.append(cells)
    lines.append(_table(["field", *(md(lb) for lb in labels)], rows))
    tick(1)

    path.write_text("\n".join(lines), encoding="utf-8")
    return written


def _vocabulary(data: ReportData) -> list[str]:
    """The drift vocabulary section: per run, its top tokens and what grew."""
    from monitor.charts.tables import CHANGE_HEADERS
    from monitor.report.data import NO_LEDGER, VOCAB_HEADERS, VOCAB_INTRO, vocabulary_rows

    def token(text: str, special: bool) -> str:
        return md_code(text) + (" (special)" if special else "")

    lines = ["## Drift vocabulary", "", VOCAB_INTRO, ""]
    for r in data.runs:
        lines += [f"### {md(r.label)}", ""]
        if r.vocabulary.empty:
            lines += [NO_LEDGER, ""]
            continue
        top, grew = vocabulary_rows(r, token, str)
        lines.append(_table(list(VOCAB_HEADERS), top))
        if grew:
            lines.append(_table([h for _, h in CHANGE_HEADERS], grew))
    return lines


#: Progress steps ``render_markdown`` reports.
MARKDOWN_STEPS = 7
