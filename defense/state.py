"""Per-client detector state: in this process by default, in Redis when configured.

With Redis, several API processes or replicas share one state per client, so an attacker who
spreads queries over them is seen as one stream; and a restarted server keeps what it knew.
Each client's record is read, updated and written under a per-client lock.

A record maps field names to a detector's :data:`State` (numpy arrays) or to bytes (the
client's summary). The in-process store keeps states as they are, never serialising them;
Redis stores them as ``.npz`` bytes (arrays only: nothing is unpickled).
"""

from __future__ import annotations

import io
import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import redis
from redis.exceptions import LockError, RedisError
from redis.typing import EncodableT, FieldT

from mlaas.redisclient import connect_redis

State = dict[str, np.ndarray]
Record = dict[str, "State | bytes"]


def encode_state(state: State) -> bytes:
    buffer = io.BytesIO()
    # numpy's stub lets mypy match the arrays against savez's own allow_pickle flag; no
    # state has a field of that name, so every one is saved as an array.
    np.savez(buffer, **state)  # type: ignore[arg-type]
    return buffer.getvalue()


def decode_state(data: bytes) -> State:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


class StateStore(ABC):
    in_process: bool = False
    """True when reading and writing involve no I/O (callers may skip a thread hop)."""

    @abstractmethod
    @contextmanager
    def lock(self, client: str) -> Iterator[None]: ...

    @abstractmethod
    def load(self, client: str) -> Record: ...

    @abstractmethod
    def save(self, client: str, fields: Record) -> None: ...

    @abstractmethod
    def field(self, client: str, name: str) -> State | bytes | None:
        """One field of a client's record (the summary, say) without reading the rest."""

    @abstractmethod
    def clients(self) -> list[str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class MemoryStore(StateStore):
    in_process = True

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    @contextmanager
    def lock(self, client: str) -> Iterator[None]:
        with self._guard:
            client_lock = self._locks[client]
        with client_lock:
            yield

    def load(self, client: str) -> Record:
        return dict(self._records.get(client, {}))

    def save(self, client: str, fields: Record) -> None:
        self._records.setdefault(client, {}).update(fields)

    def field(self, client: str, name: str) -> State | bytes | None:
        return self._records.get(client, {}).get(name)

    def clients(self) -> list[str]:
        return sorted(self._records)


def is_outage(exc: RedisError) -> bool:
    """Whether ``exc`` means Redis cannot be reached (the only case a deployment may choose to
    answer without it): a connection error or a timeout.

    Anything else Redis or redis-py raises (a lock not had in time, a value or a script Redis
    refuses, a full Redis, a malformed reply) is not an outage: a client can provoke some of
    those, and none of them may switch its detection off.
    """
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError) and not isinstance(
        exc, LockError
    )


def _binary(value: bytes | str) -> bytes:
    """A Redis reply as the bytes it is: states are binary, so a client that decodes replies
    to text (``decode_responses=True``) would corrupt them, and is refused."""
    if isinstance(value, str):
        raise TypeError("RedisStore needs a Redis client without decode_responses")
    return value


class RedisStore(StateStore):
    """One hash per client (a field per detector, plus the client's summary).

    ``lock_wait_s`` bounds how long a request waits for a record another process holds (then
    :class:`redis.exceptions.LockError`, which callers refuse: a request must not hang, nor be
    answered unobserved); ``lock_lease_s`` is how long a lock outlives a process that died
    holding it. The lease must outlast the longest update (a request's batch through every
    detector, well under a second here), else the update fails when it lets go.
    """

    def __init__(
        self,
        client: redis.Redis | str,
        prefix: str = "mlaas",
        lock_wait_s: float = 3.0,
        lock_lease_s: float = 10.0,
    ) -> None:
        self._redis = connect_redis(client) if isinstance(client, str) else client
        self._prefix = prefix
        self._lock_wait_s = lock_wait_s
        self._lock_lease_s = lock_lease_s

    def _key(self, client: str) -> str:
        return f"{self._prefix}:client:{client}"

    def lock_name(self, client: str) -> str:
        """The Redis key of ``client``'s lock (for tests and operators)."""
        return f"{self._prefix}:lock:{client}"

    @contextmanager
    def lock(self, client: str) -> Iterator[None]:
        with self._redis.lock(
            self.lock_name(client),
            timeout=self._lock_lease_s,
            blocking_timeout=self._lock_wait_s,
        ):
            yield

    def load(self, client: str) -> Record:
        record: Record = {}
        for key, value in self._redis.hgetall(self._key(client)).items():
            name, data = _binary(key).decode(), _binary(value)
            record[name] = data if name.startswith("_") else decode_state(data)
        return record

    def save(self, client: str, fields: Record) -> None:
        encoded: dict[FieldT, EncodableT] = {
            name: value if isinstance(value, bytes) else encode_state(value)
            for name, value in fields.items()
        }
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(client), mapping=encoded)
            pipe.sadd(f"{self._prefix}:clients", client)
            pipe.execute()

    def field(self, client: str, name: str) -> State | bytes | None:
        value = self._redis.hget(self._key(client), name)
        if value is None:
            return None
        data = _binary(value)
        return data if name.startswith("_") else decode_state(data)

    def clients(self) -> list[str]:
        members = self._redis.smembers(f"{self._prefix}:clients")
        return sorted(_binary(c).decode() for c in members)

    def close(self) -> None:
        self._redis.close()
