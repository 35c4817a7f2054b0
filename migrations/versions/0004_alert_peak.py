"""alert episodes carry their peak and escalation; rule states their re-fire cool-down

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peak_value", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("peak_step", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("escalate_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("escalated_step", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("escalation_notified_step", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("alert_states", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cooldown_left", sa.Integer(), nullable=False, server_default="0")
        )
    # Episodes stored before this revision keep a NULL peak: their values may be scores
    # (a spike's z), not the level the peak is measured on.


def downgrade() -> None:
    with op.batch_alter_table("alert_states", schema=None) as batch_op:
        batch_op.drop_column("cooldown_left")
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_column("escalation_notified_step")
        batch_op.drop_column("escalated_step")
        batch_op.drop_column("escalate_at")
        batch_op.drop_column("peak_step")
        batch_op.drop_column("peak_value")
