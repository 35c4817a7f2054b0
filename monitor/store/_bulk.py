"""The store's one bulk-insert helper, for both dialects.

Rows go through the driver's executemany with tuples (``exec_driver_sql``), several rows per
statement: SQLAlchemy Core inserts of dicts cost several times more, and per-statement
overhead dominates narrow rows. On PostgreSQL a large batch can go through COPY instead:
binary COPY straight into the table when the rows are known to be new, or COPY into a
temporary table and ``INSERT ... ON CONFLICT DO NOTHING`` from it when some may already be
stored (COPY itself cannot skip a row).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection

COPY_MIN_ROWS = 2000
"""Rows in one batch from which PostgreSQL callers use COPY instead of executemany."""

_ROWS_PER_STATEMENT = 30
_MAX_PARAMS = 999  # SQLite's historical limit on host parameters per statement
_PG_CACHED_PARAMS = 50
"""psycopg parses a statement's ``%s`` placeholders with a regex and caches the result only
for statements of at most 50 parameters (``psycopg._queries.MAX_CACHED_STATEMENT_PARAMS``):
a longer multi-row VALUES is parsed again at every call (the committer's CPU per step on
PostgreSQL: 0.358 ms with 30-row statements, 0.324 ms within the cache). PostgreSQL
statements stay within it."""


def insert_rows(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    key: Sequence[str] = (),
    copy: bool = False,
) -> int:
    """Insert ``rows`` (tuples in ``columns`` order) into ``table``; returns the rows
    inserted (as the driver counts them; never negative).

    ``key``: ``ON CONFLICT (key) DO NOTHING`` (a plain INSERT when empty). ``copy``: on
    PostgreSQL use COPY (ignored on SQLite)."""
    if not rows:
        return 0
    if copy and conn.dialect.name == "postgresql":
        if key:
            return _copy_via_temp(conn, table, columns, key, rows)
        _copy_binary(conn, table, columns, rows)
        return len(rows)
    sqlite = conn.dialect.name == "sqlite"
    ph = "?" if sqlite else "%s"
    one = f"({', '.join([ph] * len(columns))})"
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    tail = f" ON CONFLICT ({', '.join(key)}) DO NOTHING" if key else ""
    most = _MAX_PARAMS if sqlite else _PG_CACHED_PARAMS
    per = max(1, min(_ROWS_PER_STATEMENT, most // len(columns)))
    full = len(rows) // per * per
    inserted = 0
    if full:
        chain = itertools.chain.from_iterable
        flat = [tuple(chain(rows[i : i + per])) for i in range(0, full, per)]
        sql = head + ", ".join([one] * per) + tail
        inserted += max(conn.exec_driver_sql(sql, flat).rowcount, 0)
    if full < len(rows):
        inserted += max(conn.exec_driver_sql(head + one + tail, list(rows[full:])).rowcount, 0)
    return inserted


_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # binary COPY header: signature, flags, extension
_TRAILER = b"\xff\xff"
_FIXED = {"int4": ">i4", "int8": ">i8", "float8": ">f8"}


def _binary_block(rows: Sequence[tuple[Any, ...]], types: Sequence[str]) -> bytes | None:
    """The whole binary COPY stream of ``rows`` built a column at a time with numpy (a
    tenth of psycopg's ``write_row`` per row), when every value is not NULL, every number
    fits its column and each text column holds ASCII strings of one length (a step row:
    'ok' and its payload hash); None otherwise."""
    n = len(rows)
    columns = list(zip(*rows, strict=True))
    fields: list[tuple[str, str]] = [("count", ">i2")]
    values: list[np.ndarray] = []
    for i, (column, kind) in enumerate(zip(columns, types, strict=True)):
        if kind in _FIXED:
            array = np.array(column)  # ints stay ints (a float is never truncated); None: object
            if array.dtype.kind not in ("if" if kind == "float8" else "i"):
                return None
            if kind == "int4" and (array.min() < -(2**31) or array.max() >= 2**31):
                return None
            fmt = _FIXED[kind]
        elif kind == "text":
            try:
                ascii_text = "".join(column).isascii()  # TypeError: None or not a str
            except TypeError:
                return None
            size = len(column[0])
            if not (size and ascii_text and set(map(len, column)) == {size}):
                return None
            fmt = f"S{size}"
            array = np.array(column, dtype=fmt)
        else:
            return None
        fields += [(f"size{i}", ">i4"), (f"value{i}", fmt)]
        values.append(array)
    block = np.empty(n, dtype=np.dtype(fields))
    block["count"] = len(types)
    for i, array in enumerate(values):
        block[f"size{i}"] = block.dtype[f"value{i}"].itemsize
        block[f"value{i}"] = array
    return _SIGNATURE + block.tobytes() + _TRAILER


def _copy_binary(
    conn: Connection, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """PostgreSQL binary COPY inside the current transaction (rows known to be new)."""
    raw = conn.connection.driver_connection
    types = _pg_types(table, columns)
    with (
        raw.cursor() as cur,  # type: ignore[union-attr]
        cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        _write_rows(copy, rows, types)


def _write_rows(copy: Any, rows: Sequence[tuple[Any, ...]], types: list[str]) -> None:
    """The rows into a binary COPY: one block when ``_binary_block`` can build it."""
    block = _binary_block(rows, types)
    if block is not None:
        copy.write(block)
        return
    copy.set_types(types)
    for row in rows:
        copy.write_row(row)


def _copy_via_temp(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    key: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
) -> int:
    """COPY into a temporary table, then ``INSERT ... ON CONFLICT (key) DO NOTHING``: rows
    another writer already stored are skipped."""
    tmp = f"_klmon_in_{table}"
    names = ", ".join(columns)
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp} (LIKE {table}) ON COMMIT DELETE ROWS")
        # binary: a bytea (rollup stats) would otherwise travel as twice as many hex digits
        with cur.copy(f"COPY {tmp} ({names}) FROM STDIN (FORMAT BINARY)") as cp:
            _write_rows(cp, rows, _pg_types(table, columns))
        cur.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM {tmp} "
            f"ON CONFLICT ({', '.join(key)}) DO NOTHING"
        )
        inserted = max(cur.rowcount, 0)
        cur.execute(f"DELETE FROM {tmp}")
    finally:
        cur.close()
    return inserted


def _pg_types(table: str, columns: Sequence[str]) -> list[str]:
    from monitor.store.models import Base

    t = Base.metadata.tables[table]
    out = []
    for c in columns:
        name = type(t.c[c].type).__name__.lower()
        out.append(
            {
                "integer": "int4",
                "biginteger": "int8",
                "float": "float8",
                "string": "text",
                "text": "text",
                "boolean": "bool",
                "json": "json",
                "largebinary": "bytea",
            }[name]
        )
    return out
