"""Alembic environment: the engine comes from klmon's settings, never from an ini file."""

from __future__ import annotations

from alembic import context

from monitor.config import db_url
from monitor.store.engine import make_engine
from monitor.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine(db_url())
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("klmon migrations run online only: use `klmon db upgrade`")
run_migrations_online()
