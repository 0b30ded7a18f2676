"""A file's structure counted before Pillow parses it: JPEG scans and markers, PNG chunks,
GIF blocks before the first image, TIFF strips, tiles and directory entries.

Pillow walks each of these in Python and libjpeg decodes every scan over the whole image, so a
small file made of many of them could keep a worker busy for minutes; the walks here only
read the bytes that frame them, and stop as soon as a count is over its limit.
"""

from __future__ import annotations

import re
import struct

from server.inputs.limits import MAX_SEGMENTS, Budget, too_complex

JPEG_MAX_SCANS = 100
"""libjpeg decodes every scan of a progressive JPEG over the whole image, and a scan can cost
a few bytes: 1,000 copies of one scan in a 99 KB file took 6 s at 4096x4096, a 32 MB body
would take hours (libjpeg-turbo's LJT-01-003). Encoders write about 10 scans; libtiff stops a
JPEG inside a TIFF at the same 100 (LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER)."""
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


def check_structure(data: bytes, item: str, budget: Budget) -> None:
    """Refuse files whose structure would take Pillow or libjpeg seconds to walk."""
    most = min(budget.segments, MAX_SEGMENTS)
    if data.startswith(b"\xff\xd8\xff"):
        scans, count = _jpeg_structure(data, most)
        if scans > JPEG_MAX_SCANS:
            raise too_complex(item, f"a JPEG of more than {JPEG_MAX_SCANS} scans")
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
            raise too_complex(item, f"more than {MAX_SEGMENTS} {what}")
        raise too_complex(
            item,
            f"the request's files hold more than {MAX_SEGMENTS} chunks, markers, blocks or "
            "strips in all; send fewer files in one request",
        )
    budget.segments -= count
