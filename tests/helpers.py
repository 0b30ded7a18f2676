"""Small helpers the tests share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi.testclient import TestClient

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
