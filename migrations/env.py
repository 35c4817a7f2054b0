"""Alembic environment: the engine comes from klmon's settings, never from an ini file."""

from __future__ import annotations

from alembic import context

from monitor.config import db_url
from monitor.store.engine import make_engine
from monitor.store.tables import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine(db_url())
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds a SQLite table by copying it and dropping the old one; with
            # foreign keys on, that DROP would cascade into every child table (dropping a
            # column of `runs` would delete all steps). The pragma only takes effect outside
            # a transaction.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=sqlite,
                    compare_type=True,
                )
                context.run_migrations()
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


if context.is_offline_mode():
    raise SystemExit("klmon migrations run online only: use `klmon db upgrade`")
run_migrations_online()
