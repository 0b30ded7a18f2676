"""The query-log writer: batched, off the request path, and it never drops a row."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import numpy as np

from server.db import init_db, make_engine
from server.querylog import PendingQuery, QueryLogWriter, count_queries, fetch_queries


def pending(client: str, n: int) -> list[PendingQuery]:
    image = np.zeros((28, 28, 1), dtype=np.uint8)
    return [
        PendingQuery(
            id=uuid.uuid4().hex,
            client=client,
            created_at=datetime.now(UTC),
            image=image,
            input_shape="28x28x1",
            predicted=i % 10,
            payload={"label": i % 10},
            latency_ms=1.0,
            granularity="probs",
        )
        for i in range(n)
    ]


def test_close_flushes_every_pending_row(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    writer = QueryLogWriter(engine, flush_rows=64, flush_interval_s=10.0)
    writer.submit(pending("alice", 1000))
    writer.submit(pending("bob", 7))
    writer.close()
    assert count_queries(engine) == 1007
    assert count_queries(engine, "bob") == 7
    assert writer.written == 1007 and writer.write_errors == 0


def test_failed_writes_are_retried_not_dropped(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    writer = QueryLogWriter(engine, flush_rows=8, flush_interval_s=0.01, max_retry_delay_s=0.05)
    writer.submit(pending("alice", 5))  # no tables yet: every insert fails
    deadline = time.monotonic() + 10
    while writer.write_errors < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.write_errors >= 2 and writer.written == 0
    init_db(engine)  # the database comes back
    writer.close()
    assert count_queries(engine) == 5


def test_fetch_orders_and_filters(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    init_db(engine)
    writer = QueryLogWriter(engine, store_inputs=False)
    writer.submit(pending("alice", 3) + pending("bob", 2))
    writer.close()
    rows = fetch_queries(engine, limit=None)
    assert [r["client"] for r in rows] == ["alice"] * 3 + ["bob"] * 2
    assert fetch_queries(engine, limit=2, newest_first=True)[0]["client"] == "bob"
    assert len(fetch_queries(engine, client="alice", limit=None)) == 3
    assert fetch_queries(engine, include_input=True, limit=1)[0]["input_png_base64"] is None
