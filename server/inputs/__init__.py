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

Modules by job: :mod:`~server.inputs.limits` (what a request may cost, the shared refusals),
:mod:`~server.inputs.structure` (file structure counted before parsing),
:mod:`~server.inputs.images` (one image file to pixels), :mod:`~server.inputs.bodies` (request
bodies to a batch) and :mod:`~server.inputs.middleware` (the body size limit).
"""

from server.inputs.bodies import (
    SUPPORTED_MEDIA_TYPES,
    DecodedBatch,
    decode_files,
    decode_json,
    decode_npy_batch,
    form_files,
    media_type,
)
from server.inputs.images import ALLOWED_FORMATS, decode_image_file
from server.inputs.limits import MAX_SEGMENTS, TOTAL_PIXELS_FACTOR, Budget, Limits
from server.inputs.middleware import BodySizeLimit, BodyTooLarge
from server.inputs.structure import JPEG_MAX_SCANS

__all__ = [
    "ALLOWED_FORMATS",
    "JPEG_MAX_SCANS",
    "MAX_SEGMENTS",
    "SUPPORTED_MEDIA_TYPES",
    "TOTAL_PIXELS_FACTOR",
    "BodySizeLimit",
    "BodyTooLarge",
    "Budget",
    "DecodedBatch",
    "Limits",
    "decode_files",
    "decode_image_file",
    "decode_json",
    "decode_npy_batch",
    "form_files",
    "media_type",
]
