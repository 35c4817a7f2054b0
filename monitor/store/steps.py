"""Step rows and extra metrics as DataFrames (the writes live in ``step_writes``; they are
re-exported here for the callers that import them from this module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Connection, text

from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.models import STEP_COLUMNS, STEP_QUANTITIES
from monitor.store.step_writes import write_metrics, write_steps

__all__ = [
    "STEP_COLUMNS",
    "latest_steps",
    "metric_names",
    "read_metrics",
    "read_metrics_by_suffix",
    "read_metrics_long",
    "read_steps",
    "steps_with_data",
    "stored_between",
    "write_metrics",
    "write_steps",
]


def read_steps(
    db: Database,
    run_id: int,
    *,
    start: int | None = None,
    end: int | None = None,
    columns: Sequence[str] | None = None,
    after: int | None = None,
) -> pd.DataFrame:
    """A run's step table sorted by step (``after``: only steps > after, for live updates).

    Columns: step, wall_time, status, reject_reason, ranks_seen and the quantities (or just
    ``columns``); missing values are NaN.
    """
    wanted = (
        list(columns)
        if columns
        else [c for c in STEP_COLUMNS if c not in ("run_id", "payload_hash")]
    )
    bad = set(wanted) - set(STEP_COLUMNS)
    if bad:
        raise InvalidInput(f"columns {sorted(bad)} are not step columns")
    if "step" not in wanted:
        wanted.insert(0, "step")
    where, params = ["run_id = :run"], {"run": run_id}
    _add_range(where, params, start, end)
    if after is not None:
        where.append("step > :after")
        params["after"] = int(after)
    sql = text(f"SELECT {', '.join(wanted)} FROM steps WHERE {' AND '.join(where)} ORDER BY step")
    with db.begin() as conn:
        df = pd.read_sql(sql, conn, params=params)
    for c in df.columns:
        if c in STEP_QUANTITIES or c == "wall_time":
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def read_metrics(
    db: Database,
    run_id: int,
    names: Sequence[str] | None = None,
    *,
    start: int | None = None,
    end: int | None = None,
) -> pd.DataFrame:
    """Extra metrics as a wide DataFrame: a ``step`` column and one column per name."""
    return _wide(read_metrics_long(db, run_id, names, start=start, end=end))


def read_metrics_long(
    db: Database,
    run_id: int,
    names: Sequence[str] | None = None,
    *,
    start: int | None = None,
    end: int | None = None,
) -> pd.DataFrame:
    """Extra metrics one row per (step, name): columns step, name, value (unordered)."""
    where, params = ["run_id = :run"], {"run": run_id}
    if names:
        keys = {f"n{i}": n for i, n in enumerate(names)}
        where.append(f"name IN ({', '.join(':' + k for k in keys)})")
        params.update(keys)
    _add_range(where, params, start, end)
    sql = text(f"SELECT step, name, value FROM metrics WHERE {' AND '.join(where)}")
    with db.begin() as conn:
        return pd.read_sql(sql, conn, params=params)


def latest_steps(db: Database, run_id: int, columns: Sequence[str], limit: int) -> pd.DataFrame:
    """The run's last ``limit`` step rows, newest first: step, wall_time and ``columns``.
    Object dtype, so a missing value stays None (a NaN stored by PostgreSQL stays NaN)."""
    wanted = ["step", "wall_time", *columns]
    bad = set(wanted) - set(STEP_COLUMNS)
    if bad:
        raise InvalidInput(f"columns {sorted(bad)} are not step columns")
    sql = text(
        f"SELECT {', '.join(wanted)} FROM steps WHERE run_id = :r ORDER BY step DESC LIMIT :n"
    )
    with db.begin() as conn:
        rows = conn.execute(sql, {"r": run_id, "n": int(limit)}).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=wanted, dtype=object)


#: Selects per UNION ALL statement (SQLite allows 500 compound members).
_UNION_CHUNK = 400


def latest_steps_of_runs(
    db: Database, columns: Sequence[str], limit: int, run_ids: Sequence[int] | None = None
) -> dict[int, list[tuple[Any, ...]]]:
    """``latest_steps`` of every run (or of ``run_ids``) at once: run id -> its last ``limit``
    step rows (step, wall_time, ``columns``), newest first; a run without steps is left out.

    Two statements: each run's ``limit``-th newest step (an index lookup a run), then each
    run's rows from there (an index range a run); a window function or a join on a
    correlated bound would visit every stored step."""
    wanted = ["step", "wall_time", *columns]
    bad = set(wanted) - set(STEP_COLUMNS)
    if bad:
        raise InvalidInput(f"columns {sorted(bad)} are not step columns")
    if limit < 1:
        raise InvalidInput(f"limit must be >= 1, got {limit}")
    if run_ids is not None and not run_ids:
        return {}
    bounds_sql = text(
        "SELECT r.id, COALESCE((SELECT s.step FROM steps s WHERE s.run_id = r.id "
        "ORDER BY s.step DESC LIMIT 1 OFFSET :skip), "
        "(SELECT MIN(s.step) FROM steps s WHERE s.run_id = r.id)) FROM runs r"
        + ("" if run_ids is None else f" WHERE r.id IN ({', '.join(str(int(r)) for r in run_ids)})")
    )
    out: dict[int, list[tuple[Any, ...]]] = {}
    with db.begin() as conn:
        bounds = [
            (int(r), int(lo))
            for r, lo in conn.execute(bounds_sql, {"skip": int(limit) - 1})
            if lo is not None
        ]
        for i in range(0, len(bounds), _UNION_CHUNK):
            sql = " UNION ALL ".join(
                f"SELECT run_id, {', '.join(wanted)} FROM steps WHERE run_id = {r} AND step >= {lo}"
                for r, lo in bounds[i : i + _UNION_CHUNK]
            )
            for row in _driver_rows(conn, sql):
                out.setdefault(int(row[0]), []).append(tuple(row[1:]))
    for rows in out.values():
        rows.sort(key=lambda r: r[0], reverse=True)
    return out


def _driver_rows(conn: Connection, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a statement without parameters as the driver's plain tuples (SQLAlchemy's
    Row objects cost about a third of reading thousands of rows)."""
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(sql)
        return cur.fetchall()
    finally:
        cur.close()


def steps_with_data(db: Database, run_id: int) -> list[int]:
    """Every step with a step row or a metric, sorted."""
    with db.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT step FROM steps WHERE run_id = :r "
                "UNION SELECT step FROM metrics WHERE run_id = :r ORDER BY step"
            ),
            {"r": run_id},
        ).all()
    return [int(r[0]) for r in rows]


def stored_between(
    db: Database, run_id: int, lo: int, hi: int
) -> tuple[set[int], dict[tuple[int, str], float | None]]:
    """The steps and the metric values ((step, name) -> value, None kept) a run holds
    between steps lo and hi, read in one transaction."""
    args = {"r": run_id, "lo": lo, "hi": hi}
    where = "WHERE run_id = :r AND step BETWEEN :lo AND :hi"
    with db.begin() as conn:
        steps = {int(r[0]) for r in conn.execute(text(f"SELECT step FROM steps {where}"), args)}
        metrics = {
            (int(r[0]), r[1]): r[2]
            for r in conn.execute(text(f"SELECT step, name, value FROM metrics {where}"), args)
        }
    return steps, metrics


def metric_names(db: Database, run_id: int) -> list[str]:
    with db.begin() as conn:
        rows = conn.execute(
            text("SELECT DISTINCT name FROM metrics WHERE run_id = :run ORDER BY name"),
            {"run": run_id},
        ).all()
    return [r[0] for r in rows]


def read_metrics_by_suffix(
    db: Database,
    run_id: int,
    suffixes: Sequence[str],
    *,
    start: int | None = None,
    end: int | None = None,
) -> pd.DataFrame:
    """Wide extra metrics whose names end with one of ``suffixes`` (e.g. TRL's
    ``completions/clipped_ratio``) over a step range, reading only that range."""
    if not suffixes:
        return _wide(pd.DataFrame(columns=["step", "name", "value"]))
    # LIKE narrows the scan ('_' may over-match one character); endswith decides.
    keys = {f"s{i}": "%" + s for i, s in enumerate(suffixes)}
    where = ["run_id = :run", "(" + " OR ".join(f"name LIKE :{k}" for k in keys) + ")"]
    params: dict[str, Any] = {"run": run_id, **keys}
    _add_range(where, params, start, end)
    sql = text(f"SELECT step, name, value FROM metrics WHERE {' AND '.join(where)}")
    with db.begin() as conn:
        long = pd.read_sql(sql, conn, params=params)
    return _wide(long[long["name"].str.endswith(tuple(suffixes))])


def _add_range(
    where: list[str], params: dict[str, Any], start: int | None, end: int | None
) -> None:
    if start is not None:
        where.append("step >= :start")
        params["start"] = int(start)
    if end is not None:
        where.append("step <= :end")
        params["end"] = int(end)


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    """(step, name, value) rows as a ``step`` column plus one column per name."""
    if long.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    wide = long.pivot(index="step", columns="name", values="value").sort_index()
    wide.columns.name = None
    return wide.reset_index()
