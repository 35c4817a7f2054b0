"""The per-run counters on ``runs`` (n_steps, last_step, and the last step with a value of each
KL column and of reward_mean: ``run_list.LAST_STEP_COLUMNS``), kept up to date inside the step
writers' transactions so that listing runs reads one row a run instead of counting its steps.

``count_written`` is called by ``step_writes`` with the step rows it inserted or rewrote, under
the run's write lock; ``recount`` rebuilds the counters from the stored steps (the migration
does the same in SQL; a script that writes ``steps`` directly calls it after)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from monitor.store.models import STEP_COLUMNS
from monitor.store.run_list import LAST_STEP_COLUMNS


def _raise_to(column: str, ph: str) -> str:
    """SET clause moving ``column`` up to a parameter, never down (portable: no GREATEST)."""
    return f"{column} = CASE WHEN {column} IS NULL OR {column} < {ph} THEN {ph} ELSE {column} END"


def count_written(
    conn: Connection,
    ph: str,
    run_id: int,
    inserted: Sequence[Sequence[Any]],
    updated: Sequence[Sequence[Any]] = (),
    *,
    columns: Sequence[str] = STEP_COLUMNS,
) -> None:
    """Account for step rows (``columns`` order: by default every one of ``STEP_COLUMNS``)
    just inserted (new steps) and rewritten (a multi-rank step re-merged). A rewrite that
    empties a counted column at its last step makes that column's last step be looked up
    again."""
    step_at = columns.index("step")
    value_at = {col: columns.index(col) for col in LAST_STEP_COLUMNS if col in columns}
    sets: list[str] = []
    params: list[Any] = []
    if inserted:
        sets.append(f"n_steps = n_steps + {ph}")
        params.append(len(inserted))
        top = max(int(r[step_at]) for r in inserted)
        sets.append(_raise_to("last_step", ph))
        params += [top, top]
    emptied: list[str] = []
    for col, idx in value_at.items():
        with_value = [int(r[step_at]) for r in (*inserted, *updated) if r[idx] is not None]
        if with_value:
            sets.append(_raise_to(LAST_STEP_COLUMNS[col], ph))
            params += [max(with_value), max(with_value)]
        if any(r[idx] is None for r in updated):
            emptied.append(col)
    if sets:
        conn.exec_driver_sql(
            f"UPDATE runs SET {', '.join(sets)} WHERE id = {ph}", (*params, run_id)
        )
    if emptied:
        conn.exec_driver_sql(
            "UPDATE runs SET "
            + ", ".join(_last_with_value(c) for c in emptied)
            + f" WHERE id = {ph}",
            (run_id,),
        )


def _last_with_value(col: str) -> str:
    return (
        f"{LAST_STEP_COLUMNS[col]} = (SELECT s.step FROM steps s "
        f"WHERE s.run_id = runs.id AND s.{col} IS NOT NULL ORDER BY s.step DESC LIMIT 1)"
    )


def recount(conn: Connection, ph: str, run_ids: Iterable[int] | None = None) -> None:
    """Rebuild the counters of ``run_ids`` (default: every run) from their stored steps."""
    sets = [
        "n_steps = (SELECT COUNT(*) FROM steps s WHERE s.run_id = runs.id)",
        "last_step = (SELECT MAX(s.step) FROM steps s WHERE s.run_id = runs.id)",
        *(_last_with_value(col) for col in LAST_STEP_COLUMNS),
    ]
    sql = "UPDATE runs SET " + ", ".join(sets)
    if run_ids is None:
        conn.exec_driver_sql(sql)
        return
    ids = [(int(r),) for r in run_ids]
    if ids:
        conn.exec_driver_sql(sql + f" WHERE id = {ph}", ids)
