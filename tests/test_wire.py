import io
import pickle

import numpy as np
import pytest
from PIL import Image

from mlaas.images import InputShape, to_shape, to_tensor
from mlaas.wire import decode_npy, encode_npy, encode_png


def test_npy_round_trip_keeps_bytes_and_shape() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    decoded = decode_npy(encode_npy(images))
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    assert np.array_equal(decoded, images)


def test_encode_npy_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_npy(np.zeros((1, 4, 4), dtype=np.float32))


def test_decode_npy_never_unpickles() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buffer.getvalue())
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as no unpickling
        decode_npy(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 1), (6, 7, 3)])
def test_png_is_lossless(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
    assert np.array_equal(decoded.reshape(image.shape), image)


def test_input_shape_parse_and_str() -> None:
    assert InputShape.parse("3x32x32") == InputShape(3, 32, 32)
    assert str(InputShape(1, 28, 28)) == "1x28x28"
    for bad in ("32x32", "2x28x28", "axbxc"):
        with pytest.raises(ValueError):
            InputShape.parse(bad)


def test_to_shape_converts_channels_and_size() -> None:
    grey = np.full((2, 10, 10), 200, dtype=np.uint8)
    rgb = to_shape(grey, InputShape(3, 20, 20))
    assert rgb.shape == (2, 20, 20, 3) and rgb.dtype == np.uint8
    assert np.all(rgb == 200)  # a flat image stays flat through resizing
    colour = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    colour[..., 0] = 255  # pure red: luma 0.299 * 255
    assert to_shape(colour, InputShape(1, 4, 4))[0, 0, 0, 0] == 76
    rgba = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    assert to_shape(rgba, InputShape(3, 4, 4)).shape == (1, 4, 4, 3)


def test_to_shape_downscaling_averages() -> None:
    stripes = np.zeros((1, 32, 32, 1), dtype=np.uint8)
    stripes[:, :, ::2] = 255
    small = to_shape(stripes, InputShape(1, 8, 8))
    assert 100 < int(small.mean()) < 155  # antialiasing averages stripes instead of sampling


def test_to_tensor_scales_to_unit_interval() -> None:
    batch = np.array([[[[0], [255]]]], dtype=np.uint8)  # (1, 1, 2, 1)
    tensor = to_tensor(batch)
    assert tuple(tensor.shape) == (1, 1, 1, 2)
    assert tensor.min().item() == 0.0 and tensor.max().item() == 1.0
