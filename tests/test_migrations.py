"""Migrations of the provider's database: a new database is made by them, one an earlier
release left (before migrations existed) is recognised and upgraded with its rows, the
newest revision is the models exactly, on SQLite and PostgreSQL, processes starting at once
upgrade once, and a database a newer version migrated is refused."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from server.db import Base, SchemaOutdated, init_db, make_engine
from server.keys import KeyStore, hash_key
from server.migrate import ADVISORY_LOCK, SchemaUnrecognised, current_revision, revisions
from server.querylog import fetch_alerts, fetch_queries
from testbed.cli import app
from tests.helpers import wait_until

HEAD = revisions()[-1]
OLD_KEY = "mlaas_an-old-key-from-before-accounts"
THEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def release_before_accounts() -> sa.MetaData:
    """The tables as the last release before accounts (commit f8f575e, revision 0003) made
    them with ``create_all``: no ``account`` on keys, no ``level`` or ``account`` on alerts,
    no decision statistics, no admin sessions."""
    metadata = sa.MetaData()
    when = sa.DateTime(timezone=True)
    sa.Table(
        "api_keys",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), unique=True, nullable=False),
        sa.Column("key_hash", sa.String(64), unique=True, nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("granularity", sa.String(64)),
        sa.Column("rate_limit", sa.Float),
        sa.Column("rate_burst", sa.Integer),
        sa.Column("daily_quota", sa.Integer),
        sa.Column("created_at", when, nullable=False),
        sa.Column("revoked_at", when),
    )
    sa.Table(
        "queries",
        metadata,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("client", sa.String(128), nullable=False),
        sa.Column("created_at", when, nullable=False),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("input_shape", sa.String(32), nullable=False),
        sa.Column("input_png", sa.LargeBinary),
        sa.Column("predicted", sa.Integer, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("granularity", sa.String(64), nullable=False),
        sa.Column("scores", sa.JSON),
        sa.Column("request_key", sa.String(255)),
        sa.Column("position", sa.Integer),
        sa.Index("ix_queries_client_time", "client", "created_at"),
        sa.Index("ux_queries_request", "client", "request_key", "position", unique=True),
    )
    sa.Table(
        "alerts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("client", sa.String(128), index=True, nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("created_at", when, index=True, nullable=False),
        sa.Column("query_count", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
    )
    return metadata


def make_old_database(url: str) -> None:
    """A database as that release left it: a key with a limit, a logged query of an
    idempotent request, and an alarm."""
    metadata = release_before_accounts()
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    tables = metadata.tables
    with engine.begin() as connection:
        connection.execute(
            tables["api_keys"].insert(),
            {
                "name": "alice",
                "key_hash": hash_key(OLD_KEY),
                "key_prefix": OLD_KEY[:10],
                "daily_quota": 500,
                "created_at": THEN,
            },
        )
        connection.execute(
            tables["queries"].insert(),
            {
                "id": "q" * 32,
                "client": "alice",
                "created_at": THEN,
                "input_sha256": "0" * 64,
                "input_shape": "28x28x1",
                "predicted": 3,
                "payload": {"label": 3},
                "latency_ms": 2.5,
                "granularity": "probs",
                "request_key": "request-1",
                "position": 0,
            },
        )
        connection.execute(
            tables["alerts"].insert(),
            {
                "client": "alice",
                "detector": "msp",
                "created_at": THEN,
                "query_count": 40,
                "score": 9.0,
                "threshold": 5.0,
                "action": "block",
            },
        )
    engine.dispose()


def assert_old_rows_read_by_the_server(engine: sa.Engine) -> None:
    keys = KeyStore(engine)
    (key,) = keys.list()
    assert (key.name, key.account, key.limits.daily_quota) == ("alice", "alice", 500)
    client = keys.authenticate(OLD_KEY)
    assert client is not None and (client.name, client.shared_account) == ("alice", None)
    (query,) = fetch_queries(engine, limit=None)
    assert (query["client"], query["predicted"], query["payload"]) == ("alice", 3, {"label": 3})
    (alert,) = fetch_alerts(engine)
    assert (alert["level"], alert["account"], alert["detector"]) == ("key", "alice", "msp")


def differences(engine: sa.Engine) -> list[object]:
    """What autogenerate would change to make the database the models (`alembic check`)."""
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_a_new_database_is_made_by_the_migrations_and_is_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    assert current_revision(engine) is None
    init_db(engine)
    assert current_revision(engine) == HEAD
    assert differences(engine) == []
    init_db(engine)  # every start-up: nothing left to do
    assert current_revision(engine) == HEAD
    engine.dispose()


def test_a_database_from_before_accounts_is_upgraded_with_its_rows(database_url: str) -> None:
    make_old_database(database_url)
    engine = make_engine(database_url)
    assert current_revision(engine) is None  # made before migrations existed
    init_db(engine)
    assert current_revision(engine) == HEAD
    assert_old_rows_read_by_the_server(engine)
    assert differences(engine) == []
    engine.dispose()


def test_an_upgrade_that_fails_leaves_the_database_as_it_was(database_url: str) -> None:
    make_old_database(database_url)
    engine = make_engine(database_url)
    with engine.begin() as connection:  # the name revision 0004 gives the alerts' account index
        connection.execute(sa.text("CREATE INDEX ix_alerts_account ON queries (client)"))
    with pytest.raises(sa.exc.DatabaseError, match="ix_alerts_account"):
        init_db(engine)
    # Revision 0004 had altered the keys before it failed: undone, and nothing stamped.
    assert "account" not in {c["name"] for c in sa.inspect(engine).get_columns("api_keys")}
    assert current_revision(engine) is None
    engine.dispose()


def test_mlaas_db_upgrade_upgrades_an_old_database(tmp_path: Path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_old_database(url)
    monkeypatch.setenv("MLAAS_DATABASE_URL", url)
    runner = CliRunner()
    current = runner.invoke(app, ["db", "current"])
    assert (current.exit_code, current.stdout) == (0, "none\n")
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout == f"{HEAD}\n"
    assert f"from revision 0003 to revision {HEAD}" in upgraded.stderr
    assert runner.invoke(app, ["db", "current"]).stdout == f"{HEAD}\n"
    again = runner.invoke(app, ["db", "upgrade"])
    assert (again.exit_code, again.stdout) == (0, f"{HEAD}\n")
    assert "already" in again.stderr
    engine = make_engine(url)
    assert_old_rows_read_by_the_server(engine)
    engine.dispose()


def test_threads_starting_at_once_upgrade_a_new_database_once(database_url: str) -> None:
    """Alembic keeps its state in module globals: threads of one process take turns."""
    engines = [make_engine(database_url) for _ in range(2)]
    start = threading.Barrier(len(engines))
    failures: list[BaseException] = []

    def start_up(engine: sa.Engine) -> None:
        start.wait()
        try:
            init_db(engine)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start_up, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    with engines[0].connect() as connection:
        stamped = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
        assert stamped.scalars().all() == [HEAD]
    assert differences(engines[0]) == []
    for engine in engines:
        engine.dispose()


def test_server_processes_starting_at_once_wait_for_one_upgrade(postgres_url: str) -> None:
    """Held by someone else, the advisory lock keeps both processes waiting; released, they
    upgrade the new database in turn, and both start."""
    start_up = (
        "import sys; from server.db import init_db, make_engine; init_db(make_engine(sys.argv[1]))"
    )
    repository = Path(__file__).resolve().parents[1]
    holder = sa.create_engine(postgres_url)
    # The processes waiting for the lock this connection holds.
    waiting = sa.text(
        "SELECT count(*) FROM pg_locks AS held"
        " JOIN pg_locks AS waiting USING (locktype, database, classid, objid, objsubid)"
        " WHERE held.locktype = 'advisory' AND held.pid = pg_backend_pid() AND held.granted"
        " AND NOT waiting.granted"
    )
    with holder.begin() as connection:
        connection.execute(ADVISORY_LOCK)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", start_up, postgres_url],
                cwd=repository,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        wait_until(
            lambda: (
                connection.execute(waiting).scalar_one() == 2
                or any(process.poll() is not None for process in processes)
            ),
            timeout=60,
            what="both processes waiting for the lock",
        )
        assert all(process.poll() is None for process in processes), [
            process.communicate()[0] for process in processes
        ]
        assert current_revision(holder) is None
    # The lock went with the transaction.
    for process in processes:
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
    assert current_revision(holder) == HEAD
    holder.dispose()


def test_a_database_a_newer_version_migrated_is_refused(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'newer.db'}")
    init_db(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '0999'"))
    with pytest.raises(SchemaOutdated, match=r"revision '0999', which this version .* a newer"):
        init_db(engine)
    engine.dispose()


def test_what_a_refused_start_left_is_dropped_and_made_again(tmp_path: Path) -> None:
    """Before migrations, a newer version refused an older database after ``create_all`` had
    made the tables it lacked, and a spool's own upgrade added the nullable columns it
    lacked: empty, they are dropped and the revisions make them; holding data, refused."""
    path = tmp_path / "refused.db"
    make_old_database(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    Base.metadata.tables["admin_sessions"].create(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE queries ADD COLUMN statistics JSON"))
        connection.execute(sa.text("ALTER TABLE alerts ADD COLUMN account VARCHAR(128)"))
    init_db(engine)
    assert current_revision(engine) == HEAD
    assert_old_rows_read_by_the_server(engine)
    assert differences(engine) == []
    engine.dispose()

    held = tmp_path / "held.db"
    make_old_database(f"sqlite:///{held}")
    engine = make_engine(f"sqlite:///{held}")
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE queries ADD COLUMN statistics JSON"))
        connection.execute(sa.text("""UPDATE queries SET statistics = '{"msp": 1.0}'"""))
    with pytest.raises(SchemaUnrecognised, match=r"at schema revision 0003 but for queries."):
        init_db(engine)
    assert current_revision(engine) is None  # refused as it was, nothing stamped
    engine.dispose()
