"""`klmon report`: one self-contained HTML file (no external script or style, user text
escaped, the alert, the sample tokens, the config differences) and Markdown with PNG charts
that exist and are referenced."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from sqlalchemy import LargeBinary, bindparam, text

from monitor.cli import main
from monitor.demo import build_demo
from monitor.formats import show_token
from monitor.report import collect, parse_run_refs, render_html, render_markdown
from monitor.report.markdown import md_code
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.sample_codec import encode_sample

EVIL = "<script>alert('x')</script>|*evil*"
EVIL_HTML = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;|*evil*"
EXTERNAL = re.compile(
    r"<script[^>]*\bsrc\s*=|<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//|@import|url\(\s*[\"']?(https?:)?//",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's runs (60 steps each) with alerts evaluated; the spike run renamed to a
    hostile name."""
    from monitor.alerts import AlertEngine, AlertSettings, load_rules

    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'demo.db'}"
    build_demo(url, steps=60)
    db = Database.open(url)
    AlertEngine(db, load_rules(), settings=AlertSettings(), senders={}).evaluate()
    with db.begin() as conn:
        conn.execute(text("UPDATE runs SET name = :n WHERE name = 'ppo-kl-spike'"), {"n": EVIL})
    db.dispose()
    return url


def _ids(url: str) -> dict[str, int]:
    db = Database.open(url)
    with db.begin() as conn:
        rows = conn.execute(text("SELECT name, id FROM runs")).all()
    db.dispose()
    return {name: int(i) for name, i in rows}


def test_parse_run_refs() -> None:
    assert parse_run_refs(" 3, ppo-healthy ,3,") == ["3", "ppo-healthy"]
    with pytest.raises(ValueError, match="at least one run"):
        parse_run_refs(" , ")


def test_html_report_is_self_contained_and_escaped(demo_db: str, tmp_path: Path) -> None:
    ids = _ids(demo_db)
    out = tmp_path / "report.html"
    refs = f"ppo-healthy,{ids[EVIL]},ppo-ref-mismatch"
    result = CliRunner().invoke(main, ["report", "--db", demo_db, "--runs", refs, "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")

    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert page.count("plotly.js v") == 1  # the library, inlined once
    assert page.count("Plotly.newPlot") >= 8  # the compare charts and the timelines

    # each run's name, escaped; the hostile one never raw
    for name in ("ppo-healthy", "ppo-ref-mismatch"):
        assert name in page
    assert EVIL_HTML in page
    assert "<script>alert(" not in page

    # the alert that fired on the reference mismatch, with its message
    assert "negative-kl" in page and "stayed below zero" in page
    # the annotation
    assert "vLLM sampler redeployed" in page

    # the sample tokens, coloured, of a stored sample
    db = Database.open(demo_db)
    data = collect(db, refs)
    sample = data.runs[0].samples[0]
    stored = read_samples(db, sample.run_id, sample.step)
    db.dispose()
    assert any(s.id == sample.id for s in stored)
    spans = re.findall(
        r'<span class="tok" style="background:[^"]+" title="[^"]+">([^<]*)</span>', page
    )
    assert spans[: len(sample.tokens)] == sample.tokens

    # config side by side, differences highlighted
    assert '<tr class="differs"><td>config.sampler_temperature</td>' in page
    assert '<tr class="differs"><td>config.learning_rate</td>' in page


def test_html_report_step_range(demo_db: str) -> None:
    db = Database.open(demo_db)
    data = collect(db, "ppo-ref-mismatch", start=40, end=50)
    page = render_html(data)
    db.dispose()
    run = data.runs[0]
    assert run.first_step == 40 and run.last_step == 50
    assert all(40 <= s.step <= 50 for s in run.samples)
    assert run.series["step"].min() >= 40 and run.series["step_end"].max() <= 50
    assert "steps 40 to 50" in page


@pytest.mark.parametrize(("start", "end"), [(None, None), (20, 50)])
def test_html_report_charts_are_the_compare_pages(
    demo_db: str, start: int | None, end: int | None
) -> None:
    """The report reads the store itself (no dashboard import), yet draws exactly the
    figures the Compare page draws from the dashboard's cached reads: lines, bands and the
    alert and note markers."""
    import json

    from monitor.charts.panel import build_panel, panel_specs
    from monitor.charts.view import View
    from monitor.dashboard.data import DashboardData
    from monitor.report.panel_source import StorePanelSource

    db = Database.open(demo_db)
    ids = sorted(_ids(demo_db).values())
    view = View(runs=tuple(ids), start=start, end=end)
    specs = panel_specs(view, {})
    labels = {i: f"run {i}" for i in ids}
    built = [
        build_panel(source, view, specs, labels=labels, max_buckets=600)
        for source in (DashboardData(db), StorePanelSource(db))
    ]
    markers = [
        (source.alert_markers(ids), source.note_markers(ids))
        for source in (DashboardData(db), StorePanelSource(db))
    ]
    db.dispose()
    assert not markers[0][0].empty and not markers[0][1].empty  # the demo has both
    assert markers[0][0].equals(markers[1][0]) and markers[0][1].equals(markers[1][1])
    dashboard, report = (json.dumps(b.figures, sort_keys=True, default=str) for b in built)
    assert dashboard == report
    assert built[0].empty == built[1].empty


def test_markdown_report_writes_referenced_pngs(demo_db: str, tmp_path: Path) -> None:
    out = tmp_path / "incident" / "report.md"
    refs = f"ppo-healthy,klmon-demo/{EVIL}"  # project/name: the name holds a slash
    result = CliRunner().invoke(
        main, ["report", "--db", demo_db, "--runs", refs, "--format", "md", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    doc = out.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc)
    assert len(images) >= 6 and "report-kl.png" in images and "report-alerts.png" in images
    for name in images:
        png = out.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(images)

    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert r"\|\*evil\*" in doc  # a pipe in a name never splits a table
    assert "kl-spike" in doc  # the alert on the spike run
    assert "data loader restarted" in doc  # its annotation


def test_render_markdown_progress_and_files(demo_db: str, tmp_path: Path) -> None:
    db = Database.open(demo_db)
    data = collect(db, "ppo-healthy")
    ticks = []
    files = render_markdown(data, tmp_path / "r.md", progress=ticks.append)
    db.dispose()
    assert files[0] == tmp_path / "r.md" and all(f.exists() for f in files)
    assert sum(ticks) >= 5


def test_unknown_run_is_a_clean_error(demo_db: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["report", "--db", demo_db, "--runs", "no-such-run", "-o", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 1
    assert "no run named 'no-such-run'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "r.pdf"], "ends in .pdf"),
        (["-o", "r.html", "--format", "md"], "--format md but"),
    ],
)
def test_output_that_names_another_format_is_refused(
    demo_db: str, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a if not a.startswith("r.") else str(tmp_path / a) for a in args]
    result = CliRunner().invoke(main, ["report", "--db", demo_db, "--runs", "ppo-healthy", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_range_without_steps_is_an_error_not_an_empty_report(tmp_path: Path) -> None:
    demo_db = f"sqlite:///{tmp_path / 'own.db'}"  # its own: steps are deleted below
    build_demo(demo_db, steps=60)
    out = tmp_path / "r.html"
    base = ["report", "--db", demo_db, "-o", str(out)]
    result = CliRunner().invoke(main, [*base, "--runs", "ppo-healthy", "--from", "5000"])
    assert result.exit_code == 1
    assert "no steps of ppo-healthy in steps 5000 to last" in result.output
    assert not out.exists()
    # one run without steps there: a warning, and the report of the other
    db = Database.open(demo_db)
    with db.begin() as conn:
        conn.execute(text("DELETE FROM steps WHERE run_id = :r AND step >= 30"),
                     {"r": _ids(demo_db)["ppo-healthy"]})  # fmt: skip
    db.dispose()
    result = CliRunner().invoke(
        main, [*base, "--runs", "ppo-healthy,ppo-reward-hacking", "--from", "40"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: no steps of ppo-healthy in steps 40 to last" in result.output
    assert out.exists()


#: Tokens that try to close their code span early and let the rest through as HTML.
HOSTILE_TOKENS = [
    "a``<img src=x onerror=alert(1)>``b",
    "``<img src=x onerror=alert(2)>",
    "`<b onmouseover=alert(3)>`",
    "x|<script>alert(4)</script>|",
    "\\`<iframe src=javascript:alert(5)>",
]

#: What CommonMark with GitHub tables may produce from the report, and nothing else.
ALLOWED_TAGS = {"h1", "h2", "h3", "p", "strong", "em", "code", "blockquote", "img", "br"}
ALLOWED_TAGS |= {"table", "thead", "tbody", "tr", "th", "td"}


def _render(markdown: str) -> str:
    """Markdown as a renderer that lets raw HTML through would show it (GitHub-style tables)."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.code: list[str] = []
        self._in_code = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        if tag == "code":
            self._in_code = True
            self.code.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "code":
            self._in_code = False

    def handle_data(self, data: str) -> None:
        if self._in_code:
            self.code[-1] += data


def _elements(html: str) -> _Elements:
    parser = _Elements()
    parser.feed(html)
    parser.close()
    return parser


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="`|\\<>&\"' \tab\r\n", min_size=1, max_size=12))
def test_md_code_span_holds_any_token(token: str) -> None:
    """In a table cell, a token renders as exactly one code element with its own text."""
    cell = _elements(_render(f"| t |\n|---|\n| {md_code(token)} |\n"))
    assert [t for t, _a in cell.tags if t not in ("table", "thead", "tbody", "tr", "th")] == [
        "td",
        "code",
    ]
    assert cell.code == [re.sub(r"[\r\n]+", " ", token)]  # line breaks shown as one space


def test_markdown_report_tokens_never_become_html(demo_db: str, tmp_path: Path) -> None:
    """A stored sample whose tokens hold backtick runs and HTML: the rendered report has
    only the report's own elements, and each token shows literally in a code span."""
    own = tmp_path / "hostile.db"
    shutil.copy(demo_db.removeprefix("sqlite:///"), own)
    url = f"sqlite:///{own}"
    db = Database.open(url)
    data = collect(db, "ppo-healthy")
    sample = data.runs[0].samples[0]
    tokens = [HOSTILE_TOKENS[i % len(HOSTILE_TOKENS)] for i in range(len(sample.policy_logprobs))]
    payload = encode_sample(
        sample.policy_logprobs,
        sample.ref_logprobs,
        prompt=sample.prompt,
        response=sample.response,
        tokens=tokens,
    )
    with db.begin() as conn:
        conn.execute(
            text("UPDATE samples SET payload = :p WHERE id = :i").bindparams(
                bindparam("p", type_=LargeBinary())
            ),
            {"p": payload, "i": sample.id},
        )
    db.dispose()
    out = tmp_path / "report.md"
    result = CliRunner().invoke(
        main, ["report", "--db", url, "--runs", "ppo-healthy", "--format", "md", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    page = _elements(_render(out.read_text(encoding="utf-8")))
    assert {t for t, _a in page.tags} <= ALLOWED_TAGS
    for tag, attrs in page.tags:
        names = {name for name, _v in attrs}
        if tag == "img":
            assert names == {"src", "alt"} and dict(attrs)["src"].endswith(".png")
        else:
            assert names <= {"style"}, (tag, attrs)  # table cell alignment at most
    # shown as text, whitespace made visible ('␣'), never as markup
    assert {show_token(t).text for t in HOSTILE_TOKENS} <= set(page.code)
