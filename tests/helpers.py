"""Small helpers the tests share."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

ADMIN_TOKEN = "test-admin-token-long-enough-for-the-server"
"""At least 32 characters, as the server demands of MLAAS_ADMIN_TOKEN."""
REDIS_URL = os.environ.get("MLAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
"""The shared Redis; tests take a prefix of their own from the ``redis_prefix`` fixture."""


def create_key(
    client: TestClient, name: str, granularity: str | None = None, account: str | None = None
) -> str:
    response = client.post(
        "/admin/keys",
        json={"name": name, "granularity": granularity, "account": account},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(
    condition: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail the test
    (AssertionError naming ``what`` and the timeout) when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        # Checked after a poll, so a zero timeout still looks once and a slow condition
        # gets its last look at the deadline rather than being cut short.
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = 0.002,
    what: str = "the condition",
) -> T:
    """:func:`wait_until` inside a test's own event loop: between looks it yields to the loop
    (``asyncio.sleep``), so that the tasks whose state it waits for run meanwhile. The interval
    is short because those usually get there within a turn or two of the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def requests_finished(metrics: str, route: str) -> int:
    """How many requests to ``route`` the server has finished with, whatever their status
    (a client that hung up included), from its ``/metrics`` text: the service counts each
    request in ``mlaas_requests_total`` as the request ends."""
    return sum(
        int(sample.value)
        for family in text_string_to_metric_families(metrics)
        if family.name == "mlaas_requests"
        for sample in family.samples
        if sample.name == "mlaas_requests_total" and sample.labels["route"] == route
    )


def answered(live, client: str) -> int:
    """Rows in the provider's log for ``client`` of the ``live`` server, once the writer has
    caught up (a row counts as pending until the writer is done with it, the batch it is
    writing included)."""
    from server.db import make_engine
    from server.querylog import count_queries

    wait_until(
        lambda: live.admin.stats()["log_rows_pending"] == 0,
        10,
        interval=0.05,
        what="no rows pending",
    )
    return count_queries(make_engine(live.database), client)
