"""Migrations: the migrated schema equals the models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from monitor.errors import SchemaOutOfDate
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.models import Base
from monitor.store.schema import current_revision, head_revision, upgrade


def test_migrated_schema_equals_models(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    upgrade(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == [], f"migrations and models differ: {diff}"


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


def test_step_columns_are_exactly_the_divergence_quantities() -> None:
    """A quantity added to monitor.divergence must get a steps column (and the reverse)."""
    import numpy as np

    from monitor.divergence import summarize
    from monitor.store.models import STEP_QUANTITIES, StepRow

    names = tuple(summarize(np.array([[-0.8, -0.4]]), np.array([[-1.5, -2.1]])).as_dict())
    assert names == STEP_QUANTITIES
    assert set(STEP_QUANTITIES) <= set(StepRow.__table__.columns.keys())
