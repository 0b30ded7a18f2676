"""What one request may cost, and the refusals the decoders share.

Everything here is checked from headers alone (the image's, the .npy array's), before any
pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlaas.images import InputShape
from server.errors import ApiError

MAX_SEGMENTS = 1 << 17
"""The most chunks (PNG), markers (JPEG), blocks before the first image (GIF), or strips,
tiles and directory entries (TIFF) a request's files may hold in all. Pillow walks each of
them in Python: a 28 MB TIFF listing 7 million strips of a 16x16 image took it 28 s and
840 MB, 31 MB of empty PNG chunks 5 s; at this limit the worst request takes under a second."""
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


def invalid(item: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_image", f"{item}: {problem}")


def too_many(count: int, limits: Limits) -> ApiError:
    return ApiError(
        413,
        "too_many_images",
        f"{count} images in one request; the limit is {limits.max_images}",
    )


def too_complex(item: str, problem: str) -> ApiError:
    return ApiError(413, "image_too_complex", f"{item}: {problem}")


def _check_pixels(item: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{item}: {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
        )


def check_size(
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
