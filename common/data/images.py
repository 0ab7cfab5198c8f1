"""Decoding dataset image files (JPEG, PNG, PGM) into uint8 arrays with OpenCV.

These decoders are for dataset files on disk. The on-device pipeline has its own stricter decoder
for untrusted camera input.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from common.errors import DataError

ImageSource = str | Path | bytes


def _read(source: ImageSource, name: str | None) -> tuple[np.ndarray, str]:
    if isinstance(source, bytes):
        return np.frombuffer(source, dtype=np.uint8), name or "<image bytes>"
    path = Path(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read image {path}: {exc.strerror or exc}; "
            "check that the file exists and is readable"
        ) from exc
    return np.frombuffer(data, dtype=np.uint8), name or str(path)


def _decode(source: ImageSource, flag: int, name: str | None) -> np.ndarray:
    buf, label = _read(source, name)
    image = cv2.imdecode(buf, flag) if buf.size else None
    if image is None or image.size == 0:
        raise DataError(
            f"image {label} is empty or corrupt (OpenCV cannot decode it); "
            "replace it with an intact copy of the dataset"
        )
    return image


def decode_gray(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) into a ``uint8`` ``(H, W)`` grayscale array.

    Args:
        source: a path or the encoded bytes.
        name: how to name the image in error messages (defaults to the path).

    Raises:
        DataError: if the file cannot be read or decoded.
    """
    image = _decode(source, cv2.IMREAD_GRAYSCALE, name)
    return np.ascontiguousarray(image, dtype=np.uint8)


def decode_rgb(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) into a ``uint8`` ``(H, W, 3)`` RGB array.

    Raises:
        DataError: if the file cannot be read or decoded.
    """
    image = _decode(source, cv2.IMREAD_COLOR, name)
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)
