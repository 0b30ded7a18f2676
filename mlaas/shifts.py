"""Benign shifts: the ways honest users' images differ from the images a model was trained on.

A detector of extraction must tell an attacker from an honest user whose photos are framed,
lit, compressed or focused a little differently. Judging it only on the variations it was
calibrated on says nothing about the next user; so the shifts come as named *families*, and
a detector is calibrated on some families and judged on the others (held out).

Each family maps a ``uint8 (N, H, W, C)`` batch and a generator to a batch of the same shape,
drawing fresh parameters per image. ``mixture`` composes several families at once, as a user
whose photos are rotated, zoomed, low-contrast and re-compressed together.

    >>> shifted = apply_shift("jpeg", images, np.random.default_rng(0))
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from mlaas.images import as_nhwc, mild_variations

ShiftFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _per_image(transform: Callable[[Image.Image, np.random.Generator], Image.Image]) -> ShiftFn:
    """Lift a PIL transform of one image (drawing its own parameters) to a batch."""

    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = as_nhwc(np.asarray(images))
        out = np.empty_like(images)
        grey = images.shape[-1] == 1
        for i, image in enumerate(images):
            pil = Image.fromarray(image[..., 0] if grey else image)
            result = np.asarray(transform(pil, rng))
            out[i] = result[..., None] if grey else result
        return out

    return shift


def _zoom(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 80-100 % of each side at a random place, resized back: framed tighter."""
    width, height = image.size
    scale = rng.uniform(0.8, 1.0)
    crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
    left = int(rng.integers(width - crop_w + 1))
    top = int(rng.integers(height - crop_h + 1))
    return image.resize(
        (width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
    )


def _rotation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Held at a slant: up to 15 degrees either way, the corners filled with the border's tone."""
    corners = np.asarray(image)[[0, 0, -1, -1], [0, -1, 0, -1]]
    fill = tuple(int(v) for v in np.median(corners.reshape(4, -1), axis=0))
    return image.rotate(
        rng.uniform(-15.0, 15.0),
        Image.Resampling.BILINEAR,
        fillcolor=fill[0] if len(fill) == 1 else fill,
    )


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded by a phone or a web upload at quality 30-90."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 91)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(image.mode)


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Out of focus or shaken: a Gaussian blur of radius 0.4-1.2 pixels."""
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))


def _contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Other light or another camera: contrast 0.6-1.4 about the image's mean, gamma 0.7-1.4."""
    images = as_nhwc(np.asarray(images)).astype(np.float32) / 255.0
    n = len(images)
    contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(np.float32)
    gamma = np.exp(rng.uniform(np.log(0.7), np.log(1.4), size=(n, 1, 1, 1))).astype(np.float32)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    varied = np.clip((images - mean) * contrast + mean, 0.0, 1.0) ** gamma
    return np.clip(np.rint(varied * 255.0), 0, 255).astype(np.uint8)


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A noisy sensor in low light: Gaussian noise with a standard deviation of 4-16 levels."""
    images = as_nhwc(np.asarray(images))
    sigma = rng.uniform(4.0, 16.0, size=(len(images), 1, 1, 1))
    noisy = images.astype(np.float32) + rng.normal(0.0, 1.0, size=images.shape) * sigma
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


MIXTURE_PARTS = ("rotation", "zoom", "contrast", "jpeg", "blur", "noise")


def _chained(
    images: np.ndarray,
    rng: np.random.Generator,
    pick: Callable[[np.random.Generator], Sequence[str]],
) -> np.ndarray:
    """Each image under the families ``pick`` draws for it, one after the other, in order."""
    images = as_nhwc(np.asarray(images))
    out = np.empty_like(images)
    for i in range(len(images)):
        image = images[i : i + 1]
        for name in pick(rng):
            image = SHIFTS[name](image, rng)
        out[i] = image[0]
    return out


def _mixture_parts(rng: np.random.Generator) -> Sequence[str]:
    parts = [str(rng.choice(["rotation", "zoom"])), str(rng.choice(["contrast", "jpeg"]))]
    extra = [p for p in MIXTURE_PARTS if p not in parts]
    parts += list(rng.choice(extra, size=int(rng.integers(0, 3)), replace=False))
    return rng.permutation(parts).tolist()


def _mixture(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Several shifts at once: each image gets two to four of the single families, in a
    random order (always at least one geometric and one photometric change)."""
    return _chained(images, rng, _mixture_parts)


SHIFTS: dict[str, ShiftFn] = {
    "none": lambda images, rng: as_nhwc(np.asarray(images)).copy(),
    "mild": mild_variations,
    "zoom": _per_image(_zoom),
    "rotation": _per_image(_rotation),
    "jpeg": _per_image(_jpeg),
    "contrast": _contrast,
    "blur": _per_image(_blur),
    "noise": _noise,
    "mixture": _mixture,
}
"""Every family by name. ``none`` sends the images as they are."""

CALIBRATION_SHIFTS = ("mild", "zoom", "jpeg", "noise")
"""What ``mlaas defense train`` calibrates on by default."""

HELD_OUT_SHIFTS = ("rotation", "contrast", "blur", "mixture")
"""What the detection bench judges on, never seen by a default calibration."""


def shift_names() -> list[str]:
    return list(SHIFTS)


def parse_shifts(text: str | Sequence[str]) -> list[str]:
    """``"mild,zoom"`` or a list of names, checked against the registry (``all``: every one)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if names == ["all"]:
        return [n for n in SHIFTS if n != "none"]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown or not names:
        raise ValueError(
            f"unknown benign shift {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SHIFTS)}"
        )
    return names


def apply_shift(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``images`` as a user of family ``name`` would send them."""
    if name not in SHIFTS:
        raise ValueError(f"unknown benign shift {name!r}; choose from {', '.join(SHIFTS)}")
    return SHIFTS[name](images, rng)


def compose_shifts(
    names: Sequence[str], images: np.ndarray, rng: np.random.Generator, most: int = 3
) -> np.ndarray:
    """Each image under one to ``most`` of ``names`` at once, drawn at random and applied in
    a random order: what a detector must learn to accept when users combine habits."""
    names = parse_shifts(names)

    def pick(rng: np.random.Generator) -> Sequence[str]:
        count = int(rng.integers(1, min(most, len(names)) + 1))
        return rng.choice(names, size=count, replace=False).tolist()

    return _chained(images, rng, pick)


def shift_mixture(
    names: Sequence[str], images: np.ndarray, rng: np.random.Generator, composed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each image shifted by one of ``names``, chosen at random; returns the images and, per
    image, the index into ``names`` of its family. With ``composed``, one more group (index
    ``len(names)``) holds images under several of ``names`` at once (:func:`compose_shifts`)."""
    names = parse_shifts(names)
    images = as_nhwc(np.asarray(images))
    family = rng.integers(len(names) + int(composed), size=len(images))
    out = np.empty_like(images)
    for index in range(len(names) + int(composed)):
        mine = np.flatnonzero(family == index)
        if len(mine) == 0:
            continue
        if index < len(names):
            out[mine] = apply_shift(names[index], images[mine], rng)
        else:
            out[mine] = compose_shifts(names, images[mine], rng)
    return out, family
