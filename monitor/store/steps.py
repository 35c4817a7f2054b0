"""Step rows and extra metrics as DataFrames (the writes live in ``step_writes``; they are
re-exported here for the callers that import them from this module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, text

from monitor.errors import InvalidInput
from monitor.store._driver import fetch
from monitor.store.database import Database
from monitor.store.metric_blocks import BLOCK_LEVEL, decode, stored_metric_names
from monitor.store.metric_blocks import TABLE as BLOCKS
from monitor.store.step_writes import write_metrics, write_steps
from monitor.store.tables import STEP_COLUMNS, STEP_QUANTITIES

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
    """Extra metrics one row per (step, name): columns step, name, value (sorted by name,
    then step; a value stored as NULL is NaN)."""
    where, params = ["run_id = :run"], {"run": run_id}
    if names:
        keys = {f"n{i}": n for i, n in enumerate(names)}
        where.append(f"name IN ({', '.join(':' + k for k in keys)})")
        params.update(keys)
    with db.begin() as conn:
        return _metric_values(conn, where, params, start, end)


def _metric_values(
    conn: Connection,
    where: list[str],
    params: dict[str, Any],
    start: int | None,
    end: int | None,
) -> pd.DataFrame:
    """The (step, name, value) frame of the metric blocks matching ``where``, cut to the
    step range."""
    if start is not None:
        where = [*where, "block >= :b0"]
        params = {**params, "b0": int(start) >> BLOCK_LEVEL}
    if end is not None:
        where = [*where, "block <= :b1"]
        params = {**params, "b1": int(end) >> BLOCK_LEVEL}
    rows = fetch(
        conn,
        f"SELECT block, mask, vals, name FROM {BLOCKS} WHERE {' AND '.join(where)} "
        "ORDER BY name, block",
        params,
    )
    row, steps, values = decode(rows)
    keep = np.ones(len(steps), dtype=bool)
    if start is not None:
        keep &= steps >= int(start)
    if end is not None:
        keep &= steps <= int(end)
    names = np.array([r[3] for r in rows], dtype=object)
    return pd.DataFrame(
        {"step": steps[keep], "name": names[row[keep]], "value": values[keep]}, copy=False
    )


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


def steps_with_data(db: Database, run_id: int) -> list[int]:
    """Every step with a step row or a metric, sorted."""
    with db.begin() as conn:
        rows = conn.execute(text("SELECT step FROM steps WHERE run_id = :r"), {"r": run_id})
        steps = np.fromiter((int(r[0]) for r in rows), np.int64)
        masks = fetch(
            conn, f"SELECT block, mask, mask FROM {BLOCKS} WHERE run_id = :r", {"r": run_id}
        )
    _, metric_steps, _ = decode(masks, values=False)
    return np.union1d(steps, metric_steps).tolist()


def stored_between(
    db: Database, run_id: int, lo: int, hi: int
) -> tuple[set[int], dict[tuple[int, str], float | None]]:
    """The steps and the metric values ((step, name) -> value, None kept) a run holds
    between steps lo and hi, read in one transaction."""
    args = {"r": run_id, "lo": lo, "hi": hi}
    where = "WHERE run_id = :r AND step BETWEEN :lo AND :hi"
    with db.begin() as conn:
        steps = {int(r[0]) for r in conn.execute(text(f"SELECT step FROM steps {where}"), args)}
        long = _metric_values(conn, ["run_id = :r"], {"r": run_id}, lo, hi)
    metrics = {
        (s, n): None if v != v else v
        for s, n, v in zip(
            long["step"].tolist(), long["name"].tolist(), long["value"].tolist(), strict=True
        )
    }
    return steps, metrics


def metric_names(db: Database, run_id: int) -> list[str]:
    """The names of a run's extra metrics, sorted."""
    with db.begin() as conn:
        return stored_metric_names(conn, run_id)


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
    with db.begin() as conn:
        # the run's names (an index seek each), then only the blocks of the matching ones
        names = [n for n in stored_metric_names(conn, run_id) if n.endswith(tuple(suffixes))]
        if not names:
            return _wide(pd.DataFrame(columns=["step", "name", "value"]))
        keys = {f"n{i}": n for i, n in enumerate(names)}
        where = ["run_id = :run", f"name IN ({', '.join(':' + k for k in keys)})"]
        long = _metric_values(conn, where, {"run": run_id, **keys}, start, end)
    return _wide(long)


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
