"""What a running service holds, shared by its routes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from redis import Redis
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defense.monitor import Monitor
from defense.perturb import Perturbation
from server.idempotency import IdempotencyCache
from server.inference import MicroBatcher, Victim
from server.inputs import Limits
from server.keys import KeyStore
from server.metrics import ServiceMetrics
from server.querylog import QueryLogWriter
from server.ratelimit import LimitSpec, MemoryRateLimiter, RateLimiter
from server.settings import ServerSettings
from server.shaping import Granularity


@dataclass
class ServiceState:
    settings: ServerSettings
    engine: Engine
    keys: KeyStore
    victim: Victim
    batcher: MicroBatcher
    writer: QueryLogWriter
    granularity: Granularity
    limits: Limits
    redis: Redis | None = None
    limiter: RateLimiter = field(default_factory=MemoryRateLimiter)
    limits_default: LimitSpec = field(default_factory=LimitSpec)
    """The deployment's rate limit and quota; a key's own settings override them."""
    monitor: Monitor | None = None
    perturbation: Perturbation = field(default_factory=Perturbation)
    deception: Perturbation | Granularity = field(default_factory=Perturbation)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    idempotency: IdempotencyCache = field(default_factory=IdempotencyCache)
    rejected: Counter[str] = field(default_factory=Counter)
    """Refused requests by HTTP status: counted, never logged as answered queries."""


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


class CountRejections:
    """ASGI middleware counting refused requests (status >= 400) by status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                service = getattr(scope["app"].state, "service", None)
                if service is not None:
                    service.rejected[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, observing_send)
