"""What the serving benchmark measures and for how long: the victims, the targets, the names
it gives its clients, and the command line that sets the rest."""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass
from pathlib import Path

from mlaas.images import InputShape

VICTIMS: dict[str, InputShape] = {
    "cnn-small": InputShape(1, 28, 28),
    "resnet18": InputShape(3, 32, 32),
}
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
