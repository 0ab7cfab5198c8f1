"""Is an encoded dataset image whole? Structural checks that OpenCV's decoder does not make.

Whether ``cv2.imdecode`` rejects a truncated JPEG depends on OpenCV's version and its libjpeg:
many builds decode it with only a "premature end of data" warning on stderr and grey rows where
the data ran out, and a face set with such images trains on half-grey faces without a word.
:func:`image_problem` therefore walks the JPEG's marker segments to its end-of-image marker (and
checks a binary PGM's pixel count) before decoding, so that an incomplete file is reported
whatever the decoder does.
"""

from __future__ import annotations

import cv2
import numpy as np

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0..RST7 carry no length field


def jpeg_is_complete(data: bytes) -> bool:
    """Whether ``data`` is a JPEG whose segments and scans run intact up to its EOI marker.

    Walks the marker segments (JPEG, ITU-T T.81 Annex B); after each start-of-scan it skips the
    entropy-coded data (where ``FF 00`` is a stuffed byte and ``FF D0..D7`` a restart marker) to
    the next marker. Trailing bytes after EOI are allowed, as decoders ignore them.
    """
    if data[:2] != b"\xff\xd8":
        return False
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            return True
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > size:
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            pos = _end_of_scan(data, pos)
            if pos < 0:
                return False
    return False


def _end_of_scan(data: bytes, pos: int) -> int:
    """Position of the first real marker after entropy-coded data starting at ``pos``; -1 if none."""
    size = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= size:
            return -1
        following = data[pos + 1]
        if following == 0xFF:
            pos += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        else:
            return pos


def pgm_is_complete(data: bytes) -> bool:
    """Whether a binary (``P5``) PGM holds all ``width x height`` pixels its header promises.

    Other PNM variants are left to the decoder (True).
    """
    if data[:2] != b"P5":
        return True
    fields: list[int] = []
    pos, size = 2, len(data)
    while len(fields) < 3:
        while pos < size and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            end = data.find(b"\n", pos)
            if end < 0:
                return False
            pos = end + 1
            continue
        start = pos
        while pos < size and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            return False
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    pixel_bytes = 1 if maxval < 256 else 2
    return size - (pos + 1) >= width * height * pixel_bytes


def image_problem(
    data: bytes, gray: bool, shape: tuple[int, int] | None = None, name: str = "image"
) -> str | None:
    """What is wrong with an encoded dataset image (``None`` if nothing is).

    Args:
        data: the file's bytes.
        gray: decode as grayscale (else colour), as the dataset's reader does.
        shape: the ``(height, width)`` the reader requires, if any.
        name: how to name the image in the message.
    """
    lower = name.lower()
    if (lower.endswith((".jpg", ".jpeg")) and not jpeg_is_complete(data)) or (
        lower.endswith(".pgm") and not pgm_is_complete(data)
    ):
        return f"image {name} is truncated ({len(data)} bytes)"
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag) if data else None
    if image is None or image.size == 0:
        return f"image {name} is empty or corrupt (OpenCV cannot decode it)"
    if shape is not None and image.shape[:2] != shape:
        return f"image {name} is {image.shape[1]}x{image.shape[0]}, expected {shape[1]}x{shape[0]}"
    return None
