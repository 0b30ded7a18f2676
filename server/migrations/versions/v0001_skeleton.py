"""The provider's first tables, as the provider skeleton made them (commit d7e2cb9): API keys
and the query log.

Revisions are written by hand and spell out their own types, never importing the models,
which change after them; each must run on SQLite and PostgreSQL alike.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("granularity", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("input_shape", sa.String(32), nullable=False),
        sa.Column("input_png", sa.LargeBinary(), nullable=True),
        sa.Column("predicted", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("granularity", sa.String(64), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=True),
    )
    op.create_index("ix_queries_client_time", "queries", ["client", "created_at"])
