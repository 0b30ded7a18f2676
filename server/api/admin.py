"""The admin API: API keys, the query log, alerts, counters and a client's standing."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
)

from defense.monitor import ClientStatus, Level, Policy, shared_account
from server.api.deps import AdminCredentials, require_admin
from server.api.docs import admin_errors
from server.api.routers import admin_router
from server.api.schemas import (
    AlertRow,
    ClientStanding,
    CreatedKey,
    KeyRow,
    MonitorStatus,
    QueryRow,
    ServiceStats,
    StandingStatus,
)
from server.errors import ApiError
from server.inputs import media_type
from server.keys import (
    CLIENT_NAME_PATTERN,
    DuplicateClient,
    KeyStoreError,
    NameConflict,
)
from server.options import MIN_RATE_LIMIT
from server.querylog import count_queries, fetch_alerts, fetch_queries, logged_flags
from server.ratelimit import LimitSpec
from server.state import get_state

M = TypeVar("M", bound=BaseModel)


# Granularities as they are written (server/shaping.py), exactly: every string the pattern
# allows is accepted and nothing else is, so the schema tells the truth. Granularity.parse alone
# is more lenient (it took "probs\x0b", control character and all, for "probs").
_TOP_K, _ROUND = "topk:[1-9][0-9]{0,5}", "round:[0-8]"
GRANULARITY_PATTERN = f"^(probs|label|{_TOP_K}|{_ROUND}|{_TOP_K},{_ROUND}|{_ROUND},{_TOP_K})$"


def _iso_only(value: object) -> object:
    """Refuse a number where the schema promises an ISO 8601 time (pydantic would read
    ``since=29447131`` as seconds since 1970, which the schema does not allow)."""
    if isinstance(value, str | int | float) and _NUMBER.fullmatch(str(value).strip()):
        raise ValueError("an ISO 8601 time is needed (2026-12-01T17:00:00Z), not a number")
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _utc_if_naive(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


IsoTime = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_utc_if_naive)]
"""An ISO 8601 time; one without a zone is taken as UTC, as the log keeps its times."""


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
def list_keys(request: Request) -> list[KeyRow]:
    return [KeyRow.model_validate(k.to_row()) for k in get_state(request).keys.list()]


@admin_router.get(
    "/queries",
    response_model=list[QueryRow],
    # The log's rows as they are: input_png_base64 appears only when asked for.
    response_model_exclude_unset=True,
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
def stats(request: Request) -> ServiceStats:
    state = get_state(request)
    return ServiceStats(
        model=state.victim.card.name,
        granularity=str(state.granularity),
        batches=state.batcher.batches,
        images=state.batcher.images,
        log_mode=str(state.writer.mode),
        log_rows_written=state.writer.written,
        log_rows_pending=state.writer.pending,
        log_write_errors=state.writer.write_errors,
        log_rows_spooled=state.writer.spooled,
        alerts_written=state.writer.alerts_written,
        alerts_waiting=state.writer.alerts_waiting,
        alerts_lost=state.writer.alerts_lost,
        detectors=[d.name for d in state.monitor.detectors] if state.monitor else [],
        rejected_by_status=dict(state.rejected),
    )


@admin_router.get(
    "/alerts",
    response_model=list[AlertRow],
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
    return fetch_alerts(
        get_state(request).engine,
        client=client,
        account=account,
        level=level.value if level is not None else None,
        since=since,
        limit=limit,
    )


_FLAGGED: dict[Policy, StandingStatus] = {
    Policy.monitor: "flagged",
    Policy.block: "blocked",
    Policy.deceive: "deceived",
}
"""A flagged client's status under each policy."""


@admin_router.get(
    "/clients/{name}",
    dependencies=[Depends(require_admin)],
    responses=admin_errors(404, 422, 503),
    summary="One client's standing",
)
def client_standing(request: Request, name: str) -> ClientStanding:
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
    policy = monitor.policy if monitor is not None else Policy.monitor
    if monitor is not None and not flagged and policy is not Policy.monitor:
        # The policy holds a client flagged by a logged alert though Redis lost its record
        # (see server/prediction.py's _flags): say so here too.
        shared = shared_account(name, key.account)
        flagged = bool(logged_flags(state.engine, name, shared, policy.value))
    status: StandingStatus
    if key.revoked_at is not None:
        status = "revoked"
    elif flagged:
        status = _FLAGGED[policy]
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
    return ClientStanding(
        client=name,
        account=key.account,
        status=status,
        granularity=key.granularity or str(state.granularity),
        queries_logged=count_queries(state.engine, name),
        monitor=_monitor_status(standing.status if standing is not None else None),
        account_monitor=_monitor_status(standing.account_status if standing is not None else None),
        alerts=[AlertRow.model_validate(alert) for alert in alerts],
    )


def _monitor_status(status: ClientStatus | None) -> MonitorStatus | None:
    return MonitorStatus.model_validate(status.to_dict()) if status is not None else None
