"""One HTTP load phase against the server: simulated clients, the measured window, the CPU
each side used, and the query log's catch-up afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import machine_cpu_s, process_cpu_s
from bench.servelib.plan import ADMIN_TOKEN
from mlaas.wire import NPY_MEDIA_TYPE


@dataclass
class CpuSnapshot:
    wall: float
    server: float
    client: float
    machine: float
    steal: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSnapshot:
        machine, steal = machine_cpu_s()
        return cls(
            time.perf_counter(), process_cpu_s(server_pid), time.process_time(), machine, steal
        )


@dataclass
class Phase:
    """One HTTP load phase: what was answered, refused and used."""

    name: str
    per_request: int  # images per request; 0 for GET /healthz (the no-model ceiling)
    window_s: float = 0.0
    images: int = 0  # answered inside the measured window
    requests: int = 0
    answered_images: int = 0  # every 200, lead-in and tail included: what the log must hold
    wrong_counts: int = 0  # 200 responses whose prediction count differs from the request's
    statuses: Counter[int] = field(default_factory=Counter)  # non-200 responses
    errors: Counter[str] = field(default_factory=Counter)  # transport errors
    latencies: list[float] = field(default_factory=list)
    cpu_start: CpuSnapshot | None = None
    cpu_end: CpuSnapshot | None = None
    stats_start: dict[str, Any] = field(default_factory=dict)
    stats_end: dict[str, Any] = field(default_factory=dict)
    drain_s: float = float("nan")

    @property
    def rate(self) -> float:
        return self.images / self.window_s if self.window_s > 0 else 0.0

    @property
    def refused(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def cores(self) -> dict[str, float]:
        """Mean cores busy over the window: server, client (this process), everything else."""
        if self.cpu_start is None or self.cpu_end is None:
            return {}
        a, b = self.cpu_start, self.cpu_end
        wall = b.wall - a.wall
        server, client = (b.server - a.server) / wall, (b.client - a.client) / wall
        machine = (b.machine - a.machine) / wall
        return {
            "server": server,
            "client": client,
            "other": max(0.0, machine - server - client),
            "steal": (b.steal - a.steal) / wall,
        }

    def mean_forward_batch(self) -> float:
        try:
            batches = self.stats_end["batches"] - self.stats_start["batches"]
            images = self.stats_end["images"] - self.stats_start["images"]
        except KeyError:
            return float("nan")
        return images / batches if batches else float("nan")


async def _worker(
    http: httpx.AsyncClient,
    bodies: list[bytes],
    offset: int,
    phase: Phase,
    measure_from: float,
    stop_at: float,
) -> None:
    index = offset
    while time.perf_counter() < stop_at:
        body = bodies[index % len(bodies)]
        index += 1
        sent = time.perf_counter()
        try:
            if phase.per_request:
                response = await http.post("/v1/predict", content=body)
            else:
                response = await http.get("/healthz")
        except httpx.HTTPError as exc:
            phase.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        done = time.perf_counter()
        if response.status_code != 200:
            phase.statuses[response.status_code] += 1
            continue
        # Counting the answers in the raw body checks every response without parsing its JSON.
        answered = response.content.count(b'"query_id"') if phase.per_request else 1
        if answered != (phase.per_request or 1):
            phase.wrong_counts += 1
        phase.answered_images += answered
        if measure_from <= done <= stop_at:
            phase.images += answered
            phase.requests += 1
            phase.latencies.append(done - sent)


async def _admin_stats(admin: httpx.AsyncClient) -> dict[str, Any]:
    try:
        response = await admin.get("/admin/stats")
        return response.json() if response.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


async def run_phase(
    url: str,
    key: str,
    phase: Phase,
    *,
    bodies: list[bytes],
    concurrency: int,
    warmup_s: float,
    seconds: float,
    server_pid: int,
    log_target: int,
) -> Phase:
    """Run ``concurrency`` request loops; measure the window after ``warmup_s``.

    ``log_target`` is how many rows the query log should hold once this phase is written; the
    phase then waits for the writer to catch up and records how long that took.
    """
    # One AsyncClient (one keep-alive connection) per simulated client: a single shared pool
    # with 64 connections costs the client milliseconds of CPU per request, because httpcore
    # 1.0's pool bookkeeping scans every connection on each request (encode/httpcore#1035).
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE}
    admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120)
            )
            for _ in range(concurrency)
        ]
        admin = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, headers=admin_headers, timeout=120)
        )
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
        workers = [
            asyncio.create_task(_worker(http, bodies, i, phase, measure_from, stop_at))
            for i, http in enumerate(clients)
        ]
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        phase.cpu_start = CpuSnapshot.take(server_pid)
        phase.stats_start = await _admin_stats(admin)
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        phase.cpu_end = CpuSnapshot.take(server_pid)
        phase.window_s = phase.cpu_end.wall - phase.cpu_start.wall
        phase.stats_end = await _admin_stats(admin)
        await asyncio.gather(*workers)
        ended = time.perf_counter()
        target = log_target + (phase.answered_images if phase.per_request else 0)
        while time.perf_counter() - ended < 120:
            stats = await _admin_stats(admin)
            if stats.get("log_rows_written", -1) >= target:
                phase.drain_s = time.perf_counter() - ended
                break
            await asyncio.sleep(0.02)
    return phase


def run_async(main: Callable[[], Coroutine[Any, Any, Phase]]) -> tuple[Phase, str]:
    """Run on uvloop where installed (a cheaper client), else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main()), "asyncio"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main()), "uvloop"
