"""Strict image decoding: real photos decode; broken, hostile and odd files get one clear error."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.recogniser.imageio import decode_image, read_image
from common.errors import DataError


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def face_jpeg(lfw_jpegs: dict[str, bytes]) -> bytes:
    return next(iter(lfw_jpegs.values()))


def test_real_lfw_jpeg_decodes_to_uint8_rgb(face_jpeg: bytes) -> None:
    rgb = decode_image(face_jpeg, name="lfw.jpg")
    assert rgb.shape == (112, 112, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10  # a real photo, not a blank


def test_read_image_from_file(tmp_path: Path, face_jpeg: bytes) -> None:
    (tmp_path / "a.jpg").write_bytes(face_jpeg)
    assert read_image(tmp_path / "a.jpg").shape == (112, 112, 3)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read image"):
        read_image(tmp_path / "nope.jpg")


def test_truncated_jpeg_is_refused(face_jpeg: bytes) -> None:
    with pytest.raises(DataError, match="truncated or corrupt"):
        decode_image(face_jpeg[: len(face_jpeg) // 2], name="half.jpg")


def test_truncated_png_is_refused(yale: dict[str, np.ndarray]) -> None:
    data = png_bytes(yale["images"][0])
    with pytest.raises(DataError, match=r"image half\.png"):
        decode_image(data[: len(data) // 2], name="half.png")


def test_png_with_corrupt_data_crc_is_refused(yale: dict[str, np.ndarray]) -> None:
    data = bytearray(png_bytes(yale["images"][0]))
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    with pytest.raises(DataError):
        decode_image(bytes(data), name="bad.png")


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello, this is not an image\n" * 10, b"%PDF-1.7\n", b"GIF89a" + bytes(100)],
    ids=["empty", "text", "pdf", "gif"],
)
def test_non_images_are_refused(payload: bytes) -> None:
    with pytest.raises(DataError, match=r"not a supported image|is empty"):
        decode_image(payload, name="x")


def test_png_decompression_bomb_is_refused_from_the_header_alone() -> None:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10^10 gray pixels
    idat = zlib.compress(b"\x00" * 1000)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"too large|pixel limit"):
        decode_image(bomb, name="bomb.png")
    assert time.perf_counter() - start < 1.0


def test_jpeg_claiming_huge_dimensions_is_refused(face_jpeg: bytes) -> None:
    data = bytearray(face_jpeg)
    sof = data.index(b"\xff\xc0")  # baseline frame header: FFC0 len(2) precision(1) H(2) W(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(DataError, match=r"too large|pixel limit"):
        decode_image(bytes(data), name="huge.jpg")


def test_custom_pixel_limit_applies(face_jpeg: bytes) -> None:
    with pytest.raises(DataError, match="pixel limit"):
        decode_image(face_jpeg, name="a.jpg", max_pixels=100 * 100)


def test_grayscale_png_becomes_rgb_with_equal_channels(yale: dict[str, np.ndarray]) -> None:
    gray = yale["images"][0]
    rgb = decode_image(png_bytes(gray), name="g.png")
    assert rgb.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(rgb[:, :, 0], gray)
    np.testing.assert_array_equal(rgb[:, :, 2], gray)


def test_rgba_png_is_composited_onto_white() -> None:
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (200, 10, 10, 255)  # opaque red left half, transparent right half
    rgb = decode_image(png_bytes(rgba), name="a.png")
    assert rgb.shape == (20, 30, 3)
    assert tuple(rgb[0, 0]) == (200, 10, 10) and tuple(rgb[0, 29]) == (255, 255, 255)


def test_16bit_png_keeps_the_high_byte(yale: dict[str, np.ndarray]) -> None:
    gray16 = yale["images"][0].astype(np.uint16) * 257
    rgb = decode_image(png_bytes(gray16), name="g16.png")
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :, 1], yale["images"][0])


def test_palette_and_pgm_images_decode(yale: dict[str, np.ndarray]) -> None:
    img = Image.fromarray(yale["images"][0])
    for fmt in ("PPM", "BMP"):
        buf = io.BytesIO()
        (img.convert("P") if fmt == "BMP" else img).save(buf, format=fmt)
        assert decode_image(buf.getvalue(), name=fmt).shape == (243, 320, 3)


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff\xd8" + bytes(2048))
    with pytest.raises(DataError, match="MiB limit"):
        read_image(path, max_bytes=1024)
