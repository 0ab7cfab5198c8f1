"""decode_gray / decode_rgb on real dataset files and on corrupt input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data.images import decode_gray, decode_rgb
from common.errors import DataError


def _first_jpeg(fer_root: Path) -> Path:
    rel = (fer_root / "index.csv").read_text().splitlines()[1].split(",")[0]
    return fer_root / rel


def test_decodes_a_real_fer_jpeg_from_path_and_bytes(fer_root: Path) -> None:
    path = _first_jpeg(fer_root)

    from_path, from_bytes = decode_gray(path), decode_gray(path.read_bytes())

    assert from_path.shape == (48, 48) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_bytes)


def test_decode_rgb_returns_rgb_channel_order(tmp_path: Path) -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)

    rgb = decode_rgb(tmp_path / "blue.png")

    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("payload", [b"", b"garbage", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_file_is_a_data_error_naming_it(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(payload)

    with pytest.raises(DataError, match=r"broken\.jpg"):
        decode_gray(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jpg"):
        decode_gray(tmp_path / "nope.jpg")
