"""The provider's database: `mlaas db upgrade`, `mlaas db current`.

The server upgrades its database itself at start-up; `mlaas db upgrade` does it beforehand,
for an operator who would rather see it happen than have the first replica do it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from testbed.cli.common import _server_settings, app, err, fail

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

db_app = typer.Typer(
    help="The provider's database: its schema's revision, and upgrades to this version's.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")


def _engine() -> Engine:
    from server.db import make_engine

    settings = _server_settings()
    # The server's timeouts, but no statement limit: a migration of a large log takes long.
    return make_engine(
        settings.resolved_database_url,
        **{**settings.database_options, "statement_timeout_s": None},
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Upgrade the database (MLAAS_DATABASE_URL) to this version's schema; print its revision."""
    from sqlalchemy.exc import OperationalError

    from server.migrate import SchemaError, upgrade

    engine = _engine()
    try:
        before, head = upgrade(engine)
    except SchemaError as exc:
        raise fail(str(exc)) from exc
    except OperationalError as exc:
        raise fail(f"the database does not answer: {exc.orig}") from exc
    finally:
        engine.dispose()
    if before == head:
        err.print(f"the database is at revision {head}, this version's newest, already")
    else:
        made = "a new database" if before is None else f"revision {before}"
        err.print(f"upgraded the database from {made} to revision {head}")
    print(head)


@db_app.command("current")
def db_current() -> None:
    """Print the database's schema revision (none: not migrated yet); change nothing."""
    from sqlalchemy.exc import OperationalError

    from server.migrate import current_revision, revisions

    engine = _engine()
    try:
        revision = current_revision(engine)
    except OperationalError as exc:
        raise fail(f"the database does not answer: {exc.orig}") from exc
    finally:
        engine.dispose()
    head = revisions()[-1]
    if revision is None:
        err.print(f"not migrated yet: `mlaas db upgrade` brings it to revision {head}")
    elif revision not in revisions():
        err.print(f"a newer version migrated it: this version's newest revision is {head}")
    elif revision != head:
        err.print(f"this version's newest revision is {head}: `mlaas db upgrade` brings it there")
    print(revision or "none")
