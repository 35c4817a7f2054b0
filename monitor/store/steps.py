"""Step rows and extra metrics: idempotent bulk writes and DataFrame reads.

Writes go through the driver's executemany with tuples (``exec_driver_sql``), about 5x faster
than SQLAlchemy inserts of dicts (docs/ARCHITECTURE.md). ``INSERT ... ON CONFLICT DO NOTHING`` has
the same syntax on SQLite and PostgreSQL: a replayed step is a no-op; a step whose stored
payload hash differs from the new one is reported as a conflict and never overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Connection, text

from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.domain import StepWriteResult
from monitor.store.models import STEP_QUANTITIES
from monitor.store.series import invalidate_rollups

STEP_COLUMNS: tuple[str, ...] = (
    "run_id",
    "step",
    "wall_time",
    "status",
    "reject_reason",
    "ranks_seen",
    "payload_hash",
    *STEP_QUANTITIES,
)
_STEP_DEFAULTS: dict[str, Any] = {"status": "ok", "ranks_seen": 1}


def _clean(value: Any) -> Any:
    """NaN/inf become NULL: they mean "no data" and PostgreSQL would store them verbatim."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        return _clean(value.item())
    return value


def _insert_sql(db: Database, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    ph = db.paramstyle
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([ph] * len(columns))}) "
        f"ON CONFLICT ({', '.join(key)}) DO NOTHING"
    )


def write_steps(db: Database, run_id: int, rows: Sequence[Mapping[str, Any]]) -> StepWriteResult:
    """Insert step rows for one run. Each row holds ``step``, ``wall_time`` and any of the
    quantity columns; ``payload_hash`` (optional) decides replay vs conflict."""
    if not rows:
        return StepWriteResult(0, 0)
    unknown = set().union(*(r.keys() for r in rows)) - set(STEP_COLUMNS)
    if unknown:
        raise InvalidInput(f"step rows have unknown columns: {sorted(unknown)}")
    columns = STEP_COLUMNS
    tuples = []
    for r in rows:
        if r.get("step") is None or r.get("wall_time") is None:
            raise InvalidInput("every step row needs 'step' and 'wall_time'")
        tuples.append(
            tuple(
                run_id if c == "run_id" else _clean(r.get(c, _STEP_DEFAULTS.get(c)))
                for c in columns
            )
        )
    sql = _insert_sql(db, "steps", columns, ("run_id", "step"))
    with db.begin() as conn:
        # executemany's rowcount is the total over the batch on sqlite3 and psycopg 3.
        inserted = conn.exec_driver_sql(sql, tuples).rowcount
        if inserted:
            invalidate_rollups(conn, run_id, min(int(r["step"]) for r in rows))
        if inserted == len(rows):
            return StepWriteResult(inserted, 0)
        conflicts = _find_conflicts(conn, run_id, rows)
    return StepWriteResult(inserted, len(rows) - inserted - len(conflicts), conflicts)


def _find_conflicts(
    conn: Connection, run_id: int, rows: Sequence[Mapping[str, Any]]
) -> tuple[int, ...]:
    """Steps of this batch already stored with a different payload hash."""
    steps = [int(r["step"]) for r in rows]
    stored = dict(
        conn.execute(
            text(
                "SELECT step, payload_hash FROM steps "
                "WHERE run_id = :run AND step >= :lo AND step <= :hi"
            ),
            {"run": run_id, "lo": min(steps), "hi": max(steps)},
        ).all()
    )
    return tuple(
        int(r["step"])
        for r in rows
        if r.get("payload_hash") is not None
        and stored.get(int(r["step"])) is not None
        and stored[int(r["step"])] != r["payload_hash"]
    )


def write_metrics(
    db: Database, run_id: int, values: Iterable[tuple[int, str, float | None]]
) -> int:
    """Insert (step, name, value) extra metrics; existing (run, step, name) are left alone."""
    tuples = [(run_id, int(step), str(name), _clean(value)) for step, name, value in values]
    if not tuples:
        return 0
    sql = _insert_sql(
        db, "metrics", ("run_id", "step", "name", "value"), ("run_id", "step", "name")
    )
    with db.begin() as conn:
        cursor = conn.exec_driver_sql(sql, tuples)
        if cursor.rowcount:
            invalidate_rollups(
                conn, run_id, min(t[1] for t in tuples), steps=False,
                metric_names={t[2] for t in tuples},
            )  # fmt: skip
        return max(cursor.rowcount, 0)


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
    where, params = ["run_id = :run"], {"run": run_id}
    if names:
        keys = {f"n{i}": n for i, n in enumerate(names)}
        where.append(f"name IN ({', '.join(':' + k for k in keys)})")
        params.update(keys)
    _add_range(where, params, start, end)
    sql = text(f"SELECT step, name, value FROM metrics WHERE {' AND '.join(where)}")
    with db.begin() as conn:
        return _wide(pd.read_sql(sql, conn, params=params))


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
