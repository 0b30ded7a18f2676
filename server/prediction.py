"""The prediction service, no HTTP routing (server/api/predict.py calls it): the limits bill,
the blocked and flagged checks (Redis, this process's memory, the query log's alerts),
inference with the monitor's verdict and logging, idempotent answers recalled from the log."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Response
from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from defense.detectors import Observation
from defense.monitor import (
    Alert,
    ClientStatus,
    Level,
    Policy,
    Standing,
    Verdict,
    account_record,
    shared_account,
)
from defense.state import is_outage
from mlaas.wire import Prediction, PredictResponse
from server.errors import ApiError
from server.idempotency import reused_key_error
from server.inference import QueueFull
from server.inputs import DecodedBatch
from server.keys import Client
from server.querylog import (
    DuplicateRequest,
    LogMode,
    PendingQuery,
    fetch_request,
    logged_flags,
    request_logged,
    wait_for_commit,
)
from server.ratelimit import Decision
from server.settings import RedisFailure
from server.shaping import Granularity
from server.state import ServiceState

log = logging.getLogger(__name__)
T = TypeVar("T")


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


async def refuse_blocked(state: ServiceState, client: Client) -> None:
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


async def answered_before(state: ServiceState, client: Client, request_key: str) -> bool:
    """Whether an idempotent request is being answered here or is in the log already."""
    if state.idempotency.holds(client.name, request_key):
        return True
    try:
        return await run_in_threadpool(request_logged, state.engine, client.name, request_key)
    except SQLAlchemyError:
        if state.writer.mode is LogMode.durable:
            raise
        return False  # buffered: charged as a new request during a database outage


async def recall(
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


class Bill:
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


async def infer_and_log(
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
    alerts: list[Alert] = []
    if state.monitor is not None:
        observation = Observation(batch.images, output.logits, output.probs, output.features)
        verdict, flagged = await _observe(state, client, observation)
        if verdict is not None:
            scores, statistics = verdict.scores, verdict.statistics
            alerts = verdict.alerts
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
    rows: list[PendingQuery | Alert] = [
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
    rows.extend(alerts)
    logged = state.writer.submit(rows)
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
            recalled = await recall(state, client, request_key or "", hashes or [])
            if recalled is None:
                raise
            return recalled, None
        return answer, None
    return answer, logged
