"""The prediction service's app factory and lifecycle.

Start-up loads the victim, opens the database and starts the micro-batcher and the query-log
writer; shutdown (after uvicorn has drained in-flight requests) stops the batcher and flushes
every pending log row, so N answered queries and a stop leave N rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import RedisError
from threadpoolctl import threadpool_limits

from defense.detectors import load_detector
from defense.monitor import Monitor
from defense.state import MemoryStore, RedisStore
from mlaas.redisclient import connect_redis
from server.api import admin_router, public_router
from server.dashboard import router as dashboard_router
from server.db import init_db, make_engine
from server.errors import error_response, install_error_handlers
from server.inference import MicroBatcher, Victim
from server.inputs import BodySizeLimit, BodyTooLarge, Limits
from server.keys import KeyStore
from server.metrics import MetricsMiddleware, ServiceMetrics
from server.options import LogMode
from server.querylog import LogUnavailable, QueryLogWriter
from server.ratelimit import InFlight, LimitSpec, MemoryRateLimiter, RedisRateLimiter
from server.settings import ServerSettings
from server.state import CountRejections, MonitorThreads, ServiceState

log = logging.getLogger(__name__)


def build_monitor(settings: ServerSettings, redis_client: Redis | None) -> Monitor | None:
    """The detectors the settings name, on in-process or Redis state; None when there are none."""
    if not settings.detector_names:
        return None
    detectors = [
        load_detector(
            name,
            settings.resolved_defense_dir,
            prada_delta=settings.prada_delta,
            prada_state_bytes=settings.prada_state_bytes,
        )
        for name in settings.detector_names
    ]
    store = (
        RedisStore(
            redis_client, prefix=settings.redis_prefix, lock_wait_s=settings.redis_lock_wait_s
        )
        if redis_client is not None
        else MemoryStore()
    )
    return Monitor(detectors, store, settings.policy)


def _check_redis(client: Redis) -> None:
    try:
        client.ping()
    except RedisError as exc:
        # Not fatal: the service starts, /readyz says what is missing, and requests follow
        # MLAAS_REDIS_FAILURE until Redis answers (the client reconnects by itself).
        log.warning("redis does not answer at start-up: %s", exc)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The detectors' NumPy products are small: a multi-threaded BLAS only spins against
        # the model's own threads (measured: detectors cost as much as the forward pass).
        threadpool_limits(1, user_api="blas")
        engine = make_engine(settings.resolved_database_url, **settings.database_options)
        await asyncio.to_thread(init_db, engine)
        victim = await asyncio.to_thread(Victim, settings.victim_dir, settings.device)
        batcher = MicroBatcher(
            victim,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_queued=settings.batch_queue_images,
            on_batch=metrics.batch_size.observe,
        )
        writer = QueryLogWriter(
            engine,
            mode=settings.log_mode,
            store_inputs=settings.log_inputs,
            flush_rows=settings.log_flush_rows,
            flush_interval_s=settings.log_flush_interval_ms / 1000.0,
            max_buffered_rows=settings.log_buffer_rows,
            spool=settings.resolved_log_spool if settings.log_mode is LogMode.buffered else None,
        )
        redis_client = connect_redis(settings.redis_url) if settings.redis_url else None
        if redis_client is not None:
            await asyncio.to_thread(_check_redis, redis_client)
        monitor = await asyncio.to_thread(build_monitor, settings, redis_client)
        limiter = (
            RedisRateLimiter(redis_client, prefix=settings.redis_prefix)
            if redis_client is not None
            else MemoryRateLimiter()
        )
        batcher.start()
        app.state.service = ServiceState(
            settings=settings,
            engine=engine,
            keys=KeyStore(engine, serve_through_outages=settings.log_mode is LogMode.buffered),
            redis=redis_client,
            limiter=limiter,
            limits_default=LimitSpec(
                rate=settings.rate_limit,
                burst=settings.rate_burst,
                daily_quota=settings.daily_quota,
            ),
            victim=victim,
            batcher=batcher,
            writer=writer,
            granularity=settings.granularity,
            limits=Limits(
                settings.max_images_per_request,
                settings.max_image_pixels,
                settings.max_request_pixels,
            ),
            monitor=monitor,
            perturbation=settings.perturbation,
            deception=settings.deceive,
            metrics=metrics,
            in_flight=InFlight(settings.max_in_flight_per_key),
            monitor_threads=MonitorThreads(settings.monitor_threads, settings.redis_lock_wait_s),
        )
        log.info(
            "serving %s (%s) on %s, granularity %s, detectors %s (policy %s, state %s)",
            victim.card.name,
            victim.card.architecture,
            victim.device,
            settings.granularity,
            ", ".join(settings.detector_names) or "none",
            settings.policy,
            "redis" if settings.redis_url else "in-process",
        )
        log.info(
            "query log %s; redis failure: %s; limits: %s; CORS: %s",
            settings.log_mode,
            settings.redis_failure if settings.redis_url else "n/a",
            app.state.service.limits_default,
            ", ".join(settings.cors_origin_list) or "closed",
        )
        try:
            yield
        finally:
            await batcher.stop()
            await asyncio.to_thread(writer.close, settings.log_shutdown_timeout_s)
            log.info("query log flushed: %d rows written", writer.written)
            if writer.lost:
                log.error("query log: %d answered rows could not be written", writer.lost)
            # After the batcher: no request is left to observe (uvicorn drained them).
            await asyncio.to_thread(app.state.service.monitor_threads.close)
            if redis_client is not None:
                redis_client.close()
            engine.dispose()

    app = FastAPI(
        title="mlaas-testbed prediction API",
        version="1",
        description=(
            "A victim image classifier behind a prediction API with configurable output "
            "granularity. Every answered query is logged per client."
        ),
        lifespan=lifespan,
    )
    install_error_handlers(app)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "payload_too_large", str(exc))

    @app.exception_handler(LogUnavailable)
    async def _log_unavailable(request: Request, exc: LogUnavailable) -> JSONResponse:
        # Fail closed: an answer that cannot be logged is not given.
        return error_response(
            503, "query_log_unavailable", f"{exc}; retry shortly", {"Retry-After": "1"}
        )

    # The last added runs first: count every refusal, the body-size ones included.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(CountRejections)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origin_list:
        # Closed unless origins are named: a page elsewhere must not read answers with a
        # visitor's credentials. Only the prediction API's reads and posts are allowed.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            allow_credentials=False,
        )
    app.include_router(public_router)
    app.include_router(dashboard_router)
    app.include_router(admin_router)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn's factory entry point: settings come from the environment alone."""
    return create_app(ServerSettings())
