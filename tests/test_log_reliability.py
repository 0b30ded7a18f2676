"""The query log under a database that misbehaves: duplicates never jam the spool or the
writer, errors that are not outages are seen, a silent database is a prompt 503 and not a
hang, alerts of refused requests are not lost, and the connection settings that bound all
of this are in effect on real servers."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from defense.monitor import Alert
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import init_db, make_engine
from server.querylog import (
    LogUnavailable,
    QueryLogWriter,
    Spool,
    _to_row,
    count_queries,
    fetch_alerts,
    fetch_request,
    is_outage,
    wait_for_commit,
)
from server.settings import ServerSettings
from tests.helpers import bearer, create_key, wait_until
from tests.services import PrivatePostgres
from tests.test_querylog import pending


def rows_of(client: str, n: int, request_key: str | None = None) -> list[dict]:
    return [_to_row(query, store_input=False) for query in pending(client, n, request_key)]


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# ------------------------------------------------------------------ duplicates never jam


def test_spool_put_skips_rows_it_holds_by_id_or_by_request(tmp_path, caplog) -> None:
    spool = Spool(tmp_path / "spool.db")
    first = rows_of("alice", 3, request_key="k1")
    assert spool.put(first, []) == 3
    # The same request answered again (another worker, or this one after a restart): new
    # ids, same (client, request_key, position). Before, this failed every put for ever.
    again = rows_of("alice", 3, request_key="k1")
    alert = {
        "client": "alice",
        "detector": "prada",
        "created_at": datetime.now(UTC),
        "query_count": 3,
        "score": 0.1,
        "threshold": 0.9,
        "action": "monitor",
    }
    assert spool.put(again + rows_of("bob", 2), [alert]) == 3  # bob's two and the alert
    assert spool.put(first[:1], []) == 0  # the same row, by id
    assert spool.count() == 3 + 2 + 1
    assert warnings_of(caplog, "3 rows of 'alice' key 'k1' were spooled already")
    spool.close()


def test_move_skips_rows_the_database_holds_and_empties_the_spool(
    database_url: str, tmp_path, caplog
) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    logged = QueryLogWriter(engine)
    # Logged directly once the database was back: a retry of the request that was spooled.
    logged.submit(pending("alice", 3, request_key="k1")).result(timeout=10)
    logged.close()
    spool = Spool(tmp_path / "spool.db")
    spooled = rows_of("alice", 3, request_key="k1") + rows_of("bob", 2)
    spool.put(spooled, [])
    moved = spool.move_into(engine)
    assert (moved.taken, moved.written) == (5, 2) and spool.count() == 0
    assert count_queries(engine, "alice") == 3 and count_queries(engine, "bob") == 2
    # What stands is the first answer, the one already in the log.
    assert [r["id"] for r in fetch_request(engine, "alice", "k1")] != [r["id"] for r in spooled[:3]]
    assert warnings_of(caplog, "3 rows of 'alice' key 'k1' were in the database already")
    # A move a crash interrupted, repeated: every row is skipped by id.
    spool.put(spooled[3:], [])
    assert spool.move_into(engine).written == 0 and count_queries(engine) == 5
    spool.close()


def test_two_buffered_workers_answering_one_request_during_an_outage(tmp_path, caplog) -> None:
    """The same Idempotency-Key reached two workers sharing the spool while the database was
    away: both are answered, the spool keeps one copy, and it empties once the database is
    back, where before every later write to the spool failed until the buffer was full."""
    engine = make_engine(f"sqlite:///{tmp_path / 'away.db'}")  # no tables: away
    spool = tmp_path / "spool.db"
    workers = [
        QueryLogWriter(
            engine, mode="buffered", flush_interval_s=0.01, max_retry_delay_s=0.05, spool=spool
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.submit(pending("alice", 3, request_key="k1")).result(timeout=10)
    workers[1].submit(pending("bob", 2)).result(timeout=10)  # the spool still takes rows
    assert sum(w.spooled for w in workers) == 5 and all(w.pending == 0 for w in workers)
    init_db(engine)
    wait_until(lambda: not any(w.spooled for w in workers), 20, what="every spool drained")
    for worker in workers:
        worker.close()
    assert count_queries(engine, "alice") == 3 and count_queries(engine, "bob") == 2
    assert warnings_of(caplog, "were spooled already")


def test_a_buffered_request_logged_already_is_skipped_not_retried(tmp_path, caplog) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    init_db(engine)
    QueryLogWriter(engine).submit(pending("alice", 3, request_key="k1")).result(timeout=10)
    writer = QueryLogWriter(engine, mode="buffered", flush_interval_s=0.01)
    done = writer.submit(pending("alice", 4, request_key="k1"))  # one more image than logged
    done.result(timeout=10)
    writer.close()
    assert writer.write_errors == 0 and writer.written == 1
    assert count_queries(engine, "alice") == 4
    assert warnings_of(caplog, "3 rows of 'alice' key 'k1' were logged already; skipped")


# --------------------------------------------------------- errors that are not outages


def test_outages_are_told_from_refusals() -> None:
    refused = IntegrityError("INSERT", {}, Exception("duplicate key"))
    away = OperationalError("SELECT 1", {}, Exception("connection refused"))
    assert not is_outage(refused) and is_outage(away)
    assert is_outage(ConnectionResetError()) and not is_outage(ValueError("bad row"))


def test_a_row_the_database_refuses_is_a_warning_once_not_a_silent_loop(
    postgres_url: str, tmp_path, caplog
) -> None:
    """SQLite kept a client name longer than PostgreSQL's column takes: every move fails
    with a DataError, which is no outage; it is reported, once while it repeats."""
    caplog.set_level(logging.DEBUG, logger="server.querylog")
    engine = make_engine(postgres_url)
    init_db(engine)
    spool = Spool(tmp_path / "spool.db")
    spool.put(rows_of("x" * 200, 1), [])
    spool.close()
    writer = QueryLogWriter(
        engine, mode="buffered", max_retry_delay_s=0.02, spool=tmp_path / "spool.db"
    )
    attempts = 0
    move = writer._spool.move_into  # type: ignore[union-attr]

    def counted(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        return move(*args, **kwargs)

    writer._spool.move_into = counted  # type: ignore[method-assign,union-attr]
    wait_until(lambda: attempts >= 5, 20, what="five attempts")
    writer.close(timeout=0.1)
    reports = warnings_of(caplog, "moving rows into the database failed")
    assert len(reports) == 1 and "StringDataRightTruncation" in reports[0]
    assert not [r for r in caplog.records if "still away" in r.getMessage()]
    assert writer.spooled == 1  # kept, not dropped


# ------------------------------------------------------------- a database gone silent


class SilentableProxy:
    """A TCP relay in front of a real server that can go silent: it then reads what either
    side sends and forwards nothing, as a database behind a partition looks to its client
    (the connection stays open, nothing is answered); resumed, it delivers what it held."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        self._flowing.set()
        for connection in self._sockets:
            connection.close()


@contextmanager
def silentable(server: PrivatePostgres) -> Iterator[tuple[SilentableProxy, str]]:
    proxy = SilentableProxy(server.port)
    try:
        yield proxy, server.url.replace(f":{server.port}/", f":{proxy.port}/")
    finally:
        proxy.close()


def test_a_silent_database_is_a_timely_refusal_and_the_late_commit_stays(
    private_postgres: PrivatePostgres,
) -> None:
    with silentable(private_postgres) as (proxy, url):
        engine = make_engine(url)
        init_db(engine)
        writer = QueryLogWriter(engine)
        asyncio.run(wait_for_commit(writer.submit(pending("alice", 2)), 10))
        proxy.silence()
        late = writer.submit(pending("alice", 3))
        started = time.monotonic()
        with pytest.raises(LogUnavailable, match="did not commit within 1 s"):
            asyncio.run(wait_for_commit(late, 1.0))
        assert 0.9 < time.monotonic() - started < 3
        assert not late.done()  # the wait was abandoned, not the rows
        proxy.resume()
        late.result(timeout=20)  # the writer completes it, and goes on
        asyncio.run(wait_for_commit(writer.submit(pending("bob", 1)), 10))
        writer.close()
        assert count_queries(engine, "alice") == 5 and count_queries(engine, "bob") == 1
        engine.dispose()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("fashion-mnist:test", InputShape(1, 28, 28)).get_batch(np.arange(8))


def predict(client, key: str, batch: np.ndarray, **headers: str):
    return client.post(
        "/v1/predict",
        content=encode_npy(batch),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE, **headers},
    )


def test_a_durable_request_is_refused_when_its_commit_hangs_and_the_service_recovers(
    make_client, postgres_url: str, images
) -> None:
    """The database stops answering the log's inserts (a lock held elsewhere; keys still
    answer): the request gets 503 after MLAAS_LOG_COMMIT_TIMEOUT_S, not after minutes. Its
    rows commit once the database answers, and its retry is answered from them."""
    client = make_client(
        database_url=postgres_url, log_commit_timeout_s=1.0, db_statement_timeout_s=0
    )
    key = create_key(client, "patient")
    assert predict(client, key, images[:2]).status_code == 200
    locker = create_engine(postgres_url)
    with locker.connect() as connection:
        # SHARE mode blocks inserts, not reads: the idempotency lookup still answers.
        connection.execute(text("LOCK TABLE queries IN SHARE MODE"))
        started = time.monotonic()
        refused = predict(client, key, images[2:5], **{"Idempotency-Key": "late-1"})
        waited = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "query_log_unavailable"
        assert refused.headers["retry-after"] and 1.0 <= waited < 4
        connection.rollback()  # the database answers again
    locker.dispose()
    engine = client.app.state.service.engine
    # the late commit stayed
    wait_until(lambda: count_queries(engine, "patient") == 5, 20, what="5 rows of patient")
    retried = predict(client, key, images[2:5], **{"Idempotency-Key": "late-1"})
    assert retried.status_code == 200 and retried.headers["idempotent-replayed"] == "true"
    logged = [row["id"] for row in fetch_request(engine, "patient", "late-1")]
    assert [p["query_id"] for p in retried.json()["predictions"]] == logged
    assert predict(client, key, images[5:6]).status_code == 200
    assert count_queries(engine, "patient") == 6


# ------------------------------------------------------ alerts of refused requests


def alert_for(client: str) -> Alert:
    return Alert(
        client=client,
        detector="prada",
        created_at=datetime.now(UTC),
        query_count=40,
        score=0.71,
        threshold=0.9,
        action="block",
    )


def test_the_alert_of_a_commit_that_failed_is_written_once_the_database_is_back(
    private_postgres: PrivatePostgres,
) -> None:
    engine = make_engine(private_postgres.url)
    init_db(engine)
    writer = QueryLogWriter(engine, max_retry_delay_s=0.2)
    writer.submit(pending("mallory", 2)).result(timeout=10)
    private_postgres.stop()
    # The request that flagged mallory: refused, since it cannot be logged.
    refused = writer.submit([*pending("mallory", 3), alert_for("mallory")])
    with pytest.raises(LogUnavailable):
        refused.result(timeout=20)
    assert writer.alerts_waiting == 1
    private_postgres.start()
    wait_until(lambda: writer.alerts_waiting == 0, 20, what="no alerts waiting")
    writer.close()
    alerts = fetch_alerts(engine, client="mallory")
    assert [(a["detector"], a["action"], a["query_count"]) for a in alerts] == [
        ("prada", "block", 40)
    ]
    assert count_queries(engine, "mallory") == 2  # the refused request's rows never were
    engine.dispose()


def test_kept_alerts_left_at_a_stop_are_counted_as_lost(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'never.db'}")  # no tables
    writer = QueryLogWriter(engine, max_retry_delay_s=0.05)
    with pytest.raises(LogUnavailable):
        writer.submit([*pending("mallory", 1), alert_for("mallory")]).result(timeout=10)
    writer.close(timeout=0.3)
    assert writer.alerts_lost == 1 and writer.alerts_waiting == 0 and not writer.alive


# ------------------------------------------------------------- connection settings


def _parameters(engine) -> dict[str, str]:
    with engine.connect() as connection:
        return connection.connection.dbapi_connection.info.get_parameters()


def test_postgres_connections_carry_timeouts_and_keepalives(postgres_url: str) -> None:
    engine = make_engine(postgres_url, statement_timeout_s=7, tcp_timeout_s=12)
    with engine.connect() as connection:
        assert connection.execute(text("SHOW statement_timeout")).scalar() == "7s"
        # The URL's own options (the test's schema) are kept next to the timeout.
        assert connection.execute(text("SHOW search_path")).scalar().startswith("test_")
    parameters = _parameters(engine)
    assert {name: parameters.get(name) for name in (
        "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
        "tcp_user_timeout", "connect_timeout",
    )} == {
        "keepalives": "1", "keepalives_idle": "6", "keepalives_interval": "2",
        "keepalives_count": "3", "tcp_user_timeout": "12000", "connect_timeout": "5",
    }  # fmt: skip
    engine.dispose()

    # The server's: from its settings, and a setting the URL makes itself wins.
    settings = ServerSettings(database_url=postgres_url + "&keepalives_idle=30")
    engine = make_engine(settings.resolved_database_url, **settings.database_options)
    with engine.connect() as connection:
        assert connection.execute(text("SHOW statement_timeout")).scalar() == "10s"
    parameters = _parameters(engine)
    assert parameters["keepalives_idle"] == "30" and parameters["tcp_user_timeout"] == "10000"
    engine.dispose()

    settings = ServerSettings(database_url=postgres_url, db_statement_timeout_s=0)
    engine = make_engine(settings.resolved_database_url, **settings.database_options)
    with engine.connect() as connection:
        assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
    engine.dispose()


def test_statement_timeout_ends_a_blocked_commit(postgres_url: str) -> None:
    engine = make_engine(postgres_url, statement_timeout_s=0.5)
    init_db(engine)
    writer = QueryLogWriter(engine)
    locker = create_engine(postgres_url)
    with locker.connect() as connection:
        connection.execute(text("LOCK TABLE queries IN SHARE MODE"))
        started = time.monotonic()
        with pytest.raises(LogUnavailable, match="unavailable"):
            writer.submit(pending("alice", 1)).result(timeout=10)
        assert time.monotonic() - started < 3
        connection.rollback()
    writer.submit(pending("alice", 1)).result(timeout=10)
    writer.close()
    locker.dispose()
    engine.dispose()


def _synchronous(engine) -> int:
    with engine.connect() as connection:
        return connection.exec_driver_sql("PRAGMA synchronous").scalar()


def test_sqlite_is_synchronous_full_for_the_durable_log_only(tmp_path: Path) -> None:
    full, normal = 2, 1
    url = f"sqlite:///{tmp_path / 'mlaas.db'}"
    for mode, expected in (("durable", full), ("buffered", normal)):
        settings = ServerSettings(database_url=url, log_mode=mode)
        engine = make_engine(settings.resolved_database_url, **settings.database_options)
        assert _synchronous(engine) == expected
        engine.dispose()
    spool = Spool(tmp_path / "spool.db")
    assert _synchronous(spool.engine) == normal
    spool.close()
