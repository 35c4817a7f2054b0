"""Pieces every command shares: the --db option and opening the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from monitor.config import db_url
from monitor.store.database import Database

F = TypeVar("F", bound=Callable[..., Any])


def db_option(func: F) -> F:
    """``--db URL`` on a command; falls back to KLMON_DB_URL, then sqlite:///klmon.db."""
    return click.option(
        "--db",
        "db",
        metavar="URL",
        default=None,
        help="Database URL (default: $KLMON_DB_URL or sqlite:///klmon.db).",
    )(func)


def open_db(url: str | None, *, check: bool = True, create: bool = False) -> Database:
    """The database at ``url``; ``create``: an empty one gets the schema (writing commands)."""
    return Database.open(db_url(url), check=check, create=create)
