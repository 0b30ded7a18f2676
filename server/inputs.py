"""From request bodies to the model's input: decoding, limits and clear errors.

Three body formats, one result (uint8 ``(N, H, W, C)`` at the victim's input shape):

* ``multipart/form-data``: one or more image files (PNG, JPEG, GIF, BMP, WebP, TIFF);
* ``application/json``: ``{"images": [base64 file, ...]}``;
* ``application/x-npy``: a uint8 array (N, H, W) or (N, H, W, C), the fast path.

Every refusal names the offending item. Nothing is decoded before it is known to be cheap:
pixel counts come from the image header (or the .npy header), so a decompression bomb costs
nothing; a file's structure (JPEG scans and markers, PNG chunks, GIF blocks, TIFF strips) is
counted before Pillow parses it, so a small file cannot keep a worker busy for minutes; only
the first frame of an animated or multi-page file is ever decoded.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlaas.images import InputShape, to_shape
from mlaas.wire import NPY_MEDIA_TYPE
from server.errors import ApiError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
"""Pillow opens nothing else: no EPS, PDF or PSD, so no Ghostscript or other external program."""

MAX_SEGMENTS = 1 << 17
"""The most chunks (PNG), markers (JPEG), blocks before the first image (GIF), or strips,
tiles and directory entries (TIFF) a request's files may hold in all. Pillow walks each of
them in Python: a 28 MB TIFF listing 7 million strips of a 16x16 image took it 28 s and
840 MB, 31 MB of empty PNG chunks 5 s; at this limit the worst request takes under a second."""

JPEG_MAX_SCANS = 100
"""libjpeg decodes every scan of a progressive JPEG over the whole image, and a scan can cost
a few bytes: 1,000 copies of one scan in a 99 KB file took 6 s at 4096x4096, a 32 MB body
would take hours (libjpeg-turbo's LJT-01-003). Encoders write about 10 scans; libtiff stops a
JPEG inside a TIFF at the same 100 (LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER)."""

TOTAL_PIXELS_FACTOR = 4
"""A request's images hold at most this many times the per-image pixel limit in all, unless
:attr:`Limits.max_total_pixels` says otherwise: four images at the limit, or 256 at 512x512
by default. Decoding 256 images at the limit would take one request over a minute."""


@dataclass
class Limits:
    max_images: int
    max_pixels: int
    max_total_pixels: int | None = None

    @property
    def total_pixels(self) -> int:
        if self.max_total_pixels is not None:
            return self.max_total_pixels
        return TOTAL_PIXELS_FACTOR * self.max_pixels


@dataclass
class Budget:
    """What is left of one request's allowance as its files are decoded one by one."""

    pixels: int
    segments: int = MAX_SEGMENTS

    @classmethod
    def of(cls, limits: Limits) -> Budget:
        return cls(limits.total_pixels)


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


def _too_complex(item: str, problem: str) -> ApiError:
    return ApiError(413, "image_too_complex", f"{item}: {problem}")


def _quoted(text: str, most: int = 80) -> str:
    return repr(text if len(text) <= most else text[:most] + "...")


def _check_pixels(item: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{item}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
        )


def _check_size(
    item: str,
    width: int,
    height: int,
    limits: Limits,
    shape: InputShape | None,
    budget: Budget | None,
) -> None:
    """Everything the header tells: pixels, the request's pixel budget, the resize's cost."""
    _check_pixels(item, width, height, limits)
    if budget is not None and width * height > budget.pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"{item}: the request's images hold more than {limits.total_pixels} pixels in all; "
            "send fewer or smaller images",
        )
    # Resizing widens a narrow image to the model's width before it shrinks it in height (and
    # the other way round): a 16777216x1 image would take 2 GB to reach 28x28, 15 GB for 224.
    if shape is not None:
        work = max(width, shape.width) * max(height, shape.height)
        if work > limits.max_pixels:
            raise ApiError(
                413,
                "image_too_large",
                f"{item}: {width}x{height} pixels is too elongated to resize to the model's "
                f"{shape.width}x{shape.height} within the limit of {limits.max_pixels} pixels",
            )


# JPEG: a marker is 0xFF (fill bytes 0xFF may repeat) and a byte that is neither a stuffed zero
# nor a restart marker (both of which occur inside entropy-coded data).
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
_JPEG_NO_LENGTH = (0x01, 0xD8)  # TEM, SOI: no length field follows


def _jpeg_structure(data: bytes, most: int) -> tuple[int, int]:
    """Scans, and markers plus the bytes Pillow reads one at a time before the first scan.

    The walk finds every marker libjpeg reads (it skips segments by their length as libjpeg
    does and stops at the first EOI); it stops once a count is over its limit.
    """
    scans = steps = 0
    pos = 2
    while scans <= JPEG_MAX_SCANS and steps <= most:
        match = _JPEG_MARKER.search(data, pos)
        if match is None:
            break
        # Before the first scan Pillow's own loop reads junk and fill bytes one at a time.
        steps += match.end() - pos if scans == 0 else 1
        marker = match[1][0]
        pos = match.end()
        if marker == 0xD9:  # EOI: libjpeg reads no further (an MPO's next image, trailing data)
            break
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker == 0xDA:
            scans += 1
        pos += int.from_bytes(data[pos : pos + 2], "big")  # SOS: the entropy data follows
    return scans, steps


def _png_chunks(data: bytes, most: int) -> int:
    count, pos = 0, 8
    while pos + 8 <= len(data) and count <= most:
        count += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return count


def _gif_blocks(data: bytes, most: int) -> int:
    """Blocks, sub-blocks and stray bytes before the first image, as Pillow reads them."""
    if len(data) < 13:
        return 0
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    count = 0
    while pos < len(data) and count <= most:
        kind = data[pos]
        count += 1
        if kind in (0x2C, 0x3B):  # the first image, or the trailer
            break
        if kind != 0x21:  # a stray byte: Pillow skips it
            pos += 1
            continue
        pos += 2  # extension introducer and label, then sub-blocks up to an empty one
        while pos < len(data) and count <= most:
            size = data[pos]
            count += 1
            pos += 1 + size
            if size == 0:
                break
    return count


_TIFF_PREFIXES = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a")
_BIGTIFF_PREFIXES = (b"MM\x00\x2b", b"II\x2b\x00")
_ANY_TIFF = _TIFF_PREFIXES + _BIGTIFF_PREFIXES
_TIFF_CHUNK_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, ...


def _tiff_segments(data: bytes, most: int) -> int:
    """The first directory's entries and the strips or tiles it lists."""
    order = "<" if data.startswith(b"II") else ">"
    big = data.startswith(_BIGTIFF_PREFIXES)
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, offset)
            first, size, count_format = offset + 8, 20, "Q"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, offset)
            first, size, count_format = offset + 2, 12, "I"
    except struct.error:
        return 0  # Pillow refuses it
    if entries > most:
        return entries
    chunks = 0
    for at in range(first, first + size * entries, size):
        if at + size > len(data):
            break
        (tag,) = struct.unpack_from(order + "H", data, at)
        if tag in _TIFF_CHUNK_TAGS:
            (count,) = struct.unpack_from(order + count_format, data, at + 4)
            chunks = max(chunks, count)
    return entries + chunks


def _check_structure(data: bytes, item: str, budget: Budget) -> None:
    """Refuse files whose structure would take Pillow or libjpeg seconds to walk."""
    most = min(budget.segments, MAX_SEGMENTS)
    if data.startswith(b"\xff\xd8\xff"):
        scans, count = _jpeg_structure(data, most)
        if scans > JPEG_MAX_SCANS:
            raise _too_complex(item, f"a JPEG of more than {JPEG_MAX_SCANS} scans")
        what = "JPEG markers or fill bytes"
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        count, what = _png_chunks(data, most), "PNG chunks"
    elif data.startswith((b"GIF87a", b"GIF89a")):
        count, what = _gif_blocks(data, most), "GIF blocks before the image"
    elif data.startswith(_ANY_TIFF):
        count, what = _tiff_segments(data, most), "TIFF strips, tiles or tags"
    else:
        return
    if count > most:
        if count > MAX_SEGMENTS:
            raise _too_complex(item, f"more than {MAX_SEGMENTS} {what}")
        raise _too_complex(
            item,
            f"the request's files hold more than {MAX_SEGMENTS} chunks, markers, blocks or "
            "strips in all; send fewer files in one request",
        )
    budget.segments -= count


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb(item: str, exc: Exception, limits: Limits) -> ApiError:
    """Pillow's own bomb check, in open(): the same refusal as ours, in our words."""
    found = _BOMB_PIXELS.search(str(exc))
    size = f"{found[1]} pixels" if found else "its size"
    limit = min(limits.max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or limits.max_pixels))
    return ApiError(413, "image_too_large", f"{item}: {size} exceeds the limit of {limit} pixels")


class _UnusablePixels(ValueError):
    pass


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError)


def decode_image_file(
    data: bytes,
    item: str,
    limits: Limits,
    shape: InputShape | None = None,
    budget: Budget | None = None,
) -> np.ndarray:
    """One encoded image to uint8 (H, W, C) with C in (1, 3), its first frame if animated.

    ``shape`` (the model's input) and ``budget`` (what is left of the request's allowance,
    charged for this file) add their checks to the header's; nothing is decoded before all
    of them pass.
    """
    if not data:
        raise _invalid(item, "empty file")
    _check_structure(data, item, budget if budget is not None else Budget.of(limits))
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        _check_size(item, image.width, image.height, limits, shape, budget)
        image.seek(0)
        image.load()
        return _to_array(image)
    except ApiError:
        raise
    except _UnusablePixels as exc:
        raise _invalid(item, str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise _bomb(item, exc, limits) from exc
    except UnidentifiedImageError as exc:
        raise _invalid(
            item, f"not a decodable image (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise _invalid(item, f"corrupt or truncated image ({exc})") from exc
    except MemoryError as exc:
        raise ApiError(413, "image_too_large", f"{item}: too large to decode now") from exc
    except Exception as exc:  # a plugin's parser tripping on hostile bytes: still the file's fault
        log.warning("unexpected error decoding %s", item, exc_info=True)
        raise _invalid(item, f"undecodable image ({type(exc).__name__})") from exc


def _scaled(wide: np.ndarray, peak: float) -> np.ndarray:
    return np.clip(np.rint(wide * (255.0 / peak)), 0, 255).astype(np.uint8)[..., None]


def _to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        # 16/32-bit grey: scale to 8 bits rather than clip, so the picture survives.
        return _scaled(np.asarray(image, dtype=np.float64), 65535.0)
    if mode == "I":  # 32-bit signed: 8-, 16- or 31-bit data, by its largest value
        wide = np.asarray(image, dtype=np.float64)
        top = wide.max()
        return _scaled(wide, 255.0 if top <= 255 else 65535.0 if top <= 65535 else 2.0**31 - 1)
    if mode == "F":  # [0, 1] if it fits, else [0, 255]
        wide = np.asarray(image, dtype=np.float64)
        if not np.isfinite(wide).all():
            raise _UnusablePixels("floating-point pixels must be finite, not NaN or infinite")
        return _scaled(wide, 1.0 if wide.max() <= 1.0 else 255.0)
    if mode == "La":  # premultiplied alpha: undo it, as RGBa files are, before dropping alpha
        image = image.convert("LA")
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    if mode in ("P", "PA") and image.palette is not None and image.palette.mode in ("L", "LA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


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
        raise _invalid("body", f"not a valid .npy array ({exc})") from exc
    if dtype != np.uint8:
        raise _invalid("body", f"dtype must be uint8, not {dtype}")
    if len(dims) not in (3, 4) or (len(dims) == 4 and dims[-1] not in (1, 3, 4)):
        raise _invalid(
            "body",
            f"shape must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {dims}",
        )
    count, height, width = dims[:3]
    if count <= 0:
        raise _invalid("body", "the batch holds no images")
    if height <= 0 or width <= 0:
        raise _invalid("body", f"images must not be empty; got {height}x{width}")
    if count > limits.max_images:
        raise _too_many(count, limits)
    _check_size("body", width, height, limits, shape, None)
    if count * height * width > limits.total_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"body: {count} images of {width}x{height} hold more than {limits.total_pixels} "
            "pixels in all; send fewer or smaller images",
        )
    expected, offset = math.prod(dims), stream.tell()
    if len(body) - offset != expected:
        raise _invalid(
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
        raise _invalid("body", "no image in the request")
    if len(files) > limits.max_images:
        raise _too_many(len(files), limits)
    conformed, sent = [], []
    budget = Budget.of(limits)
    for name, data in files:  # one full-size image in memory at a time
        image = decode_image_file(data, name, limits, shape, budget)
        budget.pixels -= image.shape[0] * image.shape[1]
        sent.append(_shape_text(image))
        conformed.append(to_shape(image[None], shape))
    return DecodedBatch(np.concatenate(conformed), sent)


@functools.lru_cache(maxsize=8)
def _json_body(max_images: int) -> type[BaseModel]:
    class JsonBody(BaseModel):
        # fail_fast and max_length: the first bad item or the count ends validation, so a
        # body of 16 million numbers is one error, not 16 million (42 s and 9 GB).
        images: list[str] = Field(min_length=1, max_length=max_images, fail_fast=True)

    return JsonBody


def _base64_item(text: str, item: str) -> bytes:
    payload = text
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise _invalid(item, "a data: URL must be base64 (data:image/png;base64,...)")
    try:
        # Line breaks and spaces (MIME-style base64) are not part of the data.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid(item, "not valid base64") from exc


def decode_json(body: bytes, shape: InputShape, limits: Limits) -> DecodedBatch:
    try:
        parsed = _json_body(limits.max_images).model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "too_long":
            raise _too_many(first["ctx"]["actual_length"], limits) from exc
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


async def form_files(form_items: list[tuple[str, object]]) -> list[tuple[str, bytes]]:
    """Each file part as ``(file[i] ('name.png'), bytes)``; a part that is not a file is
    refused rather than dropped, so that every image sent gets its answer or an error."""
    files = []
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
