"""`klmon import` and `klmon export`: existing training logs in, a run's step table out."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from monitor.cli.common import db_option, open_db
from monitor.errors import InvalidInput
from monitor.ingest.importers import DEFAULT_PROJECT, FORMATS, import_path, parse_map


class _Bars:
    """click progress bars on stderr, one per phase (read, write)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.phase: str | None = None
        self.bar: Any = None
        self.done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.done = phase, 0
            self.bar = click.progressbar(
                length=max(total, 1),
                label=self.labels.get(phase, phase),
                file=sys.stderr,
            )
            self.bar.__enter__()
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _parse_config(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--config {item!r}: expected KEY=VALUE, e.g. kl_coef=0.05")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=True, readable=True))
@click.option(
    "--project",
    default=DEFAULT_PROJECT,
    show_default=True,
    help="Project of the run the log goes into.",
)
@click.option("--run", "run_name", default=None, help="Run name (default: from the file name).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="Log format; auto detects it from the content.",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="COLUMN=QUANTITY",
    help="What a column means: a klmon quantity (kl_mean, k3, reward_mean, ...), "
    "step (the column holding the step), or - to keep it only as a metric. Repeatable.",
)
@click.option(
    "--step-column",
    default=None,
    metavar="NAME",
    help="The column holding the step (default: detected: step, global_step, "
    "trainer/global_step, _step, iteration, iter, update; epoch as a last resort; else the "
    "row order).",
)
@click.option(
    "--config",
    "config_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Add to the run config (VALUE parsed as JSON when it can be). Repeatable.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@db_option
def import_cmd(
    path: str,
    project: str,
    run_name: str | None,
    fmt: str,
    maps: tuple[str, ...],
    step_column: str | None,
    config_items: tuple[str, ...],
    quiet: bool,
    db: str | None,
) -> None:
    """Import an existing training log as a finished run, idempotently.

    PATH is a Hugging Face trainer_state.json (or a directory holding one: TRL PPO, GRPO,
    RLOO, DPO, ...), a JSONL / CSV / Parquet step table, a veRL console log, or a per-token
    JSONL (policy and reference log-probs per sequence) from which klmon computes its own
    summaries, or a Hugging Face / TRL console log (the Trainer's printed dicts). The format
    is detected from the content. Every source column is kept as a metric under its own
    name; columns whose meaning is known also fill klmon's step columns, and the summary
    says which columns were read as KL. Importing the same file again changes nothing;
    another file never goes into a run that holds one (under the default name it gets a run
    of its own). Unreadable lines are skipped and listed; a failed import leaves nothing.

    \b
    Examples:
      klmon import outputs/checkpoint-250/trainer_state.json --project grpo
      klmon import logs/ppo.jsonl --run ppo-manual --map kl_vs_ref=kl_mean
      klmon import train.log --format verl --config model=qwen2.5-7b
      klmon import grpo_stdout.log --run grpo-seed44
      klmon import metrics.csv --step-column update --map kl=k3
    """
    mapping = parse_map(maps)
    config = _parse_config(config_items)
    database = open_db(db, create=True)
    bars = None if quiet else _Bars({"read": "reading", "write": "writing"})
    try:
        report = import_path(
            database,
            path,
            project=project,
            name=run_name,
            fmt=None if fmt == "auto" else fmt,
            mapping=mapping,
            config=config,
            progress=bars,
            step_column=step_column,
        )
    finally:
        if bars:
            bars.close()
        database.dispose()
    for line in report.summary_lines():
        click.echo(line)


@click.command("export")
@click.argument("run")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="File to write: .csv, .jsonl or .parquet.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl", "parquet"]),
    default=None,
    help="Output format (default: from the file extension).",
)
@db_option
def export_cmd(run: str, output: str, fmt: str | None, db: str | None) -> None:
    """Write a run's step table: every quantity, every extra metric, one row per step.

    RUN is an id, a name or PROJECT/NAME. `klmon import` reads the file back into an
    identical run.

    \b
    Example:
      klmon export grpo/gemma3 -o gemma3.parquet
      klmon import gemma3.parquet --run gemma3-copy
    """
    from monitor.ingest.export import export_run  # `klmon import` does not load it

    database = open_db(db)
    try:
        report = export_run(database, run, output, fmt=fmt)
    finally:
        database.dispose()
    r = report.run
    click.echo(
        f"wrote {report.steps} steps x {report.columns} columns ({report.metrics} extra "
        f"metrics) of run {r.id} {r.project}/{r.name} to {report.path} ({report.format})"
    )
