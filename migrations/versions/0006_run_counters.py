"""run counters: n_steps, last_step and the last step of each KL column, on runs, kept up
to date by the step writers so that listing runs reads them instead of counting steps

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 22:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The KL step columns whose last step a run keeps (KL_PREFERENCE of the code at 0006).
_KL = ("kl_mean", "k3", "k1", "k2")


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("n_steps", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("last_step", sa.BigInteger(), nullable=True))
        for col in _KL:
            batch_op.add_column(sa.Column(f"last_{col}_step", sa.BigInteger(), nullable=True))
    sets = [
        "n_steps = (SELECT COUNT(*) FROM steps s WHERE s.run_id = runs.id)",
        "last_step = (SELECT MAX(s.step) FROM steps s WHERE s.run_id = runs.id)",
    ] + [
        f"last_{col}_step = (SELECT MAX(s.step) FROM steps s "
        f"WHERE s.run_id = runs.id AND s.{col} IS NOT NULL)"
        for col in _KL
    ]
    op.execute("UPDATE runs SET " + ", ".join(sets))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for col in reversed(_KL):
            batch_op.drop_column(f"last_{col}_step")
        batch_op.drop_column("last_step")
        batch_op.drop_column("n_steps")
