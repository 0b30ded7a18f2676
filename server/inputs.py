"""From request bodies to the model's input: decoding, limits and clear errors.

Three body formats, one result (uint8 ``(N, H, W, C)`` at the victim's input shape):

* ``multipart/form-data``: one or more image files (PNG, JPEG, GIF, BMP, WebP, TIFF);
* ``application/json``: ``{"images": [base64 file, ...]}``;
* ``application/x-npy``: a uint8 array (N, H, W) or (N, H, W, C), the fast path.

Every refusal names the offending item. Pixel counts are checked from the image header,
before decoding, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlaas.images import InputShape, to_shape
from mlaas.wire import NPY_MEDIA_TYPE, JsonImages, decode_npy
from server.errors import ApiError

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


@dataclass
class Limits:
    max_images: int
    max_pixels: int


@dataclass
class DecodedBatch:
    images: np.ndarray  # uint8 (N, H, W, C) at the model's input shape
    original_shapes: list[str]  # "HxWxC" of each item as sent


def _invalid(item: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_image", f"{item}: {problem}")


def _too_many(count: int, limits: Limits) -> ApiError:
    return ApiError(
        413,
        "too_many_images",
        f"{count} images in one request; the limit is {limits.max_images}",
    )


def _check_pixels(item: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{item}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
        )


def decode_image_file(data: bytes, item: str, limits: Limits) -> np.ndarray:
    """One encoded image to uint8 (H, W, C) with C in (1, 3), its first frame if animated."""
    if not data:
        raise _invalid(item, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_pixels(item, image.width, image.height, limits)
            image.seek(0)
            image.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "image_too_large", f"{item}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _invalid(
            item, f"not a decodable image (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _invalid(item, f"corrupt or truncated image ({exc})") from exc
    return _to_array(image)


def _to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clip, so the picture survives.
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or wide.max() > 255 else 255.0
        return np.clip(np.rint(wide / peak * 255.0), 0, 255).astype(np.uint8)[..., None]
    if mode == "F":
        wide = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(wide * (255.0 if wide.max() <= 1.0 else 1.0)), 0, 255).astype(
            np.uint8
        )[..., None]
    if mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    if mode == "P" and image.palette is not None and image.palette.mode in ("L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _shape_text(image: np.ndarray) -> str:
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    return f"{height}x{width}x{channels}"


def _conform(images: list[np.ndarray], shape: InputShape) -> np.ndarray:
    return np.concatenate([to_shape(image[None], shape) for image in images])


def decode_npy_batch(body: bytes, shape: InputShape, limits: Limits) -> DecodedBatch:
    try:
        array = decode_npy(body)
    except Exception as exc:  # numpy raises ValueError, EOFError, ... on garbage
        raise _invalid("body", f"not a valid .npy array ({exc})") from exc
    if array.dtype != np.uint8:
        raise _invalid("body", f"dtype must be uint8, not {array.dtype}")
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3, 4)):
        raise _invalid(
            "body",
            f"shape must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {array.shape}",
        )
    count, height, width = array.shape[:3]
    if count == 0:
        raise _invalid("body", "the batch holds no images")
    if height == 0 or width == 0:
        raise _invalid("body", f"images must not be empty; got {height}x{width}")
    if count > limits.max_images:
        raise _too_many(count, limits)
    _check_pixels("body", width, height, limits)
    sent = _shape_text(array[0] if array.ndim == 4 else array[0][..., None])
    return DecodedBatch(to_shape(array, shape), [sent] * count)


def decode_files(files: list[tuple[str, bytes]], shape: InputShape, limits: Limits) -> DecodedBatch:
    if not files:
        raise _invalid("body", "no image in the request")
    if len(files) > limits.max_images:
        raise _too_many(len(files), limits)
    images = [decode_image_file(data, name, limits) for name, data in files]
    return DecodedBatch(_conform(images, shape), [_shape_text(i) for i in images])


def decode_json(body: bytes, shape: InputShape, limits: Limits) -> DecodedBatch:
    try:
        parsed = JsonImages.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(
            422, "invalid_request", f"{where}: {first.get('msg')} (expected {{'images': [...]}})"
        ) from exc
    if len(parsed.images) > limits.max_images:
        raise _too_many(len(parsed.images), limits)
    files = []
    for index, text in enumerate(parsed.images):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            files.append((f"images[{index}]", base64.b64decode(payload, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise _invalid(f"images[{index}]", "not valid base64") from exc
    return decode_files(files, shape, limits)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


SUPPORTED_MEDIA_TYPES = ("multipart/form-data", "application/json", NPY_MEDIA_TYPE)


async def form_files(form_items: list[tuple[str, object]]) -> list[tuple[str, bytes]]:
    files = []
    for field, value in form_items:
        if isinstance(value, UploadFile):
            files.append((value.filename or field, await value.read()))
    return files


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` before and while they arrive.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as
    it streams and the read fails with :class:`BodyTooLarge`, which the app turns into 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._refuse(send, declared)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, declared: int) -> None:
        if declared < 0:
            status, code, text = 400, "bad_request", "invalid Content-Length header"
        else:
            status, code = 413, "payload_too_large"
            text = f"request body of {declared} bytes exceeds the limit of {self.max_bytes} bytes"
        body = json.dumps({"error": {"code": code, "message": text}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
