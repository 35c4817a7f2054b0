"""Migrations: the migrated schema equals the tables of ``monitor.store.tables``, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import multiprocessing
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from monitor.errors import SchemaOutOfDate
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.schema import (
    create_schema,
    current_revision,
    head_revision,
    is_empty,
    upgrade,
)
from monitor.store.tables import metadata


def test_migrated_schema_equals_the_tables(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, metadata)
    engine.dispose()
    assert diff == [], f"migrations and tables differ: {diff}"


def _catalog(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    """What a schema is, beyond what ``compare_metadata`` looks at: every table's columns in
    order (name, type, nullability, default, key), indexes, keys and foreign keys, and on
    PostgreSQL each column's storage."""
    out: dict[str, list[tuple[object, ...]]] = {}
    with engine.connect() as conn:
        q = conn.exec_driver_sql
        if engine.dialect.name == "sqlite":
            for (t,) in q("SELECT name FROM sqlite_master WHERE type = 'table'"):
                out[f"{t} columns"] = [tuple(r) for r in q(f"PRAGMA table_xinfo('{t}')")]
                out[f"{t} indexes"] = sorted(
                    (*r[1:], tuple(map(tuple, q(f"PRAGMA index_xinfo('{r[1]}')"))))
                    for r in q(f"PRAGMA index_list('{t}')")
                )
                out[f"{t} foreign keys"] = sorted(
                    tuple(r[2:]) for r in q(f"PRAGMA foreign_key_list('{t}')")
                )
            return out
        for t, *column in q(
            "SELECT table_name, column_name, data_type, character_maximum_length, "
            "is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ):  # in order, not by position: a dropped column leaves a gap in the positions
            out.setdefault(f"{t} columns", []).append(tuple(column))
        for t, *index in q("SELECT tablename, indexname, indexdef FROM pg_indexes "
                           "WHERE schemaname = 'public' ORDER BY 1, 2"):  # fmt: skip
            out.setdefault(f"{t} indexes", []).append(tuple(index))
        for t, *constraint in q(
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ):
            out.setdefault(f"{t} constraints", []).append(tuple(constraint))
        for t, *storage in q(
            "SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 "
            "AND NOT a.attisdropped ORDER BY 1, 2"
        ):
            out.setdefault(f"{t} storage", []).append(tuple(storage))
    return out


def test_a_new_database_created_from_the_tables_equals_the_migrated_one(
    empty_db_url: str,
) -> None:
    """``create_schema`` (the tables and the head stamped, what a new database gets)
    and the migrations give the same catalog and revision."""
    engine = make_engine(empty_db_url)
    upgrade(engine)
    migrated = _catalog(engine)
    with engine.begin() as conn:
        for table in [*reversed(metadata.sorted_tables), "alembic_version"]:
            conn.exec_driver_sql(f"DROP TABLE {table if isinstance(table, str) else table.name}")
    assert is_empty(engine)
    assert create_schema(engine) is True
    assert current_revision(engine) == head_revision()
    created = _catalog(engine)
    assert not create_schema(engine)  # not empty any more: left alone
    engine.dispose()
    assert len(migrated) > 3 * len(metadata.tables)
    assert created == migrated


def test_a_schema_creation_that_fails_leaves_the_database_empty(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_schema is one transaction on both databases (SQLite's driver would commit each
    CREATE TABLE on its own): a failure after the tables leaves none of them, so another
    process never finds a half-built schema."""
    engine = make_engine(empty_db_url)
    real = metadata.create_all

    def create_then_fail(conn, **kw):  # type: ignore[no-untyped-def]
        real(conn, **kw)
        assert inspect(conn).get_table_names()  # the tables are there, inside the transaction
        raise RuntimeError("interrupted")

    monkeypatch.setattr(metadata, "create_all", create_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        create_schema(engine)
    assert is_empty(engine)
    monkeypatch.undo()
    assert create_schema(engine) is True and current_revision(engine) == head_revision()
    engine.dispose()


def test_upgrade_is_idempotent_and_reports_head(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_opening_an_unmigrated_database_says_to_upgrade(empty_db_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match="klmon db upgrade"):
        Database.open(empty_db_url)


def test_opening_a_database_from_a_newer_klmon_says_to_upgrade_klmon(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'base0'")
    engine.dispose()
    # an unknown revision: newer than this klmon knows
    with pytest.raises(SchemaOutOfDate, match="upgrade klmon"):
        Database.open(empty_db_url)


def test_downgrading_a_migration_that_rebuilds_runs_keeps_the_runs_data(
    empty_db_url: str,
) -> None:
    """On SQLite, dropping a column of ``runs`` rebuilds the table; with foreign keys on, the
    drop of the old table would cascade and delete every step of every run."""
    from alembic import command
    from sqlalchemy import text

    from monitor.store.runs import get_or_create_run
    from monitor.store.schema import alembic_config
    from monitor.store.step_writes import write_steps

    engine = make_engine(empty_db_url)
    upgrade(engine)
    db = Database.open(empty_db_url)
    run_id = get_or_create_run(db, "p", "kept").id
    write_steps(db, run_id, [{"step": s, "wall_time": 1.0, "kl_mean": 0.1 * s} for s in range(5)])
    db.dispose()
    command.downgrade(alembic_config(engine), "0009")  # drops runs.last_reward_mean_step
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM steps")).scalar() == 5
        if conn.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    upgrade(engine)
    engine.dispose()


def test_step_columns_are_exactly_the_divergence_quantities() -> None:
    """A quantity added to monitor.divergence must get a steps column (and the reverse)."""
    import numpy as np

    from monitor.divergence import summarize
    from monitor.store.tables import STEP_QUANTITIES, steps

    names = tuple(summarize(np.array([[-0.8, -0.4]]), np.array([[-1.5, -2.1]])).as_dict())
    assert names == STEP_QUANTITIES
    assert set(STEP_QUANTITIES) <= set(steps.columns.keys())


def _upgrade_after(barrier: Barrier, url: str, results: Queue) -> None:
    """One process of the concurrent-upgrade test: wait for the others, then upgrade."""
    engine = make_engine(url)
    barrier.wait()
    try:
        results.put(("ok", upgrade(engine)))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


@pytest.mark.slow
def test_concurrent_upgrades_of_a_fresh_database_are_serialised(empty_db_url: str) -> None:
    """Four processes upgrade one empty database at the same moment: one creates the schema,
    the others wait for it and find it at head; none sees a catalog error."""
    if not empty_db_url.startswith("postgresql"):
        pytest.skip("upgrades are serialised with a PostgreSQL advisory lock")
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_upgrade_after, args=(barrier, empty_db_url, results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    head = head_revision()
    assert sorted(outcomes, key=str) == sorted([("ok", None)] + [("ok", head)] * (n - 1), key=str)
    engine = make_engine(empty_db_url)
    assert current_revision(engine) == head
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []
