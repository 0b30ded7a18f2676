"""The Redis client every part of the testbed that shares state through Redis connects with."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect_redis(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client that fails fast when Redis is away and reconnects by itself when it returns.

    The timeouts turn an outage into a prompt error for the caller to handle (a 503, or an
    answer without Redis where the deployment fails open) instead of a hung request; one
    quick retry hides a connection that Redis closed while it sat in the pool.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
