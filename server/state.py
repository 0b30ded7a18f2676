"""What a running service holds, shared by its routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from redis import Redis
from redis.exceptions import LockError
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
from server.ratelimit import InFlight, LimitSpec, MemoryRateLimiter, RateLimiter
from server.settings import ServerSettings
from server.shaping import Granularity

T = TypeVar("T")


class MonitorThreads:
    """The detectors' Redis work, off AnyIO's shared thread pool (which serves key lookups and
    decoding), and one request at a time per record in this process.

    A request waits for its records' turn on the event loop, at no cost, for at most
    ``wait_s`` (then :class:`redis.exceptions.LockError`, as for a Redis lock not had in time:
    refused, never answered unobserved); only the record's turn holder takes a thread, which
    waits on the Redis lock (other processes' requests) for at most the store's own wait. So a
    client sending many requests at once holds one thread per record, and the others keep
    theirs. A lock lives while a request holds or awaits it: the table stays small.
    """

    def __init__(self, threads: int, wait_s: float) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="monitor")
        self.wait_s = wait_s
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> lock, users

    @asynccontextmanager
    async def turn(self, records: Sequence[str]) -> AsyncIterator[None]:
        """Hold ``records`` (always taken in the order given: a key's before its account's,
        so that two requests never wait on each other)."""
        held: list[str] = []
        try:
            try:
                async with asyncio.timeout(self.wait_s):
                    for name in records:
                        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
                        users[0] += 1
                        try:
                            await lock.acquire()
                        except BaseException:
                            self._leave(name, release=False)
                            raise
                        held.append(name)
            except TimeoutError:
                raise LockError(f"{records[len(held)]!r} is busy: not had in time") from None
            yield
        finally:
            for name in reversed(held):
                self._leave(name, release=True)

    def _leave(self, name: str, *, release: bool) -> None:
        lock, users = self._locks[name]
        if release:
            lock.release()
        users[0] -= 1
        if users[0] == 0:
            del self._locks[name]

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on one of these threads. Cancelled, it still waits for the thread
        to finish (seconds at most: the store's timeouts bound it) before it lets go, so that
        a turn is never handed on while its thread still works."""
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(call, *args)
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            raise

    @property
    def records(self) -> int:
        """Records held or awaited now (the lock table's size)."""
        return len(self._locks)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class FlaggedMemo:
    """Keys and accounts this process knows are flagged, and why: a flagged client stays
    flagged (nothing unflags one), so a positive answer from Redis or the database is kept, and
    survives Redis losing it. Bounded: the least recently used go first, to be found again."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._reasons: OrderedDict[tuple[str, str], list[str]] = OrderedDict()

    def get(self, level: str, name: str) -> list[str] | None:
        """The detectors that flagged ``name`` at ``level``; None if not known flagged."""
        reason = self._reasons.get((level, name))
        if reason is not None:
            self._reasons.move_to_end((level, name))
        return reason

    def put(self, level: str, name: str, reason: list[str]) -> None:
        self._reasons[(level, name)] = reason
        self._reasons.move_to_end((level, name))
        while len(self._reasons) > self._size:
            self._reasons.popitem(last=False)

    def __len__(self) -> int:
        return len(self._reasons)


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
    in_flight: InFlight = field(default_factory=lambda: InFlight(8))
    """Each key's requests in flight in this process (checked before a body is read)."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Refused requests by HTTP status: counted, never logged as answered queries."""
    monitor_threads: MonitorThreads = field(default_factory=lambda: MonitorThreads(8, 3.0))
    """Where the monitor's Redis work runs (``MLAAS_MONITOR_THREADS``)."""
    flagged: FlaggedMemo = field(default_factory=FlaggedMemo)
    """Keys and accounts known flagged: the policy holds though Redis lose them."""


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
