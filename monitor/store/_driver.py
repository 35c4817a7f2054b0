"""Statements through the driver's own cursor, for the store's hot reads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


def fetch(conn: Connection, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """Rows as the driver's plain tuples, through the driver's own cursor in the connection's
    transaction: chart reads run ~40 small statements, and SQLAlchemy's statement and Row
    overhead (~0.3 ms a statement) would be most of their cost. ``sql`` uses ``:name``
    parameters (sqlite3's own style; rewritten to psycopg's ``%(name)s``)."""
    if conn.dialect.name != "sqlite":
        sql = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(sql, dict(params))
        return cur.fetchall()
    finally:
        cur.close()
