"""Shared fixtures: every store test runs on SQLite and on the PostgreSQL at 127.0.0.1:5432
(``db_url``, ``db``); tests that need a database file of their own (a CLI, another process, a
browser) take a migrated SQLite file (``sqlite_url``, ``sqlite_db``). Helpers that are not
fixtures live in ``tests/support/``.

PostgreSQL: one fresh database per test session (created from the ``test`` database, migrated
to head, dropped at the end); tables are emptied before each test. Without a reachable server
the PostgreSQL cases are skipped with the reason, unless KLMON_REQUIRE_POSTGRES=1 (CI), where
they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from support.db import migrate, migrated_sqlite
from support.pg_cluster import ClusterUnavailable, ThrowawayCluster

from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.tables import metadata

PG_ADMIN_URL = os.environ.get("KLMON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("KLMON_REQUIRE_POSTGRES") == "1"


def _pg_unavailable(reason: str) -> None:
    if REQUIRE_PG:
        pytest.fail(f"KLMON_REQUIRE_POSTGRES=1 but PostgreSQL is not usable: {reason}")
    pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL} ({reason}); set KLMON_TEST_PG_URL")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"klmon_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        _pg_unavailable(str(exc).splitlines()[0])
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_migrated_url(pg_server_url: str) -> str:
    return migrate(pg_server_url)


def _truncate_all(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A migrated, empty klmon database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return migrated_sqlite(tmp_path / "klmon.db")
    url = request.getfixturevalue("pg_migrated_url")
    _truncate_all(url)
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database.open(db_url)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A migrated, empty SQLite file of this test's own (``tmp_path / "sqlite.db"``)."""
    return migrated_sqlite(tmp_path / "sqlite.db")


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    """The open database of ``sqlite_url``."""
    database = Database.open(sqlite_url)
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database with no klmon schema at all (for migration tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"klmon_empty_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        _pg_unavailable(str(exc).splitlines()[0])

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    request.addfinalizer(drop)
    return f"{PG_ADMIN_URL.rpartition('/')[0]}/{name}"


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayCluster]:
    """A private PostgreSQL cluster (initdb on a free loopback port) for tests that stop and
    start the server: yields the cluster (``.url`` migrated to head, ``.stop()``,
    ``.start()``), destroyed afterwards. Skipped only without the server binaries (fails
    instead under KLMON_REQUIRE_POSTGRES=1)."""
    try:
        cluster = ThrowawayCluster()
    except ClusterUnavailable as exc:
        if REQUIRE_PG:
            pytest.fail(f"KLMON_REQUIRE_POSTGRES=1 but no throwaway cluster: {exc}")
        pytest.skip(f"no throwaway PostgreSQL cluster: {exc}")
    try:
        yield cluster.create()
    finally:
        cluster.destroy()
