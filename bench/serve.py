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

    .venv/bin/python -m bench.serve            # both victims, about 4 minutes
    .venv/bin/python -m bench.serve --quick    # about 1 minute
    .venv/bin/python -m bench.serve --models cnn-small --seconds 30

``MLAAS_*`` variables set in the environment reach the server (the benchmark sets only the
database, admin token, var dir, device and the per-key cap on requests in flight), e.g.
``MLAAS_LOG_INPUTS=false`` measures without storing inputs; the header lists any it passes on.

This is a benchmark, not a test: it reports what it measures and never fails on a figure.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.servelib.measure import bench_model
from bench.servelib.plan import SET_BY_BENCH, parse_args
from bench.servelib.report import console, report, summary


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
