"""Authentication dependencies: an API key for the public API, the admin token for the rest."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.adminauth import authenticate_admin
from server.errors import ApiError
from server.keys import Client
from server.state import get_state

_bearer = HTTPBearer(auto_error=False, description="An API key from `mlaas keys create`")
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="The MLAAS_ADMIN_TOKEN"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


async def require_client(request: Request, credentials: Credentials) -> Client:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    client = await run_in_threadpool(get_state(request).keys.authenticate, credentials.credentials)
    if client is None:
        raise _unauthorized("unknown or revoked API key")
    return client


def require_admin(request: Request, credentials: AdminCredentials) -> None:
    """The admin token as a bearer token, or a live dashboard session's cookie (never the
    token itself as a cookie); failures are limited per source address (server/adminauth.py).
    A plain function: it runs in the thread pool, where its Redis and database calls may
    block."""
    authenticate_admin(request, credentials.credentials if credentials is not None else None)
