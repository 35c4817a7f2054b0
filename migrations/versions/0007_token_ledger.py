"""token ledger: per step, the token ids carrying the most positive and most negative
log p - log q (token_ledger, token_ledger_steps), the texts of those ids per run
(token_vocab), and the steps column vocab_top_share

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vocab_top_share", sa.Float(), nullable=True))
    op.create_table(
        "token_ledger",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("token_id", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("lr_sum", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_token_ledger_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "step", "token_id", name="pk_token_ledger"),
    )
    op.create_table(
        "token_ledger_steps",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("pos_mass", sa.Float(), nullable=False),
        sa.Column("neg_mass", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name="fk_token_ledger_steps_run_id_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "step", name="pk_token_ledger_steps"),
    )
    op.create_table(
        "token_vocab",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.BigInteger(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_token_vocab_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "token_id", name="pk_token_vocab"),
    )


def downgrade() -> None:
    op.drop_table("token_vocab")
    op.drop_table("token_ledger_steps")
    op.drop_table("token_ledger")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("vocab_top_share")
