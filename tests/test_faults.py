"""Faults, against real servers that the tests stop and start: the database and Redis going
away and coming back under a live service, the service itself killed mid-attack, and clients
that hang up mid-request. The rule throughout: the log holds exactly the answered queries."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from attacker.client import ExtractionClient
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import QueryRecord, make_engine
from server.querylog import count_queries
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN, bearer, create_key, requests_finished, wait_until
from tests.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("fashion-mnist:test", InputShape(1, 28, 28)).get_batch(np.arange(400))


def predict(client: TestClient, key: str, batch: np.ndarray, **headers: str):
    return client.post(
        "/v1/predict",
        content=encode_npy(batch),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE, **headers},
    )


# ---------------------------------------------------------------------------- the database


def test_database_down_fails_closed_and_recovers_without_restart(
    make_client, private_postgres: PrivatePostgres, images
) -> None:
    client = make_client(database_url=private_postgres.url)
    key = create_key(client, "steady")
    answered = 0
    for i in range(3):
        assert predict(client, key, images[i * 4 : i * 4 + 4]).status_code == 200
        answered += 4

    private_postgres.stop("immediate")  # as a crash would
    for i in range(3):
        refused = predict(client, key, images[20 + i : 21 + i])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable"
        assert refused.headers["Retry-After"] == "1"
        assert "127.0.0.1" not in refused.text  # no connection details leak out
    assert client.get("/readyz").status_code == 503

    private_postgres.restart()
    wait_until(lambda: client.get("/readyz").status_code == 200, 20, what="/readyz to say 200")
    assert predict(client, key, images[40:45]).status_code == 200
    answered += 5
    assert count_queries(client.app.state.service.engine, "steady") == answered


def test_database_lost_between_authentication_and_logging_refuses_the_answer(
    make_client, private_postgres: PrivatePostgres, images
) -> None:
    """The key check passed but the commit fails: the client gets 503, not an unlogged answer."""
    client = make_client(database_url=private_postgres.url)
    key = create_key(client, "unlucky")
    service = client.app.state.service
    real_submit = service.batcher.submit

    async def forward_then_lose_the_database(*args, **kwargs):
        output = await real_submit(*args, **kwargs)
        private_postgres.stop("immediate")
        return output

    service.batcher.submit = forward_then_lose_the_database
    refused = predict(client, key, images[:3])
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "query_log_unavailable"
    service.batcher.submit = real_submit
    private_postgres.restart()
    wait_until(lambda: client.get("/readyz").status_code == 200, 20, what="/readyz to say 200")
    assert count_queries(service.engine, "unlucky") == 0  # the refused answer left no row
    assert predict(client, key, images[:3]).status_code == 200
    assert count_queries(service.engine, "unlucky") == 3


def test_buffered_logging_answers_through_an_outage_and_loses_nothing(
    make_client, private_postgres: PrivatePostgres, images
) -> None:
    client = make_client(
        database_url=private_postgres.url, log_mode="buffered", log_flush_interval_ms=10
    )
    key = create_key(client, "buffered")
    assert predict(client, key, images[:2]).status_code == 200  # the key is now known

    private_postgres.stop("fast")
    for i in range(5):
        assert predict(client, key, images[10 + 3 * i : 13 + 3 * i]).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "buffered" in ready.json()["degraded"][0]
    service = client.app.state.service
    # parked on local disk
    wait_until(lambda: service.writer.spooled == 15, 20, what="15 rows in the spool")
    assert service.writer.pending == 0
    assert predict(client, "mlk_unknown", images[:1]).status_code == 503  # no new keys

    private_postgres.restart()
    wait_until(lambda: service.writer.spooled == 0, 20, what="an empty spool")
    assert count_queries(service.engine, "buffered") == 2 + 15
    assert client.get("/readyz").json()["degraded"] == []


def test_buffered_answers_survive_a_crash_during_the_outage(
    tiny_victim, tmp_path, private_postgres: PrivatePostgres, images
) -> None:
    env = {
        **_env(tmp_path),
        "MLAAS_DATABASE_URL": private_postgres.url,
        "MLAAS_LOG_MODE": "buffered",
    }
    server = ServerProcess(tiny_victim, env=env, log_file=tmp_path / "serve.log").start()
    try:
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            key = admin.create_key("crasher")
        send = lambda batch: httpx.post(  # noqa: E731
            f"{server.url}/v1/predict",
            content=encode_npy(batch),
            headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
        )
        assert send(images[:2]).status_code == 200
        private_postgres.stop("immediate")
        for i in range(4):
            assert send(images[10 + 5 * i : 15 + 5 * i]).status_code == 200
        spool = tmp_path / "var" / "querylog-spool.db"
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            # The first two may have reached PostgreSQL before it stopped, or the spool.
            wait_until(lambda: admin.stats()["log_rows_spooled"] >= 20, 20, what="20 rows spooled")
            assert admin.stats()["log_rows_pending"] == 0
        server.kill()  # during the outage: the answered rows are only in the spool
        private_postgres.restart()
        server = ServerProcess(
            tiny_victim, port=server.port, env=env, log_file=tmp_path / "serve.log"
        ).start()
        wait_until(
            lambda: count_queries(make_engine(private_postgres.url), "crasher") == 22,
            20,
            what="22 logged rows of crasher",
        )
    finally:
        server.stop()
    assert _spooled(spool) == 0


def _spooled(spool: Path) -> int:
    engine = make_engine(f"sqlite:///{spool}")
    try:
        return count_queries(engine)
    finally:
        engine.dispose()


def test_an_idempotent_answer_survives_a_restart(make_client, tmp_path: Path, images) -> None:
    """Committed, then the response was lost with the process: the retry, sent to a new
    process, gets the same answer from the log, and nothing is logged twice."""
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    first = make_client(database_url=database)
    key = create_key(first, "persistent")
    answer = predict(first, key, images[:6], **{"Idempotency-Key": "batch-7"})
    assert answer.status_code == 200
    first.__exit__(None, None, None)  # the process is gone, and its memory with it

    second = make_client(database_url=database)
    replay = predict(second, key, images[:6], **{"Idempotency-Key": "batch-7"})
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == answer.json()
    reused = predict(second, key, images[6:12], **{"Idempotency-Key": "batch-7"})
    assert reused.status_code == 422
    assert count_queries(second.app.state.service.engine, "persistent") == 6


# ---------------------------------------------------------------------------------- Redis


def _redis_settings(redis_server: PrivateRedis, **overrides: object) -> dict[str, object]:
    return {
        "redis_url": redis_server.url,
        "detectors": "prada",
        "prada_delta": 0.9,
        "daily_quota": 1000,
        **overrides,
    }


def test_redis_down_fails_closed_and_recovers_without_restart(
    make_client, private_redis: PrivateRedis, images
) -> None:
    client = make_client(**_redis_settings(private_redis))
    key = create_key(client, "watched")
    assert predict(client, key, images[:4]).status_code == 200

    private_redis.stop()
    refused = predict(client, key, images[4:6])
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "state_store_unavailable"
    assert client.get("/readyz").status_code == 503

    private_redis.restart()  # empty: this Redis keeps nothing on disk
    assert client.get("/readyz").status_code == 200
    assert predict(client, key, images[6:9]).status_code == 200
    service = client.app.state.service
    assert count_queries(service.engine, "watched") == 7
    status = service.monitor.status("watched")
    assert status.queries == 3  # counted again from the restart; the refused two never were


def test_a_service_started_while_redis_is_down_waits_for_it(
    make_client, private_redis: PrivateRedis, images
) -> None:
    private_redis.stop()
    client = make_client(**_redis_settings(private_redis))  # starts: not ready, not dead
    key = create_key(client, "early")
    assert client.get("/readyz").status_code == 503
    assert predict(client, key, images[:2]).status_code == 503
    private_redis.restart()
    assert client.get("/readyz").status_code == 200
    assert predict(client, key, images[:2]).status_code == 200


def test_redis_down_can_fail_open_without_detection(
    make_client, private_redis: PrivateRedis, images
) -> None:
    client = make_client(**_redis_settings(private_redis, redis_failure="open"))
    key = create_key(client, "lucky")
    private_redis.stop()
    answered = predict(client, key, images[:3])
    assert answered.status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "redis" in ready.json()["degraded"][0]
    metrics = client.get("/metrics", headers=bearer(ADMIN_TOKEN)).text
    assert 'mlaas_degraded_requests_total{component="redis"}' in metrics
    rows = client.get("/admin/queries?client=lucky", headers=bearer(ADMIN_TOKEN)).json()
    assert len(rows) == 3 and all(row["scores"] is None for row in rows)  # unscored, logged
    private_redis.restart()
    predict(client, key, images[3:5])
    rows = client.get("/admin/queries?client=lucky", headers=bearer(ADMIN_TOKEN)).json()
    assert [row["scores"] is None for row in rows] == [True] * 3 + [False] * 2


# ------------------------------------------------------------------- the service itself


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "MLAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'mlaas.db'}",
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_VAR_DIR": str(tmp_path / "var"),
    }


def _predictions_finished(url: str) -> int:
    """Prediction requests the server at ``url`` has finished with, hang-ups included."""
    metrics = httpx.get(f"{url}/metrics", headers=bearer(ADMIN_TOKEN))
    metrics.raise_for_status()
    return requests_finished(metrics.text, "/v1/predict")


def _logged_inputs(database: str, client: str) -> tuple[int, int]:
    engine = make_engine(database)
    with Session(engine) as session:
        rows, distinct = session.execute(
            select(func.count(), func.count(QueryRecord.input_sha256.distinct())).where(
                QueryRecord.client == client
            )
        ).one()
    engine.dispose()
    return rows, distinct


def test_server_killed_mid_attack_and_restarted(tiny_victim, tmp_path, images) -> None:
    env = _env(tmp_path)
    server = ServerProcess(tiny_victim, env=env, log_file=tmp_path / "serve.log").start()
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        key = admin.create_key("extractor")
    attacker = ExtractionClient(
        server.url,
        key,
        budget=400,
        cache_path=tmp_path / "attack" / "cache.sqlite",
        batch_size=10,
        concurrency=2,
        throttle_qps=150,
        max_retries=100,
        backoff_s=0.05,
        max_backoff_s=0.5,
        progress=False,
    )
    result: dict[str, object] = {}

    def attack() -> None:
        try:
            result["answers"] = attacker.query(images)
        except Exception as exc:  # surfaced by the assertions below
            result["error"] = exc

    worker = threading.Thread(target=attack)
    worker.start()
    try:
        wait_until(lambda: attacker.cache.answered_count() >= 100, 60, what="100 cached answers")
        server.kill()  # SIGKILL: batches in flight, no shutdown, no flush
        killed_at = attacker.cache.answered_count()
        server = ServerProcess(
            tiny_victim, port=server.port, env=env, log_file=tmp_path / "serve.log"
        ).start()
        worker.join(180)
    finally:
        server.stop()
    assert "error" not in result, result.get("error")
    assert killed_at < 400 and len(result["answers"]) == 400  # type: ignore[arg-type]
    assert attacker.retries >= 1
    # Exactly the answered queries: each of the 400 images once, none lost, none twice.
    assert _logged_inputs(env["MLAAS_DATABASE_URL"], "extractor") == (400, 400)
    attacker.close()


def test_clients_that_hang_up_leave_whole_requests_or_nothing(
    tiny_victim, tmp_path, images
) -> None:
    env = _env(tmp_path)
    with ServerProcess(tiny_victim, env=env) as server:
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            key = admin.create_key("flaky")
        body = encode_npy(images[:7])
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {NPY_MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        for cut in range(12):
            with socket.create_connection((server.host, server.port)) as sock:
                if cut % 2 == 0:
                    sock.sendall(head + body[: len(body) // 2])  # hangs up mid-body
                else:
                    sock.sendall(head + body)  # hangs up before the answer
            # Each hang-up on its own: the server is done with this request before the next.
            wait_until(
                lambda: _predictions_finished(server.url) == cut + 1,  # noqa: B023
                20,
                what=f"the server to finish request {cut + 1}",
            )
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            wait_until(lambda: admin.stats()["log_rows_pending"] == 0, 20, what="no rows pending")
        rows, _ = _logged_inputs(env["MLAAS_DATABASE_URL"], "flaky")
        # Half-sent bodies were never answered; whole ones may have been, seven rows each.
        assert rows % 7 == 0 and rows <= 6 * 7
        ok = httpx.post(  # and the service goes on answering
            f"{server.url}/v1/predict",
            content=body,
            headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
        )
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 7
