"""One encoded image file to pixels: only the formats allowed, only once every check on its
header and structure has passed, only its first frame, and every failure the file's fault.
"""

from __future__ import annotations

import io
import logging
import re
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlaas.images import InputShape
from server.errors import ApiError
from server.inputs.limits import Budget, Limits, check_size, invalid
from server.inputs.structure import check_structure

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
"""Pillow opens nothing else: no EPS, PDF or PSD, so no Ghostscript or other external program."""

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
        raise invalid(item, "empty file")
    check_structure(data, item, budget if budget is not None else Budget.of(limits))
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        check_size(item, image.width, image.height, limits, shape, budget)
        image.seek(0)
        image.load()
        return _to_array(image)
    except ApiError:
        raise
    except _UnusablePixels as exc:
        raise invalid(item, str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise _bomb(item, exc, limits) from exc
    except UnidentifiedImageError as exc:
        raise invalid(
            item, f"not a decodable image (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise invalid(item, f"corrupt or truncated image ({exc})") from exc
    except MemoryError as exc:
        raise ApiError(413, "image_too_large", f"{item}: too large to decode now") from exc
    except Exception as exc:  # a plugin's parser tripping on hostile bytes: still the file's fault
        log.warning("unexpected error decoding %s", item, exc_info=True)
        raise invalid(item, f"undecodable image ({type(exc).__name__})") from exc


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
