"""Load test: many clients against two API processes sharing PostgreSQL and Redis.

    .venv/bin/python bench/load.py [--clients 64] [--queries 20000] [--postgres URL]

Starts two ``mlaas serve`` processes on loopback for the default victim with the ``ood-binary``
and ``prada`` detectors on (state in Redis, log in a fresh PostgreSQL schema), then runs
``--clients`` concurrent clients, each under its own key, sending one public-pool image per
request and alternating between the two processes, until ``--queries`` images are answered.
Prints answered, refused (429 counted apart), 5xx, failed connections, log rows against
answered, p50/p99 latency and images/s. Figures, not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import redis
from sqlalchemy import create_engine, text

from defense.detectors import artifact_path
from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.modelstore import load_card
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import make_engine
from server.querylog import count_queries
from testbed.serverproc import ServerProcess


async def client_loop(
    index: int, urls: list[str], key: str, images: np.ndarray, quota: int, out: dict
) -> None:
    """One client: ``quota`` single-image requests, alternating between the processes."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE}
    async with httpx.AsyncClient(timeout=60) as http:
        for n in range(quota):
            url = urls[(index + n) % len(urls)]
            body = encode_npy(images[(index * quota + n) % len(images)][None])
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", content=body, headers=headers)
            except httpx.HTTPError:
                out["status"]["connection error"] += 1
                continue
            out["latency"].append(time.perf_counter() - started)
            out["status"][response.status_code] += 1


async def run_load(urls: list[str], keys: list[str], images: np.ndarray, total: int) -> dict:
    out: dict = {"status": Counter(), "latency": []}
    share, extra = divmod(total, len(keys))
    started = time.perf_counter()
    await asyncio.gather(
        *(client_loop(i, urls, key, images, share + (i < extra), out) for i, key in enumerate(keys))
    )
    out["seconds"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", type=Path, default=Path("var/victims/fashion"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("var/bench-load"))
    args = parser.parse_args()

    try:
        card = load_card(args.victim)
    except FileNotFoundError as exc:
        parser.error(f"{exc}: train it first with `mlaas victim train --out {args.victim}`")
    if not artifact_path(args.victim / "defense", "ood-binary").exists():
        parser.error(
            f"train the detector first: `mlaas defense train ood-binary prada "
            f"--victim {args.victim}`"
        )
    schema = f"load_{uuid.uuid4().hex[:8]}"
    prefix = f"bench-load-{uuid.uuid4().hex[:8]}"
    admin_engine = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    database = f"{args.postgres}?options=-csearch_path%3D{schema}"
    token = uuid.uuid4().hex
    env = {
        "MLAAS_DATABASE_URL": database,
        "MLAAS_REDIS_URL": args.redis,
        "MLAAS_REDIS_PREFIX": prefix,
        "MLAAS_ADMIN_TOKEN": token,
        "MLAAS_DETECTORS": "ood-binary,prada",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    servers = [
        ServerProcess(args.victim, env=env, log_file=args.out / f"server-{i}.log") for i in (1, 2)
    ]
    pool = load_dataset("fashion-mnist:pool", card.shape)
    images = pool.get_batch(np.arange(len(pool)))
    try:
        for server in servers:
            server.start()
        with AdminClient(servers[0].url, token) as admin:
            keys = [admin.create_key(f"load-{i}") for i in range(args.clients)]
        result = asyncio.run(run_load([s.url for s in servers], keys, images, args.queries))
    finally:
        for server in servers:
            server.stop()  # graceful: each flushes its pending log rows
    answered = result["status"][200]
    rows = count_queries(make_engine(database))
    latency = np.array(result["latency"]) * 1000
    refused_429 = result["status"][429]
    server_errors = sum(v for k, v in result["status"].items() if isinstance(k, int) and k >= 500)
    other = {k: v for k, v in result["status"].items() if k not in (200, 429) and not (
        isinstance(k, int) and k >= 500)}  # fmt: skip
    print(
        f"{args.clients} clients, 2 API processes, PostgreSQL + Redis, detectors ood-binary + prada"
    )
    print(f"answered: {answered:,}  refused 429: {refused_429:,}  5xx: {server_errors}")
    print(f"other statuses: {other or 'none'}")
    print(f"log rows: {rows:,} ({'equal to' if rows == answered else 'DIFFERENT FROM'} answered)")
    print(
        f"latency p50 {np.percentile(latency, 50):.1f} ms, p99 {np.percentile(latency, 99):.1f} ms;"
        f" {answered / result['seconds']:,.0f} images/s over {result['seconds']:.1f} s"
    )
    with admin_engine.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    store = redis.Redis.from_url(args.redis)
    stale = list(store.scan_iter(f"{prefix}:*"))
    if stale:
        store.delete(*stale)


if __name__ == "__main__":
    main()
