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
    The handler answers at once; rows wait in memory (at most ``max_buffered_rows``) and a
    failed write is retried with backoff until the database is back. Answers keep flowing
    through a database outage, at the risk of losing the buffer if the process dies.
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
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from mlaas.wire import encode_png
from server.db import AlertRecord, QueryRecord

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
        "request_key": query.request_key,
        "position": query.position,
    }


@dataclass
class _Unit:
    """One request's rows: committed together or not at all."""

    queries: list[PendingQuery]
    alerts: list[PendingAlert]
    done: Future[None] = field(default_factory=Future)


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
    ) -> None:
        self._engine = engine
        self.mode = LogMode(mode)
        self._store_inputs = store_inputs
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._max_retry_delay_s = max_retry_delay_s
        self._max_buffered_rows = max_buffered_rows
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
        """Queue one request's rows; the future completes when they are committed.

        In durable mode the future fails with :class:`LogUnavailable` (or
        :class:`DuplicateRequest`) when the commit does; in buffered mode it only completes
        once the rows are written, however long the database is away, and a full buffer
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
        long and reports how many rows it could not write (a durable one has none waiting).
        """
        if self._closed:
            return
        self._closed = True
        if timeout is not None:
            self._give_up_at = time.monotonic() + timeout
        self._queue.put(_STOP)
        self._thread.join(None if timeout is None else timeout + 5.0)

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

    def _finished(self, units: list[_Unit]) -> None:
        with self._count_lock:
            self._pending_rows -= sum(len(u.queries) for u in units)

    def _insert(self, units: list[_Unit]) -> None:
        rows = [_to_row(q, self._store_inputs) for u in units for q in u.queries]
        alerts = [asdict(alert) for u in units for alert in u.alerts]
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
                # Keep the rows and try again: losing answered queries would blind the log.
                self.write_errors += 1
                self.healthy = False
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
        self._finished(units)
        for unit in units:
            unit.done.set_result(None)

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
    since: datetime | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    statement = select(AlertRecord)
    if client is not None:
        statement = statement.where(AlertRecord.client == client)
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
                "detector": a.detector,
                "time": a.created_at.isoformat(),
                "query_count": a.query_count,
                "score": a.score,
                "threshold": a.threshold,
                "action": a.action,
            }
            for a in session.scalars(statement)
        ]
