"""The local SQLite spool that keeps buffered rows while the database is away, and the
idempotent insert it shares with the writer (a row already logged is skipped, not refused)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Insert, delete, func, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from server.db import AlertRecord, QueryRecord, init_db, make_engine
from server.querylog.records import _describe

log = logging.getLogger(__name__)


def _insert_ignoring_conflicts(dialect: str) -> Insert | None:
    """An INSERT of query rows that skips a row clashing with one held, where the dialect
    has ON CONFLICT DO NOTHING; None elsewhere."""
    if dialect == "postgresql":
        return postgresql.insert(QueryRecord).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(QueryRecord).on_conflict_do_nothing()
    return None


def insert_new_queries(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert the query rows the log does not hold yet; the ids of those inserted.

    A row is already held when its id or its (client, request_key, position) is. On
    PostgreSQL and SQLite it is one INSERT ... ON CONFLICT DO NOTHING, so another replica
    moving the same rows at the same moment cannot make it fail. Elsewhere the rows held are
    filtered out first: such a race then fails with IntegrityError, and the next try filters
    them out.
    """
    if not rows:
        return set()
    statement = _insert_ignoring_conflicts(session.get_bind().dialect.name)
    if statement is not None:
        return set(session.execute(statement.returning(QueryRecord.id), rows).scalars())
    ids = [row["id"] for row in rows]
    held_ids = set(session.scalars(select(QueryRecord.id).where(QueryRecord.id.in_(ids))))
    keys = {_request_place(row) for row in rows if row["request_key"] is not None}
    held_keys: set[tuple[Any, ...]] = set()
    if keys:
        columns = (QueryRecord.client, QueryRecord.request_key, QueryRecord.position)
        found = session.execute(select(*columns).where(tuple_(*columns).in_(list(keys))))
        held_keys = {tuple(row) for row in found}
    fresh = []
    for row in rows:
        place = _request_place(row)
        if row["id"] in held_ids or (row["request_key"] is not None and place in held_keys):
            continue
        held_ids.add(row["id"])
        if row["request_key"] is not None:
            held_keys.add(place)
        fresh.append(row)
    if fresh:
        session.execute(insert(QueryRecord), fresh)
    return {row["id"] for row in fresh}


def _request_place(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["client"], row["request_key"], row["position"])


class Moved(NamedTuple):
    taken: int
    """Rows and alerts that left the spool."""
    written: int
    """Query rows the database did not hold yet."""
    alerts: int


class Spool:
    """A local SQLite file that keeps buffered rows while the database is away.

    Rows reach it only when a write to the database fails, and leave it, oldest first, once
    the database answers again, after a restart too: a process killed during an outage loses
    nothing it had answered. Moving rows out cannot be one transaction across two databases,
    so a crash between the two commits would move a batch twice; query rows are skipped when
    already there, by id or by idempotency key (alerts, having neither, could be doubled).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # synchronous=NORMAL: a spooled row then survives the process being killed, which is
        # what the spool is for, but not a power cut; buffered mode answers before its rows
        # are anywhere, so FULL's extra flush per write would buy it nothing it promises.
        self.engine = make_engine(f"sqlite:///{path}", durable=False)
        # The log's own tables, in a local file; one an older version left is upgraded, not
        # refused: its rows are answered queries that must still reach the database.
        init_db(self.engine)

    def put(self, rows: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> int:
        """Keep rows and alerts; how many were kept.

        A row the spool holds already, by id or by (client, request_key, position), is
        skipped with a warning: an idempotent request answered twice during the outage (by
        two workers, or before and after a restart) is one request, and would otherwise
        fail every write to the spool from then on.
        """
        with Session(self.engine) as session, session.begin():
            kept = insert_new_queries(session, rows)
            if alerts:
                session.execute(insert(AlertRecord), alerts)
        if len(kept) < len(rows):
            skipped = [row for row in rows if row["id"] not in kept]
            log.warning("query log spool: %s were spooled already; skipped", _describe(skipped))
        return len(kept) + len(alerts)

    def count(self) -> int:
        with Session(self.engine) as session:
            queries = session.scalar(select(func.count()).select_from(QueryRecord)) or 0
            alerts = session.scalar(select(func.count()).select_from(AlertRecord)) or 0
            return int(queries + alerts)

    def move_into(self, engine: Engine, batch: int = 1000) -> Moved:
        """Move up to ``batch`` rows and alerts into ``engine``'s log.

        Rows the log holds already, by id or by (client, request_key, position), are skipped
        (with a warning) and leave the spool all the same: a move that a crash interrupted,
        or a request another replica logged first, never blocks the rows behind it.
        """
        with Session(self.engine) as spool:
            rows = [
                dict(r._mapping)
                for r in spool.execute(
                    select(QueryRecord.__table__).order_by(QueryRecord.created_at).limit(batch)
                )
            ]
            alerts = [
                dict(r._mapping)
                for r in spool.execute(
                    select(AlertRecord.__table__).order_by(AlertRecord.id).limit(batch)
                )
            ]
        if not rows and not alerts:
            return Moved(0, 0, 0)
        ids = [row["id"] for row in rows]
        with Session(engine) as session, session.begin():
            written = insert_new_queries(session, rows)
            if alerts:  # without the spool's ids: the database numbers its own
                session.execute(
                    insert(AlertRecord),
                    [{k: v for k, v in a.items() if k != "id"} for a in alerts],
                )
        with Session(self.engine) as spool, spool.begin():
            spool.execute(delete(QueryRecord).where(QueryRecord.id.in_(ids)))
            spool.execute(delete(AlertRecord).where(AlertRecord.id.in_([a["id"] for a in alerts])))
        if len(written) < len(rows):
            skipped = [row for row in rows if row["id"] not in written]
            log.warning(
                "query log spool: %s were in the database already; skipped", _describe(skipped)
            )
        return Moved(len(rows) + len(alerts), len(written), len(alerts))

    def close(self) -> None:
        self.engine.dispose()
