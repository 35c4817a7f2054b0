"""Post-mortem reports: runs side by side over a step range, as one self-contained HTML file
(opens offline) or Markdown with PNG charts next to it.

Example::

    from monitor.report import collect, render_html, render_markdown
    data = collect(db, "ppo-healthy,ppo-kl-spike", start=200, end=300)
    Path("report.html").write_text(render_html(data), encoding="utf-8")
    render_markdown(data, "incident/report.md")   # + incident/report-kl.png, ...
"""

from monitor.report.data import ReportData, RunSection, collect, parse_run_refs
from monitor.report.html import HTML_STEPS, render_html
from monitor.report.markdown import MARKDOWN_STEPS, render_markdown

__all__ = [
    "HTML_STEPS",
    "MARKDOWN_STEPS",
    "ReportData",
    "RunSection",
    "collect",
    "parse_run_refs",
    "render_html",
    "render_markdown",
]
