"""One victim measured: in-process rates before its server starts and after it stops, the HTTP
phases against a real ``mlaas serve`` in between, and its query log counted at the end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import machine_cpu_s, random_images, save_victim
from bench.servelib.phases import Phase, run_async, run_phase
from bench.servelib.plan import (
    ADMIN_TOKEN,
    DISTINCT_BODIES,
    NPY_CLIENT,
    SINGLE_CLIENT,
    VICTIMS,
    Plan,
)
from bench.servelib.report import Result, console
from mlaas.apiclient import AdminClient
from mlaas.wire import encode_npy
from server.db import make_engine
from server.inference import Victim
from server.querylog import count_queries
from testbed.serverproc import ServerProcess, ServerStartError


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
