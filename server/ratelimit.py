"""Per-client rate limits and daily quotas, counted in images (a request of n images costs n).

Why not the ``limits`` package: it checks and consumes each limit on its own (no atomic
"both or neither" over a rate limit and a quota, so a refused request could still eat into
one of them), its windows start at a client's first hit rather than at UTC midnight, it has no
token bucket / GCRA and no injectable clock. The two limits below take one Lua script.

The rate limit is GCRA (the generic cell rate algorithm, a token bucket kept as one
timestamp): ``rate`` images per second sustained, ``burst`` images at once. The daily quota
counts images per client per UTC calendar day. :meth:`RateLimiter.acquire` applies both
atomically: a refused request consumes nothing, an allowed one ``cost`` from each.

All arithmetic is in integer microseconds (exact in Python and in Lua's doubles, whose
integers are exact to 2**53), so both backends give the same decisions to the microsecond.
The Redis backend keeps one hash per client, ``{prefix}:ratelimit:{client}``, with a TTL that
ends when its state no longer matters (a full bucket and no images counted today). Without an
explicit ``now`` it reads the time from Redis ``TIME``: every API process and replica then
judges by one clock, so host clock skew can neither hand a client extra burst nor move
midnight.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import redis

from mlaas.redisclient import connect_redis
from server.options import MIN_RATE_LIMIT

_US = 1_000_000
_DAY_US = 86_400 * _US
_PRUNE_EVERY_US = 60 * _US


@dataclass(frozen=True)
class LimitSpec:
    rate: float | None = None
    """Sustained images per second; None: no rate limit."""
    burst: int | None = None
    """Bucket size in images; None: ``max(1, ceil(rate))``."""
    daily_quota: int | None = None
    """Images per UTC calendar day; None: no quota."""

    def __post_init__(self) -> None:
        if self.rate is not None and not (MIN_RATE_LIMIT <= self.rate < math.inf):
            raise ValueError(f"rate must be finite and at least {MIN_RATE_LIMIT}, not {self.rate}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")
        if self.daily_quota is not None and self.daily_quota < 0:
            raise ValueError(f"daily_quota must not be negative, not {self.daily_quota}")

    @property
    def capacity(self) -> int | None:
        """The bucket size in effect (None without a rate limit)."""
        if self.rate is None:
            return None
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))

    @property
    def unlimited(self) -> bool:
        return self.rate is None and self.daily_quota is None

    def _interval_us(self) -> int:
        """Microseconds per image; 0 without a rate limit."""
        return 0 if self.rate is None else max(1, round(_US / self.rate))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None
    """``"rate"`` or ``"quota"`` when refused, else None."""
    retry_after_s: float
    """0 when allowed; when refused, how long until the same request could pass
    (``math.inf``: never, its cost exceeds the burst or the daily quota)."""
    limit: int | None
    """The daily quota (None without one)."""
    remaining: int | None
    """What is left of today's quota after this decision (None without one)."""


Outcome = tuple[int, int, float, int]
"""What a backend decides: (allowed, reason, wait_us, remaining), as the Lua script returns it
(wait_us -1: never; remaining -1: no quota)."""

_ALLOWED_UNLIMITED = Decision(True, None, 0.0, None, None)
_REASONS = {0: None, 1: "rate", 2: "quota"}


def _decision(
    spec: LimitSpec, allowed: int, reason: int, wait_us: float, remaining: int
) -> Decision:
    return Decision(
        allowed=bool(allowed),
        reason=_REASONS[reason],
        retry_after_s=math.inf if wait_us < 0 else wait_us / _US,
        limit=spec.daily_quota,
        remaining=None if remaining < 0 else remaining,
    )


def _check_cost(cost: int) -> None:
    if cost < 0:
        raise ValueError(f"cost must not be negative, not {cost}")


class RateLimiter(ABC):
    in_process: bool = False
    """True when deciding involves no I/O (callers may skip a thread hop)."""

    def acquire(
        self, client: str, cost: int, spec: LimitSpec, now: float | None = None
    ) -> Decision:
        """Take ``cost`` images from ``client``'s rate limit and daily quota, or nothing."""
        _check_cost(cost)
        if spec.unlimited:
            return _ALLOWED_UNLIMITED
        return _decision(spec, *self._apply("acquire", client, cost, spec, now))

    def refund(self, client: str, cost: int, spec: LimitSpec, now: float | None = None) -> None:
        """Give back what an allowed but unanswered request took."""
        _check_cost(cost)
        if not spec.unlimited:
            self._apply("refund", client, cost, spec, now)

    @abstractmethod
    def _apply(
        self, op: str, client: str, cost: int, spec: LimitSpec, now: float | None
    ) -> Outcome:
        """``"acquire"`` or ``"refund"``, atomically."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class MemoryRateLimiter(RateLimiter):
    """This process's limits (each API process counts on its own); thread-safe."""

    in_process = True

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, int, int]] = {}  # client: (tat, day, used)
        self._lock = threading.Lock()
        self._next_prune = 0

    def _apply(
        self, op: str, client: str, cost: int, spec: LimitSpec, now: float | None
    ) -> Outcome:
        """The Lua script below, line for line, under a lock."""
        acquire = op == "acquire"
        now_us = round((time.time() if now is None else now) * _US)
        interval, burst = spec._interval_us(), spec.capacity or 0
        quota = -1 if spec.daily_quota is None else spec.daily_quota
        today = now_us // _DAY_US
        with self._lock:
            if now_us >= self._next_prune:
                self._prune(now_us)
            stored_tat, day, used = self._states.get(client, (0, 0, 0))
            tat = max(stored_tat, now_us)
            if day != today:
                used = 0
            if acquire:
                rate_wait: float = 0
                quota_wait: float = 0
                if interval > 0:
                    if cost > burst:
                        rate_wait = math.inf
                    else:
                        rate_wait = max(0, tat + cost * interval - burst * interval - now_us)
                if quota >= 0:
                    if cost > quota:
                        quota_wait = math.inf
                    elif used + cost > quota:
                        quota_wait = (today + 1) * _DAY_US - now_us
                if rate_wait > 0 or quota_wait > 0:
                    reason, wait = (2, quota_wait) if quota_wait >= rate_wait else (1, rate_wait)
                    return (
                        0,
                        reason,
                        -1 if wait == math.inf else wait,
                        quota - used if quota >= 0 else -1,
                    )
                tat += cost * interval
                if quota >= 0:
                    used += cost
            else:
                tat, used = tat - cost * interval, max(0, used - cost)
            if (interval > 0 and tat > now_us) or (quota >= 0 and used > 0):
                self._states[client] = (tat, today, used)
            else:
                self._states.pop(client, None)
            return 1, 0, 0, quota - used if quota >= 0 else -1

    def _prune(self, now_us: int) -> None:
        """Forget clients whose bucket is full and who used nothing today."""
        today = now_us // _DAY_US
        for client, (tat, day, used) in list(self._states.items()):
            if tat <= now_us and (day != today or used == 0):
                del self._states[client]
        self._next_prune = now_us + _PRUNE_EVERY_US

    def close(self) -> None:
        with self._lock:
            self._states.clear()


# KEYS[1]: the client's hash {tat, day, used}. ARGV: "acquire" | "refund", cost, interval (us
# per image; 0: no rate limit), burst, quota (-1: none), now (us; empty: Redis TIME).
# Returns {allowed, reason (0 none, 1 rate, 2 quota), wait (us; -1 never), remaining (-1)}.
_SCRIPT = """
local acquire = ARGV[1] == 'acquire'
local cost, interval = tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, quota = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = tonumber(ARGV[6])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local DAY = 86400000000
local today = math.floor(now / DAY)
local s = redis.call('HMGET', KEYS[1], 'tat', 'day', 'used')
local tat = math.max(tonumber(s[1]) or 0, now)
local used = 0
if tonumber(s[2]) == today then used = tonumber(s[3]) or 0 end
local function left() if quota >= 0 then return quota - used end return -1 end
if acquire then
  local rate_wait, quota_wait = 0, 0
  if interval > 0 then
    if cost > burst then rate_wait = math.huge
    else rate_wait = math.max(0, tat + cost * interval - burst * interval - now) end
  end
  if quota >= 0 then
    if cost > quota then quota_wait = math.huge
    elseif used + cost > quota then quota_wait = (today + 1) * DAY - now end
  end
  if rate_wait > 0 or quota_wait > 0 then
    local reason, wait = 1, rate_wait
    if quota_wait >= rate_wait then reason, wait = 2, quota_wait end
    if wait == math.huge then wait = -1 end
    return {0, reason, wait, left()}
  end
  tat = tat + cost * interval
  if quota >= 0 then used = used + cost end
else
  tat, used = tat - cost * interval, math.max(0, used - cost)
end
local ttl = 0
if interval > 0 and tat > now then ttl = tat - now end
if quota >= 0 and used > 0 then ttl = math.max(ttl, (today + 1) * DAY - now) end
if ttl > 0 then
  local function int(x) return string.format('%.0f', x) end
  redis.call('HSET', KEYS[1], 'tat', int(tat), 'day', int(today), 'used', int(used))
  redis.call('PEXPIRE', KEYS[1], int(math.floor(ttl / 1000) + 1))
else
  redis.call('DEL', KEYS[1])
end
return {1, 0, 0, left()}
"""


class RedisRateLimiter(RateLimiter):
    """Limits shared by every API process and replica that uses the same Redis and prefix.

    Redis errors propagate as :class:`redis.exceptions.RedisError` (the caller chooses to fail
    open or closed); redis-py reconnects, so the limiter works again once Redis is back. Its
    retries may run a script twice when a reply was lost: that errs towards counting more.
    """

    def __init__(
        self, url_or_client: str | redis.Redis, prefix: str = "mlaas", *, timeout_s: float = 2.0
    ) -> None:
        """``timeout_s`` bounds connecting and each command when given a URL (a request
        waits no longer than that, plus redis-py's retries, on an unresponsive Redis)."""
        self._owned = isinstance(url_or_client, str)
        self._redis = (
            connect_redis(url_or_client, timeout_s)
            if isinstance(url_or_client, str)
            else url_or_client
        )
        self._prefix = prefix
        self._script = self._redis.register_script(_SCRIPT)

    def key(self, client: str) -> str:
        return f"{self._prefix}:ratelimit:{client}"

    def _apply(
        self, op: str, client: str, cost: int, spec: LimitSpec, now: float | None
    ) -> Outcome:
        quota = -1 if spec.daily_quota is None else spec.daily_quota
        args: list[str | int] = [op, cost, spec._interval_us(), spec.capacity or 0, quota]
        args.append("" if now is None else str(round(now * _US)))
        allowed, reason, wait_us, remaining = self._script(keys=[self.key(client)], args=args)
        return allowed, reason, wait_us, remaining

    def close(self) -> None:
        if self._owned:
            self._redis.close()


class InFlight:
    """How many requests each key has in flight in this process, capped.

    Checked before a request's body is read, so a key cannot have more than ``limit`` bodies
    being read, decoded or answered here at once, however many connections it opens. Each
    process (and replica) counts its own: a deployment of P processes allows P x ``limit``.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, not {limit}")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def enter(self, client: str) -> bool:
        """Take a slot for ``client``; False when it has ``limit`` already. Event loop only."""
        count = self._counts.get(client, 0)
        if count >= self.limit:
            return False
        self._counts[client] = count + 1
        return True

    def leave(self, client: str) -> None:
        count = self._counts.get(client, 0) - 1
        if count > 0:
            self._counts[client] = count
        else:
            self._counts.pop(client, None)

    def __len__(self) -> int:
        """Keys with a request in flight."""
        return len(self._counts)
