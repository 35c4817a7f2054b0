"""The run list (`klmon runs`, ``list_runs``, the Runs page): every run with its step count,
last step and its wall time, current KL, last reward and tags, from the counters the step
writers keep on ``runs`` (``run_counters.py``) and the one step row of each value they point
at.

The statements and the reading of their rows live here, on a plain DB-API cursor and without
SQLAlchemy or numpy, so that `klmon runs` can answer from a driver connection opened
straight from the URL (``quick_run_summaries``): the command then costs what Python, click
and the driver cost to start, plus two statements. Anything unusual (a URL form this module
does not parse, a schema not at head, a database that cannot be reached, a counter pointing
at a step changed behind the writers' back) is left to ``Database.open`` and
``runs.run_summaries``, which give the errors and the answers."""

from __future__ import annotations

import json
import os
from typing import Any

from monitor.store.current_kl import KL_PREFERENCE, KLQuantity
from monitor.store.engine import SQLITE_BUSY_TIMEOUT_MS, normalize_url
from monitor.store.schema import script_head

#: Step columns whose last step with a value a run keeps on ``runs`` (the run list's current
#: KL, in KL_PREFERENCE order, and its last reward) -> that ``runs`` column.
LAST_STEP_COLUMNS: dict[str, str] = {c: f"last_{c}_step" for c in (*KL_PREFERENCE, "reward_mean")}

#: The columns of ``run_summaries`` records and ``list_runs``, in order.
RUN_LIST_COLUMNS: tuple[str, ...] = (
    "id",
    "project",
    "name",
    "status",
    "source",
    "created_at",
    "last_seen_at",
    "n_steps",
    "last_step",
    "last_wall",
    "last_kl",
    "kl_step",
    "kl_quantity",
    "kl_unit",
    "last_reward",
    "tags",
)

_HEAD = RUN_LIST_COLUMNS[:9]  # read as they are stored


def _statements() -> tuple[str, str]:
    kl_steps = [f"r.{LAST_STEP_COLUMNS[c]}" for c in KL_PREFERENCE]
    runs = (
        f"SELECT {', '.join(f'r.{c}' for c in _HEAD)}, r.tags, l.wall_time, rw.reward_mean, "
        f"{', '.join(kl_steps)}, {', '.join(f'k.{c}' for c in KL_PREFERENCE)} "
        "FROM runs r "
        "LEFT JOIN steps l ON l.run_id = r.id AND l.step = r.last_step "
        "LEFT JOIN steps rw ON rw.run_id = r.id AND rw.step = r.last_reward_mean_step "
        f"LEFT JOIN steps k ON k.run_id = r.id AND k.step = COALESCE({', '.join(kl_steps)}) "
        "ORDER BY r.id"
    )
    described = (
        "SELECT run_id, quantity, name, estimator, scale FROM metric_info "
        f"WHERE quantity IN ({', '.join(repr(c) for c in KL_PREFERENCE)}) "
        "ORDER BY run_id, quantity, name"
    )
    return runs, described


def read_summaries(cursor: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """The run list through a DB-API ``cursor`` (two statements whatever the number of runs
    and steps): records of ``RUN_LIST_COLUMNS``, and the ids of the runs whose counters point
    at a KL value no longer stored (the steps were changed behind the writers' back; their
    KL columns are None here and must be looked up: ``current_kl.current_kl``)."""
    runs_sql, described_sql = _statements()
    cursor.execute(runs_sql)
    rows = cursor.fetchall()
    cursor.execute(described_sql)
    described: dict[tuple[int, str], KLQuantity] = {}
    for run_id, quantity, name, estimator, scale in cursor.fetchall():
        key = (int(run_id), str(quantity))
        described.setdefault(key, KLQuantity(str(quantity), str(name), estimator, scale))
    n_head, n_kl = len(_HEAD), len(KL_PREFERENCE)
    own = {c: KLQuantity(c) for c in KL_PREFERENCE}
    out: list[dict[str, Any]] = []
    stale: list[int] = []
    for row in rows:
        rec = dict(zip(_HEAD, row[:n_head], strict=True))
        rid = rec["id"] = int(rec["id"])
        rec["n_steps"] = int(rec["n_steps"] or 0)
        rec["last_step"] = None if rec["last_step"] is None else int(rec["last_step"])
        rec["tags"] = _tags(row[n_head])
        rec["last_wall"] = _float(row[n_head + 1])
        rec["last_reward"] = _float(row[n_head + 2])
        at_steps = row[n_head + 3 : n_head + 3 + n_kl]
        values = row[n_head + 3 + n_kl :]
        rec.update(last_kl=None, kl_step=None, kl_quantity=None, kl_unit=None)
        for col, at, value in zip(KL_PREFERENCE, at_steps, values, strict=True):
            if at is None:
                continue
            if value is None:
                stale.append(rid)
                break
            quantity = described.get((rid, col)) or own[col]
            rec.update(
                last_kl=float(value),
                kl_step=int(at),
                kl_quantity=quantity.name,
                kl_unit=quantity.unit,
            )
            break
        out.append({c: rec[c] for c in RUN_LIST_COLUMNS})
    return out, stale


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _tags(value: Any) -> list[Any]:
    """The JSON tags column as a list (sqlite3 gives its text, psycopg the decoded value)."""
    if value is None or value == "[]":
        return []
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return list(value) if isinstance(value, list) else []


def quick_run_summaries(url: str) -> list[dict[str, Any]] | None:
    """``run_summaries`` of the database at ``url`` read through the driver alone (sqlite3, or
    psycopg for PostgreSQL), or None when this cannot answer: the URL is not a plain SQLite
    file or PostgreSQL URL, the database cannot be reached or its schema is not at head, or
    a run's current KL must be looked up. The caller then opens the ``Database``."""
    conn = _connect(url)
    if conn is None:
        return None
    try:
        cur = conn.cursor()
        cur.execute("SELECT version_num FROM alembic_version")
        stored = cur.fetchall()
        if len(stored) != 1 or stored[0][0] != script_head():
            return None
        records, stale = read_summaries(cur)
        return None if stale else records
    except Exception:  # the full path reports it as a klmon error
        return None
    finally:
        conn.close()


def _connect(url: str) -> Any:
    """A driver connection for a plain ``sqlite:///FILE`` (an existing file) or PostgreSQL
    URL; None for anything else, or when the connection fails."""
    url = normalize_url(url)
    try:
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///") :]
            if not path or path == ":memory:" or "?" in path or "%" in path:
                return None
            if not os.path.isfile(path):
                return None  # Database.open says why
            import sqlite3

            return sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        if url.startswith("postgresql+psycopg://"):
            import psycopg

            return psycopg.connect("postgresql://" + url.split("://", 1)[1], connect_timeout=5)
    except Exception:  # Database.open reports it as a klmon error
        return None
    return None


def run_summaries_at(url: str) -> list[dict[str, Any]]:
    """``run_summaries`` of the database at ``url`` (`klmon runs`): ``quick_run_summaries``
    when it can answer, else through ``Database.open`` (which checks the schema and raises
    klmon's errors) and ``runs.run_summaries``."""
    quick = quick_run_summaries(url)
    if quick is not None:
        return quick
    from monitor.store.database import Database
    from monitor.store.runs import run_summaries

    db = Database.open(url)
    try:
        return run_summaries(db)
    finally:
        db.dispose()
