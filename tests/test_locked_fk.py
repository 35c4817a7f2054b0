"""``locked_fk``: a bulk COPY of step rows skips PostgreSQL's per-row foreign-key checks only
where the run's lock proves them and nothing else is skipped; the key itself stays in force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Connection

from monitor.errors import StoreError
from monitor.store.database import Database
from monitor.store.locked_fk import fk_checks_held_by_lock
from monitor.store.runs import delete_run, get_or_create_run
from monitor.store.step_writes import COPY_MIN_ROWS, write_step_frame


def _role(conn: Connection) -> str:
    return conn.exec_driver_sql("SHOW session_replication_role").scalar()


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": np.arange(n),
            "wall_time": 1.7e9 + np.arange(n),
            "payload_hash": [f"v2:{i:032x}" for i in range(n)],
            "k3": np.linspace(0, 1, n),
        }
    )


# PostgreSQL only: SQLite's foreign keys have no per-row trigger
pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def pg(db: Database) -> Database:
    return db


def test_the_checks_are_skipped_for_the_block_only(pg: Database) -> None:
    with pg.begin() as conn:
        assert _role(conn) == "origin"
        with fk_checks_held_by_lock(conn, "steps", "runs") as skipped:
            assert skipped  # the test server's user is a superuser
            assert _role(conn) == "replica"
        assert _role(conn) == "origin"
        conn.rollback()


def test_an_imported_frame_keeps_the_key_in_force(pg: Database) -> None:
    """The frame's COPY stores every row; afterwards a row of a missing run is refused and
    deleting the run removes its rows (the cascade), as with the checks on."""
    run = get_or_create_run(pg, "proj", "fk")
    n = COPY_MIN_ROWS + 1
    assert write_step_frame(pg, run.id, _frame(n)).inserted == n
    with pg.begin() as conn:
        assert _role(conn) == "origin"
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM steps").scalar() == n
    with pytest.raises(StoreError, match="foreign key"), pg.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO steps (run_id, step, wall_time, status, ranks_seen) "
            "VALUES (999999, 1, 0, 'ok', 1)"
        )
    delete_run(pg, run.id)
    with pg.begin() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM steps").scalar() == 0


@pytest.mark.parametrize("obstacle", ["trigger", "rule", "role", "not superuser"])
def test_nothing_is_skipped_where_more_than_the_key_would_be(pg: Database, obstacle: str) -> None:
    """A trigger or rule of the table's own (replica mode would skip it too), a role that is
    not 'origin' now, a user who may not set the role: the checks run as usual."""
    with pg.begin() as conn:
        if obstacle == "trigger":
            conn.exec_driver_sql(
                "CREATE FUNCTION pg_temp.noop() RETURNS trigger LANGUAGE plpgsql "
                "AS 'BEGIN RETURN NEW; END'"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER audit AFTER INSERT ON steps FOR EACH ROW "
                "EXECUTE FUNCTION pg_temp.noop()"
            )
        elif obstacle == "rule":
            conn.exec_driver_sql(
                "CREATE RULE quiet AS ON INSERT TO steps WHERE NEW.step < 0 DO INSTEAD NOTHING"
            )
        elif obstacle == "role":
            conn.exec_driver_sql("SET LOCAL session_replication_role = local")
        else:
            conn.exec_driver_sql("CREATE ROLE klmon_test_plain NOLOGIN")
            conn.exec_driver_sql("GRANT USAGE ON SCHEMA public TO klmon_test_plain")
            conn.exec_driver_sql("SET LOCAL ROLE klmon_test_plain")
        before = _role(conn)
        with fk_checks_held_by_lock(conn, "steps", "runs") as skipped:
            assert not skipped
            assert _role(conn) == before
        conn.rollback()
