"""The query log (one row per answered query) and the alerts, written off the request path.

The request handler hands the writer plain arrays and dicts, one request at a time; a
background thread does the costly part (PNG encoding, hashing, the database round trip) and
commits several requests per transaction. A request's rows are never split across
transactions, so a crash or a disconnect leaves all of a request's rows or none.

Two modes (``MLAAS_LOG_MODE``):

``durable`` (the default)
    The handler waits for its rows' commit before it answers. The writer commits whatever has
    queued while the previous commit ran (a group commit), so waiting costs one round trip,
    not one per request. A failed commit fails the requests in it: they get 503 and nothing is
    logged, so the log holds exactly the answered queries, even if the database goes away.
``buffered``
    The handler answers at once; rows wait in memory (at most ``max_buffered_rows``) for the
    writer. While the database is away the writer parks them in a local SQLite spool, which
    it empties into the database once it answers again (after a restart too), so answers
    keep flowing through an outage and a crash during one loses nothing. Without a spool the
    rows stay in memory and the write is retried with backoff.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from mlaas.wire import encode_png
from server.db import AlertRecord, QueryRecord, init_db, make_engine

log = logging.getLogger(__name__)


class LogMode(StrEnum):
    durable = "durable"
    buffered = "buffered"


class LogUnavailable(Exception):
    """The query log cannot take these rows now: the request must not be answered."""


class DuplicateRequest(LogUnavailable):
    """Rows with this client's idempotency key are already in the log."""


@dataclass
class PendingQuery:
    """What the handler knows about an answered query; the writer derives the rest."""

    id: str
    client: str
    created_at: datetime
    image: np.ndarray  # uint8 (H, W, C), as the model saw it
    input_shape: str  # as the client sent it, H x W x C
    predicted: int
    payload: dict[str, Any]
    latency_ms: float
    granularity: str
    scores: dict[str, Any] | None = None
    statistics: dict[str, Any] | None = None  # decision statistics after it, and its number
    request_key: str | None = None  # the request's Idempotency-Key
    position: int | None = None  # the image's place in its request
    input_sha256: str | None = None  # when the handler has computed it already


@dataclass
class PendingAlert:
    client: str
    detector: str
    created_at: datetime
    query_count: int
    score: float
    threshold: float
    action: str
    level: str = "key"  # or "account": an alarm on the key's account's queries together
    account: str | None = None


def image_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _to_row(query: PendingQuery, store_input: bool) -> dict[str, Any]:
    image = np.ascontiguousarray(query.image)
    return {
        "id": query.id,
        "client": query.client,
        "created_at": query.created_at,
        "input_sha256": query.input_sha256 or image_sha256(image),
        "input_shape": query.input_shape,
        "input_png": encode_png(image) if store_input else None,
        "predicted": query.predicted,
        "payload": query.payload,
        "latency_ms": query.latency_ms,
        "granularity": query.granularity,
        "scores": query.scores,
        "statistics": query.statistics,
        "request_key": query.request_key,
        "position": query.position,
    }


@dataclass
class _Unit:
    """One request's rows: committed together or not at all."""

    queries: list[PendingQuery]
    alerts: list[PendingAlert]
    done: Future[None] = field(default_factory=Future)
    rows: list[dict[str, Any]] | None = None
    """The queries as table rows, built once (PNG encoding is the costly part) by the writer."""


class Spool:
    """A local SQLite file that keeps buffered rows while the database is away.

    Rows reach it only when a write to the database fails, and leave it, oldest first, once
    the database answers again, after a restart too: a process killed during an outage loses
    nothing it had answered. Moving rows out cannot be one transaction across two databases,
    so a crash between the two commits would move a batch twice; query rows carry their own
    ids and are skipped when already there (alerts, having none, could be doubled then).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine = make_engine(f"sqlite:///{path}")
        self._add_new_columns()
        init_db(self.engine)  # the log's own tables, in a local file

    def _add_new_columns(self) -> None:
        """Add to a spool an older version left the nullable columns added since (such as
        ``queries.statistics``): its rows are answered queries that must still reach the
        database, and the spool is this server's own file, so it is upgraded, not refused."""
        inspector = inspect(self.engine)
        with self.engine.begin() as connection:
            for table in (QueryRecord.__table__, AlertRecord.__table__):
                if not inspector.has_table(table.name):
                    continue
                present = {column["name"] for column in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present or not column.nullable:
                        continue
                    kind = column.type.compile(dialect=self.engine.dialect)
                    connection.execute(
                        text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
                    )

    def put(self, rows: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> None:
        with Session(self.engine) as session, session.begin():
            if rows:
                session.execute(insert(QueryRecord), rows)
            if alerts:
                session.execute(insert(AlertRecord), alerts)

    def count(self) -> int:
        with Session(self.engine) as session:
            queries = session.scalar(select(func.count()).select_from(QueryRecord)) or 0
            alerts = session.scalar(select(func.count()).select_from(AlertRecord)) or 0
            return int(queries + alerts)

    def move_into(self, engine: Engine, batch: int = 1000) -> int:
        """Move up to ``batch`` rows and alerts into ``engine``'s log; how many moved."""
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
            return 0
        ids = [row["id"] for row in rows]
        with Session(engine) as session, session.begin():
            present = set(session.scalars(select(QueryRecord.id).where(QueryRecord.id.in_(ids))))
            fresh = [row for row in rows if row["id"] not in present]
            if fresh:
                session.execute(insert(QueryRecord), fresh)
            if alerts:  # without the spool's ids: the database numbers its own
                session.execute(
                    insert(AlertRecord),
                    [{k: v for k, v in a.items() if k != "id"} for a in alerts],
                )
        with Session(self.engine) as spool, spool.begin():
            spool.execute(delete(QueryRecord).where(QueryRecord.id.in_(ids)))
            spool.execute(delete(AlertRecord).where(AlertRecord.id.in_([a["id"] for a in alerts])))
        return len(rows) + len(alerts)

    def close(self) -> None:
        self.engine.dispose()


_STOP = object()


class QueryLogWriter:
    """A background thread that persists each request's rows in one transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        mode: LogMode | str = LogMode.durable,
        store_inputs: bool = True,
        flush_rows: int = 512,
        flush_interval_s: float = 0.1,
        max_retry_delay_s: float = 5.0,
        max_buffered_rows: int = 100_000,
        spool: Path | None = None,
    ) -> None:
        """``spool``: buffered mode keeps rows in this SQLite file while the database is away
        (without one, in memory only, retrying)."""
        self._engine = engine
        self.mode = LogMode(mode)
        self._store_inputs = store_inputs
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._max_retry_delay_s = max_retry_delay_s
        self._max_buffered_rows = max_buffered_rows
        self._spool = Spool(spool) if spool is not None and self.mode is LogMode.buffered else None
        self.spooled = self._spool.count() if self._spool is not None else 0
        """Rows and alerts in the spool, waiting for the database."""
        self._next_move = 0.0
        self._move_delay = 0.05
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending_rows = 0
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="query-log-writer", daemon=True)
        self._closed = False
        self._give_up_at: float | None = None
        self.written = 0
        self.alerts_written = 0
        self.write_errors = 0
        self.lost = 0
        self.healthy = True
        """False from a failed write until the next successful one."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending_rows

    def submit(self, items: Sequence[PendingQuery | PendingAlert]) -> Future[None]:
        """Queue one request's rows; the future completes when they are safe.

        In durable mode that is their commit, and the future fails with
        :class:`LogUnavailable` (or :class:`DuplicateRequest`) when the commit does. In
        buffered mode it is their commit or, while the database is away, their place in the
        spool (without a spool, only their commit, however long that takes); a full buffer
        raises :class:`LogUnavailable` here, before anything is queued.
        """
        if self._closed:
            raise LogUnavailable("the query log writer is closed")
        queries = [q for q in items if isinstance(q, PendingQuery)]
        if (
            self.mode is LogMode.buffered
            and self._pending_rows + len(queries) > self._max_buffered_rows
        ):
            raise LogUnavailable(
                f"the query log buffer is full ({self._pending_rows} rows wait for the database)"
            )
        unit = _Unit(queries, [a for a in items if isinstance(a, PendingAlert)])
        with self._count_lock:
            self._pending_rows += len(queries)
        self._queue.put(unit)
        return unit.done

    def close(self, timeout: float | None = None) -> None:
        """Write every pending row, then stop the thread.

        With ``timeout``, a buffered writer whose database stays away gives up after that
        long: what it could spool waits there for the next start, the rest is counted as lost
        (a durable writer has nothing waiting).
        """
        if self._closed:
            return
        self._closed = True
        if timeout is not None:
            self._give_up_at = time.monotonic() + timeout
        self._queue.put(_STOP)
        self._thread.join(None if timeout is None else timeout + 5.0)
        if self._spool is not None:
            if self.spooled:
                log.warning(
                    "query log: %d rows stay in %s until the database answers",
                    self.spooled,
                    self._spool.path,
                )
            self._spool.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            units: list[_Unit] = []
            rows = 0
            deadline = None
            while rows < self._flush_rows:
                if self.mode is LogMode.durable and units:
                    timeout = 0.0  # group commit: take what is queued, never wait for more
                else:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if self.spooled:  # wake up to move spooled rows
                        until_move = max(0.0, self._next_move - time.monotonic())
                        timeout = until_move if timeout is None else min(timeout, until_move)
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                units.append(item)
                rows += len(item.queries)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_interval_s
            if units:
                if self.mode is LogMode.durable:
                    self._commit_or_fail(units)
                else:
                    self._write_until_done(units)
            if self.spooled:
                self._move_spooled(until_empty=stopping)

    def _finished(self, units: list[_Unit]) -> None:
        with self._count_lock:
            self._pending_rows -= sum(len(u.queries) for u in units)

    @staticmethod
    def _alerts(units: list[_Unit]) -> list[dict[str, Any]]:
        return [asdict(alert) for u in units for alert in u.alerts]

    def _rows(self, units: list[_Unit]) -> list[dict[str, Any]]:
        for unit in units:
            if unit.rows is None:
                unit.rows = [_to_row(q, self._store_inputs) for q in unit.queries]
        return [row for u in units for row in u.rows or ()]

    def _insert(self, units: list[_Unit]) -> None:
        rows, alerts = self._rows(units), self._alerts(units)
        with Session(self._engine) as session, session.begin():
            if rows:
                session.execute(insert(QueryRecord), rows)
            if alerts:
                session.execute(insert(AlertRecord), alerts)
        self.written += len(rows)
        self.alerts_written += len(alerts)
        self.healthy = True

    def _commit_or_fail(self, units: list[_Unit]) -> None:
        try:
            self._insert(units)
        except IntegrityError:
            if len(units) == 1:
                self._fail(units, DuplicateRequest("this request is already in the log"))
                return
            # One request's idempotency key clashed; commit the others on their own.
            for unit in units:
                self._commit_or_fail([unit])
            return
        except Exception as exc:
            self.write_errors += 1
            self.healthy = False
            log.warning("query log commit failed, %d requests refused: %s", len(units), exc)
            self._fail(units, LogUnavailable("the query log database is unavailable"))
            return
        self._succeed(units)

    def _succeed(self, units: list[_Unit]) -> None:
        self._finished(units)
        for unit in units:
            unit.done.set_result(None)

    def _fail(self, units: list[_Unit], error: LogUnavailable) -> None:
        self._finished(units)
        for unit in units:
            unit.done.set_exception(error)

    def _write_until_done(self, units: list[_Unit]) -> None:
        delay = 0.05
        while True:
            try:
                self._insert(units)
                break
            except IntegrityError:
                if len(units) == 1:
                    # Answered already (a duplicate idempotency key from another replica).
                    log.error(
                        "query log: request already logged; %d rows not written again",
                        len(units[0].queries),
                    )
                    break
                for unit in units:
                    self._write_until_done([unit])
                return
            except Exception as exc:
                self.write_errors += 1
                self.healthy = False
                if self._to_spool(units, exc):
                    return
                # Keep the rows and try again: losing answered queries would blind the log.
                log.warning(
                    "query log write failed, %d rows wait; retrying in %.2f s: %s",
                    self.pending,
                    delay,
                    exc,
                )
                if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    self.lost += self._drain_on_give_up(units)
                    return
                time.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay_s)
        self._succeed(units)

    def _to_spool(self, units: list[_Unit], error: Exception) -> bool:
        """Park the rows in the spool; False when there is none or it fails too."""
        if self._spool is None:
            return False
        rows, alerts = self._rows(units), self._alerts(units)
        try:
            self._spool.put(rows, alerts)
        except Exception:
            log.exception("query log spool %s failed", self._spool.path)
            return False
        if not self.spooled:
            log.warning(
                "query log database unavailable, spooling to %s: %s", self._spool.path, error
            )
        self.spooled += len(rows) + len(alerts)
        self._succeed(units)
        return True

    def _move_spooled(self, until_empty: bool = False) -> None:
        """Move spooled rows into the database, oldest first, backing off while it is away.

        One batch per call while serving; ``until_empty`` (stopping) moves them all, or
        retries until the shutdown timeout and leaves the rest for the next start.
        """
        while self.spooled:
            if not until_empty and time.monotonic() < self._next_move:
                return
            try:
                moved = self._spool.move_into(self._engine)  # type: ignore[union-attr]
            except Exception as exc:
                log.debug("query log spool: the database is still away: %s", exc)
                self._move_delay = min(self._move_delay * 2, self._max_retry_delay_s)
                self._next_move = time.monotonic() + self._move_delay
                if (
                    not until_empty
                    or self._give_up_at is None
                    or time.monotonic() > self._give_up_at
                ):
                    return
                time.sleep(self._move_delay)
                continue
            self._move_delay = 0.05
            self.healthy = True
            self.written += moved
            self.spooled = max(0, self.spooled - moved) if moved else 0
            if not self.spooled:
                log.info("query log spool emptied into the database")
            if not until_empty:
                return

    def _drain_on_give_up(self, units: list[_Unit]) -> int:
        lost = sum(len(u.queries) for u in units)
        stop_seen = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop_seen = True
            else:
                units.append(item)
                lost += len(item.queries)
        if stop_seen:
            self._queue.put(_STOP)
        self._fail(units, LogUnavailable("the query log database stayed unavailable"))
        log.error("query log: the database stayed unavailable; %d answered rows lost", lost)
        return lost


def fetch_request(engine: Engine, client: str, request_key: str) -> list[dict[str, Any]]:
    """The logged rows of one client's idempotent request, in the request's order."""
    statement = (
        select(
            QueryRecord.id,
            QueryRecord.input_sha256,
            QueryRecord.payload,
            QueryRecord.granularity,
        )
        .where(QueryRecord.client == client, QueryRecord.request_key == request_key)
        .order_by(QueryRecord.position)
    )
    with Session(engine) as session:
        return [dict(row._mapping) for row in session.execute(statement)]


def record_to_dict(record: QueryRecord, include_input: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": record.id,
        "client": record.client,
        "time": record.created_at.isoformat(),
        "input_sha256": record.input_sha256,
        "input_shape": record.input_shape,
        "predicted": record.predicted,
        "payload": record.payload,
        "latency_ms": round(record.latency_ms, 3),
        "granularity": record.granularity,
        "scores": record.scores,
        "statistics": record.statistics,
    }
    if include_input:
        png = record.input_png
        row["input_png_base64"] = base64.b64encode(png).decode("ascii") if png else None
    return row


def fetch_queries(
    engine: Engine,
    *,
    client: str | None = None,
    since: datetime | None = None,
    limit: int | None = 100,
    offset: int = 0,
    newest_first: bool = False,
    include_input: bool = False,
) -> list[dict[str, Any]]:
    statement = select(QueryRecord)
    if not include_input:
        statement = statement.options(defer(QueryRecord.input_png))
    if client is not None:
        statement = statement.where(QueryRecord.client == client)
    if since is not None:
        statement = statement.where(QueryRecord.created_at >= since)
    order = QueryRecord.created_at.desc() if newest_first else QueryRecord.created_at
    statement = statement.order_by(order, QueryRecord.id).offset(offset)
    if limit is not None:
        statement = statement.limit(limit)
    with Session(engine) as session:
        return [record_to_dict(r, include_input) for r in session.scalars(statement)]


def fetch_statistics(
    engine: Engine, clients: Sequence[str], *, limit: int = 300
) -> list[dict[str, Any]]:
    """The decision statistics of ``clients``' newest ``limit`` queries, newest first, for
    those that have them (a query the monitor did not see has none): the column alone."""
    if not clients:
        return []
    statement = (
        select(QueryRecord.statistics)
        .where(QueryRecord.client.in_(list(clients)))
        .order_by(QueryRecord.created_at.desc(), QueryRecord.id)
        .limit(limit)
    )
    with Session(engine) as session:
        return [row for row in session.scalars(statement) if isinstance(row, dict)]


def count_queries(engine: Engine, client: str | None = None, since: datetime | None = None) -> int:
    statement = select(func.count()).select_from(QueryRecord)
    if client is not None:
        statement = statement.where(QueryRecord.client == client)
    if since is not None:
        statement = statement.where(QueryRecord.created_at >= since)
    with Session(engine) as session:
        return int(session.scalar(statement) or 0)


def fetch_alerts(
    engine: Engine,
    *,
    client: str | None = None,
    account: str | None = None,
    level: str | None = None,
    since: datetime | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    statement = select(AlertRecord)
    if client is not None:
        statement = statement.where(AlertRecord.client == client)
    if account is not None:
        statement = statement.where(AlertRecord.account == account)
    if level is not None:
        statement = statement.where(AlertRecord.level == level)
    if since is not None:
        statement = statement.where(AlertRecord.created_at >= since)
    statement = statement.order_by(AlertRecord.created_at, AlertRecord.id)
    if limit is not None:
        statement = statement.limit(limit)
    with Session(engine) as session:
        return [
            {
                "id": a.id,
                "client": a.client,
                "level": a.level,
                "account": a.account,
                "detector": a.detector,
                "time": a.created_at.isoformat(),
                "query_count": a.query_count,
                "score": a.score,
                "threshold": a.threshold,
                "action": a.action,
            }
            for a in session.scalars(statement)
        ]
