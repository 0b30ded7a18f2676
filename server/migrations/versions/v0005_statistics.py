"""Each query's detector decision statistics, which the dashboard charts (commit 85ce541).
None for earlier queries, as for any query no detector saw."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("queries") as batch:
        batch.add_column(sa.Column("statistics", sa.JSON(), nullable=True))
