"""Decoding of request bodies: every format, every odd image mode, every refusal."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mlaas.images import InputShape
from mlaas.wire import encode_npy
from server.errors import ApiError
from server.inputs import Limits, decode_files, decode_image_file, decode_json, decode_npy_batch

SHAPE = InputShape(1, 28, 28)
LIMITS = Limits(max_images=4, max_pixels=512 * 512)


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def refusal(call, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value


def test_grey_png_decodes_exactly() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    decoded = decode_image_file(encoded(Image.fromarray(pixels)), "a.png", LIMITS)
    assert decoded.shape == (28, 28, 1) and np.array_equal(decoded[..., 0], pixels)


@pytest.mark.parametrize(
    ("image", "fmt", "channels"),
    [
        (Image.new("RGB", (40, 30), (255, 0, 0)), "JPEG", 3),
        (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", 3),
        (Image.new("RGBA", (40, 30), (0, 0, 255, 128)), "PNG", 3),
        (Image.new("LA", (40, 30), (90, 10)), "PNG", 1),
        (Image.new("P", (40, 30), 3), "PNG", 3),
        (Image.new("1", (40, 30), 1), "PNG", 1),
        (Image.new("RGB", (40, 30), (0, 255, 0)), "WEBP", 3),
        (Image.new("RGB", (40, 30), (0, 255, 0)), "BMP", 3),
    ],
)
def test_modes_decode_to_grey_or_rgb(image: Image.Image, fmt: str, channels: int) -> None:
    decoded = decode_image_file(encoded(image, fmt), "x", LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (30, 40, channels)


def test_cmyk_comes_out_as_the_right_colour() -> None:
    cyan = decode_image_file(
        encoded(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"), "c", LIMITS
    )
    red, green, blue = cyan[4, 4].astype(int)
    assert red < 40 and green > 200 and blue > 200


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    wide = np.full((10, 10), 32768, dtype=np.uint16)
    decoded = decode_image_file(encoded(Image.fromarray(wide)), "deep.png", LIMITS)
    assert decoded.shape == (10, 10, 1)
    assert 125 <= int(decoded[0, 0, 0]) <= 130


def test_multi_frame_gif_uses_the_first_frame() -> None:
    frames = [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image_file(buffer.getvalue(), "anim.gif", LIMITS)
    assert int(decoded.mean()) < 50


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a decodable image"),
        (encoded(Image.new("L", (50, 50), 7))[:60], "corrupt or truncated"),
    ],
)
def test_undecodable_files_are_422_naming_the_item(data: bytes, fragment: str) -> None:
    error = refusal(decode_image_file, data, "shirt.png", LIMITS)
    assert error.status == 422
    assert "shirt.png" in error.message and fragment in error.message


def test_pixel_limit_checked_from_the_header() -> None:
    bomb = encoded(Image.new("L", (600, 600), 0))  # compresses to a few hundred bytes
    assert len(bomb) < 5000
    error = refusal(decode_image_file, bomb, "bomb.png", LIMITS)
    assert error.status == 413 and "600x600" in error.message


def test_npy_batch_converts_to_the_model_shape() -> None:
    batch = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    decoded = decode_npy_batch(encode_npy(batch), SHAPE, LIMITS)
    assert decoded.images.shape == (3, 28, 28, 1)
    assert decoded.original_shapes == ["56x56x3"] * 3


@pytest.mark.parametrize(
    ("array", "status", "fragment"),
    [
        (np.zeros((2, 28, 28), np.float32), 422, "uint8"),
        (np.zeros((28, 28), np.uint8), 422, "shape"),
        (np.zeros((2, 28, 28, 2, 1), np.uint8), 422, "shape"),
        (np.zeros((0, 28, 28), np.uint8), 422, "no images"),
        (np.zeros((5, 28, 28), np.uint8), 413, "limit is 4"),
        (np.zeros((1, 600, 600), np.uint8), 413, "pixels"),
    ],
)
def test_npy_refusals(array: np.ndarray, status: int, fragment: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    error = refusal(decode_npy_batch, buffer.getvalue(), SHAPE, LIMITS)
    assert error.status == status and fragment in error.message


def test_npy_garbage_is_422() -> None:
    assert refusal(decode_npy_batch, b"\x93NUMPY garbage", SHAPE, LIMITS).status == 422


def test_json_base64_and_data_urls() -> None:
    png = encoded(Image.new("L", (28, 28), 99))
    body = json.dumps(
        {
            "images": [
                base64.b64encode(png).decode(),
                "data:image/png;base64," + base64.b64encode(png).decode(),
            ]
        }
    ).encode()
    decoded = decode_json(body, SHAPE, LIMITS)
    assert decoded.images.shape == (2, 28, 28, 1) and np.all(decoded.images == 99)


def test_json_refusals_name_the_item() -> None:
    bad_base64 = json.dumps({"images": ["aGVsbG8=", "***"]}).encode()
    error = refusal(decode_json, bad_base64, SHAPE, LIMITS)
    assert error.status == 422 and "images[1]" in error.message
    not_an_image = json.dumps({"images": [base64.b64encode(b"hello").decode()]}).encode()
    error = refusal(decode_json, not_an_image, SHAPE, LIMITS)
    assert error.status == 422 and "images[0]" in error.message
    assert refusal(decode_json, b'{"pictures": []}', SHAPE, LIMITS).status == 422
    assert refusal(decode_json, b"{not json", SHAPE, LIMITS).status == 422


def test_too_many_files() -> None:
    png = encoded(Image.new("L", (28, 28), 1))
    assert refusal(decode_files, [("f", png)] * 5, SHAPE, LIMITS).status == 413
    assert refusal(decode_files, [], SHAPE, LIMITS).status == 422
