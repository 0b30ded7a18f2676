"""The retrying clients: each logical request resent (same idempotency key, same body) to the
other replica, with backoff, until it is answered or its deadline passes."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from bench.chaoslib.plan import ChaosPlan
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.querylog import image_sha256

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0


@dataclass
class RequestOutcome:
    client: str
    request_key: str
    hashes: list[str]
    query_ids: list[str] | None = None
    """The answer's ids, in order; None when the request was never answered with 200."""
    refused: str | None = None
    """A non-retryable refusal (4xx other than 429), which this load should never get."""
    attempts: int = 0
    replayed: bool = False


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def _backoff(attempt: int, retry_after: float) -> float:
    jitter = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
    return max(jitter, min(retry_after, BACKOFF_CAP_S))


async def send_until_answered(
    http: httpx.AsyncClient,
    urls: list[str],
    first: int,
    key: str,
    body: bytes,
    outcome: RequestOutcome,
    statuses: Counter[str],
    deadline: float,
    hang_up_s: float | None = None,
) -> None:
    """Send one logical request, resending it (same key, same body) until it is answered.

    ``hang_up_s``: the first attempt stops waiting for its answer after that long, as a client
    whose connection drops would, usually while the replica is still computing or committing.
    """
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": NPY_MEDIA_TYPE,
        "Idempotency-Key": outcome.request_key,
    }
    while True:
        url = urls[(first + outcome.attempts) % len(urls)]  # a retry goes to the other one
        outcome.attempts += 1
        retry_after = 0.0
        timeout = http.timeout
        if hang_up_s is not None and outcome.attempts == 1:
            timeout = httpx.Timeout(timeout.read, read=hang_up_s)
        try:
            response = await http.post(
                f"{url}/v1/predict", content=body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException:
            statuses["hang-up" if timeout is not http.timeout else "timeout"] += 1
        except httpx.TransportError as exc:
            statuses[type(exc).__name__] += 1
        else:
            status = response.status_code
            if status == 200:
                statuses["200"] += 1
                outcome.query_ids = [p["query_id"] for p in response.json()["predictions"]]
                outcome.replayed = response.headers.get("idempotent-replayed") == "true"
                return
            statuses[f"{status} {_error_code(response)}"] += 1
            if status != 429 and status < 500:
                outcome.refused = f"{status} {_error_code(response)}"
                return
            try:
                retry_after = float(response.headers.get("retry-after", 0))
            except ValueError:
                retry_after = 0.0
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(_backoff(outcome.attempts, retry_after), left))


async def run_client(
    index: int,
    key: str,
    plan: ChaosPlan,
    urls: list[str],
    images: np.ndarray,
    outcomes: list[RequestOutcome],
    statuses: Counter[str],
    answered: Callable[[], None],
) -> None:
    name = f"chaos-{index}"
    rng = np.random.default_rng([plan.seed, index])
    timeout = httpx.Timeout(plan.attempt_timeout_s, connect=2.0)
    think_s = plan.duration_s / plan.requests
    async with httpx.AsyncClient(timeout=timeout) as http:
        for n in range(plan.requests):
            count = int(rng.integers(1, plan.max_images + 1))
            batch = images[rng.choice(len(images), size=count, replace=False)]
            outcome = RequestOutcome(
                client=name,
                request_key=f"{name}-{n}-{uuid.uuid4().hex}",
                hashes=[image_sha256(image) for image in batch],
            )
            outcomes.append(outcome)
            deadline = time.monotonic() + plan.deadline_s
            hang_up = rng.random() < plan.hang_up_rate
            await send_until_answered(
                http,
                urls,
                index + n,
                key,
                encode_npy(batch),
                outcome,
                statuses,
                deadline,
                plan.hang_up_s * rng.uniform(0.05, 1.0) if hang_up else None,
            )
            if outcome.query_ids is not None:
                answered()
            # Paced, so that the load lasts through the whole chaos schedule: at full speed
            # it would be over before a replica has restarted once.
            await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
