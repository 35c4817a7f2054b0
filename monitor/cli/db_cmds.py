"""`klmon db ...`: create, upgrade and inspect the schema."""

from __future__ import annotations

import click

from monitor.cli.common import db_option, open_db
from monitor.store import current_revision, head_revision, upgrade


@click.group("db")
def db_group() -> None:
    """Manage the database schema.

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
