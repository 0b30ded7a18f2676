"""Admin authentication: no short tokens, failed attempts limited per address (in memory, in
Redis, through a Redis outage), dashboard sessions in the database, the admin check before
any body is read."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, update

from server.api.admin import NewKey
from server.db import AdminSession, utcnow
from server.settings import ServerSettings
from tests.helpers import ADMIN_TOKEN, REDIS_URL, bearer

DASHBOARD_MARK = "clients, detectors, alerts"  # the dashboard page's heading, not the form's
LOGIN_FORM = 'name="token"'


def login(client: TestClient, token: str = ADMIN_TOKEN):
    return client.post("/dashboard/login", data={"token": token}, follow_redirects=False)


def session_cookie(response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def with_session(session_id: str) -> dict[str, str]:
    return {"Cookie": f"mlaas_session={session_id}"}


def sessions(client: TestClient) -> list[AdminSession]:
    with client.app.state.service.engine.connect() as connection:
        return list(connection.execute(select(AdminSession)).all())


def test_short_admin_tokens_are_refused_with_how_to_make_one(monkeypatch, tmp_path) -> None:
    for settings in (
        lambda: ServerSettings(admin_token="x" * 31, var_dir=tmp_path),
        lambda: ServerSettings(var_dir=tmp_path),  # from the environment, as `mlaas serve`
    ):
        monkeypatch.setenv("MLAAS_ADMIN_TOKEN", "change-me")
        with pytest.raises(ValidationError) as refused:
            settings()
        message = str(refused.value)
        assert "at least 32" in message and "secrets.token_urlsafe(32)" in message
    assert ServerSettings(admin_token="x" * 32, var_dir=tmp_path).admin_token is not None


def test_failed_attempts_are_limited_per_address_before_the_token_is_compared(
    make_client, monkeypatch
) -> None:
    client = make_client(admin_failures_per_minute=3)
    for _ in range(5):  # right tokens use nothing up
        assert client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 200
    assert client.get("/admin/stats").status_code == 401  # no credential: no guess, not counted
    for _ in range(3):
        assert client.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    compared: list[bytes] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
    for token in ("wrong", ADMIN_TOKEN):  # the right token too: the gate is shut
        refused = client.get("/admin/stats", headers=bearer(token))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_admin_failures"
        assert refused.headers["Retry-After"] == "20"  # one failure back every 60 / 3 s
    assert compared == []  # refused before any comparison
    assert login(client).status_code == 429  # the login form shares the gate
    assert client.get("/dashboard", headers=with_session("guess")).status_code == 429

    # Per address: another host is not locked out; an IPv6 host counts as its /64.
    other = TestClient(client.app, client=("203.0.113.7", 40000))
    assert other.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 200
    for _ in range(3):
        host = TestClient(client.app, client=("2001:db8::1", 40000))
        assert host.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    neighbour = TestClient(client.app, client=("2001:db8::2", 40000))
    assert neighbour.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 429
    next_net = TestClient(client.app, client=("2001:db8:0:1::1", 40000))
    assert next_net.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_failed_logins_count_as_failed_attempts(make_client) -> None:
    client = make_client(admin_failures_per_minute=2)
    for _ in range(2):
        wrong = login(client, "wrong-token")
        assert wrong.status_code == 401 and "Wrong admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
    refused = login(client)  # the right token, too late
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert LOGIN_FORM in refused.text and "too many failed admin attempts" in refused.text
    assert "set-cookie" not in refused.headers and sessions(client) == []
    assert client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 429


def test_failures_are_counted_once_for_every_replica_through_redis(
    make_client, redis_prefix: str
) -> None:
    import redis

    settings = {
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
        "admin_failures_per_minute": 2,
    }
    first, second = make_client(**settings), make_client(**settings)
    assert first.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    assert second.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    assert first.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 429
    assert redis.Redis.from_url(REDIS_URL).exists(
        f"{redis_prefix}:ratelimit:admin-failures:testclient"
    )


def test_a_redis_outage_does_not_open_the_gate(make_client, private_redis) -> None:
    """Without Redis the failures are counted in the process: still limited, still usable."""
    client = make_client(redis_url=private_redis.url, admin_failures_per_minute=2)
    assert client.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    private_redis.stop()
    assert client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 200
    for _ in range(2):
        assert client.get("/admin/stats", headers=bearer("wrong")).status_code == 401
    assert client.get("/admin/stats", headers=bearer("wrong")).status_code == 429
    assert client.get("/admin/stats", headers=bearer(ADMIN_TOKEN)).status_code == 429


def test_a_login_opens_a_session_that_the_database_keeps_and_logout_ends(make_client) -> None:
    client = make_client(admin_session_ttl_s=3600)
    form = client.get("/dashboard")
    assert form.status_code == 200 and LOGIN_FORM in form.text and DASHBOARD_MARK not in form.text
    assert 'action="/dashboard/login"' in form.text and "set-cookie" not in form.headers
    assert form.headers["cache-control"] == "no-store"

    opened = login(client)
    assert opened.status_code == 303 and opened.headers["location"] == "/dashboard"
    morsel = session_cookie(opened)["mlaas_session"]
    session_id = morsel.value
    assert session_id != ADMIN_TOKEN and len(session_id) == 43  # token_urlsafe(32)
    assert morsel["httponly"] and morsel["samesite"].lower() == "strict"
    assert morsel["path"] == "/" and morsel["max-age"] == "3600" and not morsel["secure"]
    [row] = sessions(client)
    assert row.id_hash == hashlib.sha256(session_id.encode()).hexdigest()  # never the id itself
    assert row.expires_at - row.created_at == timedelta(hours=1)

    client.cookies.clear()  # the cookie goes by hand below, so that the test says which
    page = client.get("/dashboard", headers=with_session(session_id))
    assert page.status_code == 200 and DASHBOARD_MARK in page.text and 'id="logout"' in page.text
    for path in ("/admin/dashboard/data", "/admin/stats", "/metrics"):
        assert client.get(path, headers=with_session(session_id)).status_code == 200, path

    ended = client.post(
        "/dashboard/logout", headers=with_session(session_id), follow_redirects=False
    )
    assert ended.status_code == 303 and "Max-Age=0" in ended.headers["set-cookie"]
    assert sessions(client) == []
    for path in ("/admin/dashboard/data", "/admin/stats"):
        assert client.get(path, headers=with_session(session_id)).status_code == 401, path
    again = client.get("/dashboard", headers=with_session(session_id))
    assert again.status_code == 401 and LOGIN_FORM in again.text


def test_expired_sessions_are_refused_and_deleted(make_client) -> None:
    client = make_client()
    session_id = session_cookie(login(client))["mlaas_session"].value
    client.cookies.clear()
    assert client.get("/admin/stats", headers=with_session(session_id)).status_code == 200
    with client.app.state.service.engine.begin() as connection:
        connection.execute(update(AdminSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/admin/stats", headers=with_session(session_id)).status_code == 401
    assert sessions(client) == []  # deleted on sight
    expired_page = client.get("/dashboard", headers=with_session(session_id))
    assert expired_page.status_code == 401 and LOGIN_FORM in expired_page.text
    assert "Max-Age=0" in expired_page.headers["set-cookie"]  # the browser forgets it


def test_the_cookie_is_secure_when_the_deployment_says_https(make_client) -> None:
    client = make_client(secure_cookies=True)
    assert session_cookie(login(client))["mlaas_session"]["secure"]


def test_the_token_in_the_url_is_refused_and_never_set_as_a_cookie(make_client) -> None:
    client = make_client()
    refused = client.get(f"/dashboard?token={ADMIN_TOKEN}", follow_redirects=False)
    assert refused.status_code == 400 and LOGIN_FORM in refused.text
    assert "no longer goes in the URL" in refused.text and "set-cookie" not in refused.headers
    assert sessions(client) == [] and not client.cookies


def test_sessions_are_shared_by_every_api_process(make_client, postgres_url: str) -> None:
    first, second = make_client(database_url=postgres_url), make_client(database_url=postgres_url)
    session_id = session_cookie(login(first))["mlaas_session"].value
    first.cookies.clear()
    assert second.get("/admin/stats", headers=with_session(session_id)).status_code == 200
    second.post("/dashboard/logout", headers=with_session(session_id))
    assert first.get("/admin/stats", headers=with_session(session_id)).status_code == 401


def test_admin_keys_checks_the_token_before_reading_the_body(make_client, monkeypatch) -> None:
    parsed: list[bytes] = []
    real = NewKey.model_validate_json
    monkeypatch.setattr(
        NewKey, "model_validate_json", lambda body: parsed.append(body) or real(body)
    )
    client = make_client()
    bodies = (b"{not json", b'{"name": 1, "rate_limit": "x"}', b"[" * 2_000_000)
    for body in bodies:
        for headers in ({}, bearer("wrong-token")):
            response = client.post(
                "/admin/keys", content=body, headers={**headers, "Content-Type": "application/json"}
            )
            assert response.status_code == 401, response.text
    assert parsed == []  # no stranger's body was parsed

    # With the token, a bad body gets the API's usual 422, naming the field.
    admin = bearer(ADMIN_TOKEN)
    bad = client.post("/admin/keys", json={"name": "ok", "rate_limit": 0}, headers=admin)
    assert bad.status_code == 422
    assert bad.json()["error"] == {
        "code": "invalid_request",
        "message": "body.rate_limit: Input should be greater than or equal to 0.000001",
    }
    not_json = client.post(
        "/admin/keys",
        content=b"name=ok",
        headers={**admin, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert not_json.status_code == 415

    disabled = make_client(admin_token=None)
    for headers in ({}, bearer(ADMIN_TOKEN)):
        response = disabled.post("/admin/keys", content=b"{not json", headers=headers)
        assert response.status_code == 403, response.text
    assert disabled.get("/dashboard").status_code == 403
    assert disabled.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 403
