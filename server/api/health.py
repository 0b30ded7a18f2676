"""Liveness, readiness and the Prometheus metrics (these need the admin token)."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from sqlalchemy import text

from defense.state import is_outage
from server.api.deps import require_admin
from server.api.docs import admin_errors, error_responses
from server.api.routers import public_router
from server.api.schemas import Liveness, Readiness
from server.errors import ApiError
from server.options import LogMode
from server.settings import RedisFailure
from server.state import ServiceState, get_state


@public_router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Liveness:
    return Liveness(status="ok")


@public_router.get(
    "/readyz",
    responses=error_responses({503: "Not ready: a component it needs does not answer"}),
    summary="Readiness: model, batcher, log writer, database and Redis",
)
async def readyz(request: Request) -> Readiness:
    """503 while a request would be refused for want of a component. What the deployment
    answers without (a database under buffered logging, Redis failing open) is listed as
    ``degraded`` instead, so that a load balancer keeps sending traffic."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "not_ready", "the service is starting")
    problems: list[str] = []
    degraded: list[str] = []
    if not state.batcher.running:
        problems.append("the model's batcher is not running")
    if not state.writer.alive:
        problems.append("the query log writer has stopped")
    try:
        await run_in_threadpool(_ping_database, state)
    except Exception:
        if state.writer.mode is LogMode.durable:
            problems.append("the database does not answer")
        else:
            degraded.append("the database does not answer (answers are buffered)")
    if state.redis is not None:
        try:
            await run_in_threadpool(state.redis.ping)
        except RedisError as exc:
            if not is_outage(exc):  # requests are refused then, whatever the failure mode
                problems.append(f"redis refuses its commands ({type(exc).__name__})")
            elif state.settings.redis_failure is RedisFailure.closed:
                problems.append("redis does not answer")
            else:
                degraded.append("redis does not answer (no detection or rate limits)")
    if state.writer.spooled:
        degraded.append(f"{state.writer.spooled} log rows are spooled for the database")
    if problems:
        raise ApiError(503, "not_ready", "; ".join(problems))
    return Readiness(status="ready", model=state.victim.card.name, degraded=degraded)


def _ping_database(state: ServiceState) -> None:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@public_router.get(
    "/metrics",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(json=True),
    summary="Prometheus metrics (admin token: the labels name clients)",
    response_class=PlainTextResponse,
)
def metrics(request: Request) -> PlainTextResponse:
    registry = get_state(request).metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
