"""run counters: the last step with a reward_mean, on runs, kept up to date by the step writers
so that the run list shows each run's last reward without reading its latest steps

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 23:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_reward_mean_step", sa.BigInteger(), nullable=True))
    # newest first, so a run whose last step has a reward costs one index lookup
    op.execute(
        "UPDATE runs SET last_reward_mean_step = (SELECT s.step FROM steps s "
        "WHERE s.run_id = runs.id AND s.reward_mean IS NOT NULL ORDER BY s.step DESC LIMIT 1)"
    )


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("last_reward_mean_step")
