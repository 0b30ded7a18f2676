"""Migrations of the provider's database: the Alembic revisions in ``server/migrations``, run
at every start-up (``init_db``) and by ``mlaas db upgrade``.

An upgrade takes a lock first, so that processes starting at once against one database
upgrade it once: PostgreSQL's advisory lock, or SQLite's write lock (``BEGIN IMMEDIATE``).
All of it is one transaction: a revision that fails leaves the database as it was.

A database made before migrations existed has the provider's tables but no
``alembic_version``: its columns say which revision it is at, which is stamped before
upgrading. Its tables are as some release's ``create_all`` made them, but a newer release
that then refused to run on it may have left tables it lacked (``create_all`` ran before the
refusal), and an older spool may have added itself the nullable columns it lacked. Those
never held anything: they are dropped, and the revisions that add them make them again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import NamedTuple

from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import column, create_engine, inspect, select, table, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The PostgreSQL advisory lock that upgrades take, until their transaction ends: on this
# number (the bytes of "mlaa"), which no other user of the database should take, and on the
# schema the tables are in, so that deployments in other schemas never wait for each other.
ADVISORY_LOCK = text(
    "SELECT pg_advisory_xact_lock(:key, hashtext(coalesce(current_schema(), '')))"
).bindparams(key=0x6D6C6161)

# Alembic's ``op`` and ``context`` are module globals: one migration at a time in a process,
# whichever database it is on (the log's and the spool's, say). Taken before the database's.
_IN_PROCESS = threading.Lock()

Layout = dict[str, dict[str, bool]]
"""A database's tables: table -> column -> nullable."""


class SchemaError(RuntimeError):
    """The database's schema is not one this version of the testbed can bring to its own."""


class SchemaOutdated(SchemaError):
    """The database was migrated by a newer version of the testbed than this one."""


class SchemaUnrecognised(SchemaError):
    """The database has the provider's tables, but as no version of the testbed made them."""


class Upgrade(NamedTuple):
    before: str | None
    """The revision the database was at (made before migrations: the one it matched);
    None for a database without the provider's tables."""
    head: str
    """The revision it is at now: this version's newest."""


def revisions() -> list[str]:
    """This version's revisions, oldest first."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the database; None for one not migrated yet."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> Upgrade:
    """Bring the database to this version's newest revision.

    Raises SchemaOutdated for a database at a revision this version does not know (a newer
    version migrated it: running on it would fail later, query by query), and
    SchemaUnrecognised for tables no version made.
    """
    head = revisions()[-1]
    with _IN_PROCESS, _locked(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None:
            before = _adopt(connection, engine)
        elif before not in revisions():
            raise SchemaOutdated(
                f"{_shown(engine)} is at schema revision {before!r}, which this version of "
                f"the testbed does not know (its newest is {head!r}): a newer version "
                "migrated it; run that version, or point MLAAS_DATABASE_URL at another database"
            )
        if before != head:
            log.info("upgrading the database %s from %s to %s", _shown(engine), before, head)
            command.upgrade(_config(connection), "head")
    return Upgrade(before, head)


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the database's upgrade lock until it ends."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            # A large table's migration may outlast the service's statement limit, and so
            # may another process's wait for it.
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(ADVISORY_LOCK)
            yield connection
    elif engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            # Python's sqlite3 would begin a transaction only at the first write, and then a
            # deferred one; BEGIN IMMEDIATE takes the write lock first, so that another
            # process waits (up to the busy timeout) rather than reads the old revision too.
            # isolation_level None: the driver leaves BEGIN to us, and commit() still ends it.
            sqlite_connection = connection.connection.driver_connection
            assert sqlite_connection is not None
            level = sqlite_connection.isolation_level
            sqlite_connection.isolation_level = None
            try:
                with connection.begin():
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                    yield connection
            finally:
                sqlite_connection.isolation_level = level
    else:  # no lock known for it: one transaction
        with engine.begin() as connection:
            yield connection


def _adopt(connection: Connection, engine: Engine) -> str | None:
    """Stamp a database made before migrations with the revision its tables match, after
    dropping what is ahead of that revision; None, stamping nothing, for one without the
    provider's tables (a new database)."""
    if not set(inspect(connection).get_table_names()) - {"alembic_version"}:
        return None  # a new database: no need to read every revision's tables (_layouts)
    layouts = _layouts()
    present = _layout_of(connection, among=set(layouts[-1][1]))
    if not present:
        return None
    match = _match(present, layouts)
    if match is None:
        raise SchemaUnrecognised(
            f"{_shown(engine)}: its tables ({_describe(present)}) match no version of the "
            "testbed; point MLAAS_DATABASE_URL at a new database (or move this one away)"
        )
    revision, leftovers = match
    _drop_unused(connection, engine, revision, leftovers)
    MigrationContext.configure(connection).stamp(_scripts(), revision)
    log.info("the database %s predates migrations: it is at revision %s", _shown(engine), revision)
    return revision


class _Leftovers(NamedTuple):
    tables: list[str]
    columns: dict[str, list[str]]


def _match(present: Layout, layouts: list[tuple[str, Layout]]) -> tuple[str, _Leftovers] | None:
    """The newest revision whose tables ``present`` has, and what it has beyond them."""
    for revision, layout in reversed(layouts):
        leftovers = _leftovers(present, layout, layouts[-1][1])
        if leftovers is not None:
            return revision, leftovers
    return None


def _leftovers(present: Layout, layout: Layout, head_layout: Layout) -> _Leftovers | None:
    """What ``present`` has beyond a revision's ``layout``, if it has all of that and, beyond
    it, only tables and nullable columns of later revisions; else None."""
    columns = {}
    for name, expected in layout.items():
        found = present.get(name)
        if found is None or not set(expected) <= set(found):
            return None
        extra = sorted(set(found) - set(expected))
        if not all(head_layout[name].get(extra_column) for extra_column in extra):
            return None
        if extra:
            columns[name] = extra
    return _Leftovers(sorted(set(present) - set(layout)), columns)


def _drop_unused(
    connection: Connection, engine: Engine, revision: str, leftovers: _Leftovers
) -> None:
    """Drop tables and columns ahead of ``revision``, refusing any that holds something."""
    for name in leftovers.tables:
        if connection.execute(select(1).select_from(table(name)).limit(1)).first():
            raise SchemaUnrecognised(
                f"{_shown(engine)}: its tables are at schema revision {revision} but for "
                f"{name!r}, which holds rows; no version of the testbed made that"
            )
    for name, columns in leftovers.columns.items():
        for extra in columns:
            held = select(1).select_from(table(name)).where(column(extra).is_not(None))
            if connection.execute(held.limit(1)).first():
                raise SchemaUnrecognised(
                    f"{_shown(engine)}: its tables are at schema revision {revision} but for "
                    f"{name}.{extra}, which holds values; no version of the testbed made that"
                )
    operations = Operations(MigrationContext.configure(connection))
    for name in leftovers.tables:
        operations.drop_table(name)
    for name, columns in leftovers.columns.items():
        with operations.batch_alter_table(name) as batch:
            for extra in columns:
                batch.drop_column(extra)


@cache
def _layouts() -> list[tuple[str, Layout]]:
    """Each revision, oldest first, with the tables it makes: read off a scratch database
    upgraded one revision at a time, so that the revisions alone say it."""
    scratch = create_engine("sqlite://")
    layouts = []
    with scratch.begin() as connection:
        for revision in revisions():
            command.upgrade(_config(connection), revision)
            layouts.append((revision, _layout_of(connection)))
    scratch.dispose()
    return layouts


def _layout_of(connection: Connection, among: set[str] | None = None) -> Layout:
    """The tables (those named ``among``, if given) but Alembic's own."""
    inspector = inspect(connection)
    return {
        name: {c["name"]: bool(c["nullable"]) for c in inspector.get_columns(name)}
        for name in inspector.get_table_names()
        if name != "alembic_version" and (among is None or name in among)
    }


def _describe(layout: Layout) -> str:
    return "; ".join(f"{name}: {', '.join(columns)}" for name, columns in sorted(layout.items()))


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def _config(connection: Connection) -> Config:
    config = Config()
    # The path goes through configparser, which reads % as interpolation.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
