"""The victim's forward pass and the micro-batcher that feeds it.

One forward pass yields logits, probabilities and penultimate features together, because the
answer needs the first two and the detectors the last: the model never runs twice per query.

Concurrent requests share forward passes: the batcher waits at most ``max_wait_s`` after the
first pending request for others to join, up to ``max_batch`` images, and while a pass runs,
newly arriving requests queue up for the next one, in turn across clients. Passes run on
one dedicated thread, so the event loop keeps accepting and decoding requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlaas.images import InputShape, to_tensor
from mlaas.modelstore import load_model
from mlaas.training import resolve_device


@dataclass
class ForwardOutput:
    logits: np.ndarray  # float32 (N, K)
    probs: np.ndarray  # float32 (N, K)
    features: np.ndarray  # float32 (N, D)

    def __len__(self) -> int:
        return len(self.probs)

    def slice(self, start: int, stop: int) -> ForwardOutput:
        return ForwardOutput(
            self.logits[start:stop], self.probs[start:stop], self.features[start:stop]
        )


class Victim:
    """The served model, loaded from a directory that ``mlaas victim train`` wrote."""

    def __init__(self, directory: Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model, self.card = load_model(directory, device=self.device)
        self.model.eval()

    @property
    def shape(self) -> InputShape:
        return self.card.shape

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def forward(self, images: np.ndarray) -> ForwardOutput:
        """Run uint8 (N, H, W, C) images, already at the model's shape, through the model."""
        with torch.inference_mode():
            batch = to_tensor(images, self.device)
            logits, features = self.model.forward_with_features(batch)
            probs = torch.softmax(logits.float(), dim=1)
            return ForwardOutput(
                logits.float().cpu().numpy(),
                probs.cpu().numpy(),
                features.float().flatten(1).cpu().numpy(),
            )


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future[ForwardOutput]


class QueueFull(Exception):
    """The model's queue holds as many images as it may (or as the client's share allows)."""


class MicroBatcher:
    """Forward passes shared by concurrent requests, served fairly across clients.

    Waiting requests queue per client, and batches take them in turn, one request per client
    per turn: a client with many large requests waiting delays another client's request by at
    most one of its own per batch, not by all of them. The queue is bounded in images
    (``max_queued``), and no client holds more than half of it, so a burst is refused at once
    (:class:`QueueFull`, a 503 with Retry-After) instead of waiting in memory for minutes.
    """

    def __init__(
        self,
        victim: Victim,
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.002,
        max_queued: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._victim = victim
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self.max_queued = max_queued if max_queued is not None else 16 * max_batch
        self._share = max(1, self.max_queued // 2)
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()
        """Per client, in the order of their turns: the first is served next."""
        self._queued: Counter[str] = Counter()
        """Images waiting, per client."""
        self.queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.images = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._waiting:
            job = self._pop()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the model is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray, client: str = "") -> ForwardOutput:
        """The model's output for ``images``, in ``client``'s turn; :class:`QueueFull` when
        the queue, or the client's share of it, has no room for them."""
        if not self.running or self._wakeup is None:
            raise RuntimeError("the micro-batcher is not running")
        count = len(images)
        if self.queued_images + count > self.max_queued:
            raise QueueFull(f"the model's queue is full ({self.queued_images} images wait)")
        if self._queued[client] + count > self._share:
            raise QueueFull(
                f"this client has {self._queued[client]} images waiting for the model, "
                f"its share of the queue"
            )
        future: asyncio.Future[ForwardOutput] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(_Job(images, future))
        self._queued[client] += count
        self.queued_images += count
        self._wakeup.set()
        return await future

    def _peek(self) -> _Job | None:
        for jobs in self._waiting.values():
            return jobs[0]
        return None

    def _pop(self) -> _Job:
        """The next job in turn; its client goes to the back of the line."""
        client, jobs = next(iter(self._waiting.items()))
        job = jobs.popleft()
        del self._waiting[client]
        if jobs:
            self._waiting[client] = jobs
        count = len(job.images)
        self.queued_images -= count
        self._queued[client] -= count
        if self._queued[client] <= 0:
            del self._queued[client]
        return job

    async def _wait_for_work(self, timeout: float | None) -> bool:
        """Wait until a job is queued or ``timeout`` passes; whether one is."""
        assert self._wakeup is not None
        while not self._waiting:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                return False
        return True

    async def _collect(self) -> list[_Job]:
        """The next batch: jobs in turn until it is full or the wait for company is over.
        A job that would overflow the batch waits for the next one (requests are never split).
        """
        loop = asyncio.get_running_loop()
        first = self._pop()
        jobs, size = [first], len(first.images)
        deadline = loop.time() + self._max_wait_s
        while size < self._max_batch:
            job = self._peek()
            if job is None:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait_for_work(remaining):
                    break
                continue
            if size + len(job.images) > self._max_batch:
                break
            jobs.append(self._pop())
            size += len(job.images)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_work(None)
            jobs = await self._collect()
            # A client that gave up (disconnected) needs no answer.
            jobs = [j for j in jobs if not j.future.done()]
            if not jobs:
                continue
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            try:
                output = await loop.run_in_executor(self._executor, self._victim.forward, images)
            except Exception as exc:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(images)
            if self._on_batch is not None:
                self._on_batch(len(images))
            start = 0
            for job in jobs:
                stop = start + len(job.images)
                if not job.future.done():
                    job.future.set_result(output.slice(start, stop))
                start = stop
