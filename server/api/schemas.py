"""What the admin and health routes answer, as models: OpenAPI documents each body, and the
fuzz test (tests/test_fuzz.py) holds every answer to its model.

Times are the ISO 8601 strings the log and the key store write (``+00:00``, not pydantic's
``Z``), so that the JSON stays what clients such as :class:`mlaas.apiclient.AdminClient` read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

TimeText = Annotated[str, Field(description="ISO 8601, UTC")]


class CreatedKey(BaseModel):
    name: str
    account: str
    key: str = Field(description="Shown once; the server stores only its hash")


class KeyRow(BaseModel):
    """An API key as the admin sees it: never the key itself."""

    name: str
    account: str | None
    key_prefix: str = Field(description="The key's first characters, to recognise it by")
    granularity: str | None = Field(description="The key's own; None: the deployment's")
    created_at: TimeText
    revoked_at: str | None = Field(description="ISO 8601, UTC; null while the key serves")
    rate_limit: float | None = Field(description="Images per second; None: the deployment's")
    rate_burst: int | None
    daily_quota: int | None


class QueryRow(BaseModel):
    """One answered query of the log."""

    id: str
    client: str
    time: TimeText
    input_sha256: str
    input_shape: str = Field(description="As the client sent it, H x W x C")
    predicted: int
    payload: dict[str, Any] = Field(description="The prediction as the client got it")
    latency_ms: float
    granularity: str
    scores: dict[str, Any] | None = Field(description="Each detector's score of the query")
    statistics: dict[str, Any] | None = Field(
        description="Each detector's decision statistic after the query, and its number"
    )
    input_png_base64: str | None = Field(
        default=None,
        description="With include_input only: the input as base64 PNG (null where inputs "
        "are not logged)",
    )


class AlertRow(BaseModel):
    """A detector's alert, on a key's own queries or on its account's together."""

    id: int
    client: str
    level: str = Field(description="key or account")
    account: str | None
    detector: str
    time: TimeText
    query_count: int = Field(description="The stream's queries up to the alarming one")
    score: float = Field(description="The decision statistic at the alarm")
    threshold: float
    action: str = Field(description="What the policy did: monitor, block or deceive")


class ServiceStats(BaseModel):
    model: str
    granularity: str
    batches: int
    images: int
    log_mode: str
    log_rows_written: int
    log_rows_pending: int
    log_write_errors: int
    log_rows_spooled: int
    alerts_written: int
    alerts_waiting: int = Field(description="Of refused requests, waiting for the database")
    alerts_lost: int
    detectors: list[str]
    rejected_by_status: dict[str, int] = Field(description="Refused requests per HTTP status")


class MonitorStatus(BaseModel):
    """What the detectors hold on a key, or on a shared account."""

    client: str
    queries: int
    flagged: bool
    flagged_by: list[str]
    first_alert_at: int | None
    statistics: dict[str, float | None]


StandingStatus = Literal["active", "revoked", "blocked", "deceived", "flagged"]


class ClientStanding(BaseModel):
    client: str
    account: str | None
    status: StandingStatus = Field(
        description="flagged: alerted under the monitor policy; blocked or deceived: under "
        "those policies"
    )
    granularity: str
    queries_logged: int
    monitor: MonitorStatus | None
    account_monitor: MonitorStatus | None = Field(
        description="The key's shared account's, when it has one"
    )
    alerts: list[AlertRow] = Field(description="The key's own and its account's")


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    model: str
    degraded: list[str] = Field(
        description="What the service answers without for now (a database under buffered "
        "logging, Redis failing open)"
    )
