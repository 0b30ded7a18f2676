"""The victim's forward pass and the micro-batcher that feeds it.

One forward pass yields logits, probabilities and penultimate features together, because the
answer needs the first two and the detectors the last: the model never runs twice per query.

Concurrent requests share forward passes: the batcher waits at most ``max_wait_s`` after the
first pending request for others to join, up to ``max_batch`` images, and while a pass runs,
newly arriving requests queue up for the next one. Passes run on one dedicated thread, so the
event loop keeps accepting and decoding requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class MicroBatcher:
    def __init__(
        self,
        victim: Victim,
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._victim = victim
        self._on_batch = on_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.images = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the model is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> ForwardOutput:
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        future: asyncio.Future[ForwardOutput] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(images, future))
        return await future

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """Gather jobs after ``first`` until the batch is full or the wait is over."""
        jobs, size = [first], len(first.images)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait_s
        while size < self._max_batch:
            remaining = deadline - loop.time()
            try:
                if remaining > 0:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    job = self._queue.get_nowait()
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(job.images) > self._max_batch:
                return jobs, job  # starts the next batch; requests are never split
            jobs.append(job)
            size += len(job.images)
        return jobs, None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            jobs, carry = await self._collect(first)
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
