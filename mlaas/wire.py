"""The wire codec: what crosses HTTP between a client and the prediction API.

Both halves import this module and nothing of each other, so the response schema lives here:
the server builds these models, the attacker parses them.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

NPY_MEDIA_TYPE = "application/x-npy"
IMAGE_COUNT_HEADER = "X-Image-Count"
"""A prediction request's image count, declared so that limits are checked before its body."""
"""A batch as one NumPy ``.npy`` file: uint8, shaped (N, H, W) or (N, H, W, C)."""


def encode_npy(images: np.ndarray) -> bytes:
    """Serialise a uint8 batch as ``.npy`` bytes (the fastest request body the API takes)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"the API takes uint8 images, not {images.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes without ever unpickling (a request body is untrusted)."""
    # The .npy reader itself, not np.load, which opens a zip (.npz) body as an archive.
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of one uint8 image, (H, W), (H, W, 1) or (H, W, 3).

    Level 1 compresses grey 28x28 digits nearly as well as level 9 at a fraction of the CPU,
    which matters because the query log encodes every answered input.
    """
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_base64_png(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


class ClassScore(BaseModel):
    index: int = Field(description="Class index in the model's output vector")
    name: str = Field(description="Human-readable class name")
    prob: float = Field(description="Probability the API reveals for this class")


class Prediction(BaseModel):
    query_id: str = Field(description="Identifier of this answered query in the provider's log")
    label: int = Field(description="Index of the top-1 class")
    label_name: str = Field(description="Name of the top-1 class")
    scores: list[ClassScore] | None = Field(
        default=None,
        description=(
            "Classes with their probabilities, highest first; all classes for 'probs', the k "
            "highest for 'topk:K'; null for label-only granularity"
        ),
    )


class PredictResponse(BaseModel):
    model: str = Field(description="Name of the served model")
    granularity: str = Field(description="Output granularity applied to this answer")
    predictions: list[Prediction]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    """The public model card: what a client may know about the served model."""

    name: str
    classes: list[str]
    input_shape: str = Field(description="channels x height x width of the model's input")
    granularity: str
    max_images_per_request: int
