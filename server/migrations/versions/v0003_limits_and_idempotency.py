"""Per-key rate limits and quotas, and idempotent requests recalled from the log (commit
f8f575e, hardening). Every new column may stay empty: None means the deployment's limit, or a
request sent without an idempotency key."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_limit", sa.Float(), nullable=True))
        batch.add_column(sa.Column("rate_burst", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("daily_quota", sa.Integer(), nullable=True))
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("request_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("position", sa.Integer(), nullable=True))
        batch.create_index("ux_queries_request", ["client", "request_key", "position"], unique=True)
