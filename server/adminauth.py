"""Admin authentication: the admin token, dashboard sessions, and a limit on failed attempts.

Failed attempts. Every attempt at admin credentials (a bearer token, a session cookie, the
dashboard's login form) is counted against its source address *before* anything is compared:
it takes one from the address's allowance of failures, a GCRA bucket of server/ratelimit.py
(``MLAAS_ADMIN_FAILURES_PER_MINUTE`` at once, refilled at that rate per minute) under the
client name ``admin-failures:<address>``, and a right credential gives it back, so only
failures stay counted. An address with nothing left gets 429 with Retry-After and its guess is
never looked at. The limiter is the service's own: in Redis when ``MLAAS_REDIS_URL`` is set,
so that every replica counts the same failures, in-process otherwise. When Redis does not
answer the gate does not open: it falls back to a limiter in this process (guessing stays
limited, per process, and an admin can still log in to look at the outage). An IPv6 address
counts as its /64, which one host usually holds whole. Behind a reverse proxy the source is
the proxy unless uvicorn is told to trust its forwarded headers.

Dashboard sessions. Logging in trades the token for a random session id (256 bits) in an
HttpOnly, SameSite=Strict cookie that lasts ``MLAAS_ADMIN_SESSION_TTL_S``. The database keeps
the id's SHA-256 and its expiry, so every process and replica knows the session, a logout ends
it everywhere, and neither the browser nor the database holds the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from fastapi import Request
from redis.exceptions import RedisError
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from server.db import AdminSession, utcnow
from server.errors import ApiError
from server.ratelimit import LimitSpec, MemoryRateLimiter, RateLimiter
from server.settings import ServerSettings
from server.state import get_state

log = logging.getLogger(__name__)

ADMIN_COOKIE = "mlaas_session"
"""The dashboard's session cookie (a session id, never the admin token)."""
FAILURES_CLIENT = "admin-failures:"
_MAX_SESSION_ID_CHARS = 128  # ours have 43; anything much longer is not worth hashing
_fallback_lock = threading.Lock()


def admin_disabled() -> ApiError:
    return ApiError(
        403, "admin_disabled", "admin routes are disabled: set MLAAS_ADMIN_TOKEN to enable"
    )


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def source_address(request: Request) -> str:
    """Whom failures are counted against: the peer's address, an IPv6 one by its /64."""
    host = request.client.host if request.client is not None else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"  # not an IP (a test client, a Unix socket)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


def failure_allowance(settings: ServerSettings) -> LimitSpec:
    per_minute = settings.admin_failures_per_minute
    return LimitSpec(rate=per_minute / 60.0, burst=per_minute)


def _fallback_limiter(request: Request) -> RateLimiter:
    """This app's in-process limiter for failures while Redis does not answer."""
    app_state = request.app.state
    with _fallback_lock:
        limiter = getattr(app_state, "admin_failures_fallback", None)
        if limiter is None:
            limiter = MemoryRateLimiter()
            app_state.admin_failures_fallback = limiter
    return limiter


class AdminAttempt:
    """One attempt at admin credentials from a request's source address.

    :meth:`begin` counts it as a failure, or refuses it with 429 when the address has none
    left; :meth:`release` gives it back, for a right credential or one never compared.
    """

    def __init__(self, limiter: RateLimiter, client: str, spec: LimitSpec) -> None:
        self._limiter = limiter
        self._client = client
        self._spec = spec

    @classmethod
    def begin(cls, request: Request) -> AdminAttempt:
        state = get_state(request)
        client = FAILURES_CLIENT + source_address(request)
        spec = failure_allowance(state.settings)
        limiter = state.limiter
        try:
            decision = limiter.acquire(client, 1, spec)
        except RedisError as exc:
            log.warning("redis unavailable, admin failures counted in this process: %s", exc)
            limiter = _fallback_limiter(request)
            decision = limiter.acquire(client, 1, spec)
        if not decision.allowed:
            retry_after = max(1, math.ceil(decision.retry_after_s))
            raise ApiError(
                429,
                "too_many_admin_failures",
                f"too many failed admin attempts from this address; retry in {retry_after} s",
                {"Retry-After": str(retry_after)},
            )
        return cls(limiter, client, spec)

    def release(self) -> None:
        try:
            self._limiter.refund(self._client, 1, self._spec)
        except RedisError as exc:  # the attempt stays counted: errs towards the limit
            log.warning("redis unavailable, an admin attempt stays counted: %s", exc)


@contextmanager
def admin_attempt(request: Request) -> Iterator[None]:
    """An attempt around a block that compares a credential: a 401 from the block leaves it
    counted as a failure; anything else (success, a database outage) gives it back."""
    attempt = AdminAttempt.begin(request)
    failed = False
    try:
        yield
    except ApiError as exc:
        failed = exc.status == 401
        raise
    finally:
        if not failed:
            attempt.release()


def token_matches(settings: ServerSettings, given: str) -> bool:
    """Constant-time: how much of a guess was right does not show in the time taken."""
    if settings.admin_token is None:
        return False
    expected = settings.admin_token.get_secret_value().encode()
    return hmac.compare_digest(given.encode(), expected)


def _session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def create_session(engine: Engine, ttl_s: int) -> str:
    """A new session's id (shown to the browser only); expired sessions are swept on the way."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    with Session(engine) as db, db.begin():
        db.execute(delete(AdminSession).where(AdminSession.expires_at <= now))
        db.add(
            AdminSession(
                id_hash=_session_hash(session_id),
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
        )
    return session_id


def session_is_live(engine: Engine, session_id: str) -> bool:
    """True for a session that exists and has not expired; an expired one is deleted."""
    if not session_id or len(session_id) > _MAX_SESSION_ID_CHARS:
        return False
    with Session(engine) as db, db.begin():
        session = db.get(AdminSession, _session_hash(session_id))
        if session is None:
            return False
        if session.expires_at <= utcnow():
            db.delete(session)
            return False
    return True


def end_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            delete(AdminSession).where(AdminSession.id_hash == _session_hash(session_id))
        )


def authenticate_admin(request: Request, bearer_token: str | None) -> None:
    """Return when the request carries the admin token as a bearer token, or a live session's
    cookie; else 401, or 403 with admin routes off, or 429 for an address out of allowance.

    The token itself is never accepted as a cookie. A request that carries no credential at
    all guesses nothing and is refused without being counted."""
    state = get_state(request)
    if state.settings.admin_token is None:
        raise admin_disabled()
    session_id = request.cookies.get(ADMIN_COOKIE) or None
    if bearer_token is None and session_id is None:
        raise unauthorized(
            "missing admin credentials: send 'Authorization: Bearer <MLAAS_ADMIN_TOKEN>', "
            "or log in at /dashboard"
        )
    with admin_attempt(request):
        if bearer_token is not None:
            if not token_matches(state.settings, bearer_token):
                raise unauthorized("wrong admin token")
        elif not session_is_live(state.engine, session_id or ""):
            raise unauthorized("no such dashboard session, or it expired: log in at /dashboard")
