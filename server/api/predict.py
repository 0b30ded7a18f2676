"""The prediction routes: ``POST /v1/predict`` and ``GET /v1/model``.

Thin: the route reads the headers and the body and sets the response headers; the limits,
the blocked check, inference and logging are server/prediction.py's.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

from fastapi import Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlaas.wire import IMAGE_COUNT_HEADER, NPY_MEDIA_TYPE, ModelInfo, PredictResponse
from server.api.deps import require_client
from server.api.docs import PREDICT_BODY, PREDICT_ERRORS
from server.api.routers import public_router
from server.errors import ApiError
from server.idempotency import check_key
from server.inputs import (
    SUPPORTED_MEDIA_TYPES,
    DecodedBatch,
    decode_files,
    decode_json,
    decode_npy_batch,
    form_files,
    media_type,
)
from server.keys import Client
from server.prediction import Bill, answered_before, infer_and_log, recall, refuse_blocked
from server.querylog import image_sha256
from server.state import ServiceState, get_state


async def _read_batch(request: Request, state: ServiceState) -> DecodedBatch:
    kind = media_type(request.headers.get("content-type"))
    shape, limits = state.victim.shape, state.limits
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images, max_fields=limits.max_images)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise ApiError(413, "too_many_images", str(exc.detail)) from exc
            raise ApiError(
                422, "invalid_request", f"malformed multipart body: {exc.detail}"
            ) from exc
        try:
            files = await form_files(form.multi_items())
        finally:
            await form.close()
        return await run_in_threadpool(decode_files, files, shape, limits)
    if kind == "application/json":
        return await run_in_threadpool(decode_json, await request.body(), shape, limits)
    if kind == NPY_MEDIA_TYPE:
        return await run_in_threadpool(decode_npy_batch, await request.body(), shape, limits)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {kind or '(none)'!r} is not accepted; use one of "
        + ", ".join(SUPPORTED_MEDIA_TYPES),
    )


@public_router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    response: Response,
    client: Annotated[Client, Depends(require_client)],
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Resending a request with the same key returns the first answer "
            "(after a restart too) and is neither logged nor counted again"
        ),
    ] = None,
    image_count: Annotated[
        int | None,
        Header(
            alias=IMAGE_COUNT_HEADER,
            ge=1,
            description="How many images the body holds. The rate limit and quota are charged "
            "this many before the body is read (1 without the header) and settled once it is "
            "decoded, so a key over its limit is refused before any decoding",
        ),
    ] = None,
) -> PredictResponse:
    """Every limit is checked before the body is read: the key's requests in flight, its
    blocked status, then its rate limit and quota for the declared image count."""
    started = time.perf_counter()
    state = get_state(request)
    if idempotency_key is not None:
        check_key(idempotency_key)
    declared = image_count or 1
    if declared > state.limits.max_images:
        raise ApiError(
            413,
            "too_many_images",
            f"{declared} images declared; at most {state.limits.max_images} per request",
        )
    if not state.in_flight.enter(client.name):
        raise ApiError(
            429,
            "too_many_requests_in_flight",
            f"this key has {state.in_flight.limit} requests in flight; wait for their answers",
            {"Retry-After": "1"},
        )
    bill: Bill | None = None
    try:
        await refuse_blocked(state, client)
        # A retry of a request answered before is charged only the rate limit, and given that
        # back once replayed: a key at its daily quota can still collect a lost answer, and a
        # key replaying big bodies still pays for their decoding in time.
        retry = idempotency_key is not None and await answered_before(
            state, client, idempotency_key
        )
        bill = Bill(state, client, response, rate_only=retry)
        await bill.charge(declared)
        batch = await _read_batch(request, state)
        await bill.settle(len(batch.images))
        if idempotency_key is None:
            answer, _ = await infer_and_log(state, client, batch, started)
            replayed = False
        else:
            hashes = [image_sha256(image) for image in batch.images]
            fingerprint = hashlib.sha256("".join(hashes).encode()).hexdigest()
            answer, replayed = await state.idempotency.run(
                client.name,
                idempotency_key,
                fingerprint,
                compute=lambda: infer_and_log(
                    state, client, batch, started, idempotency_key, hashes
                ),
                # Only a request answered before has logged rows to replay: a new one costs
                # no second look at the log.
                recall=(lambda: recall(state, client, idempotency_key, hashes)) if retry else None,
            )
    except BaseException:
        if bill is not None:
            await bill.refund_all()  # nothing was answered: give the images back
        raise
    finally:
        state.in_flight.leave(client.name)
    if replayed:  # answered before, and counted then
        await bill.refund_all()
        response.headers["Idempotent-Replayed"] = "true"
    else:
        state.metrics.answered.labels(client.name).inc(len(batch.images))
    return answer


@public_router.get("/v1/model", response_model=ModelInfo, summary="The public model card")
async def model_info(request: Request) -> ModelInfo:
    state = get_state(request)
    card = state.victim.card
    return ModelInfo(
        name=card.name,
        classes=card.classes,
        input_shape=str(card.shape),
        granularity=str(state.granularity),
        max_images_per_request=state.limits.max_images,
    )
