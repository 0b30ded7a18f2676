"""What a chaos run does: how many clients send what, for how long, and which faults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EVENTS = (
    "kill-a", "kill-b", "stall-a", "stall-b",
    "redis", "postgres-fast", "postgres-immediate", "stall-postgres",
)  # fmt: skip
DEFAULT_EVENTS = ("kill-a", "redis", "postgres-fast", "postgres-immediate", "stall-postgres")


@dataclass
class ChaosPlan:
    clients: int = 64
    requests: int = 30
    max_images: int = 4
    events: tuple[str, ...] = DEFAULT_EVENTS
    duration_s: float = 90.0
    """How long the load lasts, chaos aside: each client waits about this over its requests."""
    min_gap_s: float = 3.0
    attempt_timeout_s: float = 10.0
    stall_s: float = 12.0
    """How long ``stall-postgres`` freezes the database: longer than an attempt's timeout, so
    that clients give up on a hung replica and resend to the other one."""
    hang_up_rate: float = 0.05
    hang_up_s: float = 0.02
    """A ``hang_up_rate`` share of requests stop waiting for their first answer after up to
    ``hang_up_s`` (drawn at random): before the replica has read the body (then it drops the
    request) or after (then it answers and logs it, and the answer is lost on the way, which
    only the retry's idempotency key can put right: a replay, or a race between replicas)."""
    deadline_s: float = 90.0
    """Per logical request: past it, the request is given up as unfinished."""
    max_seconds: float = 600.0
    """The whole load phase: past it, whatever is still unanswered is unfinished."""
    victim: Path | None = None
    """None: a random-init cnn-small (answers need not be right, only logged once)."""
    detectors: str = "prada"
    rate_limit: float = 1000.0
    """Images/s per key: high enough never to refuse, set so the limiter runs in Redis."""
    seed: int = 0
    log_dir: Path | None = None
    progress: bool = True
