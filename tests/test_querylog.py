"""The query-log writer: a request's rows land together or not at all, durable mode never
answers what it could not log, buffered mode never drops a row it accepted."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from server.db import init_db, make_engine
from server.querylog import (
    DuplicateRequest,
    LogMode,
    LogUnavailable,
    PendingQuery,
    QueryLogWriter,
    count_queries,
    fetch_queries,
    fetch_request,
)
from tests.helpers import wait_until


def pending(client: str, n: int, request_key: str | None = None) -> list[PendingQuery]:
    return [
        PendingQuery(
            id=uuid.uuid4().hex,
            client=client,
            created_at=datetime.now(UTC),
            image=np.full((28, 28, 1), i, dtype=np.uint8),
            input_shape="28x28x1",
            predicted=i % 10,
            payload={"label": i % 10},
            latency_ms=1.0,
            granularity="probs",
            request_key=request_key,
            position=i if request_key else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("mode", list(LogMode))
def test_close_flushes_every_pending_row(database_url: str, mode: LogMode) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    writer = QueryLogWriter(engine, mode=mode, flush_rows=64, flush_interval_s=10.0)
    done = [writer.submit(pending("alice", 10)) for _ in range(100)]
    done.append(writer.submit(pending("bob", 7)))
    writer.close()
    assert all(f.done() and f.exception() is None for f in done)
    assert count_queries(engine) == 1007
    assert count_queries(engine, "bob") == 7
    assert writer.written == 1007 and writer.write_errors == 0 and writer.pending == 0


def test_durable_commit_completes_the_future_before_the_rows_are_read(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    init_db(engine)
    writer = QueryLogWriter(engine, mode="durable", flush_interval_s=10.0)
    writer.submit(pending("alice", 3)).result(timeout=10)
    # No waiting for a flush interval: the commit is what completed the future.
    assert count_queries(engine, "alice") == 3
    writer.close()


def test_durable_refuses_when_the_database_fails_and_recovers_without_restart(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    writer = QueryLogWriter(engine, mode="durable")
    refused = writer.submit(pending("alice", 5))  # no tables yet: the insert fails
    with pytest.raises(LogUnavailable):
        refused.result(timeout=10)
    assert not writer.healthy and writer.written == 0 and writer.pending == 0
    init_db(engine)  # the database is back
    writer.submit(pending("alice", 2)).result(timeout=10)
    assert writer.healthy
    writer.close()
    assert count_queries(engine) == 2  # the refused five were never logged


def test_a_duplicate_request_fails_alone_in_its_group_commit(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    init_db(engine)
    writer = QueryLogWriter(engine, mode="durable")
    writer.submit(pending("alice", 3, request_key="k1")).result(timeout=10)
    # Hold the writer on a first unit so that the next three are committed as one group.
    gate, holding = threading.Event(), threading.Event()
    original = writer._insert

    def held(units):
        holding.set()
        gate.wait(10)
        return original(units)

    writer._insert = held  # type: ignore[method-assign]
    first = writer.submit(pending("carol", 1))
    wait_until(holding.is_set, 10, what="the writer held on the first unit")
    group = [
        writer.submit(pending("bob", 2)),
        writer.submit(pending("alice", 3, request_key="k1")),  # already logged
        writer.submit(pending("bob", 4, request_key="k2")),
    ]
    gate.set()
    first.result(timeout=10)
    group[0].result(timeout=10)
    group[2].result(timeout=10)
    with pytest.raises(DuplicateRequest):
        group[1].result(timeout=10)
    writer.close()
    assert count_queries(engine, "bob") == 6 and count_queries(engine, "alice") == 3
    recalled = fetch_request(engine, "bob", "k2")
    assert [r["payload"]["label"] for r in recalled] == [0, 1, 2, 3]


def test_buffered_failed_writes_are_retried_not_dropped(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    writer = QueryLogWriter(
        engine, mode="buffered", flush_rows=8, flush_interval_s=0.01, max_retry_delay_s=0.05
    )
    done = writer.submit(pending("alice", 5))  # no tables yet: every insert fails
    wait_until(lambda: writer.write_errors >= 2, 10, interval=0.01, what="two failed writes")
    assert writer.write_errors >= 2 and writer.written == 0 and not done.done()
    assert writer.pending == 5
    init_db(engine)  # the database comes back
    done.result(timeout=10)
    writer.close()
    assert count_queries(engine) == 5 and writer.lost == 0


def test_buffered_rows_wait_in_the_spool_and_move_when_the_database_returns(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    writer = QueryLogWriter(
        engine,
        mode="buffered",
        flush_interval_s=0.01,
        max_retry_delay_s=0.05,
        spool=tmp_path / "spool.db",
    )
    done = [writer.submit(pending("alice", 4)), writer.submit(pending("bob", 3))]
    for future in done:
        future.result(timeout=10)  # safe in the spool: no tables in the database yet
    assert writer.spooled == 7 and writer.pending == 0 and writer.written == 0
    init_db(engine)  # the database comes back
    wait_until(lambda: not writer.spooled, 10, what="the spool drained into the database")
    writer.submit(pending("carol", 2)).result(timeout=10)  # straight to the database now
    writer.close()
    assert count_queries(engine, "alice") == 4 and count_queries(engine, "bob") == 3
    assert count_queries(engine) == 9 and writer.spooled == 0 and writer.lost == 0


def test_the_spool_outlives_the_process(tmp_path) -> None:
    """Rows spooled by a process that stopped during the outage are moved by the next one."""
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    spool = tmp_path / "spool.db"
    first = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, spool=spool)
    first.submit(pending("alice", 5)).result(timeout=10)
    first.close(timeout=0.2)  # the database is still away: the rows stay in the spool
    assert first.spooled == 5 and first.lost == 0
    init_db(engine)
    before_the_move = spool.read_bytes()
    second = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, spool=spool)
    assert second.spooled == 5
    second.close()
    assert count_queries(engine, "alice") == 5 and second.spooled == 0
    # A crash between the database's commit and the spool's delete: the rows come again.
    spool.write_bytes(before_the_move)
    again = QueryLogWriter(engine, mode="buffered", spool=spool)
    assert again.spooled == 5
    again.close()
    assert count_queries(engine) == 5 and again.spooled == 0  # moved once, not twice


def test_statistics_pass_through_the_spool_and_an_older_spool_is_upgraded(tmp_path) -> None:
    """The per-query decision statistics reach the database through the spool; a spool left
    by a version before them gains their column, and its rows still move (without them)."""
    import sqlite3

    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    spool = tmp_path / "spool.db"
    rows = pending("alice", 3)
    for number, row in enumerate(rows, start=1):
        row.statistics = {"query": number, "msp": 0.5 * number, "prada": None}
    first = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, spool=spool)
    first.submit(rows).result(timeout=10)
    first.close(timeout=0.2)  # the database is away: the rows stay in the spool
    init_db(engine)
    second = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, spool=spool)
    second.close()
    logged = sorted(fetch_queries(engine, client="alice"), key=lambda r: r["statistics"]["query"])
    assert [r["statistics"] for r in logged] == [row.statistics for row in rows]

    old = tmp_path / "old-spool.db"
    third = QueryLogWriter(make_engine(f"sqlite:///{tmp_path / 'away.db'}"), mode="buffered",
                           flush_interval_s=0.01, spool=old)  # fmt: skip
    third.submit(pending("bob", 2)).result(timeout=10)
    third.close(timeout=0.2)
    with sqlite3.connect(old) as connection:  # as the older version left it
        connection.execute("ALTER TABLE queries DROP COLUMN statistics")
        connection.execute("DROP TABLE alembic_version")  # made before migrations
    upgraded = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, spool=old)
    assert upgraded.spooled == 2
    upgraded.close()
    assert [r["statistics"] for r in fetch_queries(engine, client="bob")] == [None, None]


def test_buffered_refuses_once_the_buffer_is_full(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'late.db'}")
    writer = QueryLogWriter(
        engine, mode="buffered", max_buffered_rows=8, flush_interval_s=0.01, max_retry_delay_s=0.05
    )
    writer.submit(pending("alice", 6))
    with pytest.raises(LogUnavailable, match="buffer is full"):
        writer.submit(pending("alice", 3))
    writer.submit(pending("alice", 2))  # exactly fills it
    init_db(engine)
    writer.close()
    assert count_queries(engine) == 8


def test_buffered_stop_gives_up_after_its_timeout_and_counts_the_loss(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'never.db'}")
    writer = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01, max_retry_delay_s=0.05)
    writer.submit(pending("alice", 4))
    writer.submit(pending("bob", 3))
    started = time.monotonic()
    writer.close(timeout=0.5)
    assert time.monotonic() - started < 10
    assert writer.lost == 7 and not writer.alive


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


def test_a_log_from_an_older_version_is_upgraded_and_foreign_tables_refused(tmp_path) -> None:
    import sqlite3

    from server.migrate import SchemaUnrecognised

    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as foreign:
        foreign.execute("CREATE TABLE queries (id TEXT PRIMARY KEY, client TEXT)")
    with pytest.raises(SchemaUnrecognised, match=r"\(queries: id, client\) match no version"):
        init_db(make_engine(f"sqlite:///{path}"))
    # A log from before the dashboard's decision statistics and before migrations: upgraded,
    # its queries kept, without statistics.
    before = tmp_path / "before-statistics.db"
    engine = make_engine(f"sqlite:///{before}")
    init_db(engine)
    writer = QueryLogWriter(engine)
    writer.submit(pending("alice", 2))
    writer.close()
    engine.dispose()
    with sqlite3.connect(before) as old:  # as that version left it
        old.execute("ALTER TABLE queries DROP COLUMN statistics")
        old.execute("DROP TABLE admin_sessions")
        old.execute("DROP TABLE alembic_version")
    engine = make_engine(f"sqlite:///{before}")
    init_db(engine)
    assert [r["statistics"] for r in fetch_queries(engine, client="alice")] == [None, None]
