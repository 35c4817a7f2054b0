"""extra metrics as column blocks: ``metrics`` (a row per run, step and name) becomes
``metric_blocks`` (a row per run, name and 128 aligned steps: a step bitmap and packed
float64 values); the metric rollups are dropped (a cache, rebuilt from level 7 on read)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 23:40:00
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

from monitor.store import metric_blocks
from monitor.store._bulk import insert_rows

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_CHUNK = 50_000


def upgrade() -> None:
    op.create_table(
        "metric_blocks",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("step_min", sa.BigInteger(), nullable=False),
        sa.Column("step_max", sa.BigInteger(), nullable=False),
        sa.Column("mask", sa.LargeBinary(), nullable=False),
        sa.Column("vals", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_metric_blocks_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "name", "block", name=op.f("pk_metric_blocks")),
    )
    conn = op.get_bind()
    for run_id, name, steps, values in _series(conn):
        rows = metric_blocks.encode(run_id, name, steps, values)
        insert_rows(conn, "metric_blocks", metric_blocks.COLUMNS, rows, copy=len(rows) > 256)
    op.drop_table("metrics")
    op.execute("DELETE FROM metric_rollups")


def _series(conn: Any) -> Iterator[tuple[int, str, np.ndarray, np.ndarray]]:
    """Each (run, name) of the old table with its steps (sorted) and values (NULL: NaN)."""
    result = conn.exec_driver_sql(
        "SELECT run_id, name, step, value FROM metrics ORDER BY run_id, name, step",
        execution_options={"stream_results": True},
    )
    key: tuple[int, str] | None = None
    steps: list[int] = []
    values: list[float] = []
    while chunk := result.fetchmany(_CHUNK):
        for run_id, name, step, value in chunk:
            if (run_id, name) != key:
                if key is not None:
                    yield (*key, np.array(steps, np.int64), np.array(values, np.float64))
                key, steps, values = (int(run_id), str(name)), [], []
            steps.append(int(step))
            values.append(np.nan if value is None else float(value))
    if key is not None:
        yield (*key, np.array(steps, np.int64), np.array(values, np.float64))


def downgrade() -> None:
    op.create_table(
        "metrics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", "name", name=op.f("pk_metrics")),
    )
    conn = op.get_bind()
    result = conn.exec_driver_sql(
        "SELECT block, mask, vals, run_id, name FROM metric_blocks",
        execution_options={"stream_results": True},
    )
    ph = "?" if conn.dialect.name == "sqlite" else "%s"
    while chunk := result.fetchmany(_CHUNK // metric_blocks.BLOCK_STEPS + 1):
        row, steps, values = metric_blocks.decode(chunk)
        conn.exec_driver_sql(
            f"INSERT INTO metrics (run_id, step, name, value) VALUES ({ph}, {ph}, {ph}, {ph})",
            [
                (int(chunk[i][3]), s, chunk[i][4], None if v != v else v)
                for i, s, v in zip(row.tolist(), steps.tolist(), values.tolist(), strict=True)
            ],
        )
    op.drop_table("metric_blocks")
    op.execute("DELETE FROM metric_rollups")
