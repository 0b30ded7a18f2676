"""The query log (one row per answered query) and the alerts, written off the request path.

The request handler hands the writer plain arrays and dicts; a background thread does the
costly part (PNG encoding, hashing, the database round trip) in batches. Rows are never
dropped: a failed write is retried with backoff, and :meth:`QueryLogWriter.close` flushes
everything still pending, which is what a graceful shutdown calls.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, defer

from mlaas.wire import encode_png
from server.db import AlertRecord, QueryRecord

log = logging.getLogger(__name__)


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


@dataclass
class PendingAlert:
    client: str
    detector: str
    created_at: datetime
    query_count: int
    score: float
    threshold: float
    action: str


def _to_row(query: PendingQuery, store_input: bool) -> dict[str, Any]:
    image = np.ascontiguousarray(query.image)
    return {
        "id": query.id,
        "client": query.client,
        "created_at": query.created_at,
        "input_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
        "input_shape": query.input_shape,
        "input_png": encode_png(image) if store_input else None,
        "predicted": query.predicted,
        "payload": query.payload,
        "latency_ms": query.latency_ms,
        "granularity": query.granularity,
        "scores": query.scores,
    }


_STOP = object()


class QueryLogWriter:
    """A background thread that persists :class:`PendingQuery` items in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        store_inputs: bool = True,
        flush_rows: int = 512,
        flush_interval_s: float = 0.1,
        max_retry_delay_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._store_inputs = store_inputs
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._max_retry_delay_s = max_retry_delay_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="query-log-writer", daemon=True)
        self._closed = False
        self.written = 0
        self.alerts_written = 0
        self.write_errors = 0
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, items: Sequence[PendingQuery | PendingAlert]) -> None:
        if self._closed:
            raise RuntimeError("the query log writer is closed")
        for item in items:
            self._queue.put(item)

    def close(self, timeout: float | None = None) -> None:
        """Flush every pending row, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[PendingQuery | PendingAlert] = []
            deadline = None
            while len(batch) < self._flush_rows:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_interval_s
            if batch:
                self._write(batch)

    def _write(self, batch: list[PendingQuery | PendingAlert]) -> None:
        rows = [_to_row(q, self._store_inputs) for q in batch if isinstance(q, PendingQuery)]
        alerts = [asdict(a) for a in batch if isinstance(a, PendingAlert)]
        delay = 0.05
        while True:
            try:
                with Session(self._engine) as session, session.begin():
                    if rows:
                        session.execute(insert(QueryRecord), rows)
                    if alerts:
                        session.execute(insert(AlertRecord), alerts)
                self.written += len(rows)
                self.alerts_written += len(alerts)
                return
            except Exception:
                # Keep the rows and try again: losing answered queries would blind the log.
                self.write_errors += 1
                log.exception("query log write of %d rows failed; retrying", len(rows))
                time.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay_s)


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
