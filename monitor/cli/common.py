"""Pieces every command shares: the --db option, opening the database, ``--json`` output
and text for terminal tables."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from monitor.config import db_url
from monitor.formats import json_safe

if TYPE_CHECKING:
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
    from monitor.store import Database  # here: `klmon runs` answers without SQLAlchemy

    return Database.open(db_url(url), check=check, create=create)


def json_value(value: Any) -> Any:
    """:func:`monitor.formats.json_safe`, element by element inside lists and tuples."""
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return json_safe(value)


def json_records(df: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as dicts of JSON-safe values."""
    return [{k: json_value(v) for k, v in rec.items()} for rec in df.to_dict(orient="records")]


def echo_records(records: list[dict[str, Any]], *, as_json: bool, empty: str) -> bool:
    """With ``--json`` print the records as a JSON array; else print ``empty`` when there are
    none. True when that was all there is to print."""
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return True
    if not records:
        click.echo(empty)
        return True
    return False


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
