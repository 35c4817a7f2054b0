"""Runs: create, find, list, update status."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, delete, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from monitor.errors import InvalidInput, NotFound, StoreError
from monitor.store.current_kl import current_kl
from monitor.store.database import Database
from monitor.store.domain import RunInfo
from monitor.store.run_list import RUN_LIST_COLUMNS, read_summaries
from monitor.store.tables import runs

if TYPE_CHECKING:
    import pandas as pd

RUN_STATUSES = ("running", "finished", "crashed")


def _to_info(row: Row[Any]) -> RunInfo:
    config, tags = row.config, row.tags
    return RunInfo(
        id=row.id,
        project=row.project,
        name=row.name,
        status=row.status,
        source=row.source,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        finished_at=row.finished_at,
        world_size=row.world_size,
        config=dict(config) if isinstance(config, dict) else {},
        tags=list(tags) if isinstance(tags, list) else [],
        baseline_run_id=row.baseline_run_id,
    )


def get_or_create_run(
    db: Database,
    project: str,
    name: str,
    *,
    config: dict[str, Any] | None = None,
    tags: list[Any] | None = None,
    source: str = "live",
    world_size: int = 1,
    status: str = "running",
    now: float | None = None,
) -> RunInfo:
    """Return the run (project, name), creating it if needed. Safe against a concurrent
    creator (several ranks start at once): the loser of the insert race reads the winner's."""
    if not project or not name:
        raise InvalidInput("project and name must be non-empty strings")
    if status not in RUN_STATUSES:
        raise InvalidInput(f"status {status!r} is not one of {RUN_STATUSES}")
    now = time.time() if now is None else now
    existing = find_run_by_name(db, project, name)
    if existing is not None:
        return existing
    try:
        with db.begin() as conn:
            info = RunInfo(
                id=0,
                project=project,
                name=name,
                status=status,
                source=source,
                created_at=now,
                last_seen_at=now,
                finished_at=None,
                world_size=world_size,
                config=dict(config or {}),
                tags=list(tags or []),
                baseline_run_id=None,
            )
            values = {k: v for k, v in asdict(info).items() if k not in ("id", "finished_at")}
            created = conn.execute(insert(runs).values(**values))
            return replace(info, id=int(created.inserted_primary_key[0]))
    except StoreError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            found = find_run_by_name(db, project, name)
            if found is not None:
                return found
        raise


def find_run_by_name(db: Database, project: str, name: str) -> RunInfo | None:
    with db.begin() as conn:
        row = conn.execute(
            select(runs).where(runs.c.project == project, runs.c.name == name)
        ).first()
        return _to_info(row) if row else None


def get_run(db: Database, run_id: int) -> RunInfo:
    with db.begin() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise NotFound(f"run {run_id} does not exist")
        return _to_info(row)


def get_runs(db: Database, run_ids: Sequence[int]) -> dict[int, RunInfo]:
    """The runs among ``run_ids`` that exist, by id (one query)."""
    ids = [int(r) for r in run_ids]
    if not ids:
        return {}
    with db.begin() as conn:
        rows = conn.execute(select(runs).where(runs.c.id.in_(ids))).all()
        return {row.id: _to_info(row) for row in rows}


def list_run_ids(db: Database) -> list[int]:
    """Every run's id, ascending."""
    with db.begin() as conn:
        return [int(r) for r in conn.execute(select(runs.c.id).order_by(runs.c.id)).scalars()]


def delete_run(db: Database, run_id: int) -> None:
    """Remove a run and every row that hangs off it (the foreign keys cascade)."""
    with db.begin() as conn:
        conn.execute(delete(runs).where(runs.c.id == run_id))


def delete_project_runs(db: Database, project: str) -> None:
    """Remove every run of ``project`` (and all that hangs off them)."""
    with db.begin() as conn:
        conn.execute(delete(runs).where(runs.c.project == project))


def count_runs_outside(db: Database, project: str) -> int:
    """How many runs belong to another project than ``project``; 0 on a database that has
    no schema yet."""
    with db.begin() as conn:
        if not inspect(conn).has_table("runs"):
            return 0
        q = select(func.count()).select_from(runs).where(runs.c.project != project)
        return int(conn.execute(q).scalar() or 0)


def resolve_run(db: Database, ref: str | int, project: str | None = None) -> RunInfo:
    """A run by id (``7``), by name (``ppo-beta0.05``) or by ``project/name``."""
    ref_s = str(ref).strip()
    if ref_s.isdigit():
        return get_run(db, int(ref_s))
    if project is None and "/" in ref_s:
        project, ref_s = ref_s.split("/", 1)
    with db.begin() as conn:
        q = select(runs).where(runs.c.name == ref_s)
        if project is not None:
            q = q.where(runs.c.project == project)
        rows = conn.execute(q).all()
        if not rows:
            raise NotFound(
                f"no run named {ref_s!r}" + (f" in project {project!r}" if project else "")
            )
        if len(rows) > 1:
            projects = ", ".join(sorted(r.project for r in rows))
            raise NotFound(
                f"run name {ref_s!r} is ambiguous (projects {projects}): use PROJECT/NAME or the id"
            )
        return _to_info(rows[0])


def set_run_status(db: Database, run_id: int, status: str, *, now: float | None = None) -> None:
    if status not in RUN_STATUSES:
        raise InvalidInput(f"status {status!r} is not one of {RUN_STATUSES}")
    now = time.time() if now is None else now
    values: dict[str, Any] = {"status": status, "last_seen_at": now}
    values["finished_at"] = None if status == "running" else now
    with db.begin() as conn:
        result = conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
        if result.rowcount == 0:
            raise NotFound(f"run {run_id} does not exist")


def touch_run(db: Database, run_id: int, *, now: float | None = None) -> None:
    """Record that the run is alive (used to tell a stalled run from a quiet one)."""
    now = time.time() if now is None else now
    with db.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(last_seen_at=now))


def set_baseline_run(db: Database, run_id: int, baseline_run_id: int | None) -> None:
    """Name the run this one is compared against by default (e.g. a known-good run)."""
    if baseline_run_id == run_id:
        raise InvalidInput(f"run {run_id} cannot be its own baseline")
    with db.begin() as conn:
        if baseline_run_id is not None and not run_exists(conn, baseline_run_id):
            raise NotFound(f"baseline run {baseline_run_id} does not exist")
        result = conn.execute(
            update(runs).where(runs.c.id == run_id).values(baseline_run_id=baseline_run_id)
        )
        if result.rowcount == 0:
            raise NotFound(f"run {run_id} does not exist")


def run_exists(conn: Connection, run_id: int) -> bool:
    """Whether the run is stored (in ``conn``'s transaction)."""
    return conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is not None


def run_summaries(db: Database) -> list[dict[str, Any]]:
    """Every run with its step count, last step and its wall time, its current KL and last
    reward, as plain records (the columns of ``RUN_LIST_COLUMNS``; the KL ones None for a
    run without KL).

    The current KL is the latest value of the best KL quantity the run has
    (``monitor.store.current_kl``: kl_mean, else k3, k1, k2), which quantity that is and its
    unit. Two queries whatever the number of runs and steps (``run_list.read_summaries``):
    the counters the step writers keep on ``runs`` with the step rows they point at, and the
    metric_info rows that say which source key filled a KL column."""
    with db.begin() as conn:
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            records, stale = read_summaries(cur)
        finally:
            cur.close()
    for rid in stale:  # the steps were changed behind the writers' back: look it up
        rec = next(r for r in records if r["id"] == rid)
        now = current_kl(db, rid)
        if now is not None:
            rec.update(
                last_kl=now.value,
                kl_step=now.step,
                kl_quantity=now.quantity.name,
                kl_unit=now.quantity.unit,
            )
    return records


def list_runs(db: Database) -> pd.DataFrame:
    """``run_summaries`` as a DataFrame (``n_steps`` int64, ``last_step`` and ``kl_step``
    Int64, ``last_kl``, ``last_wall`` and ``last_reward`` float with NaN for none)."""
    import pandas as pd  # here, not at the top: `klmon runs` reads the records without pandas

    df = pd.DataFrame(run_summaries(db), columns=list(RUN_LIST_COLUMNS))
    df["n_steps"] = df["n_steps"].astype("int64")
    df["last_step"] = df["last_step"].astype("Int64")
    df["kl_step"] = df["kl_step"].astype("Int64")
    for col in ("last_kl", "last_wall", "last_reward"):
        df[col] = df[col].astype(float)
    return df
