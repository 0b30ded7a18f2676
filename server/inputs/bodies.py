"""Request bodies to one batch at the model's input shape: an ``x-npy`` array, image files
(multipart form parts) or JSON with base64 images.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from mlaas.images import InputShape, to_shape
from mlaas.wire import NPY_MEDIA_TYPE
from server.errors import ApiError
from server.inputs.images import decode_image_file
from server.inputs.limits import Budget, Limits, check_size, invalid, too_many


@dataclass
class DecodedBatch:
    images: np.ndarray  # uint8 (N, H, W, C) at the model's input shape
    original_shapes: list[str]  # "HxWxC" of each item as sent


def _quoted(text: str, most: int = 80) -> str:
    return repr(text if len(text) <= most else text[:most] + "...")


def _shape_text(image: np.ndarray) -> str:
    height, width = image.shape[:2]
    channels = image.shape[2] if image.ndim == 3 else 1
    return f"{height}x{width}x{channels}"


def _read_npy(body: bytes, shape: InputShape, limits: Limits) -> np.ndarray:
    """The array a .npy body holds, checked from its header before any data is read."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            dims, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            dims, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} (1.0 or 2.0 accepted)")
    except Exception as exc:  # numpy raises ValueError, EOFError, ... on garbage
        raise invalid("body", f"not a valid .npy array ({exc})") from exc
    if dtype != np.uint8:
        raise invalid("body", f"dtype must be uint8, not {dtype}")
    if len(dims) not in (3, 4) or (len(dims) == 4 and dims[-1] not in (1, 3, 4)):
        raise invalid(
            "body",
            f"shape must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {dims}",
        )
    count, height, width = dims[:3]
    if count <= 0:
        raise invalid("body", "the batch holds no images")
    if height <= 0 or width <= 0:
        raise invalid("body", f"images must not be empty; got {height}x{width}")
    if count > limits.max_images:
        raise too_many(count, limits)
    check_size("body", width, height, limits, shape, None)
    if count * height * width > limits.total_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"body: {count} images of {width}x{height} hold more than {limits.total_pixels} "
            "pixels in all; send fewer or smaller images",
        )
    expected, offset = math.prod(dims), stream.tell()
    if len(body) - offset != expected:
        raise invalid(
            "body",
            f"the header declares {dims}, {expected} bytes of data, but the body holds "
            f"{len(body) - offset}",
        )
    flat = np.frombuffer(body, dtype=np.uint8, count=expected, offset=offset)
    # A writable C-ordered copy, whatever order the file was in.
    return np.array(flat.reshape(dims, order="F" if fortran_order else "C"), order="C")


def decode_npy_batch(body: bytes, shape: InputShape, limits: Limits) -> DecodedBatch:
    array = _read_npy(body, shape, limits)
    sent = _shape_text(array[0] if array.ndim == 4 else array[0][..., None])
    return DecodedBatch(to_shape(array, shape), [sent] * len(array))


def decode_files(files: list[tuple[str, bytes]], shape: InputShape, limits: Limits) -> DecodedBatch:
    if not files:
        raise invalid("body", "no image in the request")
    if len(files) > limits.max_images:
        raise too_many(len(files), limits)
    conformed, sent = [], []
    budget = Budget.of(limits)
    for name, data in files:  # one full-size image in memory at a time
        image = decode_image_file(data, name, limits, shape, budget)
        budget.pixels -= image.shape[0] * image.shape[1]
        sent.append(_shape_text(image))
        conformed.append(to_shape(image[None], shape))
    return DecodedBatch(np.concatenate(conformed), sent)


class _JsonImages(BaseModel):
    """A JSON body's shape; :func:`_json_body` adds the limits, which depend on the settings."""

    images: list[str]


@functools.lru_cache(maxsize=8)
def _json_body(max_images: int) -> type[_JsonImages]:
    class JsonBody(_JsonImages):
        # fail_fast and max_length: the first bad item or the count ends validation, so a
        # body of 16 million numbers is one error, not 16 million (42 s and 9 GB).
        images: list[str] = Field(min_length=1, max_length=max_images, fail_fast=True)

    return JsonBody


def _base64_item(text: str, item: str) -> bytes:
    payload = text
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise invalid(item, "a data: URL must be base64 (data:image/png;base64,...)")
    try:
        # Line breaks and spaces (MIME-style base64) are not part of the data.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(item, "not valid base64") from exc


def decode_json(body: bytes, shape: InputShape, limits: Limits) -> DecodedBatch:
    try:
        parsed = _json_body(limits.max_images).model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "too_long":
            raise too_many(first["ctx"]["actual_length"], limits) from exc
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(
            422, "invalid_request", f"{where}: {first.get('msg')} (expected {{'images': [...]}})"
        ) from exc
    files = [
        (f"images[{index}]", _base64_item(text, f"images[{index}]"))
        for index, text in enumerate(parsed.images)
    ]
    return decode_files(files, shape, limits)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


SUPPORTED_MEDIA_TYPES = ("multipart/form-data", "application/json", NPY_MEDIA_TYPE)


async def form_files(form_items: Sequence[tuple[str, object]]) -> list[tuple[str, bytes]]:
    """Each file part as ``(file[i] ('name.png'), bytes)``; a part that is not a file is
    refused rather than dropped, so that every image sent gets its answer or an error."""
    files: list[tuple[str, bytes]] = []
    for field, value in form_items:
        if not isinstance(value, UploadFile):
            raise ApiError(
                422,
                "invalid_request",
                f"form field {_quoted(field)} is not a file: send each image as a file part "
                "(with a filename)",
            )
        label = f"file[{len(files)}]"
        if value.filename:
            label += f" ({_quoted(value.filename)})"
        files.append((label, await value.read()))
    return files
