"""samples: prompt, response, tokens and log-probs in one compressed payload (a LargeBinary,
``monitor/store/sample_codec.py``) instead of two Text and three JSON columns; existing rows
are converted here, so the readers know one format

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 23:40:00
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from monitor.store.sample_codec import decode_sample, encode_sample

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OLD = ("prompt", "response", "tokens", "policy_logprobs", "ref_logprobs")
_BATCH = 500


def _json(value: Any) -> Any:
    """A JSON column's value: SQLite hands back the text, PostgreSQL the parsed value."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def _rows_after(conn: sa.Connection, columns: str, last: int) -> list[Any]:
    return conn.execute(
        sa.text(f"SELECT id, {columns} FROM samples WHERE id > :last ORDER BY id LIMIT :n"),
        {"last": last, "n": _BATCH},
    ).all()


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("payload", sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    update = sa.text("UPDATE samples SET payload = :payload WHERE id = :id").bindparams(
        sa.bindparam("payload", type_=sa.LargeBinary())
    )
    last = -1
    while rows := _rows_after(conn, ", ".join(_OLD), last):
        params = []
        for id_, prompt, response, tokens, lp, ref in rows:
            payload = encode_sample(
                _json(lp), _json(ref), prompt=prompt, response=response, tokens=_json(tokens)
            )
            params.append({"id": id_, "payload": payload})
        conn.execute(update, params)
        last = rows[-1][0]
    with op.batch_alter_table("samples", schema=None) as batch_op:
        for col in _OLD:
            batch_op.drop_column(col)
        batch_op.alter_column("payload", existing_type=sa.LargeBinary(), nullable=False)
    if conn.dialect.name == "postgresql":  # already compressed: TOAST need not try again
        op.execute("ALTER TABLE samples ALTER COLUMN payload SET STORAGE EXTERNAL")


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("response", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("tokens", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("policy_logprobs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("ref_logprobs", sa.JSON(), nullable=True))
    conn = op.get_bind()
    update = sa.text(
        "UPDATE samples SET prompt = :prompt, response = :response, tokens = :tokens, "
        "policy_logprobs = :lp, ref_logprobs = :ref WHERE id = :id"
    )
    last = -1
    while rows := _rows_after(conn, "payload", last):
        params = []
        for id_, payload in rows:
            s = decode_sample(payload)
            params.append(
                {
                    "id": id_,
                    "prompt": s.prompt,
                    "response": s.response,
                    "tokens": None if s.tokens is None else json.dumps(s.tokens),
                    "lp": json.dumps(s.policy_logprobs.tolist()),
                    "ref": json.dumps(s.ref_logprobs.tolist()),
                }
            )
        conn.execute(update, params)
        last = rows[-1][0]
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.alter_column("policy_logprobs", existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column("ref_logprobs", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("payload")
