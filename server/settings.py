"""The provider's settings: ``MLAAS_*`` environment variables, ``.env``, or a TOML file.

Precedence, highest first: explicit arguments, environment, ``.env``, the TOML file named by
``MLAAS_CONFIG``, defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Light modules only: reading the settings must not load SciPy, torch or SQLAlchemy
# (tests/test_settings_light.py).
from defense.options import DEFAULT_DETECTORS, DETECTORS, Policy
from defense.perturb import Perturbation
from mlaas.config import CommonSettings
from server.options import MIN_RATE_LIMIT, LogMode
from server.shaping import Granularity


def parse_deception(spec: str) -> Perturbation | Granularity:
    """The ``deceive`` action: a perturbation, or else a (coarser) granularity."""
    try:
        return Perturbation.parse(spec)
    except ValueError:
        pass
    try:
        return Granularity.parse(spec)
    except ValueError:
        raise ValueError(
            f"deceive {spec!r}: a perturbation (reverse-sigmoid:B:G, noise:S) or a granularity"
        ) from None


def _parsed_by(parse: Callable[[str], object]) -> BeforeValidator:
    """Parse a spec as written (environment, ``.env``, TOML, a caller's string) once, when the
    settings are read; a value parsed already passes as it is."""
    return BeforeValidator(lambda value: parse(value) if isinstance(value, str) else value)


# NoDecode: these are dataclasses, which pydantic-settings would otherwise read from the
# environment as JSON; str() writes each back as its spec.
GranularitySpec = Annotated[
    Granularity, NoDecode, _parsed_by(Granularity.parse), PlainSerializer(str, return_type=str)
]
PerturbationSpec = Annotated[
    Perturbation, NoDecode, _parsed_by(Perturbation.parse), PlainSerializer(str, return_type=str)
]
DeceptionSpec = Annotated[
    Perturbation | Granularity,
    NoDecode,
    _parsed_by(parse_deception),
    PlainSerializer(str, return_type=str),
]


def _normalised(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class RedisFailure(StrEnum):
    closed = "closed"
    open = "open"


MIN_ADMIN_TOKEN_CHARS = 32
"""A token_urlsafe(32) has 43: guessing one is hopeless even without the failure limit."""


class ServerSettings(CommonSettings):
    # Empty variables count as unset, so that compose can pass optional ones through as-is.
    model_config = SettingsConfigDict(
        env_prefix="MLAAS_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    victim_dir: Path = Path("var/victims/fashion")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: a SQLite file <var_dir>/mlaas.db"
    )
    granularity: GranularitySpec = Granularity()
    admin_token: SecretStr | None = Field(
        default=None,
        description=f"Bearer token for /admin routes, at least {MIN_ADMIN_TOKEN_CHARS} "
        "characters; unset disables them",
    )
    admin_failures_per_minute: int = Field(
        default=10,
        ge=1,
        description="Failed admin attempts (wrong token, unknown session) a source address may "
        "make per minute, in a burst or spread out; beyond: 429 before any token is compared",
    )
    admin_session_ttl_s: int = Field(
        default=8 * 3600, ge=60, description="How long a dashboard login lasts, in seconds"
    )
    secure_cookies: bool = Field(
        default=False,
        description="Mark the dashboard's session cookie Secure: set it when the deployment is "
        "served over HTTPS (browsers then never send the cookie in clear)",
    )

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"MLAAS_ADMIN_TOKEN has {len(value.get_secret_value())} characters; it needs at "
                f"least {MIN_ADMIN_TOKEN_CHARS}. Make one with: "
                'python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return value

    device: str = "auto"

    max_images_per_request: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="Per decoded image; larger files are refused (413)"
    )
    max_request_pixels: int | None = Field(
        default=None, ge=1, description="All images of a request together; default: 4 images' worth"
    )

    batch_max_size: int = Field(default=256, ge=1, description="Images per forward pass")
    batch_max_wait_ms: float = Field(
        default=2.0, ge=0, description="How long a forward pass waits for company"
    )
    batch_queue_images: int | None = Field(
        default=None,
        ge=1,
        description="Images waiting for the model, at most (beyond: 503 with Retry-After; no "
        "client may hold more than half); default: 16 forward passes' worth",
    )
    max_in_flight_per_key: int = Field(
        default=8,
        ge=1,
        description="Requests one key may have in flight per API process (beyond: 429), "
        "checked before the body is read",
    )

    detectors: str = Field(
        default="",
        description="Comma-separated: ood-binary, msp, mahalanobis, prada, or default "
        "(the set bench/detection.py measured best out of sample)",
    )
    policy: Annotated[Policy, BeforeValidator(_normalised)] = Field(
        default=Policy.monitor, description="monitor, block or deceive"
    )
    deceive: DeceptionSpec = Field(
        default=Perturbation.parse("reverse-sigmoid:0.7:0.4"),
        description="What a deceived client gets: a perturbation or a granularity",
    )
    perturbation: PerturbationSpec = Field(
        default=Perturbation(), description="Applied to every answer"
    )
    defense_dir: Path | None = Field(
        default=None, description="Detector artifacts; default: <victim_dir>/defense"
    )
    prada_delta: float | None = Field(
        default=None, gt=0, lt=1, description="Default: calibrated by `mlaas defense train`"
    )
    prada_state_bytes: int = Field(
        default=4 * 2**20,
        ge=2**16,
        description="PRADA's growing sets per client, at most (oldest members evicted first); "
        "raise it for large inputs or many classes, where it must hold more rows per class "
        "than an attacker has seed lineages",
    )
    redis_url: str | None = Field(
        default=None, description="Shared per-client detector state; default: in-process"
    )
    redis_prefix: str = Field(
        default="mlaas", description="Key prefix, so that deployments can share one Redis"
    )

    log_mode: LogMode = Field(
        default=LogMode.durable,
        description="durable: answer only once the query is committed to the log (a database "
        "outage means 503); buffered: answer at once, rows wait in memory for the database",
    )
    log_buffer_rows: int = Field(
        default=100_000, ge=1, description="buffered mode: rows held before refusing with 503"
    )
    log_spool: Path | None = Field(
        default=None,
        description="buffered mode: the SQLite file that keeps rows while the database is "
        "away; default: <var_dir>/querylog-spool.db",
    )
    log_shutdown_timeout_s: float = Field(
        default=30.0, gt=0, description="buffered mode: how long a stop waits for the database"
    )
    log_commit_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="durable mode: how long a request waits for its rows' commit before it is "
        "refused with 503 (rows committed later stay logged)",
    )
    db_connect_timeout_s: float = Field(
        default=5.0, ge=2, description="PostgreSQL: how long making a connection may take"
    )
    db_statement_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="PostgreSQL: how long the server may run one statement (0: no limit)",
    )
    db_tcp_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="PostgreSQL: how long a connection may wait on a peer that stopped "
        "answering, by TCP keepalives and tcp_user_timeout (0: the OS's timeouts, minutes)",
    )
    redis_failure: RedisFailure = Field(
        default=RedisFailure.closed,
        description="closed: Redis down means 503 for predictions; open: answer without "
        "detector scores and rate limits until it returns",
    )
    redis_lock_wait_s: float = Field(
        default=3.0,
        gt=0,
        le=30,
        description="How long a request waits for a client's detector state that another "
        "request holds (in this process, then in Redis), each; then 503",
    )
    monitor_threads: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Threads for the detectors' Redis work (their own: the shared pool serves "
        "key lookups and decoding); a client's requests use one at a time per process",
    )
    rate_limit: float | None = Field(
        default=None,
        ge=MIN_RATE_LIMIT,
        description="Images per second per key; unset: no rate limit",
    )
    rate_burst: int | None = Field(
        default=None, ge=1, description="Images a key may send at once; default: one second's"
    )
    daily_quota: int | None = Field(
        default=None, ge=1, description="Images per key per UTC day; unset: no quota"
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins allowed to call the API from a browser; "
        "empty: CORS closed (no browser page elsewhere may read an answer)",
    )
    log_inputs: bool = Field(default=True, description="Store each query's input as PNG")
    log_flush_rows: int = Field(default=512, ge=1)
    log_flush_interval_ms: float = Field(default=100.0, gt=0)

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if "default" in names:  # the measured default set, in place
            at = names.index("default")
            names[at : at + 1] = [n for n in DEFAULT_DETECTORS if n not in names]
        unknown = [n for n in names if n not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector {unknown[0]!r}; choose from {', '.join(DETECTORS)}")
        if len(set(names)) != len(names):
            raise ValueError("a detector is listed twice")
        return ",".join(names)

    @property
    def detector_names(self) -> list[str]:
        return [n for n in self.detectors.split(",") if n]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def resolved_defense_dir(self) -> Path:
        return self.defense_dir if self.defense_dir is not None else self.victim_dir / "defense"

    @property
    def resolved_log_spool(self) -> Path:
        return self.log_spool if self.log_spool is not None else self.var_dir / "querylog-spool.db"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.var_dir / 'mlaas.db'}"

    @property
    def database_options(self) -> dict[str, Any]:
        """``make_engine``'s keyword arguments for these settings."""
        return {
            "durable": self.log_mode is LogMode.durable,
            "connect_timeout_s": self.db_connect_timeout_s,
            "statement_timeout_s": self.db_statement_timeout_s or None,
            "tcp_timeout_s": self.db_tcp_timeout_s or None,
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (
            init_settings,
            env_settings,
            dotenv_settings,
        )
        config_file = os.environ.get("MLAAS_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"MLAAS_CONFIG names {config_file}, which does not exist")
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return (*sources, file_secret_settings)
