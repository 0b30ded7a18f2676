"""A thin synchronous client for the prediction and admin APIs (HTTP only, via httpx).

Benign clients, the demo and tests use it as is; the attacker adds budgets, retries and a
resumable cache on top. It knows the server only through the wire schema.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np

from mlaas.wire import IMAGE_COUNT_HEADER, NPY_MEDIA_TYPE, ModelInfo, PredictResponse, encode_npy


class ApiCallError(RuntimeError):
    """The API refused a call; ``code`` and ``message`` come from its JSON error body."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    code, message = "http_error", response.text[:500]
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        pass
    retry_after = response.headers.get("retry-after")
    raise ApiCallError(
        response.status_code,
        code,
        message,
        float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
    )


class _Base:
    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PredictionClient(_Base):
    def predict(self, images: np.ndarray) -> PredictResponse:
        """Classify a uint8 batch (N, H, W[, C]) sent as one ``.npy`` body."""
        response = self._http.post(
            "/v1/predict",
            content=encode_npy(images),
            headers={"Content-Type": NPY_MEDIA_TYPE, IMAGE_COUNT_HEADER: str(len(images))},
        )
        raise_for_error(response)
        return PredictResponse.model_validate_json(response.content)

    def model_info(self) -> ModelInfo:
        response = self._http.get("/v1/model")
        raise_for_error(response)
        return ModelInfo.model_validate_json(response.content)


class AdminClient(_Base):
    def create_key(
        self,
        name: str,
        granularity: str | None = None,
        account: str | None = None,
        **limits: float,
    ) -> str:
        """A new client's key; ``limits``: ``rate_limit``, ``rate_burst``, ``daily_quota``;
        ``account``: a shared account the key joins (default: the key alone)."""
        body: dict[str, Any] = {"name": name, "granularity": granularity, **limits}
        if account is not None:
            body["account"] = account
        response = self._http.post("/admin/keys", json=body)
        raise_for_error(response)
        return response.json()["key"]

    def keys(self) -> list[dict[str, Any]]:
        """Every key's name, account, prefix, granularity, limits and dates."""
        response = self._http.get("/admin/keys")
        raise_for_error(response)
        return response.json()

    def queries(self, **params: Any) -> list[dict[str, Any]]:
        response = self._http.get(
            "/admin/queries", params={k: v for k, v in params.items() if v is not None}
        )
        raise_for_error(response)
        return response.json()

    def stats(self) -> dict[str, Any]:
        response = self._http.get("/admin/stats")
        raise_for_error(response)
        return response.json()

    def client(self, name: str) -> dict[str, Any]:
        """A client's standing: status, queries logged, monitor state, alerts."""
        response = self._http.get(f"/admin/clients/{name}")
        raise_for_error(response)
        return response.json()

    def alerts(self, **params: Any) -> list[dict[str, Any]]:
        response = self._http.get(
            "/admin/alerts", params={k: v for k, v in params.items() if v is not None}
        )
        raise_for_error(response)
        return response.json()

    def wait_for_log(self, rows: int, timeout: float = 10.0) -> bool:
        """The log is written off the request path: wait until it holds ``rows`` rows."""
        deadline = time.monotonic() + timeout
        while self.stats()["log_rows_written"] < rows:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
