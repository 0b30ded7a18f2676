"""Settings values that the service's modules act on, kept free of heavy imports: reading the
settings (``server.settings``) must not load the query log's SQLAlchemy or the rate limiter's
Redis client."""

from __future__ import annotations

from enum import StrEnum


class LogMode(StrEnum):
    """How an answer waits for its query-log rows (``server.querylog``'s doc)."""

    durable = "durable"
    buffered = "buffered"


MIN_RATE_LIMIT = 1e-6
"""Images per second, at least: about one image in 12 days. Slower rates have no use, and
rates near zero (5e-324 is a valid float) make a per-image interval that overflows."""
