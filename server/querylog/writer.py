"""The query log (one row per answered query) and the alerts, written off the request path.

The request handler hands the writer plain arrays and dicts, one request at a time; a
background thread does the costly part (PNG encoding, hashing, the database round trip) and
commits several requests per transaction. A request's rows are never split across
transactions, so a crash or a disconnect leaves all of a request's rows or none.

Two modes (``MLAAS_LOG_MODE``):

``durable`` (the default)
    The handler waits for its rows' commit before it answers. The writer commits whatever has
    queued while the previous commit ran (a group commit), so waiting costs one round trip,
    not one per request. A failed commit fails the requests in it: they get 503 and their
    queries are not logged, so the log holds the answered queries, even if the database goes
    away. Their alerts are kept and written once it is back: the detectors' state already
    says the client was flagged, so no later request would raise them again. A request that
    waits longer than its timeout gets 503 too, but its rows stay queued and are logged if
    the commit succeeds later: the log may then hold a query whose answer never reached the
    client (the safe side for detection), and a retry under the same Idempotency-Key is
    answered from those rows.
``buffered``
    The handler answers at once; rows wait in memory (at most ``max_buffered_rows``) for the
    writer. While the database is away the writer parks them in a local SQLite spool, which
    it empties into the database once it answers again (after a restart too), so answers
    keep flowing through an outage and a crash during one loses nothing. Without a spool the
    rows stay in memory and the write is retried with backoff. Writes are idempotent: a row
    already logged, by id or by (client, request_key, position) (one idempotent request
    answered twice during an outage, by two workers or before and after a restart), is
    skipped with a warning, so a duplicate can never jam the spool or the writer.

Errors are told apart: an outage (connection refused, lost or timed out) is retried quietly
with backoff; any other error (a constraint violation, say) is a warning, at most once a
minute while it repeats, never mistaken for "the database is still away".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import delete, func, insert, inspect, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
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


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached now (try again later), rather
    than that it refused these rows (which trying again will not change)."""
    if isinstance(error, IntegrityError):
        return False
    if isinstance(error, OperationalError | InterfaceError | PoolTimeout):
        return True  # refused, lost or timed-out connections, statement timeouts
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, ConnectionError | TimeoutError)


class _Repeating:
    """Logs a recurring problem at most once per ``every_s``, saying how often it recurred."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._since = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        self._since += 1
        if now - self._last < self.every_s:
            return
        if self._since > 1:
            message += " (%d times since the last report)"
            args = (*args, self._since)
        log.warning(message, *args)
        self._last, self._since = now, 0


_ON_CONFLICT_DO_NOTHING = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


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
    insert_ignoring = _ON_CONFLICT_DO_NOTHING.get(session.get_bind().dialect.name)
    if insert_ignoring is not None:
        statement = insert_ignoring(QueryRecord).on_conflict_do_nothing()
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


def _describe(rows: list[dict[str, Any]], limit: int = 5) -> str:
    """Which rows, for a log line: their clients and idempotency keys (never the images)."""
    places = sorted({(row["client"], row["request_key"]) for row in rows}, key=repr)
    named = ", ".join(f"{client!r} key {key!r}" for client, key in places[:limit])
    more = f" and {len(places) - limit} more" if len(places) > limit else ""
    return f"{len(rows)} rows of {named}{more}"


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
        max_kept_alerts: int = 10_000,
    ) -> None:
        """``spool``: buffered mode keeps rows in this SQLite file while the database is away
        (without one, in memory only, retrying). ``max_kept_alerts``: alerts of failed
        commits held in memory for the database's return, at most (the oldest go first)."""
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
        self._spool_trouble = _Repeating()
        self._kept_alerts: list[dict[str, Any]] = []
        """Alerts of requests whose commit failed: written on their own once it can be."""
        self._max_kept_alerts = max_kept_alerts
        self._next_alert_try = 0.0
        self._alert_delay = 0.05
        self._alert_trouble = _Repeating()
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
        self.alerts_lost = 0
        self.healthy = True
        """False from a failed write until the next successful one."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending_rows

    @property
    def alerts_waiting(self) -> int:
        """Alerts of failed commits that wait for the database."""
        return len(self._kept_alerts)

    def submit(self, items: Sequence[PendingQuery | PendingAlert]) -> Future[None]:
        """Queue one request's rows; the future completes when they are safe.

        In durable mode that is their commit, and the future fails with
        :class:`LogUnavailable` (or :class:`DuplicateRequest`) when the commit does; the
        alerts are then kept and written later (see the module's doc). A caller that stops
        waiting (a timeout) leaves the rows queued: committed later, they stay logged. In
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
        (a durable writer has only the alerts of failed commits waiting: they get as long).
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
                    chore = self._next_chore()
                    if chore is not None:  # wake up to move spooled rows or write kept alerts
                        until_chore = max(0.0, chore - time.monotonic())
                        timeout = until_chore if timeout is None else min(timeout, until_chore)
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
            if self._kept_alerts:
                self._write_kept_alerts(until_empty=stopping)

    def _next_chore(self) -> float | None:
        """When spooled rows or kept alerts are next due a try; None when none wait."""
        due = [
            at
            for at, waiting in (
                (self._next_move, self.spooled),
                (self._next_alert_try, self._kept_alerts),
            )
            if waiting
        ]
        return min(due, default=None)

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

    def _insert(self, units: list[_Unit], *, skip_logged: bool = False) -> list[dict[str, Any]]:
        """Commit the units' rows and alerts in one transaction; the rows skipped.

        ``skip_logged``: rows the log holds already (by id or idempotency key) are skipped;
        otherwise one fails the whole transaction with IntegrityError.
        """
        rows, alerts = self._rows(units), self._alerts(units)
        with Session(self._engine) as session, session.begin():
            if skip_logged:
                inserted = insert_new_queries(session, rows)
            else:
                if rows:
                    session.execute(insert(QueryRecord), rows)
                inserted = {row["id"] for row in rows}
            if alerts:
                session.execute(insert(AlertRecord), alerts)
        skipped = [row for row in rows if row["id"] not in inserted]
        self.written += len(rows) - len(skipped)
        self.alerts_written += len(alerts)
        self.healthy = True
        return skipped

    def _commit_or_fail(self, units: list[_Unit]) -> None:
        try:
            self._insert(units)
        except IntegrityError:
            if len(units) == 1:
                # Another replica logged this request; the detectors here counted its images
                # all the same, and an alert they raised must not be lost with the rows.
                self._keep_alerts(units)
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
            self._keep_alerts(units)
            self._fail(units, LogUnavailable("the query log database is unavailable"))
            return
        self._succeed(units)

    def _succeed(self, units: list[_Unit]) -> None:
        self._finished(units)
        for unit in units:
            # A future its caller cancelled must not stop the thread (the rows are written).
            with contextlib.suppress(InvalidStateError):
                unit.done.set_result(None)

    def _fail(self, units: list[_Unit], error: LogUnavailable) -> None:
        self._finished(units)
        for unit in units:
            with contextlib.suppress(InvalidStateError):
                unit.done.set_exception(error)

    def _write_until_done(self, units: list[_Unit]) -> None:
        delay = 0.05
        while True:
            try:
                skipped = self._insert(units, skip_logged=True)
                if skipped:  # an idempotent request answered twice, by two workers, say
                    log.warning("query log: %s were logged already; skipped", _describe(skipped))
                break
            except IntegrityError as exc:
                if len(units) == 1:
                    # Not an idempotency key met twice (those are skipped above, but for a
                    # race on a database without ON CONFLICT): the database refuses these
                    # rows, and would for ever. Their alerts are written on their own.
                    log.warning(
                        "query log: the database refused %s; skipped: %s",
                        _describe(self._rows(units)),
                        exc,
                    )
                    self._keep_alerts(units)
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
            kept = self._spool.put(rows, alerts)
        except Exception:
            log.exception("query log spool %s failed", self._spool.path)
            return False
        if not self.spooled:
            log.warning(
                "query log database unavailable, spooling to %s: %s", self._spool.path, error
            )
        self.spooled += kept
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
                if is_outage(exc):
                    log.debug("query log spool: the database is still away: %s", exc)
                else:  # not an outage: it will not pass by itself, so it must be seen
                    self._spool_trouble.warning(
                        "query log spool: moving rows into the database failed (%d wait in "
                        "%s); retrying with backoff: %s",
                        self.spooled,
                        self._spool.path,  # type: ignore[union-attr]
                        exc,
                    )
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
            self.written += moved.written
            self.alerts_written += moved.alerts
            self.spooled = max(0, self.spooled - moved.taken) if moved.taken else 0
            if not self.spooled:
                log.info("query log spool emptied into the database")
            if not until_empty:
                return

    def _keep_alerts(self, units: list[_Unit]) -> None:
        """Keep the alerts of units that were not committed, to be written on their own."""
        alerts = self._alerts(units)
        if not alerts:
            return
        self._kept_alerts.extend(alerts)
        log.warning("query log: %d alerts of a failed commit wait for the database", len(alerts))
        overflow = len(self._kept_alerts) - self._max_kept_alerts
        if overflow > 0:
            del self._kept_alerts[:overflow]
            self.alerts_lost += overflow
            log.error("query log: %d alerts dropped, the oldest of too many waiting", overflow)

    def _write_kept_alerts(self, until_empty: bool = False) -> None:
        """Write the kept alerts, oldest first, backing off while the database is away.

        One batch per call while serving; ``until_empty`` (stopping) writes them all, or
        retries until the shutdown timeout and counts the rest as lost.
        """
        while self._kept_alerts:
            if not until_empty and time.monotonic() < self._next_alert_try:
                return
            alerts = self._kept_alerts[:1000]
            try:
                with Session(self._engine) as session, session.begin():
                    session.execute(insert(AlertRecord), alerts)
            except Exception as exc:
                if is_outage(exc):
                    log.debug("query log: kept alerts wait, the database is away: %s", exc)
                else:
                    self._alert_trouble.warning(
                        "query log: %d kept alerts cannot be written; retrying with backoff: %s",
                        len(self._kept_alerts),
                        exc,
                    )
                self._alert_delay = min(self._alert_delay * 2, self._max_retry_delay_s)
                self._next_alert_try = time.monotonic() + self._alert_delay
                if not until_empty:
                    return
                if self._give_up_at is None or time.monotonic() > self._give_up_at:
                    self.alerts_lost += len(self._kept_alerts)
                    log.error(
                        "query log: the database stayed unavailable; %d alerts lost",
                        len(self._kept_alerts),
                    )
                    self._kept_alerts.clear()
                    return
                time.sleep(self._alert_delay)
                continue
            del self._kept_alerts[: len(alerts)]
            self.alerts_written += len(alerts)
            self._alert_delay = 0.05
            log.info("query log: %d alerts of failed commits written", len(alerts))

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


async def wait_for_commit(done: Future[None], timeout_s: float) -> None:
    """Wait for a durable request's commit (``submit``'s future), raising what it raises, or
    :class:`LogUnavailable` once ``timeout_s`` has passed, for a database that stopped
    answering: the request is then refused with 503, never left hanging.

    Rows that commit after that stay logged: the log then holds a query whose answer the
    client never got (the safe side for detection), and a retry under the same
    Idempotency-Key is answered from them.
    """
    waiting = asyncio.wrap_future(done)
    try:
        # Shielded: a timeout or a cancelled request must not cancel the writer's future,
        # which the writer still completes; the shield also retrieves its late outcome.
        await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
    except TimeoutError:
        raise LogUnavailable(f"the query log did not commit within {timeout_s:g} s") from None


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


def request_logged(engine: Engine, client: str, request_key: str) -> bool:
    """Whether one client's idempotent request has rows in the log (one index lookup)."""
    statement = (
        select(QueryRecord.id)
        .where(QueryRecord.client == client, QueryRecord.request_key == request_key)
        .limit(1)
    )
    with Session(engine) as session:
        return session.scalar(statement) is not None


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


def logged_flags(
    engine: Engine, client: str, account: str | None, action: str
) -> dict[str, list[str]]:
    """The detectors whose logged alerts, acted on with ``action``, flagged ``client`` on its
    own queries (``"key"``) or, when ``account`` is given (a shared one), the account on its
    keys' queries together (``"account"``); each level's detectors in the order they alarmed,
    and only the levels that have one. The log keeps what a state store may lose (a Redis
    restarted without persistence), so that a flagged client stays flagged."""
    condition = (AlertRecord.level == "key") & (AlertRecord.client == client)
    if account is not None:
        condition = condition | (
            (AlertRecord.level == "account") & (AlertRecord.account == account)
        )
    first = func.min(AlertRecord.id)
    statement = (
        select(AlertRecord.level, AlertRecord.detector)
        .where(condition, AlertRecord.action == action)
        .group_by(AlertRecord.level, AlertRecord.detector)
        .order_by(first)
    )
    flags: dict[str, list[str]] = {}
    with Session(engine) as session:
        for level, detector in session.execute(statement):
            flags.setdefault(level, []).append(detector)
    return flags
