"""Reads of the query log and the alerts: one idempotent request's rows, pages of queries,
counts, decision statistics, and the flags the logged alerts keep."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, defer

from server.db import AlertRecord, QueryRecord


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
        statistics: list[Any] = list(session.scalars(statement))
    return [row for row in statistics if isinstance(row, dict)]


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
