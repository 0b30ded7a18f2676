"""Idempotent prediction requests: a retried request is answered once.

A client that lost a response (a dropped connection, a crash after sending) cannot know
whether the provider answered. Resending the same request with the same ``Idempotency-Key``
header returns the first answer again, with ``Idempotent-Replayed: true``, and neither logs
nor bills the images twice. Keys are scoped per client. This process remembers them for
``ttl_s`` (a bounded LRU), which also makes concurrent duplicates wait for the first; the
query log remembers them for good, so a retry after a restart, or on another replica, is
answered from the logged rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mlaas.wire import PredictResponse
from server.errors import ApiError

MAX_KEY_LENGTH = 255


@dataclass
class _Entry:
    fingerprint: str
    created: float
    answer: asyncio.Future[PredictResponse]


class IdempotencyCache:
    def __init__(self, max_entries: int = 100_000, ttl_s: float = 24 * 3600) -> None:
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._max_entries = max_entries
        self._ttl_s = ttl_s

    def __len__(self) -> int:
        return len(self._entries)

    async def run(
        self,
        client: str,
        key: str,
        fingerprint: str,
        compute: Callable[[], Awaitable[PredictResponse]],
        recall: Callable[[], Awaitable[PredictResponse | None]] | None = None,
    ) -> tuple[PredictResponse, bool]:
        """The answer for ``(client, key)`` and whether it is a replay.

        Concurrent duplicates wait for the first; a failed computation is forgotten, so that a
        retry computes afresh. The same key with a different body is refused (422). On a miss,
        ``recall`` may find an answer given before this process remembered it (the query log
        keeps them: after a restart, or from another replica).
        """
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ApiError(
                422, "invalid_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} chars"
            )
        self._expire()
        slot = (client, key)
        entry = self._entries.get(slot)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request body",
                )
            self._entries.move_to_end(slot)
            return await asyncio.shield(entry.answer), True
        future: asyncio.Future[PredictResponse] = asyncio.get_running_loop().create_future()
        self._entries[slot] = _Entry(fingerprint, time.monotonic(), future)
        replayed = False
        try:
            answer = await recall() if recall is not None else None
            replayed = answer is not None
            if answer is None:
                answer = await compute()
        except BaseException as exc:
            self._entries.pop(slot, None)
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # mark it retrieved: duplicates re-raise it themselves
            raise
        future.set_result(answer)
        return answer, replayed

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            entry = next(iter(self._entries.values()))
            if len(self._entries) <= self._max_entries and now - entry.created < self._ttl_s:
                break
            if not entry.answer.done():
                break  # still being computed: never evict an in-flight request
            self._entries.popitem(last=False)
