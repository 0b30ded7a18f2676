"""Small helpers the tests share."""

from __future__ import annotations

from fastapi.testclient import TestClient

ADMIN_TOKEN = "test-admin-token"


def create_key(client: TestClient, name: str, granularity: str | None = None) -> str:
    response = client.post(
        "/admin/keys",
        json={"name": name, "granularity": granularity},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 201, response.text
    return response.json()["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
