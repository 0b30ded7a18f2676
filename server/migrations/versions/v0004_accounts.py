"""Accounts (commit 7bccf8f): a key belongs to an account, and an alarm is on a key's own
queries or on its shared account's.

The new NOT NULL columns are added empty, filled, then made NOT NULL (SQLite rebuilds the
table for that step, hence the batch operations).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("account", sa.String(128), nullable=True))
    # Before accounts every key was alone, and a key alone is the account named after it.
    op.execute("UPDATE api_keys SET account = name")
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("account", existing_type=sa.String(128), nullable=False)
        batch.create_index("ix_api_keys_account", ["account"])

    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("account", sa.String(128), nullable=True))
    # Every earlier alarm was on a key's own queries; the monitor records such an alarm with
    # the key's account, which was the key itself.
    op.execute("UPDATE alerts SET level = 'key', account = client")
    with op.batch_alter_table("alerts") as batch:
        batch.alter_column("level", existing_type=sa.String(16), nullable=False)
        batch.create_index("ix_alerts_account", ["account"])
