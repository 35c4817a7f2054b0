"""Pieces every command shares: the --db option, opening the database, and text for
terminal tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from monitor.config import db_url
from monitor.store import Database

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


#: C0 and C1 control characters, DEL, Unicode line/paragraph separators, the bidi controls
#: that reorder what a terminal shows, and lone surrogates (which cannot be printed).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def cell(value: object) -> str:
    """``value`` as text for one cell of a terminal table: control characters shown escaped
    (``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u202e``, ``\\udcff``), so a stored name can
    neither start a forged row nor send escape sequences to the terminal. None is ``-``."""
    return "-" if value is None else _CONTROL.sub(_escape, str(value))
