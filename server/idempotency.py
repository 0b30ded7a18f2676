"""Idempotent prediction requests: a retried request is answered once.

A client that lost a response (a dropped connection, a crash after sending) cannot know
whether the provider answered. Resending the same request with the same ``Idempotency-Key``
header returns the first answer again, with ``Idempotent-Replayed: true``, and neither logs
nor bills the images twice. Keys are scoped per client.

The query log is what remembers answers: a retry is answered from the logged rows, after a
restart and on another replica too. This process keeps only what the log cannot answer yet:

* a request being computed, as its body's fingerprint and a future, so that a concurrent
  duplicate waits for the first instead of computing (and logging) again;
* a request answered but not yet in the log (buffered logging commits after answering), with
  its answer until its rows are committed, so that a retry in that window is still a replay.

Both end with the request's rows in the log, so what this process holds is bounded by the
requests in flight and the log's buffer, never by how many keys a client has used: a client
cannot buy memory with fresh keys. A per-client cap bounds even that (a client holding more
unfinished idempotent requests than the cap is refused with 429).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from mlaas.wire import PredictResponse
from server.errors import ApiError

MAX_KEY_LENGTH = 255

Computed = tuple[PredictResponse, "Future[None] | None"]
"""An answer and, when its rows are not committed yet, the future of their commit."""


def check_key(key: str) -> None:
    """Refuse an ``Idempotency-Key`` the log cannot keep (before any work is done)."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise ApiError(
            422,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters",
        )


def reused_key_error() -> ApiError:
    """The 422 for a key already used (in flight or logged) with a different body."""
    return ApiError(
        422, "idempotency_key_reused", "this Idempotency-Key was used for a different request body"
    )


@dataclass
class _Entry:
    fingerprint: str
    answer: asyncio.Future[PredictResponse]


class IdempotencyCache:
    def __init__(self, max_per_client: int = 1024) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._per_client: Counter[str] = Counter()
        self._max_per_client = max_per_client

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, client: str, key: str) -> bool:
        """Whether this process is computing, or has not yet logged, ``(client, key)``."""
        return (client, key) in self._entries

    async def run(
        self,
        client: str,
        key: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[Computed]],
        recall: Callable[[], Awaitable[PredictResponse | None]] | None = None,
    ) -> tuple[PredictResponse, bool]:
        """The answer for ``(client, key)`` and whether it is a replay.

        Concurrent duplicates wait for the first; a failed computation is forgotten, so that a
        retry computes afresh. The same key with a different body is refused (422). On a miss,
        ``recall`` finds an answer logged before (by this process or another replica); the
        caller may leave it out when it knows the log has none (a race with another replica is
        then settled by the log's unique index when the rows are written).
        """
        check_key(key)
        slot = (client, key)
        entry = self._entries.get(slot)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise reused_key_error()
            return await asyncio.shield(entry.answer), True
        if self._per_client[client] >= self._max_per_client:
            raise ApiError(
                429,
                "too_many_unfinished_requests",
                f"this client has {self._max_per_client} idempotent requests being answered or "
                "logged; retry shortly",
                {"Retry-After": "1"},
            )
        future: asyncio.Future[PredictResponse] = asyncio.get_running_loop().create_future()
        self._entries[slot] = _Entry(fingerprint, future)
        self._per_client[client] += 1
        try:
            answer = await recall() if recall is not None else None
            if answer is not None:
                self._forget(slot)
                future.set_result(answer)
                return answer, True
            answer, logged = await compute()
        except BaseException as exc:
            self._forget(slot)
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # mark it retrieved: duplicates re-raise it themselves
            raise
        future.set_result(answer)
        if logged is None or logged.done():
            self._forget(slot)
        else:  # kept until the log can answer a retry itself
            loop = asyncio.get_running_loop()

            def forget_when_logged(_: Future[None]) -> None:  # on the log writer's thread
                with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to free
                    loop.call_soon_threadsafe(self._forget, slot)

            logged.add_done_callback(forget_when_logged)
        return answer, False

    def _forget(self, slot: tuple[str, str]) -> None:
        if self._entries.pop(slot, None) is not None:
            client = slot[0]
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
