"""Schema management through Alembic: upgrade, current revision, and the check that refuses
to work on a database whose schema is behind."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.errors import SchemaOutOfDate

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy import Connection, Engine

# Alembic is imported where it is used: opening a database at head (every read command)
# checks the revision without it (``_stored_revision``, ``script_head``). SQLAlchemy too:
# `klmon runs` compares the scripts' head with alembic_version through the driver alone
# (``run_list.py``).


def migrations_dir() -> Path:
    """Where the Alembic scripts are: top-level ``migrations/`` in a checkout, shipped as the
    ``monitor.migrations`` package in the wheel (see pyproject's package-dir)."""
    try:
        import monitor.migrations
    except ModuleNotFoundError:
        # A source checkout imported from its root (python -c, scripts): monitor.migrations
        # exists only once installed, but migrations/ sits beside monitor/.
        checkout = Path(__file__).resolve().parents[2] / "migrations"
        if (checkout / "env.py").is_file():
            return checkout
        raise
    return Path(monitor.migrations.__file__).parent


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_dir()))
    head = script.get_current_head()
    assert head is not None, "no Alembic revisions found"
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


#: Key of the PostgreSQL advisory lock that serialises schema upgrades (any fixed bigint:
#: "klmon" in ASCII). Other applications sharing the database would have to pick the same
#: number by chance to be blocked by it.
UPGRADE_LOCK_KEY = 0x6B6C6D6F6E

#: Alembic runs a migration script through module-level proxies (``alembic.op``,
#: ``alembic.context``): two upgrades on two threads of one process (a writer creating the
#: schema of a new database while another thread upgrades a second one) would run each
#: other's operations. One upgrade at a time per process.
_ALEMBIC = threading.Lock()


def _run_upgrade(engine: Engine, revision: str) -> str | None:
    with _ALEMBIC:
        from alembic import command

        before = current_revision(engine)
        command.upgrade(alembic_config(engine), revision)
        return before


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, a session advisory lock held while the schema changes (nothing on
    SQLite, whose writers the database lock serialises: ``create_schema`` holds it with
    ``BEGIN IMMEDIATE``, as Python's sqlite3 runs DDL outside any transaction)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock:
        lock.exec_driver_sql(f"SELECT pg_advisory_lock({UPGRADE_LOCK_KEY})")
        try:
            yield
        finally:
            lock.exec_driver_sql(f"SELECT pg_advisory_unlock({UPGRADE_LOCK_KEY})")


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the schema to ``revision``; returns the revision it found (None: empty).

    On PostgreSQL the whole upgrade holds a session advisory lock, so two processes
    upgrading the same database at once (two ``klmon db upgrade``, a writer creating the
    schema while another starts) run one after the other: the second waits, finds the
    schema at head and does nothing, instead of failing on a half-created catalog
    (``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``).
    """
    with _schema_lock(engine):
        return _run_upgrade(engine, revision)


#: What the migrations set beyond the tables' DDL (0008: a compressed payload is stored out
#: of line without TOAST trying to compress it again).
_PG_AFTER_CREATE = ("ALTER TABLE samples ALTER COLUMN payload SET STORAGE EXTERNAL",)


def create_schema(engine: Engine) -> bool:
    """Give an empty database the schema at head: the tables of ``monitor.store.tables``
    (``create_all``) and the head revision stamped, instead of running every migration (a
    fifth of a short import's time, Alembic's import included). ``tests/test_schema.py``
    checks that both give the same catalog on SQLite and PostgreSQL. False when the database
    was not empty once the lock was held (another process created the schema meanwhile);
    the scripts' head unclear without Alembic: the migrations run."""
    head = script_head()
    if head is None:
        upgrade(engine)
        return True
    from monitor.store.tables import metadata

    with _schema_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            # sqlite3 commits each CREATE TABLE on its own unless a transaction is open: one
            # write transaction makes the schema appear whole or not at all, and another
            # process creating it waits here, then finds it below
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        if _has_tables(conn):
            return False
        metadata.create_all(conn)
        if conn.dialect.name == "postgresql":
            for sql in _PG_AFTER_CREATE:
                conn.exec_driver_sql(sql)
        # the table Alembic creates, as it creates it
        conn.exec_driver_sql(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
        )
        conn.exec_driver_sql(f"INSERT INTO alembic_version (version_num) VALUES ('{head}')")
    return True


_REVISION = re.compile(r"""^revision\s*=\s*["']([^"']+)["']\s*$""", re.M)
_DOWN_REVISION = re.compile(r"""^down_revision\s*=\s*(?:["']([^"']+)["']|None)\s*$""", re.M)


def script_head() -> str | None:
    """The head revision from the scripts' ``revision``/``down_revision`` lines, without
    importing Alembic; None unless that gives exactly one head (then Alembic decides)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        found = _REVISION.findall(source)
        down = _DOWN_REVISION.search(source)
        if len(found) != 1 or down is None:
            continue
        revisions.add(found[0])
        if down.group(1):
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _stored_revision(engine: Engine) -> str | None:
    """The one row of ``alembic_version``, read without Alembic (None: no table or row)."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    return str(rows[0][0]) if len(rows) == 1 else None


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate with an actionable message unless the schema is at head."""
    head = script_head()
    if head is not None and _stored_revision(engine) == head:
        return  # the common case, answered without importing Alembic
    from alembic.script import ScriptDirectory

    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaOutOfDate(
            "the database has no klmon schema yet: run `klmon db upgrade` (with the same --db)"
        )
    script = ScriptDirectory(str(migrations_dir()))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaOutOfDate(
            f"the database schema is at revision {current}, newer than this klmon knows "
            f"(head {head}): upgrade klmon"
        )
    raise SchemaOutOfDate(
        f"the database schema is at revision {current}, behind {head}: "
        "run `klmon db upgrade` (with the same --db)"
    )


def is_empty(engine: Engine) -> bool:
    """True when the database holds no table at all (a new SQLite file, a new PostgreSQL
    database): the only state in which a client may create the schema on its own."""
    with engine.connect() as conn:
        return not _has_tables(conn)


def _has_tables(conn: Connection) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(conn).get_table_names())


def ensure_schema(engine: Engine) -> bool:
    """Create the schema on an empty database (True when it did); otherwise the same check
    as :func:`check_schema`. A database at an older revision is never migrated here: that
    stays an explicit ``klmon db upgrade``, so one client cannot change a shared schema
    under the others."""
    if _stored_revision(engine) is None and is_empty(engine):
        try:
            created = create_schema(engine)
        except Exception as exc:
            # Another process (a second rank, a dashboard) may have created it meanwhile:
            # then the schema is at head and all is well; otherwise the original error.
            try:
                check_schema(engine)
            except Exception:
                raise exc from None
            return False
        if created:
            return True
    check_schema(engine)
    return False
