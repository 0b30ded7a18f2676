"""Alembic's environment for the provider's database.

``server.migrate`` runs it on a connection it has opened, locked and begun itself (the
connection comes in ``config.attributes``), so there is no URL, no offline mode and no
transaction to manage here: every revision of one upgrade commits, or none does.
"""

from alembic import context

from server.db import Base

context.configure(
    connection=context.config.attributes["connection"],
    # For `alembic revision --autogenerate` while writing a revision by hand: it then compares
    # with the models, and writes ALTERs as batch operations, which SQLite needs.
    target_metadata=Base.metadata,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
