"""The dashboard: one page, served by the API, that refreshes itself every two seconds.

Clients with their query counts and recent rate, alerts as they happen, the selected client's
latest query images, the query log with a filter, and, for the selected client, why and when
an alert fired: per detector, its decision statistic over the client's latest queries
against its threshold, with the alert marked at the query that raised it; for a key in a
shared account the same for the account's queries taken together.

It is an admin page behind a login form: ``POST /dashboard/login`` with the admin token (field
``token``) opens a server-side session (server/adminauth.py) whose id the browser keeps in an
HttpOnly, SameSite=Strict cookie, ``Secure`` with ``MLAAS_SECURE_COOKIES``; the page's data
calls carry it. Failed logins count as failed admin attempts. The token never goes in a URL,
where it would stay in the browser's history, in proxies' logs and in Referer headers.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from html import escape
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from defense.monitor import ACCOUNT_PREFIX, QUERY, Level, shared_account
from server.adminauth import (
    ADMIN_COOKIE,
    AdminAttempt,
    admin_attempt,
    admin_disabled,
    create_session,
    end_session,
    session_is_live,
    token_matches,
    unauthorized,
)
from server.api.deps import require_admin
from server.api.docs import admin_errors
from server.errors import ApiError
from server.inputs import media_type
from server.keys import KeyInfo
from server.querylog import count_queries, fetch_alerts, fetch_queries, fetch_statistics
from server.settings import ServerSettings
from server.state import ServiceState, get_state

router = APIRouter()
PAGE = files("server").joinpath("static/dashboard.html")
WINDOW = 300
"""The charts cover the selected client's (or account's) latest this many queries."""
MAX_LOGIN_BODY = 4096
"""Bytes: a login form is one field."""
# Admin pages: never cached, never framed by another site, never named in a Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mlaas-testbed dashboard: log in</title>
<style>
  body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 32em; }}
  h1 {{ font-size: 1.3em; }} .error {{ color: #b00020; font-weight: 600; }}
  .muted {{ color: #777; }} input {{ width: 100%; margin: .3em 0 .8em; padding: 4px; }}
</style>
</head>
<body>
<h1>mlaas-testbed dashboard</h1>
<p class="error" id="error">{message}</p>
<form method="post" action="/dashboard/login">
  <label for="token">Admin token</label>
  <input type="password" id="token" name="token" autocomplete="current-password" required
         autofocus>
  <button type="submit" id="login">Log in</button>
</form>
<p class="muted">The <code>MLAAS_ADMIN_TOKEN</code> the API runs with. A login lasts {hours} h
or until you log out.</p>
</body>
</html>
"""


def _login_page(
    settings: ServerSettings,
    status: int = 200,
    message: str = "",
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    hours = f"{settings.admin_session_ttl_s / 3600:g}"
    return HTMLResponse(
        LOGIN_PAGE.format(message=escape(message), hours=hours),
        status_code=status,
        headers={**PAGE_HEADERS, **(headers or {})},
    )


def _enabled(request: Request) -> ServiceState:
    state = get_state(request)
    if state.settings.admin_token is None:
        raise admin_disabled()
    return state


def _forget_cookie(response: Response, settings: ServerSettings) -> None:
    response.delete_cookie(
        ADMIN_COOKIE, path="/", secure=settings.secure_cookies, httponly=True, samesite="strict"
    )


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(request: Request, token: str | None = None) -> Response:
    """The page for a live session, else the login form. A token in the URL is refused
    without a look at it: the form is the only way in."""
    state = _enabled(request)
    settings = state.settings
    if token is not None:
        return _login_page(
            settings,
            400,
            "The admin token no longer goes in the URL, where it stays in the browser's "
            "history and in logs: enter it in this form. Consider it exposed if it was sent.",
        )
    session_id = request.cookies.get(ADMIN_COOKIE)
    if not session_id:
        return _login_page(settings)
    try:
        with admin_attempt(request):
            if not session_is_live(state.engine, session_id):
                raise unauthorized("the session has expired or ended: log in again")
    except ApiError as exc:
        if exc.status not in (401, 429):
            raise
        response = _login_page(settings, exc.status, exc.message, exc.headers)
        if exc.status == 401:
            _forget_cookie(response, settings)
        return response
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)


async def _form_token(request: Request) -> str:
    """The login form's ``token``, from a body read only up to MAX_LOGIN_BODY bytes."""
    kind = media_type(request.headers.get("content-type"))
    if kind != "application/x-www-form-urlencoded":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {kind or '(none)'!r}: the login form is "
            "application/x-www-form-urlencoded",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            raise ApiError(413, "payload_too_large", "a login form is a few hundred bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_request", f"malformed login form: {exc}") from None
    tokens = fields.get("token", [])
    if len(tokens) != 1:
        raise ApiError(400, "bad_request", "the login form takes one field, token")
    return tokens[0]


@router.post("/dashboard/login", include_in_schema=False)
async def login(request: Request) -> Response:
    """The admin token for a session. A wrong one is a failed admin attempt; an address out of
    failures gets 429 before the form is even read."""
    state = _enabled(request)
    settings = state.settings
    try:
        attempt = await run_in_threadpool(AdminAttempt.begin, request)
    except ApiError as exc:
        return _login_page(settings, exc.status, exc.message, exc.headers)
    try:
        token = await _form_token(request)
    except BaseException:
        await run_in_threadpool(attempt.release)  # nothing was compared
        raise
    if not token_matches(settings, token):
        return _login_page(settings, 401, "Wrong admin token.")  # counted: not released
    await run_in_threadpool(attempt.release)
    session_id = await run_in_threadpool(create_session, state.engine, settings.admin_session_ttl_s)
    response = RedirectResponse("/dashboard", status_code=303, headers=PAGE_HEADERS)
    response.set_cookie(
        ADMIN_COOKIE,
        session_id,
        max_age=settings.admin_session_ttl_s,
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/dashboard/logout", include_in_schema=False)
def logout(request: Request) -> Response:
    """Ends the session everywhere (it is deleted from the database) and drops the cookie.
    Only the session's own cookie can end it, and SameSite=Strict keeps other sites'
    forms from sending it."""
    state = _enabled(request)
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id:
        end_session(state.engine, session_id)
    response = RedirectResponse("/dashboard", status_code=303, headers=PAGE_HEADERS)
    _forget_cookie(response, state.settings)
    return response


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    scores = (row["payload"] or {}).get("scores") or []
    return {
        "time": row["time"],
        "client": row["client"],
        "label_name": (row["payload"] or {}).get("label_name"),
        "top_prob": scores[0]["prob"] if scores else None,
        "latency_ms": row["latency_ms"],
        "scores": row["scores"],
    }


def _charts(state: ServiceState, client: str, keys: list[KeyInfo]) -> list[dict[str, Any]]:
    """Per detector and level (the key's own queries; its shared account's, if any): the
    decision statistic after each of the latest queries as [query number, statistic] points
    (numbered as the monitor counts them, as the alerts are), the threshold, the side of it
    that alarms, and the alert, if any, with the query number that raised it."""
    monitor = state.monitor
    if monitor is None:
        return []
    engine = state.engine
    alerts = fetch_alerts(engine, client=client, level=Level.key.value, limit=None)
    levels = [(Level.key, client, [client], "", alerts)]
    key = next((k for k in keys if k.name == client), None)
    shared = shared_account(key.name, key.account) if key is not None else None
    if shared is not None:
        members = [k.name for k in keys if k.account == shared]
        alerts = fetch_alerts(engine, account=shared, level=Level.account.value, limit=None)
        levels.append((Level.account, shared, members, ACCOUNT_PREFIX, alerts))
    charts = []
    for level, name, members, prefix, alerts in levels:
        number = prefix + QUERY
        rows = [r for r in fetch_statistics(engine, members, limit=WINDOW) if number in r]
        rows.sort(key=lambda r: r[number])  # a request's rows share their time: not by time
        span = [rows[0][number], rows[-1][number]] if rows else None
        for detector in monitor.detectors:
            column = prefix + detector.name
            fired = [a for a in alerts if a["detector"] == detector.name]
            alert = fired[-1] if fired else None  # after a reset of the state, the latest
            charts.append(
                {
                    "level": level.value,
                    "name": name,
                    "detector": detector.name,
                    "threshold": _finite(detector.threshold),
                    "direction": detector.direction,
                    "queries": span,
                    "points": [[r[number], r[column]] for r in rows if r.get(column) is not None],
                    "alert": None
                    if alert is None
                    else {k: alert[k] for k in ("query_count", "score", "threshold", "time")},
                }
            )
    return charts


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@router.get(
    "/admin/dashboard/data",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(422, 503),
    tags=["admin"],
)
def dashboard_data(request: Request, client: str = "", filter: str = "") -> dict[str, Any]:
    state = get_state(request)
    engine = state.engine
    minute_ago = datetime.now(UTC) - timedelta(minutes=1)
    clients = []
    accounts: dict[str, list[str]] = {}  # a shared account's detectors, read once per refresh
    keys = state.keys.list()
    for key in keys:
        flagged_by: list[str] = []
        if state.monitor is not None:
            flagged_by = list(state.monitor.status(key.name).flagged_by)
            shared = shared_account(key.name, key.account)
            if shared is not None:
                if shared not in accounts:
                    account_status = state.monitor.account_status(shared)
                    accounts[shared] = [ACCOUNT_PREFIX + d for d in account_status.flagged_by]
                flagged_by += accounts[shared]
        clients.append(
            {
                "client": key.name,
                "account": key.account,
                "status": "revoked" if key.revoked_at else "active",
                "queries": count_queries(engine, key.name),
                "last_minute": count_queries(engine, key.name, since=minute_ago),
                "flagged_by": flagged_by,
            }
        )
    data: dict[str, Any] = {
        "model": state.victim.card.name,
        "granularity": str(state.granularity),
        "detectors": [d.name for d in state.monitor.detectors] if state.monitor else [],
        "clients": clients,
        "alerts": fetch_alerts(engine, limit=None)[-20:][::-1],
        "queries": [
            _flat(r)
            for r in fetch_queries(engine, client=filter or None, limit=50, newest_first=True)
        ],
    }
    if client:
        recent = fetch_queries(
            engine, client=client, limit=16, newest_first=True, include_input=True
        )[::-1]
        data["charts"] = _charts(state, client, keys)
        data["images"] = [r["input_png_base64"] for r in recent if r["input_png_base64"]]
    return data
