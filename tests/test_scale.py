"""Several API processes, one truth: shared PostgreSQL log, shared Redis detector state."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mlaas.apiclient import AdminClient
from mlaas.datasets import load_dataset
from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.db import make_engine
from server.querylog import count_queries, fetch_alerts, fetch_queries
from testbed.serverproc import ServerProcess
from tests.helpers import ADMIN_TOKEN, REDIS_URL

pytestmark = pytest.mark.slow


def send(url: str, key: str, images: np.ndarray) -> None:
    response = httpx.post(
        f"{url}/v1/predict",
        content=encode_npy(images),
        headers={"Authorization": f"Bearer {key}", "Content-Type": NPY_MEDIA_TYPE},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def test_an_attacker_spread_over_two_processes_is_one_stream(
    tiny_victim, postgres_url, redis_prefix, tmp_path
) -> None:
    env = {
        "MLAAS_DATABASE_URL": postgres_url,
        "MLAAS_REDIS_URL": REDIS_URL,
        "MLAAS_REDIS_PREFIX": redis_prefix,
        "MLAAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "MLAAS_DETECTORS": "prada",
        "MLAAS_PRADA_DELTA": "0.95",
    }
    crops = load_dataset("natural-crops", InputShape(1, 28, 28)).get_batch(np.arange(400))
    first = ServerProcess(tiny_victim, env=env, log_file=tmp_path / "a.log").start()
    second = ServerProcess(tiny_victim, env=env, log_file=tmp_path / "b.log")
    try:
        second.start()
        with AdminClient(first.url, ADMIN_TOKEN) as admin:
            spread, alone = admin.create_key("spread"), admin.create_key("alone")
            for index, start in enumerate(range(0, 400, 10)):
                # The same queries: one client alternates between the processes, the other
                # sends everything to one process.
                send((first, second)[index % 2].url, spread, crops[start : start + 10])
                send(first.url, alone, crops[start : start + 10])
    finally:  # a graceful stop flushes each process's pending rows
        second.stop()
        first.stop()
    engine = make_engine(postgres_url)
    assert count_queries(engine, "spread") == count_queries(engine, "alone") == 400
    rows = fetch_queries(engine, client="spread", limit=None)
    assert len({row["id"] for row in rows}) == 400  # none lost, none twice
    alerts = {
        client: [(a["detector"], a["query_count"]) for a in fetch_alerts(engine, client=client)]
        for client in ("spread", "alone")
    }
    assert alerts["alone"], "the stream should trip PRADA"
    assert alerts["spread"] == alerts["alone"]  # flagged after the same number of queries
