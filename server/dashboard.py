"""The dashboard: one page, served by the API, that refreshes itself every two seconds.

Clients with their query counts and recent rate, alerts as they happen, the selected client's
detector scores over its queries and its latest query images, and the query log with a
filter. It is an admin page: ``/dashboard?token=ADMIN_TOKEN`` once sets an HttpOnly,
same-site cookie that the page's data calls then carry.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from server.errors import ApiError
from server.querylog import count_queries, fetch_alerts, fetch_queries
from server.routes import ADMIN_COOKIE, admin_errors, require_admin
from server.state import get_state

router = APIRouter()
PAGE = files("server").joinpath("static/dashboard.html")


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
    for key in state.keys.list():
        flagged_by: list[str] = []
        if state.monitor is not None:
            flagged_by = list(state.monitor.status(key.name).flagged_by)
            if key.account and key.account != key.name:
                if key.account not in accounts:
                    shared = state.monitor.account_status(key.account)
                    accounts[key.account] = [f"account:{d}" for d in shared.flagged_by]
                flagged_by += accounts[key.account]
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
            engine, client=client, limit=300, newest_first=True, include_input=True
        )[::-1]
        names = data["detectors"]
        data["series"] = {n: [(r["scores"] or {}).get(n) for r in recent] for n in names}
        data["images"] = [r["input_png_base64"] for r in recent[-16:] if r["input_png_base64"]]
    return data
