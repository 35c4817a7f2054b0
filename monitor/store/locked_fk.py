"""Bulk COPY without PostgreSQL's per-row foreign-key checks, where a lock already proves them.

A foreign key's check is a trigger that runs, for every row inserted, a query locking the
referenced row (``SELECT 1 FROM runs WHERE id = $1 FOR KEY SHARE``). For a bulk import that is
most of the server's time: COPY of 200k step rows took ~1.1 s with the ``steps -> runs`` key
and ~0.3 s without it. The step writers do not need it: every row of a batch references the
run that their transaction locked first (``step_writes._lock_run``: an UPDATE of the run's row,
checked to find it), so that row exists and no other transaction can delete it or change its
id until this one ends, which is all the per-row checks would establish.

``fk_checks_held_by_lock`` turns the checks off for one statement with
``SET LOCAL session_replication_role = replica`` (what ``pg_restore --disable-triggers``
does), and only when that skips nothing else: every trigger on the table is an internal one of
a foreign key to the locked table, the table has no rules, the role is 'origin' now, and the
user may set it (a superuser, or on PostgreSQL 15+ one granted SET on the parameter).
Otherwise the checks run as usual: the same rows, stored more slowly. Cascading deletes are
the referenced table's triggers, run by whoever deletes: not affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

_ALLOWED = """
SELECT (current_setting('is_superuser') = 'on' {granted})
   AND current_setting('session_replication_role') = 'origin'
   AND NOT EXISTS (
        SELECT 1 FROM pg_trigger t
        WHERE t.tgrelid = CAST(%(table)s AS regclass)
          AND NOT (t.tgisinternal AND t.tgconstraint IN (
                SELECT c.oid FROM pg_constraint c
                WHERE c.contype = 'f' AND c.conrelid = CAST(%(table)s AS regclass)
                  AND c.confrelid = CAST(%(parent)s AS regclass))))
   AND NOT EXISTS (
        SELECT 1 FROM pg_rewrite r WHERE r.ev_class = CAST(%(table)s AS regclass))
"""
_GRANTED = "OR has_parameter_privilege('session_replication_role', 'SET')"


@contextmanager
def fk_checks_held_by_lock(conn: Connection, table: str, parent: str) -> Iterator[bool]:
    """Within the block, rows inserted into ``table`` skip the per-row checks of its foreign
    keys to ``parent`` (yields True) when that skips nothing else (see the module doc);
    else nothing changes (yields False). The caller holds, for its whole transaction, a lock
    on every ``parent`` row the inserted rows reference: only then may it call this."""
    if conn.dialect.name != "postgresql" or not _allowed(conn, table, parent):
        yield False
        return
    from psycopg.pq import TransactionStatus  # PostgreSQL only: not loaded for SQLite

    raw = conn.connection.driver_connection
    raw.execute("SET LOCAL session_replication_role = replica")  # type: ignore[union-attr]
    try:
        yield True
    finally:
        # a failed statement aborted the transaction: its rollback restores the role
        if raw.info.transaction_status != TransactionStatus.INERROR:  # type: ignore[union-attr]
            raw.execute("SET LOCAL session_replication_role = origin")  # type: ignore[union-attr]


def _allowed(conn: Connection, table: str, parent: str) -> bool:
    version = conn.dialect.server_version_info or (0,)
    sql = _ALLOWED.format(granted=_GRANTED if version >= (15,) else "")
    cur = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
        sql, {"table": table, "parent": parent}
    )
    return bool(cur.fetchone()[0])
