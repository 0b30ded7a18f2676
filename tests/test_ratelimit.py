"""Rate limits and daily quotas, in memory and in a real Redis, with injected time."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis

from server.ratelimit import (
    Decision,
    LimitSpec,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)
from tests.helpers import REDIS_URL

NOON = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()  # 12 h before a UTC midnight
MIDNIGHT = datetime(2024, 5, 2, tzinfo=UTC).timestamp()

Factory = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Limiters sharing one state: the same instance in memory (one process), new instances
    on one Redis and prefix (as many processes)."""
    made: list[RateLimiter] = []
    if request.param == "memory":
        shared = MemoryRateLimiter()
        made.append(shared)
        yield lambda: shared
    else:
        prefix = request.getfixturevalue("redis_prefix")

        def factory() -> RateLimiter:
            made.append(RedisRateLimiter(REDIS_URL, prefix=prefix))
            return made[-1]

        yield factory
    for limiter in made:
        limiter.close()


def take(limiter: RateLimiter, spec: LimitSpec, now: float, cost: int = 1, client: str = "c"):
    return limiter.acquire(client, cost, spec, now=now)


def test_burst_then_refusal_with_retry_after(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=2, burst=4)
    for _ in range(4):
        assert take(limiter, spec, NOON) == Decision(True, None, 0.0, None, None)
    refused = take(limiter, spec, NOON)
    assert (refused.allowed, refused.reason) == (False, "rate")
    assert refused.retry_after_s == pytest.approx(0.5)
    assert take(limiter, spec, NOON + 0.4).retry_after_s == pytest.approx(0.1)
    assert take(limiter, spec, NOON + 0.5).allowed  # exactly when it said
    assert take(limiter, spec, NOON + 0.5).retry_after_s == pytest.approx(0.5)


def test_the_bucket_refills_up_to_its_burst(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=2, burst=4)
    assert take(limiter, spec, NOON, cost=4).allowed
    assert not take(limiter, spec, NOON + 1.9, cost=4).allowed
    assert take(limiter, spec, NOON + 2, cost=4).allowed
    assert take(limiter, spec, NOON + 1000, cost=4).allowed  # a long pause stores no more
    assert take(limiter, spec, NOON + 1000).retry_after_s == pytest.approx(0.5)


def test_default_burst_is_the_rate_rounded_up(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=2.5)
    assert spec.capacity == 3
    assert take(limiter, spec, NOON, cost=3).allowed
    assert not take(limiter, spec, NOON).allowed
    assert LimitSpec(rate=0.1).capacity == 1


def test_a_request_costs_its_images(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=5)
    assert take(limiter, spec, NOON, cost=3).allowed
    refused = take(limiter, spec, NOON, cost=3)
    assert (refused.reason, refused.retry_after_s) == ("rate", pytest.approx(1.0))
    assert take(limiter, spec, NOON, cost=2).allowed
    assert take(limiter, spec, NOON + 3, cost=3).allowed


def test_a_request_above_the_burst_never_passes(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=5)
    for now in (NOON, NOON + 10_000):
        refused = take(limiter, spec, now, cost=6)
        assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "rate", math.inf)
    assert take(limiter, spec, NOON + 10_000, cost=5).allowed  # and it took nothing


def test_the_daily_quota_resets_at_utc_midnight(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(daily_quota=10)
    assert take(limiter, spec, NOON, cost=6) == Decision(True, None, 0.0, 10, 4)
    assert take(limiter, spec, NOON + 60, cost=4) == Decision(True, None, 0.0, 10, 0)
    refused = take(limiter, spec, NOON + 60)
    assert refused == Decision(False, "quota", 12 * 3600 - 60, 10, 0)
    assert take(limiter, spec, MIDNIGHT - 0.25).retry_after_s == pytest.approx(0.25)
    assert take(limiter, spec, MIDNIGHT) == Decision(True, None, 0.0, 10, 9)
    assert take(limiter, spec, MIDNIGHT + 1, cost=9).remaining == 0


def test_a_request_above_the_quota_never_passes(make: Factory) -> None:
    limiter = make()
    refused = take(limiter, LimitSpec(daily_quota=10), NOON, cost=11)
    assert refused == Decision(False, "quota", math.inf, 10, 10)
    nothing = take(limiter, LimitSpec(daily_quota=0), NOON)
    assert (nothing.reason, nothing.retry_after_s, nothing.remaining) == ("quota", math.inf, 0)


def test_the_longer_wait_is_the_reason(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=2, daily_quota=2)
    assert take(limiter, spec, MIDNIGHT - 100, cost=2).allowed
    refused = take(limiter, spec, MIDNIGHT - 100)  # bucket empty for 1 s, quota for 100 s
    assert (refused.reason, refused.retry_after_s) == ("quota", pytest.approx(100))
    assert take(limiter, spec, MIDNIGHT, cost=2).allowed
    refused = take(limiter, spec, MIDNIGHT)  # the bucket is the nearer, but the quota rules
    assert (refused.reason, refused.retry_after_s) == ("quota", pytest.approx(86400))
    limiter2, slow = make(), LimitSpec(rate=1 / 3600, burst=1, daily_quota=5)
    assert take(limiter2, slow, MIDNIGHT - 60, client="d").allowed
    refused = take(limiter2, slow, MIDNIGHT - 60, client="d")  # quota fine, bucket 1 h
    assert (refused.reason, refused.retry_after_s) == ("rate", pytest.approx(3600))


def test_a_refused_request_consumes_nothing(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=5, daily_quota=7)
    assert take(limiter, spec, NOON, cost=5).remaining == 2
    by_rate = take(limiter, spec, NOON, cost=2)
    assert (by_rate.reason, by_rate.remaining) == ("rate", 2)
    assert take(limiter, spec, NOON + 2, cost=2).remaining == 0  # the quota was untouched
    by_quota = take(limiter, spec, NOON + 3)  # one token in the bucket, none in the quota
    assert (by_quota.reason, by_quota.remaining) == ("quota", 0)
    rate_only = LimitSpec(rate=1, burst=5)
    assert take(limiter, rate_only, NOON + 3).allowed  # the token was untouched
    assert not take(limiter, rate_only, NOON + 3).allowed


def test_refund_gives_back_rate_and_quota(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=3, daily_quota=5)
    assert take(limiter, spec, NOON, cost=3).remaining == 2
    limiter.refund("c", 3, spec, now=NOON + 0.5)
    assert take(limiter, spec, NOON + 0.5, cost=3).remaining == 2
    assert not take(limiter, spec, NOON + 0.5).allowed
    limiter.refund("c", 100, spec, now=NOON + 1)  # more than was taken: a full bucket, no more
    assert take(limiter, spec, NOON + 1, cost=3).allowed
    assert not take(limiter, spec, NOON + 1).allowed


def test_a_refund_after_midnight_gives_nothing_back_from_today(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(daily_quota=5)
    assert take(limiter, spec, MIDNIGHT - 1, cost=5).allowed
    limiter.refund("c", 5, spec, now=MIDNIGHT + 1)
    assert take(limiter, spec, MIDNIGHT + 1).remaining == 4


def test_clients_are_limited_apart(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=1, burst=2, daily_quota=3)
    assert take(limiter, spec, NOON, cost=2, client="alice").allowed
    assert not take(limiter, spec, NOON, client="alice").allowed
    assert take(limiter, spec, NOON, cost=2, client="bob") == Decision(True, None, 0.0, 3, 1)


def test_no_limits_allow_everything(make: Factory) -> None:
    limiter = make()
    for _ in range(3):
        assert take(limiter, LimitSpec(), NOON, cost=10**6) == Decision(True, None, 0.0, None, None)
    limiter.refund("c", 5, LimitSpec())


def test_bad_arguments_are_refused(make: Factory) -> None:
    with pytest.raises(ValueError):
        make().acquire("c", -1, LimitSpec(rate=1))
    for bad in ({"rate": 0}, {"rate": math.inf}, {"rate": 1, "burst": 0}, {"daily_quota": -1}):
        with pytest.raises(ValueError):
            LimitSpec(**bad)


def test_real_time_is_used_without_now(make: Factory) -> None:
    limiter, spec = make(), LimitSpec(rate=0.001, burst=2, daily_quota=100)
    assert limiter.acquire("c", 2, spec).allowed
    refused = limiter.acquire("c", 1, spec)
    assert refused.reason == "rate"
    assert 990 < refused.retry_after_s <= 1000
    assert refused.remaining == 98


def _hammer(make: Factory, spec: LimitSpec, threads: int = 8, tries: int = 60) -> int:
    allowed = [0] * threads
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        limiter = make()  # one per thread: in Redis, as many processes would
        start.wait()
        for _ in range(tries):
            if limiter.acquire("crowd", 1, spec, now=NOON).allowed:
                allowed[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(allowed)


def test_concurrent_acquires_never_pass_more_than_the_quota(make: Factory) -> None:
    assert _hammer(make, LimitSpec(daily_quota=100)) == 100


def test_concurrent_acquires_never_pass_more_than_the_burst(make: Factory) -> None:
    assert _hammer(make, LimitSpec(rate=0.01, burst=37)) == 37
    assert _hammer(make, LimitSpec(rate=0.01, burst=37, daily_quota=40)) == 0  # bucket empty
    assert take(make(), LimitSpec(daily_quota=40), NOON, client="crowd").remaining == 39


def test_the_memory_limiter_forgets_idle_clients() -> None:
    limiter, spec = MemoryRateLimiter(), LimitSpec(rate=1, burst=5, daily_quota=10)
    take(limiter, spec, NOON, client="idle")
    take(limiter, LimitSpec(rate=1), NOON, client="brief")
    take(limiter, spec, MIDNIGHT + 120, client="active")
    assert set(limiter._states) == {"active"}


def test_redis_instances_share_limits(redis_prefix: str) -> None:
    first = RedisRateLimiter(REDIS_URL, prefix=redis_prefix)
    second = RedisRateLimiter(redis.Redis.from_url(REDIS_URL), prefix=redis_prefix)
    spec = LimitSpec(rate=1, burst=4, daily_quota=6)
    assert first.acquire("c", 3, spec, now=NOON).remaining == 3
    refused = second.acquire("c", 2, spec, now=NOON)
    assert (refused.reason, refused.retry_after_s, refused.remaining) == ("rate", 1.0, 3)
    first.close()
    assert second.acquire("c", 3, spec, now=NOON + 2).remaining == 0  # a process restarted
    other = RedisRateLimiter(REDIS_URL, prefix=f"{redis_prefix}:other")
    assert other.acquire("c", 4, spec, now=NOON).allowed  # another deployment's prefix
    other.close()
    second.close()


def test_redis_keys_expire_when_they_no_longer_matter(redis_prefix: str) -> None:
    limiter = RedisRateLimiter(REDIS_URL, prefix=redis_prefix)
    admin = redis.Redis.from_url(REDIS_URL)
    key = f"{redis_prefix}:ratelimit:c"
    limiter.acquire("c", 5, LimitSpec(rate=1, burst=5), now=NOON)
    assert 4000 < admin.pttl(key) <= 5001  # until the bucket is full again
    limiter.refund("c", 5, LimitSpec(rate=1, burst=5), now=NOON)
    assert not admin.exists(key)  # a full bucket is no state at all
    limiter.acquire("c", 1, LimitSpec(rate=1, burst=5, daily_quota=9), now=MIDNIGHT - 30)
    assert 29_000 < admin.pttl(key) <= 30_001  # until midnight, when the count resets
    assert list(admin.scan_iter(f"{redis_prefix}:*")) == [key.encode()]
    limiter.close()
    admin.close()


def test_redis_limiter_survives_a_killed_connection(redis_prefix: str) -> None:
    name = f"rl-{uuid.uuid4().hex[:8]}"
    limiter = RedisRateLimiter(f"{REDIS_URL}?client_name={name}", prefix=redis_prefix)
    spec = LimitSpec(rate=1, burst=3)
    assert limiter.acquire("c", 2, spec, now=NOON).allowed
    admin = redis.Redis.from_url(REDIS_URL)
    ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
    assert ids
    for client_id in ids:
        admin.client_kill_filter(_id=client_id)
    assert limiter.acquire("c", 1, spec, now=NOON).allowed  # reconnected, state kept
    assert not limiter.acquire("c", 1, spec, now=NOON).allowed
    admin.close()
    limiter.close()


class TcpProxy:
    """Forwards a loopback port to Redis; ``down()`` drops it and every connection."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()

    def up(self) -> None:
        self._stop.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.05)
        self._sockets.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.upstream)
            self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self._stop.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._sockets.clear()


def test_redis_errors_propagate_and_the_limiter_recovers(redis_prefix: str) -> None:
    target = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    proxy = TcpProxy(target["host"], target["port"])
    proxy.up()
    db = target.get("db", 0)
    limiter = RedisRateLimiter(
        f"redis://127.0.0.1:{proxy.port}/{db}", prefix=redis_prefix, timeout_s=1
    )
    spec = LimitSpec(rate=1, burst=3, daily_quota=10)
    try:
        assert limiter.acquire("c", 2, spec, now=NOON).allowed
        proxy.down()
        with pytest.raises(redis.RedisError):
            limiter.acquire("c", 1, spec, now=NOON)
        with pytest.raises(redis.RedisError):
            limiter.refund("c", 1, spec, now=NOON)
        proxy.up()  # Redis is back; the same limiter works, with what it had counted
        assert limiter.acquire("c", 1, spec, now=NOON).remaining == 7
        assert limiter.acquire("c", 1, spec, now=NOON).reason == "rate"
    finally:
        limiter.close()
        proxy.down()
