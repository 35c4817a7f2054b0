"""`klmon report`: a post-mortem report of runs side by side (HTML or Markdown)."""

from __future__ import annotations

from pathlib import Path

import click

from monitor.cli.common import db_option, open_db

_SUFFIX_FORMAT = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}


def _format(output: str | None, fmt: str | None) -> str:
    """The report format from --format and the output's extension; a clear error when the
    extension names another format (a .pdf would otherwise hold HTML)."""
    suffix = Path(output).suffix.lower() if output else ""
    implied = _SUFFIX_FORMAT.get(suffix)
    if suffix and implied is None:
        raise click.BadParameter(
            f"{output} ends in {suffix}: klmon writes reports as .html (print it to PDF from a "
            "browser) or .md",
            param_hint="'-o' / '--output'",
        )
    if fmt is not None and implied is not None and implied != fmt:
        raise click.BadParameter(
            f"--format {fmt} but {output} ends in {suffix}", param_hint="'--format'"
        )
    return fmt or implied or "html"


@click.command("report")
@db_option
@click.option(
    "--runs",
    "runs",
    required=True,
    metavar="A,B,...",
    help="Runs to compare, by id, name or project/name, comma-separated.",
)
@click.option("--from", "start", type=click.IntRange(min=0), default=None, help="First step.")
@click.option("--to", "end", type=click.IntRange(min=0), default=None, help="Last step.")
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Output file (default: report.html, or report.md with --format md).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "md"]),
    default=None,
    help="html: one self-contained file that opens offline; md: Markdown with PNG charts "
    "written next to it. Default: from the output's extension, else html.",
)
@click.option("--title", default=None, help="Report title (default: the run names).")
def report_cmd(
    db: str | None,
    runs: str,
    start: int | None,
    end: int | None,
    output: str | None,
    fmt: str | None,
    title: str | None,
) -> None:
    """Write a post-mortem report: the compare charts, the alert timeline, the worst samples
    with their tokens coloured by log p - log q, annotations, and each run's config side by
    side with the differences highlighted.

    \b
    Example:
      klmon report --runs ppo-healthy,ppo-kl-spike --from 200 --to 300 -o incident.html
      klmon report --runs 3,7 --format md -o incident/report.md   # + incident/report-*.png
    """
    from monitor.report import (
        HTML_STEPS,
        MARKDOWN_STEPS,
        collect,
        render_html,
        render_markdown,
    )

    fmt = _format(output, fmt)
    path = Path(output or ("report.md" if fmt == "md" else "report.html"))
    database = open_db(db)
    data = collect(database, runs, start=start, end=end, title=title)
    empty = [r.label for r in data.runs if r.series.empty]
    if len(empty) == len(data.runs):
        raise click.ClickException(
            f"no steps of {', '.join(empty)} in {data.range_text()}: nothing to report "
            "(check --from/--to; `klmon runs` shows each run's last step)"
        )
    if empty:
        click.echo(f"warning: no steps of {', '.join(empty)} in {data.range_text()}", err=True)
    steps = 1 + (MARKDOWN_STEPS if fmt == "md" else HTML_STEPS)
    with click.progressbar(length=steps, label=f"rendering {path}", width=30) as bar:
        bar.update(1)
        if fmt == "md":
            files = render_markdown(data, path, progress=bar.update)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_html(data, progress=bar.update), encoding="utf-8")
            files = [path]
    size = sum(f.stat().st_size for f in files)
    extra = f" and {len(files) - 1} PNG charts next to it" if len(files) > 1 else ""
    click.echo(
        f"wrote {path}{extra} ({size / 1e6:.1f} MB): {', '.join(r.label for r in data.runs)}, "
        f"{data.range_text()}"
    )
