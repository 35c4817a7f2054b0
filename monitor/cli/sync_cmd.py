"""`klmon sync`: replay the spool files that crashed training processes left behind."""

from __future__ import annotations

import click

from monitor.cli.common import db_option, open_db
from monitor.ingest.spool import (
    ENV_SPOOL_DIR,
    SpoolRecord,
    dead_letter_files,
    iter_records,
    spool_dir,
)
from monitor.ingest.sync import sync_spool


@click.command("sync")
@click.option(
    "--spool-dir",
    "directory",
    metavar="DIR",
    default=None,
    help=f"Spool directory (default: ${ENV_SPOOL_DIR} or ~/.cache/klmon/spool).",
)
@db_option
@click.option("--keep", is_flag=True, help="Leave replayed files in place (default: delete).")
@click.option("--dry-run", is_flag=True, help="Read and report the files; write nothing.")
def sync_cmd(directory: str | None, db: str | None, keep: bool, dry_run: bool) -> None:
    """Replay spool files of training processes that died before the database had all their
    steps. Idempotent: steps already stored are left alone; a step stored with a different
    payload is reported as a conflict and never overwritten. Damaged records are reported and
    skipped (the file is renamed *.corrupt); a record the database refuses is kept in a
    dead-letter file (*.klspool-dead) and the rest goes on; files of live processes are
    skipped.

    \b
    Example:
      klmon sync --spool-dir ~/.cache/klmon/spool --db postgresql://klmon@db-host/klmon
    """
    where = spool_dir(directory)
    reports = sync_spool(open_db(db), where, keep=keep, dry_run=dry_run)
    for path in dead_letter_files(where):
        n = sum(1 for r in iter_records(path) if isinstance(r, SpoolRecord))
        click.echo(f"{path.name}: {n} records the database refused, kept for inspection")
    if not reports:
        click.echo(f"{where}: no spool files")
        return
    for r in reports:
        click.echo(r.describe())
    done = [r for r in reports if r.action != "skipped"]
    new = sum(r.inserted for r in done)
    stored = sum(r.duplicates + r.already_committed for r in done)
    conflicts = sum(len(r.conflicts) for r in done)
    damaged = sum(len(r.corrupt) for r in reports)
    dead = sum(r.dead_letter for r in reports)
    verb = "read" if dry_run else "replayed"
    click.echo(
        f"{verb} {len(done)} of {len(reports)} files: {new} steps new, {stored} already "
        f"stored, {conflicts} conflicts, {damaged} damaged records skipped, {dead} records "
        "refused by the database (kept in *.klspool-dead files)"
    )
