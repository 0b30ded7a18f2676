"""Per-client detector state: in this process by default, in Redis when configured.

With Redis, several API processes or replicas share one state per client, so an attacker who
spreads queries over them is seen as one stream; and a restarted server keeps what it knew.
Each client's record is read, updated and written under a per-client lock.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import redis


class StateStore(ABC):
    @abstractmethod
    @contextmanager
    def lock(self, client: str) -> Iterator[None]: ...

    @abstractmethod
    def load(self, client: str) -> dict[str, bytes]: ...

    @abstractmethod
    def save(self, client: str, fields: dict[str, bytes]) -> None: ...

    @abstractmethod
    def clients(self) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class MemoryStore(StateStore):
    def __init__(self) -> None:
        self._records: dict[str, dict[str, bytes]] = {}
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    @contextmanager
    def lock(self, client: str) -> Iterator[None]:
        with self._guard:
            client_lock = self._locks[client]
        with client_lock:
            yield

    def load(self, client: str) -> dict[str, bytes]:
        return dict(self._records.get(client, {}))

    def save(self, client: str, fields: dict[str, bytes]) -> None:
        self._records.setdefault(client, {}).update(fields)

    def clients(self) -> list[str]:
        return sorted(self._records)


class RedisStore(StateStore):
    """One hash per client (a field per detector, plus the client's summary)."""

    def __init__(self, url: str, prefix: str = "mlaas", lock_timeout_s: float = 30.0) -> None:
        self._redis = redis.Redis.from_url(url)
        self._prefix = prefix
        self._lock_timeout_s = lock_timeout_s
        self._redis.ping()  # fail at start-up, clearly, not on the first query

    def _key(self, client: str) -> str:
        return f"{self._prefix}:client:{client}"

    @contextmanager
    def lock(self, client: str) -> Iterator[None]:
        with self._redis.lock(
            f"{self._prefix}:lock:{client}",
            timeout=self._lock_timeout_s,
            blocking_timeout=self._lock_timeout_s,
        ):
            yield

    def load(self, client: str) -> dict[str, bytes]:
        raw = self._redis.hgetall(self._key(client))
        return {name.decode(): value for name, value in raw.items()}

    def save(self, client: str, fields: dict[str, bytes]) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(client), mapping=fields)
            pipe.sadd(f"{self._prefix}:clients", client)
            pipe.execute()

    def clients(self) -> list[str]:
        return sorted(c.decode() for c in self._redis.smembers(f"{self._prefix}:clients"))

    def close(self) -> None:
        self._redis.close()
