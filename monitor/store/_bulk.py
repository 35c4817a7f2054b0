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

from monitor.store.tables import metadata

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
# NULL patterns past which a block is not worth building (each is one structured array)
_MAX_NULL_GROUPS = 64


def _binary_block(rows: Sequence[tuple[Any, ...]], types: Sequence[str]) -> bytes | None:
    """``column_block`` of rows given as tuples, when every value is not NULL."""
    columns = list(zip(*rows, strict=True))
    values: list[np.ndarray] = []
    for column, kind in zip(columns, types, strict=True):
        if kind in _FIXED:
            array = np.array(column)  # ints stay ints (a float is never truncated); None: object
        elif kind == "text":
            array = np.array(column, dtype=object)  # a None: not a str, no block
        else:
            return None
        values.append(array)
    return column_block(values, [None] * len(types), types)


def column_block(
    values: Sequence[np.ndarray],
    present: Sequence[np.ndarray | None],
    types: Sequence[str],
) -> bytes | None:
    """The whole binary COPY stream of rows given a column at a time, built with numpy (a
    tenth of psycopg's ``write_row`` per row); None when it cannot be (then rows go one by
    one): a number that does not fit its column, a text column whose values are not ASCII
    strings of one length (a step row: 'ok' and its payload hash), another type.

    ``values``: one array per column (int/float for int4, int8, float8; str objects for
    text); ``present``: per column, which rows have a value (None: all; the others are NULL,
    whatever their value in ``values``). Rows with the same NULL columns have one layout:
    each such group is one structured array, the groups in the order of their first row
    (COPY does not keep an order; a run's steps rarely have more than a few groups)."""
    n = len(values[0]) if values else 0
    if n == 0 or len(types) >= 63:
        return None
    arrays: list[tuple[str, np.ndarray]] = []
    for array, mask, kind in zip(values, present, types, strict=True):
        have = array if mask is None else array[mask]
        if kind in _FIXED:
            if array.dtype.kind not in ("if" if kind == "float8" else "i"):
                return None
            if kind == "int4" and len(have) and (have.min() < -(2**31) or have.max() >= 2**31):
                return None
            arrays.append((_FIXED[kind], array))
        elif kind == "text":
            try:
                ascii_text = "".join(have).isascii()  # TypeError: None or not a str
            except TypeError:
                return None
            sizes = set(map(len, have))
            if not ascii_text or len(sizes) > 1 or 0 in sizes:
                return None
            size = sizes.pop() if sizes else 1
            text = array if mask is None else np.where(mask, array, "")
            arrays.append((f"S{size}", np.array(text, dtype=f"S{size}")))
        else:
            return None
    groups = _null_groups(present, n)
    if len(groups) > _MAX_NULL_GROUPS:
        return None
    parts = [_SIGNATURE]
    for rows, nulls in groups:
        fields: list[tuple[str, str]] = [("count", ">i2")]
        for i, (fmt, _) in enumerate(arrays):
            fields.append((f"size{i}", ">i4"))
            if i not in nulls:
                fields.append((f"value{i}", fmt))
        block = np.empty(n if rows is None else len(rows), dtype=np.dtype(fields))
        block["count"] = len(types)
        for i, (_, array) in enumerate(arrays):
            if i in nulls:
                block[f"size{i}"] = -1
            else:
                block[f"size{i}"] = block.dtype[f"value{i}"].itemsize
                block[f"value{i}"] = array if rows is None else array[rows]
        parts.append(block.tobytes())
    parts.append(_TRAILER)
    return b"".join(parts)


def _null_groups(
    present: Sequence[np.ndarray | None], n: int
) -> list[tuple[np.ndarray | None, set[int]]]:
    """The rows of each NULL pattern (None: every row) and the columns NULL in it, in the
    order of each pattern's first row."""
    masks = [(i, m) for i, m in enumerate(present) if m is not None and not m.all()]
    if not masks:
        return [(None, set())]
    key = np.zeros(n, dtype=np.int64)
    for i, mask in masks:
        key |= (~mask).astype(np.int64) << i
    patterns, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    groups = []
    for g in np.argsort(first, kind="stable").tolist():
        pattern = int(patterns[g])
        nulls = {i for i in range(len(present)) if pattern >> i & 1}
        rows = None if len(patterns) == 1 else np.flatnonzero(inverse == g)
        groups.append((rows, nulls))
    return groups


def _copy_binary(
    conn: Connection, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """PostgreSQL binary COPY inside the current transaction (rows known to be new)."""
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, _copy_in(cur, table, columns) as copy:  # type: ignore[union-attr]
        _write_rows(copy, rows, _pg_types(table, columns))


def _copy_in(cur: Any, table: str, columns: Sequence[str]) -> Any:
    """psycopg's binary ``COPY table (columns) FROM STDIN`` on ``cur`` (a context manager)."""
    return cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)")


def table_block(
    table: str,
    columns: Sequence[str],
    values: Sequence[np.ndarray],
    present: Sequence[np.ndarray | None],
) -> bytes | None:
    """``column_block`` of rows of ``table``'s ``columns`` (their PostgreSQL types); None
    when it cannot be built: the caller inserts the rows another way."""
    return column_block(values, present, _pg_types(table, columns))


def copy_block(conn: Connection, table: str, columns: Sequence[str], block: bytes) -> None:
    """Binary COPY of a ``table_block`` into ``table`` inside the current PostgreSQL
    transaction."""
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, _copy_in(cur, table, columns) as copy:  # type: ignore[union-attr]
        copy.write(block)


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
        with _copy_in(cur, tmp, columns) as cp:
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
    t = metadata.tables[table]
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
