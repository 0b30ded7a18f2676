"""Image arrays as every part of the testbed sees them.

The canonical in-memory form is a ``uint8`` array shaped ``(N, H, W, C)``: what PIL decodes,
what the wire codec sends and what the query log stores. Conversion to a model's input shape
happens in exactly one place, :func:`to_shape`, so that an image sent over HTTP and the same
image fed in-process reach the model as identical tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class InputShape:
    """A model's input: channels (1 grey or 3 RGB) and spatial size in pixels."""

    channels: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, not {self.height}x{self.width}")

    @classmethod
    def square(cls, channels: int, size: int) -> InputShape:
        return cls(channels, size, size)

    @classmethod
    def parse(cls, text: str) -> InputShape:
        """Parse ``CxHxW`` (as printed by ``str``), e.g. ``1x28x28`` or ``3x32x32``."""
        match = _SHAPE_RE.match(text)
        if not match:
            raise ValueError(
                f"input shape must look like 3x32x32 (channels x height x width), not {text!r}"
            )
        return cls(*(int(g) for g in match.groups()))

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"

    @property
    def hwc(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """Return ``images`` as ``(N, H, W, C)``, adding the channel axis to grey ``(N, H, W)``."""
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W) or (N, H, W, C), got {images.shape}")
    return images


def to_shape(images: np.ndarray, shape: InputShape) -> np.ndarray:
    """Convert a ``uint8`` batch to ``shape``: channel count first, then size.

    Grey becomes RGB by repetition; RGB becomes grey by the ITU-R 601 luma weights (as PIL's
    ``convert("L")``); an alpha channel is dropped. Resizing is bilinear with antialiasing,
    so shrinking a photograph does not alias. Already-conforming batches are returned as is.
    """
    images = as_nhwc(np.asarray(images))
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, not {images.dtype}")
    channels = images.shape[-1]
    if channels in (2, 4):  # grey+alpha, RGBA: drop alpha
        images = images[..., : channels - 1]
        channels -= 1
    if channels not in (1, 3):
        raise ValueError(f"images must have 1, 3 or 4 channels, not {channels}")
    if channels != shape.channels:
        if shape.channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:
            luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            images = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    if images.shape[1:3] == (shape.height, shape.width):
        return np.ascontiguousarray(images)
    # A decoded request body is read-only; torch wants memory it may write (copied if so).
    batch = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    batch = batch.permute(0, 3, 1, 2).float()
    resized = F.interpolate(
        batch,
        size=(shape.height, shape.width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``uint8 (N, H, W, C)`` to the float ``(N, C, H, W)`` in ``[0, 1]`` that models take.

    The division happens on the target device, so only bytes cross the bus to a GPU.
    """
    writable = np.require(as_nhwc(images), requirements=["C", "W"])
    batch = torch.from_numpy(writable).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def mild_variations(
    images: np.ndarray, rng: np.random.Generator, max_shift: int = 2, noise: float = 4.0
) -> np.ndarray:
    """What benign users' photos of the same things look like: small shifts, a brightness
    change of up to 10 %, a little sensor noise. Used to simulate and calibrate on benign
    streams that are not pixel-identical to the data set."""
    images = as_nhwc(np.asarray(images))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        shifted = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        varied = shifted.astype(np.float32) * rng.uniform(0.9, 1.1)
        varied += rng.normal(0.0, noise, size=varied.shape)
        out[i] = np.clip(np.rint(varied), 0, 255).astype(np.uint8)
    return out
