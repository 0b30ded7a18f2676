"""The provider's database: API keys and the query log (SQLAlchemy 2).

SQLite under ``var/`` by default, PostgreSQL (or anything SQLAlchemy speaks) when
``MLAAS_DATABASE_URL`` says so. Timestamps are stored as UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Re-exported: callers of init_db catch them from here.
from server.migrate import SchemaError as SchemaError
from server.migrate import SchemaOutdated as SchemaOutdated
from server.migrate import upgrade


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The account the key belongs to: the key's own name unless it shares an account with
    # other keys (detectors then also decide on the account's queries taken together).
    account: Mapped[str] = mapped_column(String(128), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    granularity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # This key's own rate limit and quota; None: the deployment's.
    rate_limit: Mapped[float | None] = mapped_column(Float, nullable=True)
    rate_burst: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class QueryRecord(Base):
    """One answered query: one image, one answer."""

    __tablename__ = "queries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    input_sha256: Mapped[str] = mapped_column(String(64))
    input_shape: Mapped[str] = mapped_column(String(32))
    input_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    predicted: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    granularity: Mapped[str] = mapped_column(String(64))
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Each detector's decision statistic after the query and the query's number, the key's
    # and (``account:``-prefixed) its shared account's: what the dashboard plots against the
    # thresholds. None when no detector ran.
    statistics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # An idempotent request's key and the image's place in it: a retried request is answered
    # from these rows, after a restart or on another replica, and the unique index makes a
    # request's rows land once even when two replicas race on the same key.
    request_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_queries_client_time", "client", "created_at"),
        Index("ux_queries_request", "client", "request_key", "position", unique=True),
    )


class AlertRecord(Base):
    """A detector's alarm on a client: when, after how many of its queries, and what was done.

    ``level`` is ``key`` for an alarm on the key's own queries, ``account`` for one on its
    account's queries taken together (``client`` is then the key whose request tripped it and
    ``query_count`` counts the account's queries).
    """

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    client: Mapped[str] = mapped_column(String(128), index=True)
    level: Mapped[str] = mapped_column(String(16), default="key")
    account: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    detector: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    query_count: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32))


class AdminSession(Base):
    """A dashboard login: kept in the database so that every API process and replica knows
    it. Only the SHA-256 of the session id is stored: a copy of the table opens nothing."""

    __tablename__ = "admin_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


def _postgres_connect_args(
    query: Any,
    connect_timeout_s: float,
    statement_timeout_s: float | None,
    tcp_timeout_s: float | None,
) -> dict[str, Any]:
    """libpq settings that bound how long a silent database can hold a connection.

    connect_timeout bounds making the connection; statement_timeout a statement the server
    runs too long; TCP keepalives a connection that waits for an answer from a peer that is
    gone (a first probe after half the timeout, dead after three unanswered ones a sixth of
    it apart) and tcp_user_timeout data the peer never acknowledges (a partition that drops
    packets): without them either hangs for the kernel's TCP timeouts, minutes to hours.
    What the URL sets itself wins.
    """
    args: dict[str, Any] = {"connect_timeout": max(2, math.ceil(connect_timeout_s))}
    if tcp_timeout_s:
        args |= {
            "keepalives": 1,
            "keepalives_idle": max(1, round(tcp_timeout_s / 2)),
            "keepalives_interval": max(1, round(tcp_timeout_s / 6)),
            "keepalives_count": 3,
            "tcp_user_timeout": max(1, round(tcp_timeout_s * 1000)),  # milliseconds
        }
    args = {name: value for name, value in args.items() if name not in query}
    if statement_timeout_s:
        # Merged into the URL's options (a test's search_path, say), which come after it
        # and so win if they set statement_timeout too.
        ours = f"-c statement_timeout={max(1, round(statement_timeout_s * 1000))}"
        theirs = query.get("options")
        theirs = " ".join(theirs) if isinstance(theirs, tuple) else theirs
        args["options"] = f"{ours} {theirs}" if theirs else ours
    return args


def make_engine(
    url: str,
    *,
    durable: bool = True,
    connect_timeout_s: float = 5.0,
    statement_timeout_s: float | None = None,
    tcp_timeout_s: float | None = 10.0,
) -> Engine:
    """An engine with the settings this workload needs on each backend.

    ``durable``: a SQLite commit reaches the disk before it returns (synchronous=FULL), so
    that a power cut cannot undo a logged query that was answered; off, a commit survives the
    process being killed but not the machine losing power (WAL with synchronous=NORMAL).
    PostgreSQL: ``connect_timeout_s``, ``statement_timeout_s`` (None: no limit, for a command
    that exports a whole log) and ``tcp_timeout_s`` (None: the OS's TCP timeouts) bound how
    long a database that stopped answering can hold a connection.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        synchronous = "FULL" if durable else "NORMAL"

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the CLI read logs and create keys while a server writes.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

        return engine
    # pre-ping: a database that restarted costs one failed check, not a failed request; the
    # timeouts make an unreachable or silent database a quick 503 rather than a hung request.
    connect_args = (
        _postgres_connect_args(parsed.query, connect_timeout_s, statement_timeout_s, tcp_timeout_s)
        if parsed.get_backend_name() == "postgresql"
        and parsed.get_driver_name() in ("psycopg", "psycopg2")  # libpq's parameters
        else {}
    )
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=20,
        pool_timeout=10,
        connect_args=connect_args,
    )


def init_db(engine: Engine) -> None:
    """Bring the database to the schema this version's code needs (see server.migrate): a new
    one is made by the migrations, an older one upgraded, one made before migrations existed
    recognised first; safe with several processes starting at once. Raises SchemaOutdated
    for a database a newer version migrated (and server.migrate.SchemaUnrecognised for
    tables no version made)."""
    upgrade(engine)
