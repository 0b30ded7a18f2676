"""The adversary's HTTP client: a hard budget, retries, several keys, and a resumable cache.

Every attack queries the victim through :class:`ExtractionClient` and nothing else. It

* never lets the provider answer more images than the budget, across restarts included;
* retries 429, 5xx and connection errors with exponential backoff and full jitter, honouring
  ``Retry-After``, and fails at once, clearly, on a refused key (401/403);
* journals each batch in the run directory's SQLite cache before sending it, under an
  ``Idempotency-Key``: a batch whose answer was lost (a crash, a dropped connection) is resent
  with the same key, and the provider replays its answer instead of answering (and billing)
  twice; answered images are never sent again;
* spreads batches over several API keys, bounds concurrency, and can throttle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from mlaas.apiclient import ApiCallError, raise_for_error
from mlaas.wire import (
    IMAGE_COUNT_HEADER,
    NPY_MEDIA_TYPE,
    ModelInfo,
    Prediction,
    PredictResponse,
    encode_npy,
)


class BudgetExhausted(RuntimeError):
    pass


class KeyRefused(RuntimeError):
    """The provider refused an API key (401/403): retrying cannot help."""


class RateLimited(RuntimeError):
    """The provider asked for a wait longer than the client will sit through (a daily quota
    used up, say). The journal keeps the run: rerun it after the wait."""


@dataclass
class Answers:
    """What the API revealed, as the attacker trains on it."""

    probs: np.ndarray  # float32 (N, K): reconstructed probability vectors (one-hot if hard)
    labels: np.ndarray  # int64 (N,): the API's top-1 labels
    hard: bool  # True when the API revealed labels only

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> np.ndarray:
        """Training targets: soft vectors when the API gave scores, else hard labels."""
        return self.labels if self.hard else self.probs


def prediction_vector(prediction: Prediction, num_classes: int) -> np.ndarray:
    """A full probability vector from whatever the granularity revealed.

    Top-k answers leave ``1 - sum(revealed)`` unassigned: it is spread evenly over the hidden
    classes, capped at the smallest revealed probability (a hidden class cannot outrank a
    revealed one), then the vector is renormalised. Rounded vectors are renormalised. A label
    alone, or scores that rounded to nothing, give a one-hot vector.
    """
    vector = np.zeros(num_classes, dtype=np.float64)
    if prediction.scores:
        revealed = np.array([s.index for s in prediction.scores])
        values = np.clip([s.prob for s in prediction.scores], 0.0, 1.0)
        vector[revealed] = values
        hidden = num_classes - len(revealed)
        if hidden > 0:
            missing = max(0.0, 1.0 - float(values.sum()))
            share = min(missing / hidden, float(values.min()))
            mask = np.ones(num_classes, dtype=bool)
            mask[revealed] = False
            vector[mask] = share
    total = vector.sum()
    if total <= 0.0:
        vector[:] = 0.0
        vector[prediction.label] = 1.0
        return vector.astype(np.float32)
    return (vector / total).astype(np.float32)


def image_digest(image: np.ndarray) -> str:
    image = np.ascontiguousarray(image)
    header = f"{image.shape}|{image.dtype}|".encode()
    return hashlib.sha256(header + image.tobytes()).hexdigest()


class AnswerCache:
    """SQLite in the run directory: answered images, and batches sent but not yet answered."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS answers (
                digest TEXT PRIMARY KEY, label INTEGER NOT NULL, scores TEXT,
                granularity TEXT NOT NULL, answered_at REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS inflight (
                idempotency_key TEXT PRIMARY KEY, digests TEXT NOT NULL, sent_at REAL NOT NULL
            );
            """
        )

    def close(self) -> None:
        self._db.close()

    def answered_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def granularities(self) -> list[str]:
        """The granularities the API answered with (several if it changed, or per key)."""
        rows = self._db.execute("SELECT DISTINCT granularity FROM answers ORDER BY 1")
        return [row[0] for row in rows]

    def inflight(self) -> dict[str, list[str]]:
        rows = self._db.execute("SELECT idempotency_key, digests FROM inflight").fetchall()
        return {key: json.loads(digests) for key, digests in rows}

    def inflight_count(self) -> int:
        return sum(len(d) for d in self.inflight().values())

    def lookup(self, digests: Sequence[str]) -> dict[str, Prediction]:
        found: dict[str, Prediction] = {}
        unique = list(dict.fromkeys(digests))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for digest, label, scores, _ in self._db.execute(
                f"SELECT digest, label, scores, granularity FROM answers WHERE digest IN ({marks})",
                chunk,
            ):
                found[digest] = Prediction(
                    query_id="",
                    label=label,
                    label_name="",
                    scores=json.loads(scores) if scores else None,
                )
        return found

    def record_sent(self, key: str, digests: Sequence[str]) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO inflight VALUES (?, ?, ?)",
                (key, json.dumps(list(digests)), time.time()),
            )

    def record_answer(self, key: str, digests: Sequence[str], response: PredictResponse) -> None:
        """Store a batch's answers and close its journal entry, in one transaction."""
        now = time.time()
        rows = [
            (
                digest,
                p.label,
                json.dumps([s.model_dump() for s in p.scores]) if p.scores else None,
                response.granularity,
                now,
            )
            for digest, p in zip(digests, response.predictions, strict=True)
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", rows)
            self._db.execute("DELETE FROM inflight WHERE idempotency_key = ?", (key,))


class ExtractionClient:
    def __init__(
        self,
        url: str,
        keys: str | Sequence[str],
        *,
        budget: int | None = None,
        cache_path: Path | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_wait_s: float = 120.0,
        throttle_qps: float | None = None,
        timeout_s: float = 60.0,
        progress: bool = True,
        console: Console | None = None,
        seed: int = 0,
    ) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        if not self.keys:
            raise ValueError("at least one API key is needed")
        self.url = url.rstrip("/")
        self.budget = budget
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_wait_s = max_wait_s
        self.throttle_qps = throttle_qps
        self.timeout_s = timeout_s
        self.cache = AnswerCache(cache_path)
        self._rng = random.Random(seed)
        self._next_key = 0
        self._last_send = 0.0
        self._info: ModelInfo | None = None
        # Batches journalled by an earlier, interrupted run: resent under the same key when
        # the attack asks for their images again (a seeded attack does).
        self._resends: dict[str, list[str]] = self.cache.inflight()
        self.retries = 0
        self.sent_images = 0
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]queries"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.0f}/s · {task.fields[left]} left"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )

    # ------------------------------------------------------------------ bookkeeping
    @property
    def spent(self) -> int:
        """Images the provider has answered, or may have (sent, answer not yet stored)."""
        return self.cache.answered_count() + self.cache.inflight_count()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.spent)

    def model_info(self) -> ModelInfo:
        if self._info is None:

            async def fetch() -> httpx.Response:
                async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s) as http:
                    return await self._request(http, "GET", "/v1/model", self.keys[0])

            self._info = ModelInfo.model_validate_json(asyncio.run(fetch()).content)
        return self._info

    # ------------------------------------------------------------------ querying
    def query(self, images: np.ndarray) -> Answers:
        """Answers for a uint8 batch (N, H, W[, C]): cached ones free, the rest over HTTP.

        Raises :class:`BudgetExhausted` before sending anything if the new images do not fit.
        """
        images = np.asarray(images)
        num_classes = len(self.model_info().classes)
        digests = [image_digest(image) for image in images]
        known = self.cache.lookup(digests)
        unique_missing = list(dict.fromkeys(d for d in digests if d not in known))
        journalled = {d for batch in self._resends.values() for d in batch}
        new = sum(1 for d in unique_missing if d not in journalled)  # resends cost nothing
        remaining = self.remaining
        if remaining is not None and new > remaining:
            raise BudgetExhausted(
                f"{new} new queries asked, {remaining} left of a budget of {self.budget}"
            )
        if unique_missing:
            first = {d: i for i, d in reversed(list(enumerate(digests)))}
            to_send = [(d, images[first[d]]) for d in unique_missing]
            self._send_all(to_send)
            known = self.cache.lookup(digests)
        predictions = [known[d] for d in digests]
        hard = all(p.scores is None for p in predictions)
        return Answers(
            probs=np.stack([prediction_vector(p, num_classes) for p in predictions])
            if predictions
            else np.zeros((0, num_classes), np.float32),
            labels=np.array([p.label for p in predictions], dtype=np.int64),
            hard=hard,
        )

    def _send_all(self, items: list[tuple[str, np.ndarray]]) -> None:
        by_digest = dict(items)
        batches: list[tuple[str, list[str]]] = []
        # First, journalled batches whose images we now have: same key, same content.
        for key, digests in list(self._resends.items()):
            if all(d in by_digest for d in digests):
                batches.append((key, digests))
                for d in digests:
                    by_digest.pop(d)
                del self._resends[key]
        fresh = list(by_digest)
        for start in range(0, len(fresh), self.batch_size):
            batches.append((uuid.uuid4().hex, fresh[start : start + self.batch_size]))
        images = dict(items)
        asyncio.run(
            self._send_batches([(k, d, np.stack([images[x] for x in d])) for k, d in batches])
        )

    async def _send_batches(self, batches: list[tuple[str, list[str], np.ndarray]]) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        semaphore = asyncio.Semaphore(self.concurrency)
        self._start_progress()
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits
        ) as http:

            async def one(key: str, digests: list[str], batch: np.ndarray) -> None:
                async with semaphore:
                    self.cache.record_sent(key, digests)
                    response = await self._post(http, key, batch)
                    self.cache.record_answer(key, digests, response)
                    self.sent_images += len(digests)
                    self._advance(len(digests))

            tasks = [asyncio.create_task(one(*b)) for b in batches]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _post(self, http: httpx.AsyncClient, key: str, batch: np.ndarray) -> PredictResponse:
        api_key = self.keys[self._next_key % len(self.keys)]
        self._next_key += 1
        response = await self._request(
            http,
            "POST",
            "/v1/predict",
            api_key,
            content=encode_npy(batch),
            headers={
                "Content-Type": NPY_MEDIA_TYPE,
                "Idempotency-Key": key,
                IMAGE_COUNT_HEADER: str(len(batch)),
            },
            images=len(batch),
        )
        return PredictResponse.model_validate_json(response.content)

    async def _request(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        api_key: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        images: int = 0,
    ) -> httpx.Response:
        """One API call with retries: 429, 5xx and transport errors are retried."""
        attempt = 0
        while True:
            await self._throttle(images)
            delay: float | None = None
            try:
                response = await http.request(
                    method,
                    path,
                    content=content,
                    headers={"Authorization": f"Bearer {api_key}", **(headers or {})},
                )
                raise_for_error(response)
                return response
            except httpx.TransportError as exc:
                failure: Exception = exc
            except ApiCallError as exc:
                if exc.status in (401, 403):
                    raise KeyRefused(
                        f"the API refused key {api_key[:10]}… ({exc.status} {exc.code}): "
                        f"{exc.message}"
                    ) from exc
                if exc.status != 429 and exc.status < 500:
                    raise
                failure, delay = exc, exc.retry_after
                if delay is not None and delay > self.max_wait_s:
                    raise RateLimited(
                        f"the API asks this client to wait {delay:.0f} s ({exc.message}); "
                        "rerun the attack after that: it resumes where it stopped"
                    ) from exc
            attempt += 1
            self.retries += 1
            if attempt > self.max_retries:
                raise RuntimeError(
                    f"{method} {path}: giving up after {self.max_retries} retries: {failure}"
                ) from failure
            if delay is None:  # full jitter: spread retrying clients apart
                delay = self._rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))
            await asyncio.sleep(delay)

    async def _throttle(self, images: int) -> None:
        if not self.throttle_qps:
            return
        gap = images / self.throttle_qps
        wait = self._last_send + gap - time.monotonic()
        self._last_send = max(time.monotonic(), self._last_send + gap)
        if wait > 0:
            await asyncio.sleep(wait)

    # ------------------------------------------------------------------ progress
    def _start_progress(self) -> None:
        """One live bar for the client's lifetime (stopped by :meth:`close`)."""
        if self._progress is None or self._task is not None:
            return
        self._started = time.monotonic()
        self._task = self._progress.add_task(
            "queries", total=self.budget, completed=self.spent, rate=0.0, left="∞"
        )
        self._progress.start()

    def _advance(self, count: int) -> None:
        if self._progress is None or self._task is None:
            return
        elapsed = max(time.monotonic() - self._started, 1e-9)
        left = "∞" if self.budget is None else str(self.remaining)
        self._progress.update(
            self._task, completed=self.spent, rate=self.sent_images / elapsed, left=left
        )

    def close(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.stop()
        self.cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
