"""HTTP routes: the public prediction API and the admin API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from defense.detectors import Observation
from defense.monitor import Level, Policy
from mlaas.wire import NPY_MEDIA_TYPE, ErrorBody, ModelInfo, Prediction, PredictResponse
from server.errors import ApiError
from server.inputs import (
    SUPPORTED_MEDIA_TYPES,
    DecodedBatch,
    decode_files,
    decode_json,
    decode_npy_batch,
    form_files,
    media_type,
)
from server.keys import CLIENT_NAME_PATTERN, Client, DuplicateClient, KeyStoreError
from server.querylog import (
    DuplicateRequest,
    LogMode,
    PendingAlert,
    PendingQuery,
    count_queries,
    fetch_alerts,
    fetch_queries,
    fetch_request,
    image_sha256,
)
from server.ratelimit import Decision, LimitSpec
from server.settings import RedisFailure
from server.shaping import Granularity
from server.state import ServiceState, get_state

log = logging.getLogger(__name__)
T = TypeVar("T")

_bearer = HTTPBearer(auto_error=False, description="An API key from `mlaas keys create`")
_admin_bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="The MLAAS_ADMIN_TOKEN"
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]

_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}


def _error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for refusals: every error body is an ``ErrorBody``."""
    return {
        status: {"model": ErrorBody, "description": description}
        for status, description in descriptions.items()
    }


# What POST /v1/predict can answer besides 200 (tests/test_fuzz.py holds the API to it).
_ERRORS = _error_responses(
    {
        401: "Missing, unknown or revoked API key",
        403: "The client is blocked: flagged as a likely model-extraction attempt",
        413: "Body, image count or pixel count over the limits, or more images than the "
        "key's rate limit or quota could ever allow",
        415: "Unsupported content type",
        422: "An image that cannot be decoded, a malformed body, or a reused Idempotency-Key",
        429: "The key's rate limit or daily quota is used up",
        503: "The query log, the database or the detector state store is unavailable",
    }
)
_ERRORS[429]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
_ERRORS[503]["headers"] = {"Retry-After": _RETRY_AFTER}

_ADMIN_ERRORS = _error_responses(
    {
        400: "A body that cannot be parsed",
        401: "Missing or wrong admin token",
        403: "Admin routes are disabled: MLAAS_ADMIN_TOKEN is not set",
        404: "No such client",
        409: "A client of that name exists",
        422: "A malformed query parameter or body",
        503: "The database is unavailable",
    }
)


def admin_errors(*statuses: int, json: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented refusals of an admin route: 401 and 403, and the given statuses.

    ``json`` spells the JSON media type out, for a route whose response class is not JSON.
    """
    responses = {status: _ADMIN_ERRORS[status] for status in sorted({401, 403, *statuses})}
    if not json:
        return responses
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {
        status: {"description": response["description"], "content": body}
        for status, response in responses.items()
    }


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more image files (PNG, JPEG, ...)",
                        }
                    },
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "contentEncoding": "base64"},
                            "description": "Base64-encoded image files",
                        }
                    },
                    "required": ["images"],
                }
            },
            NPY_MEDIA_TYPE: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "A .npy uint8 array shaped (N, H, W) or (N, H, W, C)",
                }
            },
        },
    }
}

public_router = APIRouter()
admin_router = APIRouter(prefix="/admin", tags=["admin"])


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


async def require_client(request: Request, credentials: Credentials) -> Client:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    client = await run_in_threadpool(get_state(request).keys.authenticate, credentials.credentials)
    if client is None:
        raise _unauthorized("unknown or revoked API key")
    return client


ADMIN_COOKIE = "mlaas_admin"


def require_admin(request: Request, credentials: AdminCredentials) -> None:
    """The admin token, as a bearer token or as the dashboard's cookie."""
    token = get_state(request).settings.admin_token
    if token is None:
        raise ApiError(
            403, "admin_disabled", "admin routes are disabled: set MLAAS_ADMIN_TOKEN to enable"
        )
    given = (
        credentials.credentials
        if credentials is not None
        else request.cookies.get(ADMIN_COOKIE, "")
    )
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise _unauthorized("missing or wrong admin token")


async def _read_batch(request: Request, state: ServiceState) -> DecodedBatch:
    kind = media_type(request.headers.get("content-type"))
    shape, limits = state.victim.shape, state.limits
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images, max_fields=limits.max_images)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise ApiError(413, "too_many_images", str(exc.detail)) from exc
            raise ApiError(
                422, "invalid_request", f"malformed multipart body: {exc.detail}"
            ) from exc
        try:
            files = await form_files(form.multi_items())
        finally:
            await form.close()
        return await run_in_threadpool(decode_files, files, shape, limits)
    if kind == "application/json":
        return await run_in_threadpool(decode_json, await request.body(), shape, limits)
    if kind == NPY_MEDIA_TYPE:
        return await run_in_threadpool(decode_npy_batch, await request.body(), shape, limits)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not accepted; use one of "
        + ", ".join(SUPPORTED_MEDIA_TYPES),
    )


@public_router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    response: Response,
    client: Annotated[Client, Depends(require_client)],
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Resending a request with the same key returns the first answer "
            "(after a restart too) and is neither logged nor counted again"
        ),
    ] = None,
) -> PredictResponse:
    started = time.perf_counter()
    state = get_state(request)
    await _refuse_blocked(state, client)
    batch = await _read_batch(request, state)
    if idempotency_key is None:
        return await _answer(state, client, batch, started, response)
    hashes = [image_sha256(image) for image in batch.images]
    fingerprint = hashlib.sha256("".join(hashes).encode()).hexdigest()
    answer, replayed = await state.idempotency.run(
        client.name,
        idempotency_key,
        fingerprint,
        compute=lambda: _answer(state, client, batch, started, response, idempotency_key, hashes),
        recall=lambda: _recall(state, client, idempotency_key, hashes),
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return answer


async def _degradable(
    state: ServiceState, call: Callable[..., T], *args: Any, in_process: bool = False
) -> T | None:
    """Run a call that may need Redis; None when Redis is down and the deployment fails open.

    ``in_process`` calls (no I/O) run on the event loop: a thread hop would cost more.
    """
    try:
        return call(*args) if in_process else await run_in_threadpool(call, *args)
    except RedisError as exc:
        if state.settings.redis_failure is RedisFailure.closed:
            raise
        state.metrics.degraded.labels("redis").inc()
        log.warning("redis unavailable, answering without it (MLAAS_REDIS_FAILURE=open): %s", exc)
        return None


async def _refuse_blocked(state: ServiceState, client: Client) -> None:
    """403 for a key flagged itself or through its shared account (one more read for that)."""
    monitor = state.monitor
    if monitor is None or monitor.policy is not Policy.block:
        return
    standing = await _degradable(
        state,
        monitor.standing,
        client.name,
        client.account,
        in_process=monitor.store.in_process,
    )
    if standing is not None and standing.flagged:
        raise ApiError(
            403,
            "client_blocked",
            f"this client is blocked: {standing.reason} as a likely model-extraction attempt",
        )


async def _recall(
    state: ServiceState, client: Client, request_key: str, hashes: list[str]
) -> PredictResponse | None:
    """The logged answer to an idempotent request this service answered before, if any."""
    try:
        rows = await run_in_threadpool(fetch_request, state.engine, client.name, request_key)
    except SQLAlchemyError:
        if state.writer.mode is LogMode.durable:
            raise
        return None  # buffered: answer afresh rather than refuse during a database outage
    if not rows:
        return None
    if [row["input_sha256"] for row in rows] != hashes:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request body",
        )
    return PredictResponse(
        model=state.victim.card.name,
        granularity=rows[0]["granularity"],
        predictions=[Prediction(query_id=row["id"], **row["payload"]) for row in rows],
    )


def _quota_headers(decision: Decision) -> dict[str, str]:
    """The key's daily quota and what is left of it, for clients to pace themselves."""
    if decision.limit is None or decision.remaining is None:
        return {}
    return {"X-Quota-Limit": str(decision.limit), "X-Quota-Remaining": str(decision.remaining)}


def _rate_limited(decision: Decision, cost: int) -> ApiError:
    what = "daily quota" if decision.reason == "quota" else "rate limit"
    if math.isinf(decision.retry_after_s):
        return ApiError(
            413,
            "over_limit",
            f"{cost} images in one request can never fit this key's {what}; send fewer",
            _quota_headers(decision),
        )
    retry_after = max(1, math.ceil(decision.retry_after_s))
    return ApiError(
        429,
        "rate_limited",
        f"this key's {what} is used up; retry in {retry_after} s",
        {"Retry-After": str(retry_after), **_quota_headers(decision)},
    )


async def _answer(
    state: ServiceState,
    client: Client,
    batch: DecodedBatch,
    started: float,
    response: Response,
    request_key: str | None = None,
    hashes: list[str] | None = None,
) -> PredictResponse:
    cost = len(batch.images)
    limits = client.limits_over(state.limits_default)
    charged = False
    if not limits.unlimited:
        decision = await _degradable(
            state,
            state.limiter.acquire,
            client.name,
            cost,
            limits,
            in_process=state.limiter.in_process,
        )
        if decision is not None:
            if not decision.allowed:
                raise _rate_limited(decision, cost)
            charged = True
            response.headers.update(_quota_headers(decision))
    try:
        answer = await _infer_and_log(state, client, batch, started, request_key, hashes)
    except BaseException:
        if charged:  # nothing was answered: give the images back
            await _degradable(
                state,
                state.limiter.refund,
                client.name,
                cost,
                limits,
                in_process=state.limiter.in_process,
            )
        raise
    state.metrics.answered.labels(client.name).inc(cost)
    return answer


async def _infer_and_log(
    state: ServiceState,
    client: Client,
    batch: DecodedBatch,
    started: float,
    request_key: str | None,
    hashes: list[str] | None,
) -> PredictResponse:
    output = await state.batcher.submit(batch.images)
    probs = state.perturbation.apply(output.probs, state.rng)
    granularity = client.granularity or state.granularity
    scores: list[dict[str, float | None]] | None = None
    statistics: list[dict[str, Any]] | None = None
    alerts: list[PendingAlert] = []
    if state.monitor is not None:
        observation = Observation(batch.images, output.logits, output.probs, output.features)
        # In-process state: about a millisecond of NumPy with no I/O, where a thread hop would
        # cost more than it frees the event loop for (measured by bench/detection.py).
        verdict = await _degradable(
            state,
            state.monitor.observe,
            client.name,
            observation,
            client.account,
            in_process=state.monitor.store.in_process,
        )
        if verdict is not None:
            scores, statistics = verdict.scores, verdict.statistics
            alerts = [PendingAlert(**asdict(alert)) for alert in verdict.alerts]
            for alert in verdict.alerts:
                state.metrics.alerts.labels(alert.detector, alert.action).inc()
            if verdict.flagged and state.monitor.policy is Policy.deceive:
                if isinstance(state.deception, Granularity):
                    granularity = state.deception
                else:
                    probs = state.deception.apply(probs, state.rng)
    query_ids = [uuid.uuid4().hex for _ in range(len(output))]
    predictions = granularity.shape(probs, state.victim.classes, query_ids)
    answered_at = datetime.now(UTC)
    latency_ms = (time.perf_counter() - started) * 1000.0
    spec = str(granularity)
    predicted = output.probs.argmax(axis=1)
    logged = state.writer.submit(
        [
            PendingQuery(
                id=prediction.query_id,
                client=client.name,
                created_at=answered_at,
                image=image,
                input_shape=sent_shape,
                predicted=int(label),
                payload=prediction.model_dump(exclude={"query_id"}),
                latency_ms=latency_ms,
                granularity=spec,
                scores=scores[i] if scores is not None else None,
                statistics=statistics[i] if statistics is not None else None,
                request_key=request_key,
                position=i if request_key is not None else None,
                input_sha256=hashes[i] if hashes is not None else None,
            )
            for i, (prediction, image, sent_shape, label) in enumerate(
                zip(predictions, batch.images, batch.original_shapes, predicted, strict=True)
            )
        ]
        + alerts
    )
    answer = PredictResponse(
        model=state.victim.card.name, granularity=spec, predictions=predictions
    )
    if state.writer.mode is LogMode.durable:
        try:
            await asyncio.wrap_future(logged)
        except DuplicateRequest:
            # Another replica answered this idempotent request first: its answer stands.
            recalled = await _recall(state, client, request_key or "", hashes or [])
            if recalled is None:
                raise
            return recalled
    return answer


@public_router.get("/v1/model", response_model=ModelInfo, summary="The public model card")
async def model_info(request: Request) -> ModelInfo:
    state = get_state(request)
    card = state.victim.card
    return ModelInfo(
        name=card.name,
        classes=card.classes,
        input_shape=str(card.shape),
        granularity=str(state.granularity),
        max_images_per_request=state.limits.max_images,
    )


@public_router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public_router.get(
    "/readyz",
    responses=_error_responses({503: "Not ready: a component it needs does not answer"}),
    summary="Readiness: model, batcher, log writer, database and Redis",
)
async def readyz(request: Request) -> dict[str, Any]:
    """503 while a request would be refused for want of a component. What the deployment
    answers without (a database under buffered logging, Redis failing open) is listed as
    ``degraded`` instead, so that a load balancer keeps sending traffic."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "not_ready", "the service is starting")
    problems, degraded = [], []
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
        except RedisError:
            if state.settings.redis_failure is RedisFailure.closed:
                problems.append("redis does not answer")
            else:
                degraded.append("redis does not answer (no detection or rate limits)")
    if state.writer.spooled:
        degraded.append(f"{state.writer.spooled} log rows are spooled for the database")
    if problems:
        raise ApiError(503, "not_ready", "; ".join(problems))
    return {"status": "ready", "model": state.victim.card.name, "degraded": degraded}


def _ping_database(state: ServiceState) -> None:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class NewKey(BaseModel):
    name: str = Field(
        description="Client name, unique",
        json_schema_extra={"pattern": CLIENT_NAME_PATTERN},  # documented; KeyStore enforces it
    )
    granularity: str | None = Field(
        default=None, description="Overrides the deployment's granularity for this key"
    )
    rate_limit: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Images per second for this key"
    )
    # At most what the keys table's INTEGER columns hold (32 bits in PostgreSQL), else a 500.
    rate_burst: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Images this key may send at once"
    )
    daily_quota: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="Images per UTC day"
    )
    account: str | None = Field(
        default=None,
        description="The account the key joins (default: its own name, the key alone); "
        "detectors also decide on a shared account's queries taken together",
        json_schema_extra={"pattern": CLIENT_NAME_PATTERN},
    )


class CreatedKey(BaseModel):
    name: str
    account: str
    key: str = Field(description="Shown once; the server stores only its hash")


@admin_router.post(
    "/keys",
    response_model=CreatedKey,
    status_code=201,
    dependencies=[Depends(require_admin)],
    responses=admin_errors(400, 409, 422, 503),
    summary="Create an API key",
)
def create_key(request: Request, body: NewKey) -> CreatedKey:
    try:
        limits = LimitSpec(body.rate_limit, body.rate_burst, body.daily_quota)
        key = get_state(request).keys.create(body.name, body.granularity, limits, body.account)
    except DuplicateClient as exc:
        raise ApiError(409, "client_exists", str(exc)) from exc
    except (KeyStoreError, ValueError) as exc:
        raise ApiError(422, "invalid_key_request", str(exc)) from exc
    return CreatedKey(name=body.name, account=body.account or body.name, key=key)


@admin_router.get(
    "/keys",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(503),
    summary="The API keys (never the keys themselves)",
)
def list_keys(request: Request) -> list[dict[str, Any]]:
    return [k.to_row() for k in get_state(request).keys.list()]


@admin_router.get(
    "/queries",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(422, 503),
    summary="The query log",
)
def list_queries(
    request: Request,
    client: str | None = None,
    since: datetime | None = Query(default=None, description="ISO 8601 time, inclusive"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**63 - 1),  # a 64-bit SQL integer, else a 500
    include_input: bool = Query(default=False, description="Add each input as base64 PNG"),
) -> list[dict[str, Any]]:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return fetch_queries(
        get_state(request).engine,
        client=client,
        since=since,
        limit=limit,
        offset=offset,
        include_input=include_input,
    )


@admin_router.get(
    "/stats",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(),
    summary="Service counters",
)
def stats(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return {
        "model": state.victim.card.name,
        "granularity": str(state.granularity),
        "batches": state.batcher.batches,
        "images": state.batcher.images,
        "log_mode": str(state.writer.mode),
        "log_rows_written": state.writer.written,
        "log_rows_pending": state.writer.pending,
        "log_write_errors": state.writer.write_errors,
        "log_rows_spooled": state.writer.spooled,
        "alerts_written": state.writer.alerts_written,
        "detectors": [d.name for d in state.monitor.detectors] if state.monitor else [],
        "rejected_by_status": dict(state.rejected),
    }


@admin_router.get(
    "/alerts",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(422, 503),
    summary="Detector alerts",
)
def list_alerts(
    request: Request,
    client: str | None = None,
    account: str | None = Query(
        default=None, description="Only this account's alerts, at both levels"
    ),
    level: Level | None = Query(default=None, description="Only alerts at this level"),
    since: datetime | None = Query(default=None, description="ISO 8601 time, inclusive"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return fetch_alerts(
        get_state(request).engine,
        client=client,
        account=account,
        level=level.value if level is not None else None,
        since=since,
        limit=limit,
    )


@admin_router.get(
    "/clients/{name}",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(404, 422, 503),
    summary="One client's standing",
)
def client_standing(request: Request, name: str) -> dict[str, Any]:
    """The key's status counts its account's: a key whose shared account is flagged is
    blocked (or deceived) with the others. ``alerts`` holds the key's own alerts and its
    account's (``level`` tells them apart)."""
    state = get_state(request)
    known = {k.name: k for k in state.keys.list()}
    if name not in known:
        raise ApiError(404, "unknown_client", f"no client named {name!r}")
    key = known[name]
    monitor = state.monitor
    standing = monitor.standing(name, key.account) if monitor is not None else None
    if key.revoked_at is not None:
        status = "revoked"
    elif standing is not None and standing.flagged:
        status = {"block": "blocked", "deceive": "deceived"}.get(monitor.policy.value, "flagged")
    else:
        status = "active"
    alerts = fetch_alerts(state.engine, client=name, limit=None)
    if standing is not None and standing.account is not None:
        seen = {a["id"] for a in alerts}
        account_alerts = fetch_alerts(
            state.engine, account=standing.account, level=Level.account.value, limit=None
        )
        alerts += [a for a in account_alerts if a["id"] not in seen]
        alerts.sort(key=lambda a: (a["time"], a["id"]))
    return {
        "client": name,
        "account": key.account,
        "status": status,
        "granularity": key.granularity or str(state.granularity),
        "queries_logged": count_queries(state.engine, name),
        "monitor": standing.status.to_dict() if standing is not None else None,
        "account_monitor": (
            standing.account_status.to_dict()
            if standing is not None and standing.account_status is not None
            else None
        ),
        "alerts": alerts,
    }


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
