"""What an abusive key can cost the server: memory for fresh idempotency keys, decoding when over
its limit.

    .venv/bin/python -m bench.limits [--requests 10000] [--images 32] [--bodies 20]

Starts one ``mlaas serve`` on loopback (SQLite log, durable, inputs stored), then measures:

1. **Memory for the asking.** ``--requests`` requests of ``--images`` images, each with a fresh
   ``Idempotency-Key``, from 8 concurrent connections of one key without a rate limit. The
   server's resident memory (VmRSS) is read after a warm-up of ``--warmup`` requests and at
   the end: the growth is what a client can make the server hold by asking. (Before this was
   bounded, the server kept every answer: 1.36 MB per request of 256 images.)
2. **Work before limits.** A key over its rate limit (its burst of 256 images spent) sends
   ``--bodies`` requests announcing 32 MB bodies of 256 images: the server's CPU time per
   refusal and whether it answered before reading the body (it is never sent: an answer
   proves nothing was read), against the same requests from a key within its limit whose
   bodies are read and decoded (256 images of 200x200x3, a 30.7 MB ``.npy``).

Figures, not a test: it never fails on a number. The victim is ``--victim`` when it exists,
else a random-init cnn-small (memory and decoding do not depend on what the model learnt).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.common import process_cpu_s, random_images, save_victim
from mlaas.apiclient import AdminClient
from mlaas.images import InputShape
from mlaas.wire import IMAGE_COUNT_HEADER, NPY_MEDIA_TYPE, encode_npy
from testbed.serverproc import ServerProcess

BODY_BYTES = 32 * 2**20
CONCURRENCY = 8


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def fresh_keys(url: str, key: str, images: np.ndarray, requests: int, progress) -> int:
    """``requests`` requests, each under a new Idempotency-Key; how many were answered."""
    body = encode_npy(images)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": NPY_MEDIA_TYPE,
        IMAGE_COUNT_HEADER: str(len(images)),
    }
    answered = 0
    task = progress.add_task("fresh idempotency keys", total=requests)
    next_request = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal answered
        for _ in next_request:
            response = await http.post(
                "/v1/predict",
                content=body,
                headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
            )
            answered += response.status_code == 200
            progress.advance(task)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return answered


def announce_body(url: str, key: str, images: int) -> tuple[int, float]:
    """Send a prediction request's headers announcing a 32 MB body, and none of the body: the
    status the server answers with and how long it took (0 and the timeout: it waited)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            (
                "POST /v1/predict HTTP/1.1\r\n"
                f"Host: {host}\r\n"
                f"Authorization: Bearer {key}\r\n"
                f"Content-Type: {NPY_MEDIA_TYPE}\r\n"
                f"{IMAGE_COUNT_HEADER}: {images}\r\n"
                f"Content-Length: {BODY_BYTES}\r\n\r\n"
            ).encode()
        )
        try:
            status_line = sock.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            return 0, time.perf_counter() - started
    return int(status_line.split()[1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--images", type=int, default=32, help="images per request (32)")
    parser.add_argument("--bodies", type=int, default=20, help="32 MB requests per key (20)")
    args = parser.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory(prefix="bench-limits-") as scratch:
        work = Path(scratch)
        victim = args.victim
        if not (victim / "card.json").exists():
            console.print(f"no victim in {victim}: serving a random-init cnn-small")
            victim = save_victim(work / "victim", "cnn-small", InputShape(1, 28, 28), seed=0)
        token = secrets.token_urlsafe(32)
        env = {
            "MLAAS_DATABASE_URL": f"sqlite:///{work / 'mlaas.db'}",
            "MLAAS_ADMIN_TOKEN": token,
            "MLAAS_VAR_DIR": str(work),
            "MLAAS_LOG_MODE": "durable",
        }
        with ServerProcess(victim, env=env, log_file=work / "server.log") as server:
            pid = server.process.pid
            shape = InputShape.parse(httpx.get(f"{server.url}/v1/model").json()["input_shape"])
            with AdminClient(server.url, token) as admin:
                spender = admin.create_key("spender")
                over = admin.create_key("over", rate_limit=0.01, rate_burst=256)
                within = admin.create_key("within")
            rng = np.random.default_rng(0)
            images = random_images(shape, args.images, seed=0)

            with Progress(console=console, transient=True) as progress:
                asyncio.run(fresh_keys(server.url, spender, images, args.warmup, progress))
                before = rss_mb(pid)
                started = time.perf_counter()
                answered = asyncio.run(
                    fresh_keys(server.url, spender, images, args.requests, progress)
                )
                seconds = time.perf_counter() - started
            after = rss_mb(pid)

            # Empty the over-limit key's bucket, then announce 32 MB bodies from it.
            burst = random_images(shape, 256, seed=1)
            httpx.post(
                f"{server.url}/v1/predict",
                content=encode_npy(burst),
                headers={"Authorization": f"Bearer {over}", "Content-Type": NPY_MEDIA_TYPE},
            ).raise_for_status()
            cpu = process_cpu_s(pid)
            refusals = [announce_body(server.url, over, 256) for _ in range(args.bodies)]
            refused_cpu = (process_cpu_s(pid) - cpu) / args.bodies
            big = encode_npy(rng.integers(0, 256, (256, 200, 200, 3), np.uint8))
            cpu = process_cpu_s(pid)
            with httpx.Client(base_url=server.url, timeout=120) as http:
                decoded = [
                    http.post(
                        "/v1/predict",
                        content=big,
                        headers={
                            "Authorization": f"Bearer {within}",
                            "Content-Type": NPY_MEDIA_TYPE,
                        },
                    ).status_code
                    for _ in range(args.bodies)
                ]
            decoded_cpu = (process_cpu_s(pid) - cpu) / args.bodies

    table = Table(title="What an abusive key costs the server")
    table.add_column("measure")
    table.add_column("figure", justify="right")
    growth = after - before
    table.add_row(
        f"requests with fresh Idempotency-Keys ({args.images} images each)",
        f"{answered:,} of {args.requests:,} answered in {seconds:,.0f} s",
    )
    table.add_row("server RSS after warm-up / after", f"{before:,.0f} / {after:,.0f} MiB")
    table.add_row(
        "growth", f"{growth:+,.1f} MiB ({growth * 2**20 / args.requests:+,.0f} B/request)"
    )
    statuses = sorted({status for status, _ in refusals})
    slowest = max(seconds for _, seconds in refusals)
    table.add_row(
        "over-limit key, 32 MB body announced, none sent",
        f"status {statuses}, slowest answer {slowest * 1000:.0f} ms",
    )
    table.add_row("server CPU per refused request", f"{refused_cpu * 1000:.1f} ms")
    table.add_row(
        f"within-limit key, 30.7 MB body decoded (status {sorted(set(decoded))})",
        f"{decoded_cpu * 1000:.0f} ms CPU per request",
    )
    console.print(table)


if __name__ == "__main__":
    main()
