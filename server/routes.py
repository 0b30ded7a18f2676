"""HTTP routes: the public prediction API and the admin API."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from defense.detectors import Observation
from defense.monitor import (
    ClientStatus,
    Level,
    Policy,
    Standing,
    Verdict,
    account_record,
    shared_account,
)
from defense.state import is_outage
from mlaas.wire import (
    IMAGE_COUNT_HEADER,
    NPY_MEDIA_TYPE,
    ErrorBody,
    ModelInfo,
    Prediction,
    PredictResponse,
)
from server.adminauth import authenticate_admin
from server.errors import ApiError
from server.idempotency import check_key, reused_key_error
from server.inference import QueueFull
from server.inputs import (
    SUPPORTED_MEDIA_TYPES,
    DecodedBatch,
    decode_files,
    decode_json,
    decode_npy_batch,
    form_files,
    media_type,
)
from server.keys import (
    CLIENT_NAME_PATTERN,
    Client,
    DuplicateClient,
    KeyStoreError,
    NameConflict,
)
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
    logged_flags,
    request_logged,
    wait_for_commit,
)
from server.ratelimit import MIN_RATE_LIMIT, Decision, LimitSpec
from server.settings import RedisFailure
from server.shaping import Granularity
from server.state import ServiceState, get_state

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

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
        429: "The key's rate limit or daily quota is used up, or it has too many requests "
        "in flight",
        503: "The query log, the database or the detector state store is unavailable, or "
        "the model's queue is full",
    }
)
_ERRORS[429]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
_ERRORS[503]["headers"] = {"Retry-After": _RETRY_AFTER}

_ADMIN_ERRORS = _error_responses(
    {
        400: "A body that cannot be parsed",
        401: "Missing or wrong admin token, or no live dashboard session",
        403: "Admin routes are disabled: MLAAS_ADMIN_TOKEN is not set",
        404: "No such client",
        409: "A client of that name exists, or the name or the account clashes with an "
        "existing account",
        415: "A body that is not JSON",
        422: "A malformed query parameter or body",
        429: "Too many failed admin attempts from this address: refused before any token is "
        "compared",
        503: "The database is unavailable",
    }
)
_ADMIN_ERRORS[429]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}


def admin_errors(*statuses: int, json: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented refusals of an admin route: 401, 403 and 429, and the given statuses.

    ``json`` spells the JSON media type out, for a route whose response class is not JSON.
    """
    responses = {status: _ADMIN_ERRORS[status] for status in sorted({401, 403, 429, *statuses})}
    if not json:
        return responses
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {
        status: {k: v for k, v in response.items() if k != "model"} | {"content": body}
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


def require_admin(request: Request, credentials: AdminCredentials) -> None:
    """The admin token as a bearer token, or a live dashboard session's cookie (never the
    token itself as a cookie); failures are limited per source address (server/adminauth.py).
    A plain function: it runs in the thread pool, where its Redis and database calls may
    block."""
    authenticate_admin(request, credentials.credentials if credentials is not None else None)


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
    image_count: Annotated[
        int | None,
        Header(
            alias=IMAGE_COUNT_HEADER,
            ge=1,
            description="How many images the body holds. The rate limit and quota are charged "
            "this many before the body is read (1 without the header) and settled once it is "
            "decoded, so a key over its limit is refused before any decoding",
        ),
    ] = None,
) -> PredictResponse:
    """Every limit is checked before the body is read: the key's requests in flight, its
    blocked status, then its rate limit and quota for the declared image count."""
    started = time.perf_counter()
    state = get_state(request)
    if idempotency_key is not None:
        check_key(idempotency_key)
    declared = image_count or 1
    if declared > state.limits.max_images:
        raise ApiError(
            413,
            "too_many_images",
            f"{declared} images declared; at most {state.limits.max_images} per request",
        )
    if not state.in_flight.enter(client.name):
        raise ApiError(
            429,
            "too_many_requests_in_flight",
            f"this key has {state.in_flight.limit} requests in flight; wait for their answers",
            {"Retry-After": "1"},
        )
    bill: _Bill | None = None
    try:
        await _refuse_blocked(state, client)
        # A retry of a request answered before is charged only the rate limit, and given that
        # back once replayed: a key at its daily quota can still collect a lost answer, and a
        # key replaying big bodies still pays for their decoding in time.
        retry = idempotency_key is not None and await _answered_before(
            state, client, idempotency_key
        )
        bill = _Bill(state, client, response, rate_only=retry)
        await bill.charge(declared)
        batch = await _read_batch(request, state)
        await bill.settle(len(batch.images))
        if idempotency_key is None:
            answer, _ = await _infer_and_log(state, client, batch, started)
            replayed = False
        else:
            hashes = [image_sha256(image) for image in batch.images]
            fingerprint = hashlib.sha256("".join(hashes).encode()).hexdigest()
            answer, replayed = await state.idempotency.run(
                client.name,
                idempotency_key,
                fingerprint,
                compute=lambda: _infer_and_log(
                    state, client, batch, started, idempotency_key, hashes
                ),
                # Only a request answered before has logged rows to replay: a new one costs
                # no second look at the log.
                recall=(lambda: _recall(state, client, idempotency_key, hashes)) if retry else None,
            )
    except BaseException:
        if bill is not None:
            await bill.refund_all()  # nothing was answered: give the images back
        raise
    finally:
        state.in_flight.leave(client.name)
    if replayed:  # answered before, and counted then
        await bill.refund_all()
        response.headers["Idempotent-Replayed"] = "true"
    else:
        state.metrics.answered.labels(client.name).inc(len(batch.images))
    return answer


async def _degradable(
    state: ServiceState,
    call: Callable[..., T],
    *args: Any,
    in_process: bool = False,
    monitor: bool = False,
) -> T | None:
    """Run a call that may need Redis; None when Redis is down and the deployment fails open.

    ``in_process`` calls (no I/O) run on the event loop: a thread hop would cost more.
    ``monitor`` calls run on the monitor's own threads, so that their waits on Redis locks
    never hold up AnyIO's shared pool. Only an outage (no connection, a timeout) may be
    answered without Redis: any other Redis error (a lock not had in time, a value or a script
    that Redis refuses, a full Redis) is refused whatever the failure mode, as a client can
    provoke some of those and must not switch its own detection off with them.
    """
    try:
        if in_process:
            return call(*args)
        if monitor:
            return await state.monitor_threads.run(call, *args)
        return await run_in_threadpool(call, *args)
    except RedisError as exc:
        if state.settings.redis_failure is RedisFailure.closed or not is_outage(exc):
            raise
        state.metrics.degraded.labels("redis").inc()
        log.warning("redis unavailable, answering without it (MLAAS_REDIS_FAILURE=open): %s", exc)
        return None


Flags = dict[str, list[str]]
"""What flags a key: level (``key``, ``account``) -> the detectors that alarmed at it."""


async def _refuse_blocked(state: ServiceState, client: Client) -> None:
    """403 for a key flagged itself or through its shared account (one more read for that),
    whether Redis has it or lost it (see :func:`_flags`)."""
    monitor = state.monitor
    if monitor is None or monitor.policy is not Policy.block:
        return
    flags = _remembered_flags(state, client)
    if not flags:
        standing = await _degradable(
            state,
            monitor.standing,
            client.name,
            client.account,
            in_process=monitor.store.in_process,
            monitor=True,
        )
        fresh = standing is not None and (
            standing.status.queries == 0
            or (standing.account_status is not None and standing.account_status.queries == 0)
        )
        flags = await _flags(state, client, standing, fresh, holding_turn=False)
    if flags:
        raise ApiError(
            403,
            "client_blocked",
            f"this client is blocked: {_reason(client, flags)} as a likely model-extraction "
            "attempt",
        )


async def _observe(
    state: ServiceState, client: Client, observation: Observation
) -> tuple[Verdict | None, bool]:
    """The monitor's verdict on a batch (None when Redis is down and the deployment fails
    open), and whether the key is flagged (found as :func:`_flags` finds it, for the deceive
    policy: a flagged client keeps its perturbed answers though Redis lose its record).

    One request per record at a time in this process (see :class:`MonitorThreads`): a client's
    other requests wait on the event loop, not in threads.
    """
    monitor = state.monitor
    assert monitor is not None
    async with state.monitor_threads.turn(_records(client)):
        verdict = await _degradable(
            state,
            monitor.observe,
            client.name,
            observation,
            client.account,
            in_process=monitor.store.in_process,
            monitor=True,
        )
        standing = None
        if verdict is not None:
            shared = shared_account(client.name, client.account)
            standing = Standing(verdict.status, shared, verdict.account_status)
        if monitor.policy is Policy.block:
            flags = _standing_flags(standing) if standing is not None else {}
            _remember(state, client, flags)  # refused from now on without asking Redis
            return verdict, bool(flags)
        if monitor.policy is not Policy.deceive:
            return verdict, verdict is not None and verdict.flagged
        count = len(observation)  # a record this batch was the first of is a fresh one
        fresh = verdict is not None and (
            verdict.status.queries == count
            or (verdict.account_status is not None and verdict.account_status.queries == count)
        )
        flags = await _flags(state, client, standing, fresh, holding_turn=True)
        return verdict, bool(flags)


async def _flags(
    state: ServiceState,
    client: Client,
    standing: Standing | None,
    fresh: bool,
    *,
    holding_turn: bool,
) -> Flags:
    """What flags ``client`` (empty: nothing), for the block and deceive policies.

    Redis's ``standing`` first (None: Redis is down and the deployment fails open). Where
    Redis may have lost it (down, or restarted without persistence or flushed: a record with
    no queries, ``fresh``), what this process remembers, else the alerts in the query log: a
    flagged client stays flagged, and the log is asked only for fresh records, not on every
    request. Flags Redis lost are put back in it, so that every process sees them again.
    """
    flags = _standing_flags(standing) if standing is not None else {}
    if not flags:
        flags = _remembered_flags(state, client)
        if not flags and (standing is None or fresh):
            flags = await _logged(state, client)
        if flags and standing is not None:
            await _restore(state, client, flags, holding_turn=holding_turn)
    _remember(state, client, flags)
    return flags


def _records(client: Client) -> list[str]:
    """The state store's records for a key: its own, then its shared account's."""
    shared = shared_account(client.name, client.account)
    return [client.name] if shared is None else [client.name, account_record(shared)]


def _standing_flags(standing: Standing) -> Flags:
    flags: Flags = {}
    if standing.status.flagged:
        flags[Level.key.value] = list(standing.status.flagged_by)
    if standing.account_status is not None and standing.account_status.flagged:
        flags[Level.account.value] = list(standing.account_status.flagged_by)
    return flags


def _level_names(client: Client) -> dict[str, str]:
    """Level -> the name a flag at that level is kept under (the account's only if shared)."""
    shared = shared_account(client.name, client.account)
    names = {Level.key.value: client.name}
    if shared is not None:
        names[Level.account.value] = shared
    return names


def _remembered_flags(state: ServiceState, client: Client) -> Flags:
    flags: Flags = {}
    for level, name in _level_names(client).items():
        detectors = state.flagged.get(level, name)
        if detectors:
            flags[level] = detectors
    return flags


def _remember(state: ServiceState, client: Client, flags: Flags) -> None:
    names = _level_names(client)
    for level, detectors in flags.items():
        state.flagged.put(level, names[level], detectors)


def _reason(client: Client, flags: Flags) -> str:
    """Which level is flagged, by what, in the words of :attr:`Standing.reason`."""
    names = _level_names(client)

    def status(level: str) -> ClientStatus:
        detectors = flags.get(level, [])
        return ClientStatus(names[level], flagged=bool(detectors), flagged_by=detectors)

    shared = names.get(Level.account.value)
    account_status = status(Level.account.value) if shared is not None else None
    return Standing(status(Level.key.value), shared, account_status).reason


async def _logged(state: ServiceState, client: Client) -> Flags:
    """The key's flags as the query log's alerts hold them (under the deployment's policy)."""
    assert state.monitor is not None
    names = _level_names(client)
    try:
        return await run_in_threadpool(
            logged_flags,
            state.engine,
            client.name,
            names.get(Level.account.value),
            state.monitor.policy.value,
        )
    except SQLAlchemyError:
        if state.writer.mode is LogMode.durable:
            raise  # 503: durable logging answers nothing while the database is away
        log.warning("database unavailable: %s's logged alerts are not checked", client.name)
        return {}


async def _restore(
    state: ServiceState, client: Client, flags: Flags, *, holding_turn: bool
) -> None:
    """Flag the key's records in the state store again (best effort: the policy holds in this
    process whatever comes of it)."""
    monitor = state.monitor
    assert monitor is not None
    records = dict(zip(_level_names(client), _records(client), strict=True))
    turn = (
        contextlib.nullcontext()
        if holding_turn
        else state.monitor_threads.turn(list(records.values()))
    )
    try:
        async with turn:
            for level, detectors in flags.items():
                if monitor.store.in_process:
                    monitor.mark_flagged(records[level], detectors)
                else:
                    await state.monitor_threads.run(monitor.mark_flagged, records[level], detectors)
        log.warning("%s's flags (%s) were lost by the state store: restored", client.name, flags)
    except RedisError as exc:
        log.warning("%s's flags could not be restored into redis: %s", client.name, exc)


async def _answered_before(state: ServiceState, client: Client, request_key: str) -> bool:
    """Whether an idempotent request is being answered here or is in the log already."""
    if state.idempotency.holds(client.name, request_key):
        return True
    try:
        return await run_in_threadpool(request_logged, state.engine, client.name, request_key)
    except SQLAlchemyError:
        if state.writer.mode is LogMode.durable:
            raise
        return False  # buffered: charged as a new request during a database outage


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
        raise reused_key_error()
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


class _Bill:
    """What a request has taken from its key's rate limit and daily quota.

    Charged before the body is read, for the images the request declares, and settled once
    they are decoded: the difference is charged or given back. Whatever was taken is given
    back when the request is not answered, or is answered from an earlier answer (a replay).
    """

    def __init__(
        self, state: ServiceState, client: Client, response: Response, *, rate_only: bool = False
    ) -> None:
        """``rate_only``: charge the rate limit, not the daily quota (a retry's bill)."""
        self._state = state
        self._client = client
        self._response = response
        limits = client.limits_over(state.limits_default)
        self._limits = replace(limits, daily_quota=None) if rate_only else limits
        self.covered = 0
        """Images the request may have: charged, or let through while Redis is away."""
        self.charged = 0
        """Images actually taken from the limits (to give back)."""

    async def charge(self, count: int) -> None:
        """Take ``count`` images more, or refuse the request (429, or 413 when it can never
        fit), having taken nothing more."""
        self.covered += count
        if self._limits.unlimited:
            return
        limiter = self._state.limiter
        decision = await _degradable(
            self._state,
            limiter.acquire,
            self._client.name,
            count,
            self._limits,
            in_process=limiter.in_process,
        )
        if decision is None:
            return  # Redis is away and the deployment fails open
        if not decision.allowed:
            self.covered -= count
            raise _rate_limited(decision, self.covered + count)
        self.charged += count
        self._response.headers.update(_quota_headers(decision))

    async def settle(self, count: int) -> None:
        """The request holds ``count`` images: charge what was not declared, give back what
        was declared but not sent."""
        if count > self.covered:
            await self.charge(count - self.covered)
        elif count < self.covered:
            await self.refund(self.covered - count)
            self.covered = count

    async def refund(self, count: int) -> None:
        count = min(count, self.charged)
        if count <= 0:
            return
        limiter = self._state.limiter
        await _degradable(
            self._state,
            limiter.refund,
            self._client.name,
            count,
            self._limits,
            in_process=limiter.in_process,
        )
        self.charged -= count
        remaining = self._response.headers.get("X-Quota-Remaining")
        if remaining is not None:  # what the answer says is left counts the refund
            self._response.headers["X-Quota-Remaining"] = str(int(remaining) + count)

    async def refund_all(self) -> None:
        await self.refund(self.charged)


async def _infer_and_log(
    state: ServiceState,
    client: Client,
    batch: DecodedBatch,
    started: float,
    request_key: str | None = None,
    hashes: list[str] | None = None,
) -> tuple[PredictResponse, Future[None] | None]:
    """Answer and log a decoded batch: the answer, and the future of its rows' commit when
    the client is answered before it (buffered logging); None once they are committed."""
    try:
        output = await state.batcher.submit(batch.images, client.name)
    except QueueFull as exc:
        raise ApiError(503, "model_busy", f"{exc}; retry shortly", {"Retry-After": "1"}) from exc
    probs = state.perturbation.apply(output.probs, state.rng)
    granularity = client.granularity or state.granularity
    scores: list[dict[str, float | None]] | None = None
    statistics: list[dict[str, Any]] | None = None
    alerts: list[PendingAlert] = []
    if state.monitor is not None:
        observation = Observation(batch.images, output.logits, output.probs, output.features)
        verdict, flagged = await _observe(state, client, observation)
        if verdict is not None:
            scores, statistics = verdict.scores, verdict.statistics
            alerts = [PendingAlert(**asdict(alert)) for alert in verdict.alerts]
            for alert in verdict.alerts:
                state.metrics.alerts.labels(alert.detector, alert.action).inc()
        if flagged and state.monitor.policy is Policy.deceive:
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
            # At most MLAAS_LOG_COMMIT_TIMEOUT_S, then 503 (see wait_for_commit: rows that
            # commit later stay logged, and a retry with the same key is answered from them).
            await wait_for_commit(logged, state.settings.log_commit_timeout_s)
        except DuplicateRequest:
            # Another replica answered this idempotent request first: its answer stands.
            recalled = await _recall(state, client, request_key or "", hashes or [])
            if recalled is None:
                raise
            return recalled, None
        return answer, None
    return answer, logged


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
    return {"status": "ready", "model": state.victim.card.name, "degraded": degraded}


def _ping_database(state: ServiceState) -> None:
    with state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


# Granularities as they are written (server/shaping.py), exactly: every string the pattern
# allows is accepted and nothing else is, so the schema tells the truth. Granularity.parse alone
# is more lenient (it took "probs\x0b", control character and all, for "probs").
_TOP_K, _ROUND = "topk:[1-9][0-9]{0,5}", "round:[0-8]"
GRANULARITY_PATTERN = f"^(probs|label|{_TOP_K}|{_ROUND}|{_TOP_K},{_ROUND}|{_ROUND},{_TOP_K})$"
"""Images per second, at least: one per 11.6 days. Below, a microsecond interval per image
overflows (a denormal such as 5e-324 made it infinite)."""


def _iso_only(value: object) -> object:
    """Refuse a number where the schema promises an ISO 8601 time (pydantic would read
    ``since=29447131`` as seconds since 1970, which the schema does not allow)."""
    if isinstance(value, str | int | float) and _NUMBER.fullmatch(str(value).strip()):
        raise ValueError("an ISO 8601 time is needed (2026-12-01T17:00:00Z), not a number")
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]


class NewKey(BaseModel):
    name: str = Field(
        description="Client name, unique",
        pattern=CLIENT_NAME_PATTERN,  # KeyStore enforces it too, for the CLI
    )
    granularity: str | None = Field(
        default=None,
        pattern=GRANULARITY_PATTERN,
        description="Overrides the deployment's granularity for this key: probs, label, "
        "topk:K, round:D, or topk and round together (topk:3,round:2)",
    )
    rate_limit: float | None = Field(
        default=None,
        ge=MIN_RATE_LIMIT,
        allow_inf_nan=False,
        description="Images per second for this key",
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
        pattern=CLIENT_NAME_PATTERN,
    )

    @field_validator("rate_limit", "rate_burst", "daily_quota", mode="before")
    @classmethod
    def _no_booleans(cls, value: object) -> object:
        # JSON's true is no number to the schema; pydantic's lax mode would read it as 1.
        if isinstance(value, bool):
            raise ValueError("a number is needed, not a boolean")
        return value


class CreatedKey(BaseModel):
    name: str
    account: str
    key: str = Field(description="Shown once; the server stores only its hash")


def _self_contained_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` put in place of the references to them: an
    operation's request body cannot carry ``$defs`` of its own (models that refer to
    themselves would need components instead)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve({**defs[ref.removeprefix("#/$defs/")], **rest})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _parse_json_body(model: type[M], request: Request, body: bytes) -> M:
    """A JSON body as ``model``, refused as FastAPI refuses a body parameter: 422 naming the
    fields (server/errors.py), 415 for a body that says it is not JSON."""
    kind = media_type(request.headers.get("content-type"))
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", f"content type {kind!r}: send application/json"
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from None


@admin_router.post(
    "/keys",
    response_model=CreatedKey,
    status_code=201,
    responses=admin_errors(400, 409, 415, 422, 503),
    # The body is read in the handler, after the admin check: documented here instead.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _self_contained_schema(NewKey)}},
        }
    },
    summary="Create an API key",
)
async def create_key(request: Request, credentials: AdminCredentials) -> CreatedKey:
    """Authenticated before the body is read: with the body as a model parameter, FastAPI
    would read and validate it first, for anyone and with admin routes off too."""
    await run_in_threadpool(require_admin, request, credentials)
    body = _parse_json_body(NewKey, request, await request.body())
    try:
        limits = LimitSpec(body.rate_limit, body.rate_burst, body.daily_quota)
        key = await run_in_threadpool(
            get_state(request).keys.create, body.name, body.granularity, limits, body.account
        )
    except DuplicateClient as exc:
        raise ApiError(409, "client_exists", str(exc)) from exc
    except NameConflict as exc:  # a shared account's name for a key, or the reverse
        raise ApiError(409, "name_conflict", str(exc)) from exc
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
    since: IsoTime | None = Query(default=None, description="ISO 8601 time, inclusive"),
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
        "alerts_waiting": state.writer.alerts_waiting,  # of refused requests, for the database
        "alerts_lost": state.writer.alerts_lost,
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
    since: IsoTime | None = Query(default=None, description="ISO 8601 time, inclusive"),
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
    flagged = standing is not None and standing.flagged
    if monitor is not None and not flagged and monitor.policy is not Policy.monitor:
        # The policy holds a client flagged by a logged alert though Redis lost its record
        # (see _flags): say so here too.
        shared = shared_account(name, key.account)
        flagged = bool(logged_flags(state.engine, name, shared, monitor.policy.value))
    if key.revoked_at is not None:
        status = "revoked"
    elif flagged:
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
