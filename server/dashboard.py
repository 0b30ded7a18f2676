"""The dashboard: one page, served by the API, that refreshes itself every two seconds.

Clients with their query counts and recent rate, alerts as they happen, the selected client's
latest query images, the query log with a filter, and, for the selected client, why and when
an alert fired: per detector, its decision statistic over the client's latest queries
against its threshold, with the alert marked at the query that raised it; for a key in a
shared account the same for the account's queries taken together. It is an admin page:
``/dashboard?token=ADMIN_TOKEN`` once sets an HttpOnly, same-site cookie that the page's data
calls then carry.
"""

from __future__ import annotations

import hmac
import math
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from defense.monitor import ACCOUNT_PREFIX, QUERY, Level, shared_account
from server.errors import ApiError
from server.keys import KeyInfo
from server.querylog import count_queries, fetch_alerts, fetch_queries, fetch_statistics
from server.routes import ADMIN_COOKIE, admin_errors, require_admin
from server.state import ServiceState, get_state

router = APIRouter()
PAGE = files("server").joinpath("static/dashboard.html")
WINDOW = 300
"""The charts cover the selected client's (or account's) latest this many queries."""


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(request: Request, token: str | None = None) -> Response:
    settings = get_state(request).settings
    if settings.admin_token is None:
        raise ApiError(403, "admin_disabled", "the dashboard needs MLAAS_ADMIN_TOKEN to be set")
    expected = settings.admin_token.get_secret_value().encode()
    if token is not None:
        if not hmac.compare_digest(token.encode(), expected):
            raise ApiError(401, "unauthorized", "wrong admin token")
        # Trade the token in the URL for a cookie, and drop it from the address bar.
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(
            ADMIN_COOKIE, token, httponly=True, samesite="strict", path="/", max_age=8 * 3600
        )
        return response
    cookie = request.cookies.get(ADMIN_COOKIE, "")
    if not hmac.compare_digest(cookie.encode(), expected):
        raise ApiError(401, "unauthorized", "open /dashboard?token=<MLAAS_ADMIN_TOKEN> once")
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


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
