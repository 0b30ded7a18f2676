"""Redis failures that must not switch detection off, and flags that outlive Redis's data.

Against real Redis servers (the shared one under a prefix of its own; a private one, without
persistence, that the tests flush, stop and restart) and the app with its lifespan. Only an
outage (no connection, a timeout) may be answered without Redis, and only where the deployment
fails open; a lock not had in time, a value or a script that Redis refuses are refused (503)
whatever the failure mode. A flagged client stays blocked (or deceived) when Redis loses its
record: the query log's alerts say so.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from defense.detectors import save_artifact
from defense.monitor import account_record
from defense.state import RedisStore, is_outage
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.querylog import fetch_alerts, logged_flags
from tests.helpers import ADMIN_TOKEN, REDIS_URL, bearer, create_key, wait_until
from tests.services import PrivateRedis

pytestmark = pytest.mark.slow
SHAPE = InputShape(1, 28, 28)
ADMIN = bearer(ADMIN_TOKEN)


@pytest.fixture(scope="module")
def quick_msp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``msp`` detector that alarms quickly: natural crops score about 0.75 on the tiny
    victim (0.25 per query above the drift: a key alarms after about 12 of them), in-domain
    images about 0.46, below the drift (never)."""
    directory = tmp_path_factory.mktemp("defense")
    save_artifact(directory, "msp", {}, {"drift": 0.5, "threshold": 3.0})
    return directory


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return load_dataset("natural-crops", SHAPE).get_batch(np.arange(120))


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    return load_dataset("fashion-mnist:pool", SHAPE).get_batch(np.arange(20))


def predict(client: TestClient, key: str, images: np.ndarray):
    return client.post(
        "/v1/predict",
        content=encode_npy(images),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE},
    )


def settings(redis_url: str, quick_msp: Path, **overrides: object) -> dict[str, object]:
    return {
        "redis_url": redis_url,
        "detectors": "msp",
        "defense_dir": quick_msp,
        "redis_failure": "open",
        **overrides,
    }


# ------------------------------------------------------------ what counts as an outage


def test_only_connection_errors_and_timeouts_are_outages() -> None:
    assert is_outage(redis.ConnectionError("refused"))
    assert is_outage(redis.TimeoutError("timed out"))
    assert is_outage(redis.exceptions.BusyLoadingError("loading"))  # a ConnectionError
    for error in (
        redis.exceptions.LockError("not had in time"),
        redis.exceptions.LockNotOwnedError("lease expired"),
        redis.ResponseError("WRONGTYPE"),
        redis.exceptions.OutOfMemoryError("OOM"),
        redis.DataError("bad value"),
        redis.exceptions.NoScriptError("no script"),
    ):
        assert not is_outage(error), error


def test_a_held_lock_is_refused_within_the_wait_and_spares_other_clients(
    make_client, redis_prefix: str, quick_msp: Path, pool
) -> None:
    """Another process holds a client's record (here: a lock taken by hand): its requests are
    refused with 503 within the wait, though the deployment fails open, and its many requests
    at once take one monitor thread: another client is answered meanwhile."""
    wait_s = 0.6
    client = make_client(
        **settings(REDIS_URL, quick_msp, redis_prefix=redis_prefix),
        redis_lock_wait_s=wait_s,
        monitor_threads=2,
    )
    key, other = create_key(client, "stuck"), create_key(client, "other")
    assert predict(client, key, pool[:1]).status_code == 200
    holder = redis.Redis.from_url(REDIS_URL)
    store = client.app.state.service.monitor.store
    assert isinstance(store, RedisStore)
    lock = holder.lock(store.lock_name("stuck"), timeout=60)
    assert lock.acquire(blocking=False)
    try:
        started = time.monotonic()
        refused = predict(client, key, pool[:1])
        took = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "state_store_unavailable"
        # redis-py gives up at its last try (every 0.1 s) before the wait is over
        assert wait_s - 0.2 <= took < wait_s + 2.0, took

        # Six at once from the stuck client against two monitor threads; had each taken a
        # thread to wait on the lock, the other client would wait behind them.
        def stuck_request(_: int) -> tuple[int, float]:
            begun = time.monotonic()
            return predict(client, key, pool[:1]).status_code, time.monotonic() - begun

        batcher = client.app.state.service.batcher
        passed = batcher.images
        with ThreadPoolExecutor(6) as senders:
            pending = [senders.submit(stuck_request, i) for i in range(6)]
            # They are in, waiting: past its forward pass, each goes straight on to wait for
            # the client's turn, well before the other client's request, sent next, has been
            # through the model itself.
            wait_until(lambda: batcher.images == passed + 6, 10, what="six forward passes")
            begun = time.monotonic()
            answered = predict(client, other, pool[:2])
            other_took = time.monotonic() - begun
            results = [f.result() for f in pending]
        assert answered.status_code == 200, answered.text
        assert other_took < wait_s, other_took
        assert [status for status, _ in results] == [503] * 6
        # each waited its turn for at most the wait, then for the Redis lock at most the wait
        assert max(t for _, t in results) < 2 * wait_s + 2.0, results
    finally:
        lock.release()
        holder.close()
    assert predict(client, key, pool[:1]).status_code == 200  # free again
    assert client.app.state.service.monitor_threads.records == 0  # no lock left behind
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["degraded"] == []


def test_values_and_scripts_redis_refuses_fail_closed_under_open(
    make_client, redis_prefix: str, quick_msp: Path, pool
) -> None:
    client = make_client(
        **settings(REDIS_URL, quick_msp, redis_prefix=redis_prefix), daily_quota=1000
    )
    key = create_key(client, "odd")
    assert predict(client, key, pool[:2]).status_code == 200
    direct = redis.Redis.from_url(REDIS_URL)
    try:
        # The client's record is not a hash any more: Redis refuses to read it (WRONGTYPE).
        record = f"{redis_prefix}:client:odd"
        saved = direct.dump(record)
        direct.delete(record)
        direct.set(record, b"not a hash")
        refused = predict(client, key, pool[:2])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "state_store_unavailable"
        direct.delete(record)
        direct.restore(record, 0, saved)
        assert predict(client, key, pool[:2]).status_code == 200

        # The rate limiter's script fails on a key of the wrong type.
        limits = f"{redis_prefix}:ratelimit:odd"
        direct.delete(limits)
        direct.rpush(limits, b"not a bucket")
        refused = predict(client, key, pool[:2])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "state_store_unavailable"
    finally:
        direct.close()
    service = client.app.state.service
    rows = client.get("/admin/queries?client=odd", headers=ADMIN).json()
    assert len(rows) == 4 and all(row["scores"] is not None for row in rows)  # none unscored
    assert service.monitor.status("odd").queries == 4
    degraded = service.metrics.registry.get_sample_value(
        "mlaas_degraded_requests_total", {"component": "redis"}
    )
    assert not degraded  # neither was taken for an outage


def test_a_full_redis_fails_closed_and_readyz_says_so_under_open(
    make_client, private_redis: PrivateRedis, quick_msp: Path, pool
) -> None:
    client = make_client(**settings(private_redis.url, quick_msp))
    key = create_key(client, "filler")
    assert predict(client, key, pool[:2]).status_code == 200
    admin = private_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # every write is refused: OOM
    try:
        refused = predict(client, key, pool[:2])
        assert refused.status_code == 503, refused.text
        assert client.get("/readyz").status_code == 200  # PING is no write: Redis answers
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    assert predict(client, key, pool[:2]).status_code == 200
    # An outage, by contrast, is answered without Redis under open (as before).
    private_redis.stop()
    assert predict(client, key, pool[:2]).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and "redis" in ready.json()["degraded"][0]


# --------------------------------------------------------- flags that outlive Redis


def flag(client: TestClient, key: str, crops: np.ndarray) -> None:
    """Crops until the key is refused: flagged and blocked."""
    for start in range(0, len(crops), 20):
        response = predict(client, key, crops[start : start + 20])
        if response.status_code == 403:
            return
        assert response.status_code == 200, response.text
    raise AssertionError(f"{key} was never blocked")


def test_a_blocked_client_stays_blocked_when_redis_loses_everything(
    make_client, private_redis: PrivateRedis, quick_msp: Path, crops, pool
) -> None:
    options = settings(private_redis.url, quick_msp, policy="block")
    first = make_client(**options)
    thief, user = create_key(first, "thief"), create_key(first, "user")
    flag(first, thief, crops)
    assert predict(first, user, pool[:3]).status_code == 200
    (alert,) = fetch_alerts(first.app.state.service.engine)
    assert (alert["client"], alert["level"], alert["action"]) == ("thief", "key", "block")

    admin = private_redis.client()
    admin.flushall()
    # The operator's view says so before any request has put the flag back.
    standing = first.get("/admin/clients/thief", headers=bearer(ADMIN_TOKEN)).json()
    assert standing["status"] == "blocked", standing
    refused = predict(first, thief, crops[:1])  # this process remembers
    assert refused.status_code == 403 and "flagged by msp" in refused.json()["error"]["message"]

    # A process that never saw the thief (a replica, a restart) asks the log: the record in
    # Redis is fresh. It puts the flag back in Redis for every other process.
    second = make_client(**options)
    refused = predict(second, thief, crops[:1])
    assert refused.status_code == 403, refused.text
    assert "flagged by msp" in refused.json()["error"]["message"]
    status = second.app.state.service.monitor.status("thief")
    assert status.flagged and status.flagged_by == ["msp"] and status.queries == 0
    assert predict(second, user, pool[:3]).status_code == 200  # the log has nothing on it

    # Redis restarted without persistence, and a third process: the same.
    private_redis.restart()
    third = make_client(**options)
    assert predict(third, thief, crops[:1]).status_code == 403
    assert predict(third, user, pool[:3]).status_code == 200

    # Redis down, the deployment failing open: no detection, but the log still blocks.
    private_redis.stop()
    fourth = make_client(**options)
    assert predict(fourth, thief, crops[:1]).status_code == 403
    assert predict(fourth, user, pool[:3]).status_code == 200
    assert len(fetch_alerts(fourth.app.state.service.engine)) == 1  # never alerted twice
    admin.close()


def test_a_blocked_account_stays_blocked_when_redis_restarts(
    make_client, private_redis: PrivateRedis, quick_msp: Path, crops, pool
) -> None:
    options = settings(private_redis.url, quick_msp, policy="block")
    first = make_client(**options)
    keys = [create_key(first, f"acme-{i}", account="acme") for i in range(4)]
    late = create_key(first, "acme-late", account="acme")  # never sent a query
    user = create_key(first, "user")
    for start in range(0, len(crops)):  # one crop per request, round-robin: no key alarms
        response = predict(first, keys[start % 4], crops[start : start + 1])
        if response.status_code == 403:
            break
        assert response.status_code == 200, response.text
    else:
        raise AssertionError("the account was never blocked")
    alerts = fetch_alerts(first.app.state.service.engine)
    assert [(a["level"], a["account"]) for a in alerts] == [("account", "acme")]
    engine = first.app.state.service.engine
    assert logged_flags(engine, "acme-late", "acme", "block") == {"account": ["msp"]}
    assert logged_flags(engine, "acme-late", None, "block") == {}
    assert logged_flags(engine, "acme-late", "acme", "deceive") == {}

    private_redis.restart()  # empty
    second = make_client(**options)
    for key in [*keys, late]:
        refused = predict(second, key, pool[:1])
        assert refused.status_code == 403, refused.text
        assert "account 'acme'" in refused.json()["error"]["message"]
    monitor = second.app.state.service.monitor
    assert monitor.account_status("acme").flagged_by == ["msp"]  # put back in Redis
    assert not monitor.status("acme-0").flagged
    assert predict(second, user, pool[:3]).status_code == 200
    assert account_record("acme") in monitor.clients()


def test_a_deceived_client_stays_deceived_when_redis_loses_everything(
    make_client, private_redis: PrivateRedis, quick_msp: Path, crops, pool
) -> None:
    options = settings(private_redis.url, quick_msp, policy="deceive", deceive="label")
    first = make_client(**options)
    thief, user = create_key(first, "thief"), create_key(first, "user")
    granularities = [
        predict(first, thief, crops[i : i + 5]).json()["granularity"] for i in range(0, 40, 5)
    ]
    assert granularities[0] == "probs" and granularities[-1] == "label", granularities

    private_redis.restart()  # empty
    second = make_client(**options)
    answered = predict(second, thief, crops[40:42])
    assert answered.status_code == 200 and answered.json()["granularity"] == "label"
    assert second.app.state.service.monitor.status("thief").flagged  # put back in Redis
    third = make_client(**options)  # Redis has it again: no need of the log
    assert predict(third, thief, crops[42:44]).json()["granularity"] == "label"
    assert predict(third, user, pool[:2]).json()["granularity"] == "probs"

    private_redis.stop()  # down, failing open: answered unobserved, still deceived
    fourth = make_client(**options)
    assert predict(fourth, thief, crops[44:46]).json()["granularity"] == "label"
    assert predict(fourth, user, pool[:2]).json()["granularity"] == "probs"


def test_concurrent_requests_of_one_client_take_turns_without_leaking_locks(
    make_client, redis_prefix: str, quick_msp: Path, pool
) -> None:
    """Many requests of one key at once: every one observed (none lost to a race on the
    record), one at a time, and the table of turns empty afterwards."""
    client = make_client(**settings(REDIS_URL, quick_msp, redis_prefix=redis_prefix))
    key = create_key(client, "busy")
    statuses: list[int] = []
    guard = threading.Lock()

    def send(_: int) -> None:
        status = predict(client, key, pool[:2]).status_code
        with guard:
            statuses.append(status)

    with ThreadPoolExecutor(8) as senders:
        list(senders.map(send, range(16)))
    assert statuses.count(200) + statuses.count(429) == 16 and statuses.count(200) >= 8
    service = client.app.state.service
    assert service.monitor.status("busy").queries == 2 * statuses.count(200)
    assert service.monitor_threads.records == 0
