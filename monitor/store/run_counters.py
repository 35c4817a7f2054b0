"""The per-run counters on ``runs`` (n_steps, last_step, the last step with a value of each
KL column and of reward_mean: ``run_list.LAST_STEP_COLUMNS``, and ``recent_walls``: the step
and wall time of the run's ``RECENT_STEPS`` latest steps, whose gaps the stall rule reads),
kept up to date inside the step writers' transactions so that listing runs reads one row a run
instead of counting its steps or reading its latest step rows.

``count_written`` is called by ``step_writes`` with the step rows it inserted or rewrote, under
the run's write lock; ``recount`` rebuilds the counters from the stored steps (the migration
does the same in SQL; a script that writes ``steps`` directly calls it after)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection

from monitor.store.database import Database
from monitor.store.run_list import LAST_STEP_COLUMNS
from monitor.store.tables import STEP_COLUMNS

#: How many of a run's latest steps ``recent_walls`` keeps: the dashboard judges a stall on
#: the median gap between their wall times (and reads as many rows for a run's header).
RECENT_STEPS = 21


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
    step_at, wall_at = columns.index("step"), columns.index("wall_time")
    value_at = {col: columns.index(col) for col in LAST_STEP_COLUMNS if col in columns}
    written = [*inserted, *updated]
    # the written rows' indexes, latest step first (of one step, the earlier row first)
    steps = np.array([int(r[step_at]) for r in written], dtype=np.int64)
    newest = np.argsort(-steps, kind="stable").tolist()
    lasts: dict[str, int | None] = {}
    for col, idx in value_at.items():
        # the latest written step with a value: usually the first one looked at
        lasts[col] = next((int(steps[i]) for i in newest if written[i][idx] is not None), None)
    emptied = [col for col, idx in value_at.items() if any(r[idx] is None for r in updated)]
    _update_counters(
        conn,
        ph,
        run_id,
        len(inserted),
        int(steps[: len(inserted)].max()) if inserted else None,
        lasts,
        [(int(steps[i]), written[i][wall_at]) for i in newest[:RECENT_STEPS]],
        emptied,
    )


def count_inserted_columns(
    conn: Connection,
    ph: str,
    run_id: int,
    steps: np.ndarray,
    walls: np.ndarray,
    has_value: Mapping[str, np.ndarray],
) -> None:
    """``count_written`` for new step rows given a column at a time (a bulk import's):
    ``steps`` (unique), their wall times (NaN: NULL), and for the step columns the rows
    hold, which rows have a value. Sets the same counters as ``count_written`` of the same
    rows."""
    steps = np.asarray(steps, dtype=np.int64)
    if len(steps) == 0:
        return
    newest = np.argsort(-steps, kind="stable")[:RECENT_STEPS].tolist()
    lasts = {
        col: int(steps[mask].max()) if mask.any() else None
        for col, mask in has_value.items()
        if col in LAST_STEP_COLUMNS
    }
    wall = [None if np.isnan(w) else float(w) for w in np.asarray(walls, np.float64)[newest]]
    recent = [(int(steps[i]), w) for i, w in zip(newest, wall, strict=True)]
    _update_counters(conn, ph, run_id, len(steps), int(steps.max()), lasts, recent, [])


def _update_counters(
    conn: Connection,
    ph: str,
    run_id: int,
    n_inserted: int,
    top: int | None,
    lasts: Mapping[str, int | None],
    recent: Sequence[tuple[int, Any]],
    emptied: Sequence[str],
) -> None:
    """The one UPDATE of the counters: ``n_inserted`` new steps up to ``top``, the latest
    written step with a value of each column (``lasts``), the written (step, wall time) of
    the latest steps written (``recent``, latest first) and the columns a rewrite emptied."""
    sets: list[str] = []
    params: list[Any] = []
    if n_inserted:
        sets.append(f"n_steps = n_steps + {ph}")
        params.append(n_inserted)
        sets.append(_raise_to("last_step", ph))
        params += [top, top]
    for col, last in lasts.items():
        if last is not None:
            sets.append(_raise_to(LAST_STEP_COLUMNS[col], ph))
            params += [last, last]
    if recent:
        walls = _recent_after_write(conn, ph, run_id, recent)
        if walls is not None:
            sets.append(f"recent_walls = {ph}")
            params.append(walls)
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


def _recent_after_write(
    conn: Connection, ph: str, run_id: int, recent: Sequence[tuple[int, Any]]
) -> str | None:
    """The run's ``recent_walls`` once steps are written (a written step replaces its stored
    wall time), or None when they leave it unchanged; ``recent``: (step, wall time) of the
    latest RECENT_STEPS rows written, latest step first. The kept steps are the latest ones:
    a written step older than all of them, when they are RECENT_STEPS already, stays out."""
    stored = conn.exec_driver_sql(
        f"SELECT recent_walls FROM runs WHERE id = {ph}", (run_id,)
    ).scalar()
    kept = {int(s): w for s, w in _load(stored)}
    # a written step outside the latest RECENT_STEPS written is outside the latest kept too;
    # of two rows of one step, the later one is written last
    for step, wall in recent:
        kept[step] = wall
    latest = sorted(kept.items(), reverse=True)[:RECENT_STEPS]
    dumped = _dump(latest)
    return None if dumped == stored else dumped


def recent_walls(db: Database, run_ids: Sequence[int]) -> dict[int, list[tuple[int, float]]]:
    """Run id -> (step, wall_time) of its RECENT_STEPS latest steps, newest first, as the
    writers keep them (one statement, whatever the runs' lengths; a run without steps is left
    out)."""
    if not run_ids:
        return {}
    ids = ", ".join(str(int(r)) for r in run_ids)
    with db.begin() as conn:
        rows = conn.exec_driver_sql(f"SELECT id, recent_walls FROM runs WHERE id IN ({ids})").all()
    out = {int(rid): _load(walls) for rid, walls in rows}
    return {rid: walls for rid, walls in out.items() if walls}


def _latest_walls(conn: Connection, ph: str, run_id: int) -> list[tuple[int, float]]:
    rows = conn.exec_driver_sql(
        f"SELECT step, wall_time FROM steps WHERE run_id = {ph} ORDER BY step DESC LIMIT {ph}",
        (run_id, RECENT_STEPS),
    )
    return [(int(s), w) for s, w in rows]


def _dump(walls: Sequence[tuple[int, Any]]) -> str | None:
    """JSON of [[step, wall_time], ...] (a NaN wall time kept as NaN); None when empty."""
    if not walls:
        return None
    return json.dumps([[int(s), None if w is None else float(w)] for s, w in walls])


def _load(stored: str | None) -> list[tuple[int, float]]:
    return [(s, w) for s, w in json.loads(stored)] if stored else []  # steps stored as ints


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
        ids = [int(r) for (r,) in conn.exec_driver_sql("SELECT id FROM runs")]
    else:
        ids = [int(r) for r in run_ids]
        if ids:
            conn.exec_driver_sql(sql + f" WHERE id = {ph}", [(r,) for r in ids])
    for rid in ids:
        conn.exec_driver_sql(
            f"UPDATE runs SET recent_walls = {ph} WHERE id = {ph}",
            (_dump(_latest_walls(conn, ph, rid)), rid),
        )
