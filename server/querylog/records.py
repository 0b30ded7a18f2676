"""What the request handler hands the query log writer (one request's answered queries and
alerts, kept together as one unit), the table rows the writer builds from them, and the
errors: the ones a caller sees, and the test that tells a database outage from rows the
database refuses."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from mlaas.wire import encode_png

if TYPE_CHECKING:  # typing only: importing the monitor would load scipy for the log alone
    from defense.monitor import Alert


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
    alerts: list[Alert]  # written as they are: their fields are the alerts table's columns
    done: Future[None] = field(default_factory=Future)
    rows: list[dict[str, Any]] | None = None
    """The queries as table rows, built once (PNG encoding is the costly part) by the writer."""
