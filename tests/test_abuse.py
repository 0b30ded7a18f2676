"""Abuse rules, one test each: rate limits and daily quotas (in memory and in Redis), keys
hashed at rest and never logged, constant-time comparisons, the admin token on every admin
route, CORS closed by default, and no internals in error bodies."""

from __future__ import annotations

import hmac
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from mlaas.wire import IMAGE_COUNT_HEADER, NPY_MEDIA_TYPE, encode_npy
from server.api import admin_router, public_router
from server.dashboard import router as dashboard_router
from server.db import ApiKey
from server.keys import hash_key
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN, REDIS_URL, bearer, create_key

IMAGES = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)


def post(client, key: str, n: int, **headers: str):
    return client.post(
        "/v1/predict",
        content=encode_npy(IMAGES[:n]),
        headers={**bearer(key), "Content-Type": NPY_MEDIA_TYPE, **headers},
    )


def logged(client, name: str) -> int:
    service = client.app.state.service
    from server.querylog import count_queries

    return count_queries(service.engine, name)


def test_rate_limit_answers_429_with_retry_after_and_logs_nothing(make_client) -> None:
    client = make_client(rate_limit=0.5, rate_burst=4)
    key = create_key(client, "hasty")
    assert post(client, key, 3).status_code == 200
    assert post(client, key, 1).status_code == 200  # the burst is spent
    refused = post(client, key, 1)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) == 2  # one image per 2 s
    # More than the burst, declared: refused at once as one that could never pass.
    too_big = post(client, key, 5, **{IMAGE_COUNT_HEADER: "5"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "over_limit"
    # Undeclared, its first image is charged before the body is read: the bucket is empty.
    assert post(client, key, 5).status_code == 429
    assert logged(client, "hasty") == 4
    assert client.app.state.service.rejected["429"] == 2
    other = create_key(client, "patient")  # limits are per key
    assert post(client, other, 4).status_code == 200


def test_daily_quota_per_key_overrides_the_deployment(make_client) -> None:
    client = make_client(daily_quota=100)
    response = client.post(
        "/admin/keys", json={"name": "trial", "daily_quota": 5}, headers=bearer(ADMIN_TOKEN)
    )
    assert response.status_code == 201
    key = response.json()["key"]
    first = post(client, key, 4)
    assert first.status_code == 200
    assert (first.headers["X-Quota-Limit"], first.headers["X-Quota-Remaining"]) == ("5", "1")
    assert post(client, key, 2).status_code == 429  # 6 > 5: refused whole, nothing consumed
    assert post(client, key, 1).status_code == 200
    over = post(client, key, 1)
    assert over.status_code == 429 and "daily quota" in over.json()["error"]["message"]
    assert over.headers["X-Quota-Remaining"] == "0"
    now = datetime.now(UTC)
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    assert abs(int(over.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5
    assert logged(client, "trial") == 5
    assert post(client, create_key(client, "regular"), 8).status_code == 200


def test_a_replayed_request_is_not_charged_again(make_client) -> None:
    client = make_client(daily_quota=4)
    key = create_key(client, "retrier")
    first = post(client, key, 4, **{"Idempotency-Key": "only-once"})
    again = post(client, key, 4, **{"Idempotency-Key": "only-once"})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert post(client, key, 1).status_code == 429  # the quota was charged once
    # With the quota spent, a retry of the answered request still collects its answer.
    third = post(client, key, 4, **{"Idempotency-Key": "only-once"})
    assert third.status_code == 200 and third.json() == first.json()
    assert logged(client, "retrier") == 4


def test_redis_limits_are_shared_by_processes(make_client, redis_prefix, tmp_path: Path) -> None:
    prefix = redis_prefix
    shared = {"redis_url": REDIS_URL, "redis_prefix": prefix, "daily_quota": 6}
    first = make_client(**shared, database_url=f"sqlite:///{tmp_path / 'shared.db'}")
    second = make_client(**shared, database_url=f"sqlite:///{tmp_path / 'shared.db'}")
    key = create_key(first, "spreader")
    assert post(first, key, 4).status_code == 200
    assert post(second, key, 2).status_code == 200
    assert post(second, key, 1).status_code == 429  # the other process spent the quota
    assert post(first, key, 1).status_code == 429
    assert redis.Redis.from_url(REDIS_URL).exists(f"{prefix}:ratelimit:spreader")


def test_keys_are_stored_as_hashes_only(make_client, tmp_path: Path) -> None:
    client = make_client()
    key = create_key(client, "hashed")
    database = tmp_path / "api.db"
    with client.app.state.service.engine.connect() as connection:
        rows = connection.execute(ApiKey.__table__.select()).mappings().all()
    assert key not in repr(rows) and key[10:] not in database.read_bytes().decode("latin-1")
    assert len(rows[0]["key_hash"]) == 64


def test_secrets_are_compared_in_constant_time(make_client, monkeypatch) -> None:
    client = make_client()
    key = create_key(client, "timed")
    calls: list[tuple[bytes | str, bytes | str]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert post(client, key, 1).status_code == 200
    assert client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 200
    assert client.get("/admin/stats", headers=bearer("nope")).status_code == 401
    compared = {bytes(a) if isinstance(a, bytes) else a.encode() for a, _ in calls}
    assert b"nope" in compared and ADMIN_TOKEN.encode() in compared  # admin, both outcomes
    assert hash_key(key).encode() in compared  # the API key, by its hash


def test_keys_and_the_admin_token_never_reach_the_logs(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client()
    key = create_key(client, "quiet")
    post(client, key, 2)
    post(client, key + "x", 1)  # a wrong key
    client.app.state.service.keys.revoke("quiet")
    post(client, key, 1)  # a revoked key
    client.get("/admin/queries", headers=bearer(ADMIN_TOKEN))
    client.get(f"/dashboard?token={ADMIN_TOKEN}")  # refused, and not logged either
    client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
    client.post("/dashboard/login", data={"token": ADMIN_TOKEN + "x"})
    # The test's own HTTP client (httpx, httpcore) logs its URLs; the service's loggers may not.
    service_lines = [
        record.getMessage()
        for record in caplog.records
        if record.name.split(".")[0] in {"server", "defense", "mlaas", "uvicorn", "fastapi"}
    ]
    assert len(service_lines) >= 2  # the service did log: the absence below means something
    assert not [line for line in service_lines if key in line or ADMIN_TOKEN in line]


def test_uvicorn_access_log_masks_tokens_in_urls(tiny_victim: Path, tmp_path: Path) -> None:
    import httpx

    log_file = tmp_path / "serve.log"
    secret_key = "mlk_" + "s" * 40
    env = {
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "MLAAS_VAR_DIR": str(tmp_path / "var"),
    }
    with ServerProcess(tiny_victim, env=env, log_file=log_file) as server:
        httpx.get(f"{server.url}/dashboard?token={ADMIN_TOKEN}", follow_redirects=False)
        httpx.get(f"{server.url}/v1/model?key={secret_key}")
        httpx.post(f"{server.url}/v1/predict", headers=bearer(secret_key))
    text = log_file.read_text()
    assert "GET /dashboard?token=[redacted]" in text  # the access log ran, masked
    assert ADMIN_TOKEN not in text and secret_key not in text


def test_every_admin_route_and_the_dashboard_need_the_token(make_client) -> None:
    client = make_client(admin_failures_per_minute=1000)  # this test fails on purpose, often
    routes = [
        route
        for router in (public_router, admin_router, dashboard_router)
        for route in router.routes
        if isinstance(route, APIRoute)
    ]
    guarded = [
        (method, route.path)
        for route in routes
        if route.path.startswith(("/admin", "/dashboard")) or route.path == "/metrics"
        for method in route.methods
    ]
    # keys (2), queries, stats, alerts, clients, data, metrics; the page, login and logout
    assert len(guarded) >= 11
    wrong = (
        {},
        bearer("wrong-token"),
        {"Cookie": "mlaas_session=wrong"},
        {"Cookie": f"mlaas_session={ADMIN_TOKEN}"},  # the token is no session id
        {"Cookie": f"mlaas_admin={ADMIN_TOKEN}"},  # the old cookie, the raw token: gone
    )
    pages = {"/dashboard", "/dashboard/login", "/dashboard/logout"}
    for method, path in guarded:
        if path in pages:
            continue
        url = path.replace("{name}", "someone")
        for headers in wrong:
            response = client.request(method, url, headers=headers, json={"name": "x"})
            assert response.status_code == 401, (method, path, headers, response.text)
    # The page: a login form and never the dashboard, whatever the request carries.
    for headers in wrong:
        page = client.get("/dashboard", headers=headers)
        assert page.status_code in (200, 401) and 'name="token"' in page.text, headers
        assert "set-cookie" not in page.headers or "Max-Age=0" in page.headers["set-cookie"]
    refused = client.post("/dashboard/login", data={"token": "wrong-token"})
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    ended = client.post("/dashboard/logout", follow_redirects=False)  # opens nothing
    assert ended.status_code == 303 and "Max-Age=0" in ended.headers["set-cookie"]
    public = {r.path for r in routes} - {p for _, p in guarded}
    assert public == {"/v1/predict", "/v1/model", "/healthz", "/readyz"}


def test_cors_is_closed_by_default_and_opens_to_named_origins(make_client) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = make_client()
    answer = closed.options("/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    simple = closed.get("/v1/model", headers={"Origin": "https://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers

    opened = make_client(cors_origins="https://lab.example")
    allowed = opened.options("/v1/predict", headers={**preflight, "Origin": "https://lab.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://lab.example"
    refused = opened.options("/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in refused.headers


def test_errors_carry_no_stack_traces_or_internals(make_client, monkeypatch) -> None:
    client = make_client()
    key = create_key(client, "unlucky")
    service = client.app.state.service

    async def broken(images):
        raise RuntimeError("secret internal detail at /srv/model.py line 42")

    monkeypatch.setattr(service.batcher, "submit", broken)
    # As a real server would: answer the 500 rather than hand the exception to the test.
    response = post(TestClient(client.app, raise_server_exceptions=False), key, 1)
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }
    assert logged(client, "unlucky") == 0
