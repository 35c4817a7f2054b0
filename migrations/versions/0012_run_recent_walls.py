"""run counters: the step and wall time of each run's 21 latest steps, on runs, kept up to
date by the step writers so that the Runs page judges stalls without reading step rows

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 00:45:00
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

#: The latest steps kept (run_counters.RECENT_STEPS of the code at 0011).
_RECENT = 21


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recent_walls", sa.Text(), nullable=True))
    conn = op.get_bind()
    latest = sa.text(
        "SELECT step, wall_time FROM steps WHERE run_id = :r ORDER BY step DESC LIMIT :n"
    )
    store = sa.text("UPDATE runs SET recent_walls = :w WHERE id = :r")
    # one index range a run, newest first
    for (run_id,) in conn.execute(sa.text("SELECT id FROM runs")).all():
        rows = conn.execute(latest, {"r": run_id, "n": _RECENT}).all()
        if rows:
            walls = json.dumps([[int(s), None if w is None else float(w)] for s, w in rows])
            conn.execute(store, {"w": walls, "r": run_id})


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("recent_walls")
