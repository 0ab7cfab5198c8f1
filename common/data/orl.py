"""ORL / AT&T (Olivetti) faces: 40 subjects x 10 grayscale 92x112 PGM images.

Layout: ``att_faces/s<1..40>/<1..10>.pgm`` inside ``orl_att_faces_pgm.tar.gz``. Subject ``s<k>``
gets label ``k - 1``; rows are ordered by subject, then image number. 400 small PGMs decode in
milliseconds, so there is no decoded cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from common.data.archives import extract_archive, require_file
from common.data.images import decode_gray
from common.data.types import LabeledImages
from common.errors import DataError
from common.paths import data_dir as resolve_data_dir

ARCHIVE = "orl_att_faces_pgm.tar.gz"
IMAGE_SHAPE = (112, 92)  # (H, W)
_SUBJECT = re.compile(r"s(\d+)")
_IMAGE = re.compile(r"(\d+)\.pgm")


def load_orl(data_dir: Path | None = None) -> LabeledImages:
    """Load ORL faces: images ``(400, 112, 92)`` uint8 gray, labels ``0..39``.

    Raises:
        DataError: if the archive is missing or corrupt, holds no subjects, or an image is not
            92x112.
    """
    archive = require_file(resolve_data_dir(data_dir) / ARCHIVE, "ORL archive")
    root = extract_archive(archive) / "att_faces"
    if not root.is_dir():
        raise DataError(f"{archive} has no att_faces/ folder; replace it with the original archive")
    entries: list[tuple[int, int, Path]] = []
    for folder in root.iterdir():
        subject = _SUBJECT.fullmatch(folder.name)
        if not (folder.is_dir() and subject):
            continue
        for file in folder.iterdir():
            number = _IMAGE.fullmatch(file.name)
            if number:
                entries.append((int(subject.group(1)), int(number.group(1)), file))
    if not entries:
        raise DataError(f"no att_faces/s<k>/<n>.pgm images in {archive}; replace the archive")
    entries.sort()
    images = np.stack([_decode(path) for _, _, path in entries])
    labels = np.array([subject - 1 for subject, _, _ in entries], dtype=np.int64)
    return LabeledImages(images=images, labels=labels)


def _decode(path: Path) -> np.ndarray:
    image = decode_gray(path)
    if image.shape != IMAGE_SHAPE:
        raise DataError(f"ORL image {path} is {image.shape[::-1]} (WxH), expected 92x112")
    return image
