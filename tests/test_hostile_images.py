"""Hostile and odd inputs: every one a clear 4xx or a correct answer, never a crash or a hang.

Truncated and corrupted files, formats outside the allowlist, every pixel mode checked
numerically, headers declaring huge sizes, decompression bombs, bombs in later frames,
files whose structure is cheap to send and dear to walk, zero sizes, hostile .npy and JSON
bodies, and the HTTP limits in all three body formats.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import subprocess
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import (
    EpsImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from mlaas.images import InputShape
from mlaas.wire import NPY_MEDIA_TYPE, encode_npy
from server.errors import ApiError
from server.inputs import (
    JPEG_MAX_SCANS,
    MAX_SEGMENTS,
    BodySizeLimit,
    BodyTooLarge,
    Limits,
    decode_files,
    decode_image_file,
    decode_json,
    decode_npy_batch,
)
from tests.helpers import bearer, create_key

SHAPE = InputShape(1, 28, 28)
# Pillow says what it thinks of these files as it reads them; here that is expected.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data"),
    pytest.mark.filterwarnings("ignore:Truncated File Read"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

LIMITS = Limits(max_images=4, max_pixels=512 * 512)
DEFAULTS = Limits(max_images=256, max_pixels=16_777_216)  # the service's defaults
FAST = 2.0  # seconds: generous for refusals that must not decode anything


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def refusal(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kwargs)
    return info.value


def noise(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- file builders -------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(
    width: int,
    height: int,
    idat: bytes | None,
    depth: int = 8,
    colour: int = 0,
    before_idat: bytes = b"",
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + before_idat
        + (png_chunk(b"IDAT", idat) if idat is not None else b"")
        + png_chunk(b"IEND", b"")
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, data) for kind, data in chunks)


def zero_rows(width: int, height: int, bytes_per_pixel: int = 1) -> bytes:
    """A zlib stream of all-zero scanlines: a few KB that inflate to width x height pixels."""
    row = b"\x00" * (width * bytes_per_pixel + 1)
    packer = zlib.compressobj(9)
    return b"".join(packer.compress(row) for _ in range(height)) + packer.flush()


def gif_file(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF whose frames declare the sizes given, each with two pixels of data (enough for
    the header checks: such a frame does not decode)."""
    data = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    for width, height in frames:
        data += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        data += b"\x02\x02\x44\x01\x00"  # LZW: clear, 0, 0, end (min code size 2)
    return data + b"\x3b"


def gif_with_a_later_frame(width: int, height: int) -> bytes:
    """A real 4x4 GIF of grey 40, then a second frame declaring width x height."""
    first = encoded(Image.new("L", (4, 4), 40), "GIF")
    later = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return first[:-1] + later + b"\x3b"


def tiff_file(directories: list[dict[int, tuple[int, list[int]]]], data: bytes = b"") -> bytes:
    """A little-endian TIFF: ``data`` at offset 8, then each directory {tag: (type, values)}."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00" + data)
    formats = {1: "B", 3: "H", 4: "I"}
    link = 4
    for entries in directories:
        out += b"\x00" * (len(out) % 2)
        start = len(out)
        struct.pack_into("<I", out, link, start)
        table = bytearray(struct.pack("<H", len(entries)))
        extra = bytearray()
        extra_at = start + 2 + 12 * len(entries) + 4
        for tag in sorted(entries):
            kind, values = entries[tag]
            raw = struct.pack(f"<{len(values)}{formats[kind]}", *values)
            if len(raw) <= 4:
                table += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\x00")
            else:
                table += struct.pack("<HHII", tag, kind, len(values), extra_at + len(extra))
                extra += raw + b"\x00" * (len(raw) % 2)
        link = start + len(table)
        out += table + b"\x00\x00\x00\x00" + extra
    return bytes(out)


def grey_tiff_directory(
    width: int, height: int, byte_count: int, extra: dict | None = None
) -> dict:
    directory = {
        256: (4, [width]),
        257: (4, [height]),
        258: (3, [8]),
        259: (3, [1]),
        262: (3, [1]),
        273: (4, [8]),
        277: (3, [1]),
        278: (4, [height]),
        279: (4, [byte_count]),
    }
    directory.update(extra or {})
    return directory


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of a JPEG after its SOI; a scan's bytes include its entropy data."""
    segments, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            segments.append((marker, data[pos : pos + 2]))
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == 0xDA:
            while not (
                data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7
            ):
                end += 1
        segments.append((marker, data[pos:end]))
        pos = end
    return segments


def jpeg_with_scans(data: bytes, scans: int, which: int = -1) -> bytes:
    """A progressive JPEG with one of its scans repeated until it has ``scans`` of them."""
    segments = jpeg_segments(data)
    positions = [i for i, (marker, _) in enumerate(segments) if marker == 0xDA]
    at = positions[which]
    copies = segments[at][1] * (scans - len(positions))
    return (
        b"\xff\xd8"
        + b"".join(s for _, s in segments[: at + 1])
        + copies
        + b"".join(s for _, s in segments[at + 1 :])
    )


# -- truncated, corrupted, not images -------------------------------------------------------

SOURCES = {
    "png": lambda: encoded(noise(), "PNG"),
    "jpeg": lambda: encoded(noise(), "JPEG"),
    "progressive-jpeg": lambda: encoded(noise(), "JPEG", progressive=True),
    "gif": lambda: encoded(noise().convert("P"), "GIF"),
    "tiff": lambda: encoded(noise(), "TIFF"),
    "tiff-lzw": lambda: encoded(noise(), "TIFF", compression="tiff_lzw"),
    "tiff-deflate": lambda: encoded(noise(), "TIFF", compression="tiff_adobe_deflate"),
    "webp": lambda: encoded(noise(), "WEBP"),
    "webp-lossless": lambda: encoded(noise(), "WEBP", lossless=True),
    "bmp": lambda: encoded(noise(), "BMP"),
}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_truncated_files_are_422_naming_the_item(kind: str, fraction: float) -> None:
    data = SOURCES[kind]()
    cut = data[: max(1, int(len(data) * fraction))]
    error = refusal(decode_image_file, cut, f"file[0] ('cut.{kind}')", LIMITS)
    assert error.status == 422 and error.message.startswith(f"file[0] ('cut.{kind}'): ")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", list(SOURCES))
def test_flipped_bytes_in_the_middle_are_422_or_an_image(kind: str, seed: int) -> None:
    data = bytearray(SOURCES[kind]())
    rng = np.random.default_rng(seed)
    for pos in rng.integers(len(data) // 4, 3 * len(data) // 4, size=1 + seed):
        data[pos] ^= int(rng.integers(1, 256))
    try:
        decoded = decode_image_file(bytes(data), "flipped", LIMITS)
    except ApiError as error:
        assert error.status in (413, 422) and error.message.startswith("flipped: ")
    else:  # damage inside the pixel data can decode: then as an image of the right kind
        assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] in (1, 3)


def test_png_checksums() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    chunks = png_chunks(encoded(Image.fromarray(pixels)))
    bad_header = bytearray(png_join(chunks))
    bad_header[8 + 8 + 13] ^= 0xFF  # IHDR's CRC
    assert refusal(decode_image_file, bytes(bad_header), "crc", LIMITS).status == 422
    # Pillow checks no IDAT checksum: intact data with a wrong CRC is still the right image.
    bad_data = bytearray(png_join(chunks))
    idat = bad_data.index(b"IDAT")
    (length,) = struct.unpack_from(">I", bad_data, idat - 4)
    bad_data[idat + 4 + length] ^= 0xFF
    try:
        decoded = decode_image_file(bytes(bad_data), "crc", LIMITS)
    except ApiError as error:
        assert error.status == 422
    else:
        assert np.array_equal(decoded[..., 0], pixels)


HEADER_ONLY = {
    "png": png_file(16, 16, None),
    "jpeg": encoded(noise(), "JPEG")[:200],
    "gif": b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0),
    "tiff": b"II*\x00\x08\x00\x00\x00",
    "webp": b"RIFF\x04\x00\x00\x00WEBP",
    "bmp": encoded(noise(), "BMP")[:54],
}
NOT_IMAGES = {
    "garbage": np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "text": b"Dear API, please classify this shirt.\n" * 20,
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10" fill="red"/></svg>',
    "html": b"<!doctype html><html><body><img src=x></body></html>",
    "one byte": b"\x89",
    "zeros": b"\x00" * 4096,
    **{f"{kind} header only": data for kind, data in HEADER_ONLY.items()},
}


@pytest.mark.parametrize("kind", list(NOT_IMAGES))
def test_not_images_are_422(kind: str) -> None:
    error = refusal(decode_image_file, NOT_IMAGES[kind], "x.png", LIMITS)
    assert error.status == 422 and error.message.startswith("x.png: ")


def _psd() -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(3 * 4 * 4)


def _outside(fmt: str) -> bytes:
    if fmt == "PSD":
        return _psd()
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    return encoded(image.convert("F") if fmt == "SPIDER" else image, fmt)


@pytest.mark.parametrize(
    "fmt", ["EPS", "PSD", "ICO", "PDF", "PPM", "TGA", "PCX", "SGI", "QOI", "DDS", "SPIDER"]
)
def test_formats_outside_the_allowlist_are_refused_unopened(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _outside(fmt)
    if fmt != "PDF":  # Pillow writes PDF but reads none: refused in any case
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it

    def no_external_program(*args, **kwargs):
        raise AssertionError(f"an external program was started: {args}")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_external_program)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_external_program)
    error = refusal(decode_image_file, data, f"file.{fmt.lower()}", LIMITS)
    assert error.status == 422 and "not a decodable image" in error.message


def test_what_the_name_or_content_type_says_is_ignored(make_client) -> None:
    client = make_client()
    key = create_key(client, "liar")
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    png = encoded(Image.fromarray(pixels))
    answers = [
        client.post("/v1/predict", files=[("file", (name, png, kind))], headers=bearer(key))
        for name, kind in [
            ("shirt.png", "image/png"),
            ("shirt.jpg", "image/jpeg"),
            ("shirt.exe", "application/x-msdownload"),
        ]
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    probs = [a.json()["predictions"][0]["scores"] for a in answers]
    assert probs[0] == probs[1] == probs[2]


# -- modes, numerically ---------------------------------------------------------------------


def _png16(colour: int, samples: list[int], width: int = 2) -> bytes:
    """A 16-bit PNG of one row: grey (0), RGB (2), grey+alpha (4) or RGBA (6)."""
    row = b"\x00" + b"".join(struct.pack(">H", value) for value in samples)
    return png_file(width, 1, zlib.compress(row), depth=16, colour=colour)


def _tiff_of(array: np.ndarray, mode: str | None = None) -> bytes:
    image = (
        Image.fromarray(array)
        if mode is None
        else Image.frombytes(mode, (array.shape[1], array.shape[0]), array.tobytes())
    )
    return encoded(image, "TIFF")


def _palette(transparent: bool) -> bytes:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * 759)
    image.putdata([0, 1, 2])
    return encoded(image, "PNG", **({"transparency": 2} if transparent else {}))


def _premultiplied_grey() -> bytes:
    """A TIFF of grey 50 at alpha 128, premultiplied (ExtraSamples = 1): Pillow's mode La."""
    pixels = bytes([50, 128] * 4)
    directory = grey_tiff_directory(2, 2, 8, {258: (3, [8, 8]), 277: (3, [2]), 338: (3, [1])})
    return tiff_file([directory], pixels)


MODES = {
    # name: (file, expected uint8 (H, W, C) pixels, tolerance)
    "CMYK JPEG red": (
        encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100),
        np.full((8, 8, 3), (255, 0, 0)),
        3,
    ),
    "CMYK TIFF": (
        _tiff_of(np.array([[[0, 255, 255, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK"),
        np.array([[[255, 0, 0], [0, 255, 255], [0, 0, 0]]]),
        0,
    ),
    "I;16 PNG": (_png16(0, [0, 257 * 100, 65535], 3), np.array([[[0], [100], [255]]]), 0),
    "I;16 TIFF": (
        _tiff_of(np.array([[0, 257 * 100, 65535]], np.uint16)),
        np.array([[[0], [100], [255]]]),
        0,
    ),
    "I;16B TIFF": (
        _tiff_of(np.array([[0, 257 * 100, 65535]], ">u2"), "I;16B"),
        np.array([[[0], [100], [255]]]),
        0,
    ),
    "I TIFF, 8-bit values": (
        _tiff_of(np.array([[0, 100, 255]], np.int32)),
        np.array([[[0], [100], [255]]]),
        0,
    ),
    "I TIFF, 16-bit values": (
        _tiff_of(np.array([[0, 257 * 100, 65535]], np.int32)),
        np.array([[[0], [100], [255]]]),
        0,
    ),
    "I TIFF, 31-bit values": (
        _tiff_of(np.array([[-5, 2**30, 2**31 - 1]], np.int32)),
        np.array([[[0], [128], [255]]]),
        0,
    ),
    "F TIFF in [0, 1]": (
        _tiff_of(np.array([[0.0, 0.5, 1.0, -0.5]], np.float32)),
        np.array([[[0], [128], [255], [0]]]),
        0,
    ),
    "F TIFF in [0, 255]": (
        _tiff_of(np.array([[0.0, 100.4, 255.0, 300.0]], np.float32)),
        np.array([[[0], [100], [255], [255]]]),
        0,
    ),
    "48-bit RGB PNG": (
        _png16(2, [0x8000, 0xFFFF, 0x0000, 0x0000, 0x1234, 0xFF00]),
        np.array([[[128, 255, 0], [0, 0x12, 0xFF]]]),
        0,
    ),
    "64-bit RGBA PNG": (
        _png16(6, [0x8000, 0xFFFF, 0x0000, 0x0000] * 2),
        np.array([[[128, 255, 0], [128, 255, 0]]]),
        0,
    ),
    "32-bit grey+alpha PNG": (  # Pillow reads it as RGBA
        _png16(4, [0x6400, 0xFFFF, 0xC800, 0]),
        np.array([[[100, 100, 100], [200, 200, 200]]]),
        0,
    ),
    "P PNG": (_palette(False), np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]]), 0),
    "P PNG with transparency": (
        _palette(True),
        np.array([[[255, 0, 0], [0, 255, 0], [10, 20, 30]]]),
        0,
    ),
    "P GIF": (
        encoded(Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), "GIF"),
        np.full((4, 4, 3), (0, 0, 255)),
        0,
    ),
    "LA PNG": (encoded(Image.new("LA", (4, 4), (90, 10))), np.full((4, 4, 1), 90), 0),
    "La TIFF": (_premultiplied_grey(), np.full((2, 2, 1), 100), 1),
    "RGBA PNG, transparent": (
        encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 0))),
        np.full((4, 4, 3), (10, 20, 30)),
        0,
    ),
    "RGBA WebP": (
        encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 200)), "WEBP", lossless=True),
        np.full((4, 4, 3), (10, 20, 30)),
        0,
    ),
    "1-bit PNG": (
        encoded(Image.frombytes("1", (8, 1), bytes([0b10100000]))),
        np.array([[[255], [0], [255], [0], [0], [0], [0], [0]]]),
        0,
    ),
    "1-bit TIFF": (
        encoded(Image.frombytes("1", (8, 1), bytes([0b01000000])), "TIFF"),
        np.array([[[0], [255], [0], [0], [0], [0], [0], [0]]]),
        0,
    ),
    "1-bit BMP": (
        encoded(Image.frombytes("1", (8, 1), bytes([0b00000001])), "BMP"),
        np.array([[[0], [0], [0], [0], [0], [0], [0], [255]]]),
        0,
    ),
    "grey JPEG": (encoded(Image.new("L", (8, 8), 77), "JPEG"), np.full((8, 8, 1), 77), 1),
    "YCbCr TIFF": (
        encoded(Image.new("YCbCr", (4, 4), (255, 128, 128)), "TIFF"),
        np.full((4, 4, 3), 255),
        0,
    ),
    "LAB TIFF": (
        encoded(Image.new("LAB", (4, 4), (255, 128, 128)), "TIFF"),
        np.full((4, 4, 3), 255),
        2,
    ),
}


@pytest.mark.parametrize("name", list(MODES))
def test_modes_decode_to_the_right_grey_or_rgb(name: str) -> None:
    data, expected, tolerance = MODES[name]
    decoded = decode_image_file(data, name, LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance, decoded[..., 0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_are_422(value: float) -> None:
    data = _tiff_of(np.array([[0.5, value]], np.float32))
    error = refusal(decode_image_file, data, "f.tiff", LIMITS)
    assert error.status == 422 and error.message == (
        "f.tiff: floating-point pixels must be finite, not NaN or infinite"
    )


# -- huge sizes, bombs, per-frame bombs ------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decoding fail the test: refusals must come from headers alone."""

    def load(self):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _patched_jpeg_size(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _patched_bmp_size(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _patched_webp_size(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "WEBP"))
    start = data.index(b"\x9d\x01\x2a") + 3
    data[start : start + 4] = struct.pack("<HH", width, height)
    return bytes(data)


def _huge_tiles() -> bytes:
    """A 4x4 TIFF cut in 65536x65536 tiles: one tile would be 4 GB."""
    directory = grey_tiff_directory(4, 4, 16)
    for tag in (273, 278, 279):
        del directory[tag]
    directory.update({322: (4, [65536]), 323: (4, [65536]), 324: (4, [8]), 325: (4, [16])})
    return tiff_file([directory], b"\x00" * 16)


HUGE_HEADERS = {
    # name: (file, fragment of the refusal)
    "PNG 100000x100000": (png_file(100_000, 100_000, b"x" * 10), "10000000000 pixels"),
    "PNG 2^31-1 x 1": (png_file(2**31 - 1, 1, b"x" * 10), "2147483647 pixels"),
    "PNG 5000x5000": (png_file(5000, 5000, zero_rows(5000, 5000)), "5000x5000 pixels"),
    "PNG 10000x10000, over Pillow's warning": (png_file(10_000, 10_000, b"x"), "10000x10000"),
    "GIF screen 65535x65535": (gif_file((65535, 65535), [(1, 1)]), "4294836225 pixels"),
    "GIF 1x1 screen, first frame 65535x65535": (
        gif_file((1, 1), [(65535, 65535)]),
        "4294836225 pixels",
    ),
    "GIF screen 5000x5000": (gif_file((5000, 5000), [(1, 1)]), "5000x5000 pixels"),
    "TIFF 100000x100000": (tiff_file([grey_tiff_directory(100_000, 100_000, 16)]), "pixels"),
    "JPEG 65500x65500": (_patched_jpeg_size(65500, 65500), "4290250000 pixels"),
    "JPEG 5000x5000": (_patched_jpeg_size(5000, 5000), "5000x5000 pixels"),
    "BMP 100000x100000": (_patched_bmp_size(100_000, 100_000), "10000000000 pixels"),
    "WebP 16383x16383": (_patched_webp_size(16383, 16383), "268402689 pixels"),
    "WebP 5000x5000": (_patched_webp_size(5000, 5000), "5000x5000 pixels"),
}


@pytest.mark.parametrize("name", list(HUGE_HEADERS))
def test_huge_declared_sizes_are_413_from_the_header(name: str, no_decoding) -> None:
    data, fragment = HUGE_HEADERS[name]
    started = time.perf_counter()
    error = refusal(decode_image_file, data, "big", DEFAULTS)
    assert time.perf_counter() - started < FAST
    assert error.status == 413 and error.code == "image_too_large"
    assert error.message.startswith("big: ") and fragment in error.message
    assert "16777216 pixels" in error.message  # our limit, not Pillow's


def test_huge_tiles_on_a_small_tiff_allocate_nothing() -> None:
    tracemalloc.start()
    try:
        started = time.perf_counter()
        error = refusal(decode_image_file, _huge_tiles(), "tiles.tiff", DEFAULTS)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.status == 422 and elapsed < FAST and peak < 50_000_000


def test_a_decompression_bomb_within_the_limit_decodes_correctly() -> None:
    bomb = png_file(4096, 4096, zero_rows(4096, 4096))  # 16 KB for 16.7 million pixels
    assert len(bomb) < 50_000
    started = time.perf_counter()
    decoded = decode_image_file(bomb, "bomb.png", DEFAULTS)
    assert time.perf_counter() - started < 10
    assert decoded.shape == (4096, 4096, 1) and not decoded.any()


@pytest.mark.parametrize("side", [4097, 9000, 10_000, 20_000])
def test_a_decompression_bomb_over_the_limit_is_413_undecoded(side: int, no_decoding) -> None:
    # 4097: just over our limit; 9000: over it, under Pillow's warning (89 Mpx); 10000: over
    # the warning; 20000: over Pillow's own refusal (179 Mpx). The same 413 each time.
    bomb = png_file(side, side, zero_rows(64, 64))
    error = refusal(decode_image_file, bomb, "bomb.png", DEFAULTS)
    assert error.status == 413 and error.code == "image_too_large"
    assert error.message.startswith("bomb.png: ") and "16777216" in error.message


@pytest.fixture
def seeks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every frame any multi-frame plugin is asked to seek to."""
    frames: list[int] = []
    for plugin in (GifImagePlugin.GifImageFile, PngImagePlugin.PngImageFile):
        original = plugin.seek

        def recording(self, frame, original=original):
            frames.append(frame)
            return original(self, frame)

        monkeypatch.setattr(plugin, "seek", recording)
    for plugin in (TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile):
        original = plugin.seek

        def recording(self, frame, original=original):
            frames.append(frame)
            return original(self, frame)

        monkeypatch.setattr(plugin, "seek", recording)
    return frames


def _apng_with_a_huge_second_frame() -> bytes:
    frames = [Image.new("L", (4, 4), 30), Image.new("L", (4, 4), 220)]
    chunks = png_chunks(encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]))
    controls = [i for i, (kind, _) in enumerate(chunks) if kind == b"fcTL"]
    second = bytearray(chunks[controls[1]][1])
    second[4:12] = struct.pack(">II", 100_000, 100_000)
    chunks[controls[1]] = (b"fcTL", bytes(second))
    return png_join(chunks)


PER_FRAME_BOMBS = {
    "GIF": gif_with_a_later_frame(65535, 65535),
    "TIFF": tiff_file(
        [grey_tiff_directory(4, 4, 16), grey_tiff_directory(100_000, 100_000, 16)],
        bytes(range(16)),
    ),
    "APNG": _apng_with_a_huge_second_frame(),
}


@pytest.mark.parametrize("fmt", list(PER_FRAME_BOMBS))
def test_huge_later_frames_are_never_decoded(fmt: str, seeks: list[int]) -> None:
    started = time.perf_counter()
    decoded = decode_image_file(PER_FRAME_BOMBS[fmt], "frames", DEFAULTS)
    assert time.perf_counter() - started < FAST
    assert decoded.shape[:2] == (4, 4)
    assert set(seeks) <= {0}
    if fmt == "TIFF":
        assert np.array_equal(decoded[..., 0].ravel(), np.arange(16))
    if fmt == "APNG":
        assert np.all(decoded == 30)
    if fmt == "GIF":
        assert np.all(decoded == 40)


def _animation(fmt: str) -> bytes:
    values = (10, 240, 128)
    if fmt == "GIF":
        frames = [Image.new("L", (8, 8), v) for v in values]
        return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    frames = [Image.new("RGB", (8, 8), (v, v, v)) for v in values]
    params = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], **params)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_multi_frame_files_give_their_first_frame(fmt: str, seeks: list[int]) -> None:
    data = _animation(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image_file(data, "anim", LIMITS)
    assert decoded.shape[:2] == (8, 8) and np.all(decoded == 10)
    assert set(seeks) <= {0}


# -- files cheap to send and dear to walk -----------------------------------------------------


def _progressive(side: int, colour: bool) -> bytes:
    image = (
        Image.new("RGB", (side, side), (128, 40, 200))
        if colour
        else Image.new("L", (side, side), 128)
    )
    return encoded(image, "JPEG", progressive=True, **({"subsampling": 0} if colour else {}))


def test_jpeg_scans_over_the_limit_are_413_at_once(no_decoding) -> None:
    # 1,000 copies of one scan in 99 KB kept libjpeg busy 6 s at 4096x4096; 32 MB, hours.
    data = jpeg_with_scans(_progressive(4096, colour=False), JPEG_MAX_SCANS + 1, which=3)
    started = time.perf_counter()
    error = refusal(decode_image_file, data, "scans.jpg", DEFAULTS)
    assert time.perf_counter() - started < FAST
    assert error.status == 413 and error.code == "image_too_complex"
    assert error.message == f"scans.jpg: a JPEG of more than {JPEG_MAX_SCANS} scans"


def test_the_worst_jpeg_within_the_limits_decodes_in_bounded_time() -> None:
    # The dearest scan repeated up to the limit (measured here: 1.6 s at 4096x4096, 2 cores).
    data = jpeg_with_scans(_progressive(2048, colour=True), JPEG_MAX_SCANS, which=0)
    started = time.perf_counter()
    decoded = decode_image_file(data, "slow.jpg", DEFAULTS)
    assert time.perf_counter() - started < 15
    assert decoded.shape == (2048, 2048, 3)


def test_scan_markers_outside_the_image_data_do_not_count() -> None:
    base = encoded(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG")
    # An APP1 segment (where an EXIF thumbnail lives) full of FF DA bytes, and a second
    # image's scans after the end marker (as in MPO files): libjpeg reads neither.
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 400) + b"Exif\x00\x00" + b"\xff\xda" * 200
    data = base[:2] + app1 + base[2:] + b"\xff\xda\x00\x02" * 500
    decoded = decode_image_file(data, "photo.jpg", LIMITS)
    assert decoded.shape == (16, 16, 3) and abs(int(decoded[8, 8, 0]) - 200) <= 3


def _many_segments(fmt: str) -> bytes:
    count = MAX_SEGMENTS + 1
    if fmt == "JPEG markers":
        base = encoded(Image.new("L", (8, 8), 9), "JPEG")
        return base[:2] + b"\xff\xfe\x00\x02" * count + base[2:]
    if fmt == "JPEG fill bytes":
        base = encoded(Image.new("L", (8, 8), 9), "JPEG")
        return base[:2] + b"\xff" * count + base[2:]
    if fmt == "PNG":
        return png_file(
            4, 1, zlib.compress(b"\x00" + b"\x07" * 4), before_idat=png_chunk(b"abCd", b"") * count
        )
    if fmt == "GIF":
        base = gif_file((4, 4), [(4, 4)])
        return base[:19] + b"\x21\xfe\x01a\x00" * count + base[19:]
    # a 16x16 TIFF listing one strip per row, and then as many again as MAX_SEGMENTS
    directory = grey_tiff_directory(
        16, 16, 16, {278: (4, [1]), 273: (3, [8] * count), 279: (3, [16] * count)}
    )
    return tiff_file([directory], b"\x05" * 16)


@pytest.mark.parametrize("fmt", ["JPEG markers", "JPEG fill bytes", "PNG", "GIF", "TIFF"])
def test_files_of_too_many_segments_are_413_at_once(fmt: str) -> None:
    # Pillow walks each in Python: 7 million strips of a 16x16 TIFF (28 MB) took it 28 s.
    data = _many_segments(fmt)
    started = time.perf_counter()
    error = refusal(decode_image_file, data, "many", DEFAULTS)
    assert time.perf_counter() - started < FAST
    assert error.status == 413 and error.code == "image_too_complex"
    assert error.message.startswith(f"many: more than {MAX_SEGMENTS} ")


def test_a_request_has_a_segment_budget() -> None:
    # Each file under the limit, together over it: 20 files of 130,000 empty PNG chunks took
    # Pillow 6 s.
    chunky = png_file(
        4, 1, zlib.compress(b"\x00" + b"\x07" * 4), before_idat=png_chunk(b"abCd", b"") * 50_000
    )
    assert decode_files([("a", chunky)] * 2, SHAPE, DEFAULTS).images.shape == (2, 28, 28, 1)
    files = [(f"file[{i}]", chunky) for i in range(3)]
    started = time.perf_counter()
    error = refusal(decode_files, files, SHAPE, DEFAULTS)
    assert time.perf_counter() - started < FAST
    assert error.status == 413 and error.code == "image_too_complex"
    assert error.message.startswith("file[2]: the request's files hold more than ")


def test_elongated_images_are_refused_before_the_resize_blows_up() -> None:
    # 100000x2 is within the pixel limit, but widening it to 28 first would make 2.8 Mpx; a
    # 16777216x1 image took 5 s and 2 GB to reach 28x28, 15 GB for a 224x224 model.
    limits = Limits(max_images=4, max_pixels=1_000_000)
    for width, height in [(2, 100_000), (100_000, 2)]:
        tall = png_file(width, height, zero_rows(width, height))
        error = refusal(decode_files, [("file[0] ('tall.png')", tall)], SHAPE, limits)
        assert error.status == 413 and "too elongated" in error.message
        assert error.message.startswith("file[0] ('tall.png'): ")
        array = np.zeros((1, height, width), np.uint8)
        error = refusal(decode_npy_batch, encode_npy(array), SHAPE, limits)
        assert error.status == 413 and "too elongated" in error.message
    fine = png_file(2, 30_000, zero_rows(2, 30_000))  # 30000 x 28 = 0.84 Mpx: allowed
    assert decode_files([("ok", fine)], SHAPE, limits).images.shape == (1, 28, 28, 1)


def test_a_request_has_a_pixel_budget() -> None:
    limits = Limits(max_images=8, max_pixels=100 * 100, max_total_pixels=3 * 100 * 100)
    full = encoded(Image.new("L", (100, 100), 5))
    assert len(decode_files([("a", full)] * 3, SHAPE, limits).images) == 3
    error = refusal(decode_files, [(f"file[{i}]", full) for i in range(4)], SHAPE, limits)
    assert error.status == 413 and error.code == "too_many_pixels"
    assert error.message.startswith("file[3]: ") and "30000 pixels in all" in error.message
    error = refusal(decode_npy_batch, encode_npy(np.zeros((4, 100, 100), np.uint8)), SHAPE, limits)
    assert error.status == 413 and error.code == "too_many_pixels"
    assert Limits(256, 16_777_216).total_pixels == 256 * 512 * 512  # the default: 4 at the limit


# -- zero sizes ----------------------------------------------------------------------------------

ZERO_SIZED = {
    "empty file": b"",
    "PNG 0x0": png_file(0, 0, b""),
    "PNG 1x0": png_file(1, 0, zlib.compress(b"")),
    "PNG 0x1": png_file(0, 1, zlib.compress(b"\x00")),
    "GIF 0x0": gif_file((0, 0), [(0, 0)]),
    "GIF frame 0x0": gif_file((4, 4), [(0, 0)]),
    "TIFF 0x4": tiff_file([grey_tiff_directory(0, 4, 0)]),
    "BMP 0x0": _patched_bmp_size(0, 0),
}


@pytest.mark.parametrize("name", list(ZERO_SIZED))
def test_zero_sized_images_are_422(name: str) -> None:
    error = refusal(decode_image_file, ZERO_SIZED[name], "zero", LIMITS)
    assert error.status == 422 and error.message.startswith("zero: ")


# -- .npy bodies -----------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **params)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple, fortran: bool = False, version: int = 1) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()
    size = 10 + len(header) + 1
    header += b" " * ((64 - size % 64) % 64) + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(header)) + header


SPRUNG: list[bool] = []


def _spring() -> int:
    SPRUNG.append(True)
    return 0


class _Trap:
    def __reduce__(self):
        return (_spring, ())


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (npy_bytes(np.zeros((2, 8, 8), np.float64)), "dtype must be uint8, not float64"),
        (npy_bytes(np.zeros((2, 8, 8), np.int8)), "not int8"),
        (npy_bytes(np.zeros((2, 8, 8), bool)), "not bool"),
        (npy_bytes(np.zeros((2, 8, 8), ">u2")), "not >u2"),
        (npy_bytes(np.zeros((2, 8), [("r", "u1"), ("g", "u1")])), "dtype must be uint8"),
        (npy_bytes(np.array([[[_Trap()]]], dtype=object), allow_pickle=True), "not object"),
        (npy_bytes(np.zeros((1, 8, 8, 2, 1), np.uint8)), "shape must be"),
        (npy_bytes(np.zeros((1, 8, 8, 2), np.uint8)), "shape must be"),
        (npy_bytes(np.zeros((1, 8, 8, 0), np.uint8)), "shape must be"),
        (npy_bytes(np.zeros((0, 8, 8), np.uint8)), "no images"),
        (npy_bytes(np.zeros((1, 0, 8), np.uint8)), "must not be empty"),
        (npy_bytes(np.zeros((1, 8, 0), np.uint8)), "must not be empty"),
        (npy_bytes(np.zeros((2, 8, 8), np.uint8))[:-1], "the body holds 127"),
        (npy_bytes(np.zeros((2, 8, 8), np.uint8)) + b"\x00", "the body holds 129"),
        (npy_header("|u1", (2, -8, 8)), "must not be empty"),
        (npy_header("|u1", (2, 8, 8), version=3) + bytes(128), "format version 3.0"),
        (b"\x93NUMPY\x01\x00\xff\xff{" + b" " * 65535, "not a valid .npy"),
        (b"\x93NUMPY garbage", "not a valid .npy"),
        (b"", "not a valid .npy"),
    ],
)
def test_npy_refusals_are_422(body: bytes, fragment: str) -> None:
    error = refusal(decode_npy_batch, body, SHAPE, LIMITS)
    assert error.status == 422 and error.message.startswith("body: ")
    assert fragment in error.message
    assert not SPRUNG  # nothing was ever unpickled


@pytest.mark.parametrize(
    ("shape", "status"),
    [
        ((1, 100_000, 100_000), 413),
        ((10**9, 8, 8), 413),
        ((4, 512, 512), 422),
        ((4, 256, 256, 3), 422),
    ],
)
def test_npy_huge_declared_shapes_allocate_nothing(shape: tuple, status: int) -> None:
    body = npy_header("|u1", shape) + bytes(1000)
    tracemalloc.start()
    try:
        error = refusal(decode_npy_batch, body, SHAPE, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.status == status and peak < 1_000_000


@pytest.mark.parametrize(
    "array",
    [
        np.asfortranarray(np.random.default_rng(4).integers(0, 256, (3, 28, 28), dtype=np.uint8)),
        np.random.default_rng(5).integers(0, 256, (3, 56, 56), dtype=np.uint8)[:, ::2, ::2],
        np.random.default_rng(6).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)[:, 28:, 28:, :1],
    ],
    ids=["fortran order", "strided", "sliced channels"],
)
def test_npy_in_any_memory_order_gives_the_same_pixels(array: np.ndarray) -> None:
    decoded = decode_npy_batch(npy_bytes(array), SHAPE, LIMITS)
    assert decoded.images.flags.writeable and decoded.images.flags.c_contiguous
    assert np.array_equal(
        decoded.images.reshape(3, 28, 28), np.ascontiguousarray(array).reshape(3, 28, 28)
    )


def test_npy_version_2_headers_are_read() -> None:
    array = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    body = npy_header("|u1", (2, 28, 28), version=2) + array.tobytes()
    assert np.array_equal(decode_npy_batch(body, SHAPE, LIMITS).images[..., 0], array)


# -- JSON bodies ----------------------------------------------------------------------------------

PNG_28 = encoded(Image.new("L", (28, 28), 99))
B64_28 = base64.b64encode(PNG_28).decode()


@pytest.mark.parametrize(
    "text",
    [
        B64_28,
        "data:image/png;base64," + B64_28,
        "DATA:image/png;BASE64," + B64_28,
        "data:;base64," + B64_28,
        base64.encodebytes(PNG_28).decode(),  # MIME style: a line break every 76 characters
        " " + B64_28 + "\r\n",
    ],
    ids=["plain", "data URL", "upper-case data URL", "bare data URL", "line breaks", "spaces"],
)
def test_json_base64_spellings(text: str) -> None:
    decoded = decode_json(json.dumps({"images": [text]}).encode(), SHAPE, LIMITS)
    assert np.all(decoded.images == 99)


@pytest.mark.parametrize(
    ("images", "fragment"),
    [
        (["data:image/png;base64"], "images[0]: a data: URL must be base64"),
        (["data:image/png," + B64_28], "images[0]: a data: URL must be base64"),
        ([B64_28, "***"], "images[1]: not valid base64"),
        ([B64_28[:-2]], "images[0]: not valid base64"),
        (["👕" * 10], "images[0]: not valid base64"),
        (["\u0000\u202e\ufeff"], "images[0]: not valid base64"),
        ([""], "images[0]: empty file"),
        ([base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()], "images[0]: "),
    ],
)
def test_json_item_refusals_name_the_item(images: list[str], fragment: str) -> None:
    error = refusal(decode_json, json.dumps({"images": images}).encode(), SHAPE, LIMITS)
    assert error.status == 422 and error.message.startswith(fragment)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"images": [1]}', "images.0: Input should be a valid string"),
        (b'{"images": [null]}', "images.0"),
        (b'{"images": [{"data": "x"}]}', "images.0"),
        (b'{"images": [["a"]]}', "images.0"),
        (b'{"images": "abc"}', "images: Input should be a valid array"),
        (b'{"images": []}', "images: List should have at least 1 item"),
        (b"[]", "Input should be an object"),
        (b"null", "Input should be an object"),
        (b'{"images": ["\\ud800"]}', ""),
        (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion limit"),
        (b"{'images': []}", "Invalid JSON"),
        ('{"images": ["\xff\xfe"]}'.encode("latin-1"), ""),
    ],
)
def test_json_malformed_bodies_are_422(body: bytes, fragment: str) -> None:
    error = refusal(decode_json, body, SHAPE, LIMITS)
    assert error.status == 422 and fragment in error.message


def test_json_floods_are_refused_early() -> None:
    # 16 million numbers once made 16 million validation errors: 42 s and 9 GB.
    numbers = b'{"images": [' + b"0," * 8_000_000 + b"0]}"
    started = time.perf_counter()
    error = refusal(decode_json, numbers, SHAPE, LIMITS)
    assert time.perf_counter() - started < 10
    assert error.status == 422 and error.message.count("images.") == 1
    tiny = b'{"images": [' + b'"",' * 1_000_000 + b'""]}'
    error = refusal(decode_json, tiny, SHAPE, LIMITS)
    assert error.status == 413 and error.message == "1000001 images in one request; the limit is 4"


# -- multipart -------------------------------------------------------------------------------------


def test_multipart_items_are_named_by_position_and_file_name(make_client) -> None:
    client = make_client()
    key = create_key(client, "named")
    good = encoded(Image.new("L", (28, 28), 1))
    response = client.post(
        "/v1/predict",
        files=[("file", ("a.png", good, "image/png"))] * 2
        + [("file", ("c.png", b"junk", "image/png"))],
        headers=bearer(key),
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("file[2] ('c.png'): not a decodable")
    fields = client.post(
        "/v1/predict",
        files=[("file", ("a.png", good, "image/png"))],
        data={"note": "not an image"},
        headers=bearer(key),
    )
    assert fields.status_code == 422
    assert fields.json()["error"]["message"].startswith("form field 'note' is not a file")


# -- HTTP limits, in-process ------------------------------------------------------------------


def _check_refusal(response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    assert code is None or error["code"] == code, error
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_http_limits_in_all_three_formats(make_client) -> None:
    client = make_client(
        max_images_per_request=4, max_body_bytes=64 * 1024, max_image_pixels=10_000
    )
    key = create_key(client, "limits")
    small = encoded(Image.new("L", (28, 28), 50))
    big = encoded(Image.new("L", (200, 200), 50))  # 40,000 pixels, 300 bytes

    def multipart(files: list[bytes]):
        parts = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(files)]
        return client.post("/v1/predict", files=parts, headers=bearer(key))

    def as_json(files: list[bytes]):
        body = {"images": [base64.b64encode(data).decode() for data in files]}
        return client.post("/v1/predict", json=body, headers=bearer(key))

    def as_npy(array: np.ndarray):
        headers = {**bearer(key), "Content-Type": NPY_MEDIA_TYPE}
        return client.post("/v1/predict", content=encode_npy(array), headers=headers)

    for too_many in (
        multipart([small] * 5),
        as_json([small] * 5),
        as_npy(np.zeros((5, 28, 28), np.uint8)),
    ):
        _check_refusal(too_many, 413, "too_many_images")
    for too_big in (multipart([big]), as_json([big]), as_npy(np.zeros((1, 200, 200), np.uint8))):
        _check_refusal(too_big, 413, "image_too_large")
    for empty in (
        multipart([b""]),
        as_json([]),
        as_npy(np.zeros((0, 28, 28), np.uint8)),
        as_npy(np.zeros((1, 0, 28), np.uint8)),
        client.post(
            "/v1/predict",
            content=b"",
            headers={**bearer(key), "Content-Type": "multipart/form-data; boundary=x"},
        ),
        client.post(
            "/v1/predict",
            content=b"--x--",
            headers={**bearer(key), "Content-Type": "multipart/form-data"},
        ),
    ):
        _check_refusal(empty, 422)
    for ok in (
        multipart([small] * 4),
        as_json([small] * 4),
        as_npy(np.zeros((4, 28, 28), np.uint8)),
    ):
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["predictions"]) == 4


def test_http_body_limit_with_and_without_content_length(make_client) -> None:
    client = make_client(max_body_bytes=64 * 1024)
    key = create_key(client, "bodies")
    npy = {**bearer(key), "Content-Type": NPY_MEDIA_TYPE}
    oversized = b"\0" * 70_000

    def chunks():
        for _ in range(70):
            yield b"\0" * 1000

    declared = client.post("/v1/predict", content=oversized, headers=npy)
    _check_refusal(declared, 413, "payload_too_large")
    chunked = client.post("/v1/predict", content=chunks(), headers=npy)
    assert "content-length" not in {k.lower() for k in chunked.request.headers}
    _check_refusal(chunked, 413, "payload_too_large")
    lying = client.post("/v1/predict", content=oversized, headers={**npy, "Content-Length": "100"})
    _check_refusal(lying, 413, "payload_too_large")
    as_json = client.post(
        "/v1/predict",
        content=b'{"images": ["' + b"A" * 70_000 + b'"]}',
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    _check_refusal(as_json, 413, "payload_too_large")
    files = client.post(
        "/v1/predict", files=[("file", ("x.png", oversized, "image/png"))], headers=bearer(key)
    )
    _check_refusal(files, 413, "payload_too_large")
    assert (
        client.post(
            "/v1/predict", content=encode_npy(np.zeros((1, 28, 28), np.uint8)), headers=npy
        ).status_code
        == 200
    )


def test_body_limit_stops_reading_a_stream_once_over() -> None:
    pulled = 0

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"\0" * 1000, "more_body": True}

    async def app(scope, receive, send):
        while True:
            await receive()

    async def send(message):
        raise AssertionError("nothing is sent: the app's handler answers 413")

    limit = BodySizeLimit(app, max_bytes=10_000)
    scope = {"type": "http", "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(BodyTooLarge):
        asyncio.run(limit(scope, receive, send))
    assert pulled == 11  # the first chunk over the limit, not one more


def test_a_json_flood_over_http_is_413(make_client) -> None:
    client = make_client(max_images_per_request=4)
    key = create_key(client, "flood")
    body = b'{"images": [' + b'"",' * 100_000 + b'""]}'
    response = client.post(
        "/v1/predict", content=body, headers={**bearer(key), "Content-Type": "application/json"}
    )
    _check_refusal(response, 413, "too_many_images")
