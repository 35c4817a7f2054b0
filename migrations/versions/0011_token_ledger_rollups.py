"""token ledger rollups: per power-of-two step bucket, the top token ids by positive and by
negative log p - log q (token_ledger_rollups) and the bucket's masses (token_ledger_rollup_masses)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 23:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_ledger_rollups",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("token_id", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("lr_sum", sa.Float(), nullable=False),
        sa.Column("n_steps", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name="fk_token_ledger_rollups_run_id_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "level", "bucket", "token_id", name="pk_token_ledger_rollups"
        ),
    )
    op.create_table(
        "token_ledger_rollup_masses",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("n_steps", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("pos_mass", sa.Float(), nullable=False),
        sa.Column("neg_mass", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name="fk_token_ledger_rollup_masses_run_id_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "level", "bucket", name="pk_token_ledger_rollup_masses"),
    )


def downgrade() -> None:
    op.drop_table("token_ledger_rollup_masses")
    op.drop_table("token_ledger_rollups")
