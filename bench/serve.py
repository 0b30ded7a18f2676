"""Serving throughput: the victim's in-process forward pass against the HTTP API, side by side.

For each victim (``cnn-small`` at 1x28x28 and ``resnet18`` at 3x32x32, 10 classes, untrained
seeded weights: throughput does not depend on the weights) this measures, in one run:

1. in-process images/s: ``Victim.forward`` on batches of 256;
2. in-process images/s at batch 1;
3. HTTP images/s: ``application/x-npy`` requests of 64 images, a few in flight at once, against
   a real ``mlaas serve`` child process (SQLite query log, inputs logged as by default);
4. HTTP images/s: 64 concurrent clients sending one image per request (the micro-batcher's job);

and prints them with the ratios ``HTTP x-npy 64 / in-process batch-256`` and
``HTTP 64 single / in-process batch-1`` against their targets. The in-process figures are the
median of repetitions taken half before the server starts and half after it stops, so slow
drift on a noisy machine shows up rather than skewing one side. Afterwards the query log is
counted and compared with the number of answered images.

The load generator is this process (asyncio + httpx, one ``AsyncClient`` per simulated client),
the server a child process: on a small machine both compete for the same cores, which the
per-phase CPU figures make visible (server, this client, and "other": everything else on the
machine, i.e. noise). A last phase, 64 clients on ``GET /healthz``, gives the ceiling of the
HTTP stack and this client with no model, authentication or query log behind it.

    .venv/bin/python bench/serve.py            # both victims, about 4 minutes
    .venv/bin/python bench/serve.py --quick    # about 1 minute
    .venv/bin/python bench/serve.py --models cnn-small --seconds 30

``MLAAS_*`` variables set in the environment reach the server (the benchmark sets only the
database, admin token, var dir, device and the per-key cap on requests in flight), e.g.
``MLAAS_LOG_INPUTS=false`` measures without storing inputs; the header lists any it passes on.

This is a benchmark, not a test: it reports what it measures and never fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mlaas.apiclient import AdminClient
from mlaas.images import InputShape
from mlaas.models import build_model
from mlaas.modelstore import ModelCard, save_model
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import make_engine
from server.inference import Victim
from server.querylog import count_queries
from testbed.serverproc import ServerProcess, ServerStartError

VICTIMS: dict[str, InputShape] = {
    "cnn-small": InputShape(1, 28, 28),
    "resnet18": InputShape(3, 32, 32),
}
NUM_CLASSES = 10
TARGET_NPY = 0.85
TARGET_SINGLE = 2.5
ADMIN_TOKEN = secrets.token_urlsafe(32)  # the server refuses shorter ones
NPY_CLIENT = "bench-npy"
SINGLE_CLIENT = "bench-single"
DISTINCT_BODIES = 16
SET_BY_BENCH = {
    "MLAAS_DATABASE_URL",
    "MLAAS_ADMIN_TOKEN",
    "MLAAS_VAR_DIR",
    "MLAAS_DEVICE",
    "MLAAS_MAX_IN_FLIGHT_PER_KEY",
}
NOISY_CORES = 0.25  # CPU used by other processes during a phase above which figures are suspect

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Plan:
    """How long each part runs; ``--quick`` shrinks every part."""

    models: list[str]
    inproc_seconds: float  # per batch size, half before the server starts, half after it stops
    inproc_reps: int  # repetitions per half
    http_seconds: float  # measured window per HTTP phase
    http_warmup: float  # unmeasured lead-in per HTTP phase
    npy_batch: int
    npy_concurrency: int
    single_clients: int
    device: str
    torch_threads: int | None
    seed: int
    server_log: Path | None
    server_log_level: str | None
    ceiling: bool


def parse_args(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        description="In-process vs HTTP throughput of the prediction service (prints figures)."
    )
    parser.add_argument(
        "--models",
        default=",".join(VICTIMS),
        help=f"comma-separated victims, from (and by default): {', '.join(VICTIMS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short phases (about 1 minute for both victims)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per HTTP phase (20; 6 quick)"
    )
    parser.add_argument(
        "--inproc-seconds",
        type=float,
        default=None,
        help="in-process seconds per batch size, split before/after the server (8; 3 quick)",
    )
    parser.add_argument("--reps", type=int, default=None, help="in-process repetitions (8; 4)")
    parser.add_argument("--npy-batch", type=int, default=64, help="images per x-npy request (64)")
    parser.add_argument(
        "--npy-concurrency", type=int, default=4, help="x-npy requests in flight at once (4)"
    )
    parser.add_argument(
        "--single-clients", type=int, default=64, help="concurrent single-image clients (64)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device of the server and the in-process runs (cpu)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="intra-op threads in-process and in the server (OMP_NUM_THREADS); default: torch's",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init weights (0)")
    parser.add_argument(
        "--server-log", type=Path, default=None, help="append the servers' output to this file"
    )
    parser.add_argument(
        "--server-log-level",
        default=None,
        help="`mlaas serve --log-level` (default: serve's own, info, which logs every request)",
    )
    parser.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the GET /healthz phase (the HTTP stack's own ceiling, with no model)",
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in VICTIMS]
    if unknown or not models:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(VICTIMS)}")
    reps = args.reps or (4 if args.quick else 8)
    return Plan(
        models=models,
        inproc_seconds=args.inproc_seconds or (3.0 if args.quick else 8.0),
        inproc_reps=max(1, reps // 2),
        http_seconds=args.seconds or (6.0 if args.quick else 20.0),
        http_warmup=1.0 if args.quick else 2.0,
        npy_batch=args.npy_batch,
        npy_concurrency=args.npy_concurrency,
        single_clients=args.single_clients,
        device=args.device,
        torch_threads=args.torch_threads,
        seed=args.seed,
        server_log=args.server_log,
        server_log_level=args.server_log_level,
        ceiling=not args.no_ceiling,
    )


def save_victim(root: Path, arch: str, shape: InputShape, seed: int) -> Path:
    """A random-init victim with a valid model card: enough for throughput."""
    torch.manual_seed(seed)
    model = build_model(arch, NUM_CLASSES, shape)
    card = ModelCard(
        name=f"bench-{arch}",
        architecture=arch,
        dataset="random-init",
        num_classes=NUM_CLASSES,
        classes=[f"class-{i}" for i in range(NUM_CLASSES)],
        input_shape=str(shape),
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        seed=seed,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return save_model(root / arch, model, card)


def random_images(shape: InputShape, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, *shape.hwc), dtype=np.uint8)


# --------------------------------------------------------------------------- in-process


def inproc_rates(victim: Victim, images: np.ndarray, seconds: float, reps: int) -> list[float]:
    """Images/s of ``reps`` repetitions of ``seconds / reps`` each (at least one call each)."""
    per_rep = seconds / reps
    rates = []
    for _ in range(reps):
        calls = 0
        started = time.perf_counter()
        while True:
            victim.forward(images)
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= per_rep:
                break
        rates.append(calls * len(images) / elapsed)
    return rates


def warm_up(victim: Victim, images: np.ndarray, seconds: float = 1.0) -> None:
    started = time.perf_counter()
    for _ in range(3):
        victim.forward(images)
        if time.perf_counter() - started > seconds:
            break


# --------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    steal = values[7] if len(values) > 7 else 0
    guest = sum(values[8:10])  # already counted in user/nice
    return (sum(values) - idle - steal - guest) / _TICK, steal / _TICK


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


# --------------------------------------------------------------------------- HTTP load


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


# --------------------------------------------------------------------------- one victim


@dataclass
class Result:
    arch: str
    shape: InputShape
    b256_before: list[float] = field(default_factory=list)
    b256_after: list[float] = field(default_factory=list)
    b1_before: list[float] = field(default_factory=list)
    b1_after: list[float] = field(default_factory=list)
    npy: Phase | None = None
    single: Phase | None = None
    ceiling: Phase | None = None
    inproc_other: list[float] = field(default_factory=list)  # cores used by other processes
    loop: str = ""
    log_rows: dict[str, int] = field(default_factory=dict)
    log_error: str | None = None
    stop_code: int | None = None
    error: str | None = None

    @property
    def b256(self) -> float:
        return statistics.median(self.b256_before + self.b256_after)

    @property
    def b1(self) -> float:
        return statistics.median(self.b1_before + self.b1_after)

    def phases(self) -> list[Phase]:
        return [p for p in (self.npy, self.single, self.ceiling) if p is not None]

    @property
    def other_max(self) -> float:
        """The most cores other processes used during any measurement of this victim."""
        others = [p.cores().get("other", 0.0) for p in self.phases()] + self.inproc_other
        return max(others, default=0.0)

    @property
    def noisy(self) -> bool:
        return self.other_max > NOISY_CORES


def measure_inproc(
    victim: Victim,
    batch: np.ndarray,
    single: np.ndarray,
    plan: Plan,
    b256: list[float],
    b1: list[float],
) -> float:
    """Add both halves' repetitions; return the cores other processes used meanwhile."""
    wall, own, (machine, _) = time.perf_counter(), time.process_time(), machine_cpu_s()
    b256 += inproc_rates(victim, batch, plan.inproc_seconds / 2, plan.inproc_reps)
    b1 += inproc_rates(victim, single, plan.inproc_seconds / 2, plan.inproc_reps)
    wall, own = time.perf_counter() - wall, time.process_time() - own
    return max(0.0, (machine_cpu_s()[0] - machine - own) / wall)


def bench_model(arch: str, plan: Plan, root: Path) -> Result:
    shape = VICTIMS[arch]
    result = Result(arch, shape)
    victim_dir = save_victim(root, arch, shape, plan.seed)
    images = random_images(shape, 256, plan.seed)
    victim = Victim(victim_dir, plan.device)

    console.print(f"[bold]{arch}[/] {shape}: in-process warm-up and first half ...")
    warm_up(victim, images)
    warm_up(victim, images[:1])
    result.inproc_other.append(
        measure_inproc(victim, images, images[:1], plan, result.b256_before, result.b1_before)
    )

    workdir = root / f"{arch}-server"
    db_path = workdir / "mlaas.db"
    env = {
        "MLAAS_DATABASE_URL": f"sqlite:///{db_path}",
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_VAR_DIR": str(workdir / "var"),
        "MLAAS_DEVICE": plan.device,
        # All the simulated clients share one key: its cap on requests in flight is a policy
        # for abusive keys, not what this measures.
        "MLAAS_MAX_IN_FLIGHT_PER_KEY": "1024",
    }
    if plan.torch_threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(plan.torch_threads)
    log_file = plan.server_log or workdir / "server.log"
    extra = ["--log-level", plan.server_log_level] if plan.server_log_level else []
    server = ServerProcess(victim_dir, env=env, log_file=log_file, extra_args=extra)
    pool = random_images(shape, DISTINCT_BODIES * plan.npy_batch, plan.seed + 1)
    npy_bodies = [
        encode_npy(pool[i * plan.npy_batch : (i + 1) * plan.npy_batch])
        for i in range(DISTINCT_BODIES)
    ]
    single_bodies = [encode_npy(pool[i : i + 1]) for i in range(len(pool))]

    console.print(f"[bold]{arch}[/]: starting `mlaas serve` ...")
    try:
        server.start()
    except ServerStartError as exc:
        result.error = f"{exc}\n{_tail(log_file)}"
        return result
    try:
        assert server.process is not None
        pid = server.process.pid
        with AdminClient(server.url, ADMIN_TOKEN) as admin:
            npy_key = admin.create_key(NPY_CLIENT)
            single_key = admin.create_key(SINGLE_CLIENT)
        console.print(
            f"[bold]{arch}[/]: HTTP x-npy {plan.npy_batch} x {plan.npy_concurrency} in flight, "
            f"{plan.http_seconds:.0f} s ..."
        )
        result.npy, result.loop = run_async(
            lambda: run_phase(
                server.url,
                npy_key,
                Phase("npy", plan.npy_batch),
                bodies=npy_bodies,
                concurrency=plan.npy_concurrency,
                warmup_s=plan.http_warmup,
                seconds=plan.http_seconds,
                server_pid=pid,
                log_target=0,
            )
        )
        console.print(
            f"[bold]{arch}[/]: HTTP {plan.single_clients} single-image clients, "
            f"{plan.http_seconds:.0f} s ..."
        )
        result.single, _ = run_async(
            lambda: run_phase(
                server.url,
                single_key,
                Phase("single", 1),
                bodies=single_bodies,
                concurrency=plan.single_clients,
                warmup_s=plan.http_warmup,
                seconds=plan.http_seconds,
                server_pid=pid,
                log_target=result.npy.answered_images if result.npy else 0,
            )
        )
        if plan.ceiling:
            console.print(
                f"[bold]{arch}[/]: HTTP {plan.single_clients} clients GET /healthz (no model), "
                f"{plan.http_seconds / 2:.0f} s ..."
            )
            result.ceiling, _ = run_async(
                lambda: run_phase(
                    server.url,
                    single_key,
                    Phase("healthz", 0),
                    bodies=[b""],
                    concurrency=plan.single_clients,
                    warmup_s=plan.http_warmup / 2,
                    seconds=plan.http_seconds / 2,
                    server_pid=pid,
                    log_target=0,
                )
            )
    except Exception as exc:  # report and carry on with the next victim
        result.error = f"{type(exc).__name__}: {exc}\n{_tail(log_file)}"
    finally:
        result.stop_code = server.stop()

    engine = make_engine(env["MLAAS_DATABASE_URL"])
    try:
        result.log_rows = {
            "total": count_queries(engine),
            NPY_CLIENT: count_queries(engine, NPY_CLIENT),
            SINGLE_CLIENT: count_queries(engine, SINGLE_CLIENT),
        }
    except Exception as exc:
        result.log_error = f"{type(exc).__name__}: {exc}"
    finally:
        engine.dispose()

    console.print(f"[bold]{arch}[/]: in-process second half ...")
    result.inproc_other.append(
        measure_inproc(victim, images, images[:1], plan, result.b256_after, result.b1_after)
    )
    return result


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


# --------------------------------------------------------------------------- report


def _verdict(ratio: float, target: float, noisy: bool) -> str:
    text = (
        f"[green]meets target >= {target:g}[/]"
        if ratio >= target
        else f"[red]misses target >= {target:g}[/]"
    )
    return text + (" [yellow](unreliable: machine busy)[/]" if noisy else "")


def _spread(before: list[float], after: list[float], other: list[float]) -> str:
    text = f"median of {len(before) + len(after)} reps; before server "
    text += f"{statistics.median(before):,.0f}"
    if after:
        text += f", after {statistics.median(after):,.0f}"
    if other:
        text += "\nother processes: " + ", ".join(f"{o:.2f}" for o in other) + " cores"
    return text


def _phase_details(phase: Phase) -> str:
    parts = [f"{phase.requests:,} req in {phase.window_s:.1f} s"]
    if phase.latencies:
        lat = np.array(phase.latencies) * 1000.0
        parts.append(f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms")
    if phase.per_request:
        parts.append(f"mean forward batch {phase.mean_forward_batch():.1f}")
    cores = phase.cores()
    if cores:
        text = (
            f"cores busy: server {cores['server']:.2f}, client {cores['client']:.2f}, "
            f"other {cores['other']:.2f}"
        )
        if cores["steal"] > 0.01:
            text += f", stolen {cores['steal']:.2f}"
        parts.append(text)
    if phase.requests:
        server_cpu = (phase.cpu_end.server - phase.cpu_start.server) if phase.cpu_end else 0.0
        client_cpu = (phase.cpu_end.client - phase.cpu_start.client) if phase.cpu_end else 0.0
        if phase.cpu_start is not None:
            text = (
                f"CPU/req: server {server_cpu / phase.requests * 1e3:.2f} ms, "
                f"client {client_cpu / phase.requests * 1e3:.2f} ms"
            )
            if phase.per_request > 1:
                text += f" (server {server_cpu / phase.images * 1e6:.0f} us/image)"
            parts.append(text)
    if phase.per_request:
        parts.append(f"query log drained {phase.drain_s:.2f} s after the last answer")
    refused = [f"HTTP {s}: {n}" for s, n in sorted(phase.statuses.items())]
    refused += [f"{name}: {n}" for name, n in sorted(phase.errors.items())]
    if refused:
        parts.append("[red]non-200: " + ", ".join(refused) + "[/]")
    if phase.wrong_counts:
        parts.append(f"[red]{phase.wrong_counts} answers with a wrong prediction count[/]")
    return "\n".join(parts)


def report(result: Result, plan: Plan) -> None:
    if not (result.b256_before and result.b1_before):
        console.print(f"[red]{result.arch}: no in-process figures[/]")
        return
    table = Table(title=f"{result.arch} ({result.shape}, {NUM_CLASSES} classes, random init)")
    table.add_column("measurement")
    table.add_column("images/s", justify="right")
    table.add_column("details")
    table.add_row(
        "in-process batch-256",
        f"{result.b256:,.0f}",
        _spread(result.b256_before, result.b256_after, result.inproc_other),
    )
    table.add_row(
        "in-process batch-1", f"{result.b1:,.0f}", _spread(result.b1_before, result.b1_after, [])
    )
    phases = [
        (f"HTTP x-npy {plan.npy_batch} ({plan.npy_concurrency} in flight)", result.npy),
        (f"HTTP {plan.single_clients} single-image clients", result.single),
    ]
    for label, phase in phases:
        if phase is None:
            table.add_row(label, "-", "[red]not measured[/]")
        else:
            table.add_row(label, f"{phase.rate:,.0f}", _phase_details(phase))
    if result.ceiling is not None:
        table.add_row(
            f"ceiling: {plan.single_clients} clients GET /healthz (no model, auth or log)",
            f"({result.ceiling.rate:,.0f} req/s)",
            _phase_details(result.ceiling),
        )
    table.add_section()
    if result.npy is not None:
        ratio = result.npy.rate / result.b256
        table.add_row(
            f"HTTP x-npy {plan.npy_batch} / in-process batch-256",
            f"{ratio:.2f}",
            _verdict(ratio, TARGET_NPY, result.noisy),
        )
    if result.single is not None:
        ratio = result.single.rate / result.b1
        # For scale: what batching alone gains in-process. Micro-batched single-image requests
        # can hardly beat in-process batches, so a ratio target above this gain is out of reach.
        gain = result.b256 / result.b1
        table.add_row(
            f"HTTP {plan.single_clients} concurrent single / in-process batch-1",
            f"{ratio:.2f}",
            _verdict(ratio, TARGET_SINGLE, result.noisy)
            + f"\nfor scale: in-process batch-256 / batch-1 = {gain:.2f} (batching's own gain)",
        )
    console.print(table)

    phases_run = result.phases()
    answered = sum(p.answered_images for p in (result.npy, result.single) if p is not None)
    refused = sum(p.refused for p in phases_run)
    console.print(
        f"answered images (HTTP 200): {answered:,}; non-200 or failed requests: {refused}"
    )
    if result.log_error:
        console.print(f"[red]query log could not be counted: {result.log_error}[/]")
    elif result.log_rows:
        rows = result.log_rows["total"]
        per_client = ", ".join(f"{k} {v:,}" for k, v in result.log_rows.items() if k != "total")
        ok = "[green]equal[/]" if rows == answered else "[red]NOT equal[/]"
        console.print(
            f"query log after stop: {rows:,} rows ({per_client}); answered images {answered:,}: "
            f"{ok}; server exit code {result.stop_code}"
        )
    if result.noisy:
        console.print(
            f"[yellow]warning: other processes kept up to {result.other_max:.2f} cores busy "
            "during a measurement; these figures are disturbed (rerun on a quiet machine)[/]"
        )
    if result.error:
        console.print(f"[red]{result.arch}: {result.error}[/]")
    console.print()


def summary(results: list[Result], plan: Plan) -> None:
    table = Table(title="Ratios (measured side by side in this run)")
    table.add_column("victim")
    table.add_column(f"x-npy {plan.npy_batch} / batch-256", justify="right")
    table.add_column(f"{plan.single_clients} single / batch-1", justify="right")
    table.add_column("in-process batch-256 / batch-1", justify="right")
    for result in results:
        cells = []
        for phase, base, target in (
            (result.npy, result.b256 if result.b256_before else 0.0, TARGET_NPY),
            (result.single, result.b1 if result.b1_before else 0.0, TARGET_SINGLE),
        ):
            if phase is None or not base:
                cells.append("-")
                continue
            ratio = phase.rate / base
            colour = "green" if ratio >= target else "red"
            flag = " [yellow]unreliable[/]" if result.noisy else ""
            cells.append(f"[{colour}]{ratio:.2f}[/] (target {target:g}){flag}")
        cells.append(f"{result.b256 / result.b1:.2f}" if result.b1_before else "-")
        table.add_row(result.arch, *cells)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    if plan.torch_threads is not None:
        torch.set_num_threads(plan.torch_threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    console.print(
        f"[bold]mlaas serving benchmark[/]: {cores} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), device {plan.device}, "
        f"Python {sys.version.split()[0]}; load average {load}"
    )
    inherited = sorted(k for k in os.environ if k.startswith("MLAAS_") and k not in SET_BY_BENCH)
    if inherited:
        console.print(
            "server settings from this environment: "
            + ", ".join(f"{k}={os.environ[k]}" for k in inherited)
        )
    console.print(
        f"HTTP phases: {plan.http_warmup:.0f} s lead-in + {plan.http_seconds:.0f} s measured; "
        f"in-process: {plan.inproc_seconds:.0f} s per batch size, {plan.inproc_reps} reps before "
        f"the server starts and {plan.inproc_reps} after it stops."
    )
    console.print(
        f"[yellow]Note:[/] the HTTP load generator runs in this process and the server in a "
        f"child process; on {cores} cores they compete for CPU, so the HTTP figures include the "
        "client's cost (see 'cores busy' and 'CPU/req'). 'other' is CPU used by anything else "
        "on the machine during the phase: noise."
    )
    console.print()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="mlaas-bench-") as tmp:
        for arch in plan.models:
            result = bench_model(arch, plan, Path(tmp))
            report(result, plan)
            results.append(result)
    summary(results, plan)
    loop = next((r.loop for r in results if r.loop), "?")
    console.print(
        f"client: httpx {httpx.__version__} on {loop}; total time "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
