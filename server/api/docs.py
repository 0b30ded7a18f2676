"""OpenAPI fragments: the documented refusals of each route and the prediction body."""

from __future__ import annotations

from typing import Any

from mlaas.wire import NPY_MEDIA_TYPE, ErrorBody

_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for refusals: every error body is an ``ErrorBody``."""
    return {
        status: {"model": ErrorBody, "description": description}
        for status, description in descriptions.items()
    }


# What POST /v1/predict can answer besides 200 (tests/test_fuzz.py holds the API to it).
PREDICT_ERRORS = error_responses(
    {
        401: "Missing, unknown or revoked API key",
        403: "The client is blocked: flagged as a likely model-extraction attempt",
        413: "Body, image count or pixel count over the limits, or more images than the "
        "key's rate limit or quota could ever allow",
        415: "Unsupported content type",
        422: "An image that cannot be decoded, a malformed body, or a reused Idempotency-Key",
        429: "The key's rate limit or daily quota is used up, or it has too many requests "
        "in flight",
        503: "The query log, the database or the detector state store is unavailable, or "
        "the model's queue is full",
    }
)
PREDICT_ERRORS[429]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
PREDICT_ERRORS[503]["headers"] = {"Retry-After": _RETRY_AFTER}

_ADMIN_ERRORS = error_responses(
    {
        400: "A body that cannot be parsed",
        401: "Missing or wrong admin token, or no live dashboard session",
        403: "Admin routes are disabled: MLAAS_ADMIN_TOKEN is not set",
        404: "No such client",
        409: "A client of that name exists, or the name or the account clashes with an "
        "existing account",
        415: "A body that is not JSON",
        422: "A malformed query parameter or body",
        429: "Too many failed admin attempts from this address: refused before any token is "
        "compared",
        503: "The database is unavailable",
    }
)
_ADMIN_ERRORS[429]["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}


def admin_errors(*statuses: int, json: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented refusals of an admin route: 401, 403 and 429, and the given statuses.

    ``json`` spells the JSON media type out, for a route whose response class is not JSON.
    """
    responses: dict[int | str, dict[str, Any]] = {
        status: _ADMIN_ERRORS[status] for status in sorted({401, 403, 429, *statuses})
    }
    if not json:
        return responses
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {
        status: {k: v for k, v in response.items() if k != "model"} | {"content": body}
        for status, response in responses.items()
    }


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more image files (PNG, JPEG, ...)",
                        }
                    },
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "contentEncoding": "base64"},
                            "description": "Base64-encoded image files",
                        }
                    },
                    "required": ["images"],
                }
            },
            NPY_MEDIA_TYPE: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "A .npy uint8 array shaped (N, H, W) or (N, H, W, C)",
                }
            },
        },
    }
}
