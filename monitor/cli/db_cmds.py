"""`klmon db ...`: create, upgrade and inspect the schema; compact stored samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from monitor.cli.common import db_option, open_db
from monitor.store import current_revision, head_revision, upgrade

if TYPE_CHECKING:
    from monitor.store import Database


@click.group("db")
def db_group() -> None:
    """Manage the database: its schema and the space samples take.

    \b
    Example:
      klmon db upgrade --db postgresql://klmon@db-host/klmon
    """


@db_group.command("upgrade")
@db_option
def db_upgrade(db: str | None) -> None:
    """Create the schema, or upgrade it to this version of klmon.

    \b
    Example:
      klmon db upgrade --db sqlite:///klmon.db
    """
    database = open_db(db, check=False)
    with database.translate_errors():
        before = upgrade(database.engine)  # read under the upgrade lock
        after = current_revision(database.engine)
    if before == after:
        click.echo(f"{database.safe_url}: schema already at {after}")
    else:
        click.echo(f"{database.safe_url}: schema upgraded {before or '(empty)'} -> {after}")


@db_group.command("current")
@db_option
def db_current(db: str | None) -> None:
    """Print the schema revision of the database (and the one klmon needs).

    \b
    Example:
      klmon db current
    """
    database = open_db(db, check=False)
    with database.translate_errors():
        current = current_revision(database.engine)
    head = head_revision()
    state = "up to date" if current == head else "run `klmon db upgrade`"
    click.echo(f"{current or '(empty)'} (head {head}: {state})")


@db_group.command("compact")
@db_option
@click.option(
    "--run",
    "runs",
    multiple=True,
    metavar="RUN",
    help="Run id, name or project/name (repeatable; default: every run).",
)
@click.option(
    "--retention",
    metavar="SPEC",
    default=None,
    help="Which steps keep samples, e.g. 'recent=100,top=32,around=4' "
    "(default: $KLMON_SAMPLE_RETENTION or those values).",
)
@click.option("--dry-run", is_flag=True, help="Report what would be removed; delete nothing.")
@click.option(
    "--vacuum",
    is_flag=True,
    help="Then give the freed space back to the operating system (SQLite: VACUUM of the "
    "file, writers wait; PostgreSQL: VACUUM FULL of the samples table, its readers and "
    "writers wait).",
)
def db_compact(
    db: str | None, runs: tuple[str, ...], retention: str | None, dry_run: bool, vacuum: bool
) -> None:
    """Drop the drill-down samples of older steps that the retention policy does not keep.

    Every step of the last RECENT steps keeps its samples; further back every 2nd, then
    every 4th, 8th... step; the steps around alerts and the highest-KL steps always. Step
    rows, histograms and metrics are never touched. Freed space is reused by new rows;
    --vacuum gives it back to the operating system.

    \b
    Example:
      klmon db compact --run ppo-beta0.05 --dry-run
      klmon db compact --vacuum
    """
    from monitor.store import SampleRetention, compact_samples, resolve_run

    if dry_run and vacuum:
        raise click.UsageError("--vacuum gives back what is deleted: --dry-run deletes nothing")
    database = open_db(db)
    policy = SampleRetention.from_env() if retention is None else SampleRetention.parse(retention)
    if not policy.enabled:
        click.echo("sample retention is off: nothing to compact")
        if vacuum:
            _vacuum(database)
        return
    with database.translate_errors():
        ids = [resolve_run(database, r).id for r in runs] if runs else None
        results = compact_samples(database, policy, run_ids=ids, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for r in results:
        if r.rows_removed:
            click.echo(
                f"run {r.run_id}: {verb} {r.rows_removed} samples at {r.steps_removed} steps "
                f"({_size(r.bytes_removed)}); {r.steps_kept} steps keep theirs"
            )
    rows = sum(r.rows_removed for r in results)
    size = sum(r.bytes_removed for r in results)
    click.echo(f"{len(results)} run(s): {verb} {rows} samples, {_size(size)} of sample data")
    if vacuum:
        _vacuum(database)


def _vacuum(database: Database) -> None:
    from monitor.store import reclaim_space

    what, waiting = (
        ("database file", "writers") if database.is_sqlite else ("samples table", "its users")
    )
    click.echo(f"vacuuming the {what} ({waiting} wait meanwhile) ...")
    before, after = reclaim_space(database)
    click.echo(f"{what}: {_size(before)} -> {_size(after)}")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
