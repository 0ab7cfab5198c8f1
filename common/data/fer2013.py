"""FER2013 facial-expression images (the Training and PublicTest splits) as :class:`LabeledImages`.

Layout (the data README): ``fer2013/index.csv`` with columns ``path,label,emotion,usage`` and
images at ``fer2013/<Usage>/<emotion>/<Usage>_N.jpg``, 48x48 grayscale JPEG. PublicTest is the
validation split: report test accuracy on it and never train on it. Decoding ~32k JPEGs takes
seconds, so the decoded arrays are cached as ``.npz`` in the cache directory, keyed by the archive's
content (or, for an extracted folder, by its path and the size and mtime of every file listed).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

import numpy as np

from common.data.archives import (
    content_key,
    extract_archive,
    files_key,
    load_or_build,
    require_file,
)
from common.data.images import decode_gray
from common.data.types import LabeledImages
from common.errors import ConfigError, DataError
from common.paths import cache_dir
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
ARCHIVE = "fer2013_train_publictest.tar.gz"
IMAGE_SIZE = 48
Split = Literal["Training", "PublicTest", "PrivateTest"]
SPLITS: tuple[str, ...] = get_args(Split)
_USAGES = SPLITS
_COLUMNS = ("path", "label", "emotion", "usage")


def load_fer2013(
    split: Split,
    data_dir: Path | None = None,
    fer_dir: Path | None = None,
) -> LabeledImages:
    """Load one FER2013 split: ``(N, 48, 48)`` uint8 gray images, labels 0..6 (:data:`EMOTIONS`).

    Args:
        split: ``"Training"``, ``"PublicTest"`` or ``"PrivateTest"`` (FER2013's final test split;
            the shared copy does not hold it, an ``index.csv`` that lists it does).
        data_dir: folder holding ``fer2013_train_publictest.tar.gz``; resolved with
            :func:`common.paths.data_dir` when ``None``. Ignored when ``fer_dir`` is given.
        fer_dir: an already-extracted FER2013 folder (holding ``index.csv``, or holding
            ``fer2013/``).

    Raises:
        ConfigError: if ``split`` is not a known split.
        DataError: if the archive or folder is missing or corrupt, ``index.csv`` has a bad row,
            an image is unreadable or not 48x48, or the split is empty.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown FER2013 split {split!r}; use one of {', '.join(SPLITS)}")
    if fer_dir is not None:
        root = _find_root(Path(fer_dir))
        rows = _read_index(root / "index.csv", split)
        key = files_key(root, ["index.csv", *(path for path, _ in rows)])
        arrays = load_or_build(
            cache_dir() / f"fer2013-dir-{key}-{split}.npz", lambda: _decode_rows(root, rows)
        )
    else:
        archive = require_file(resolve_data_dir(data_dir) / ARCHIVE, "FER2013 archive")
        cache_file = cache_dir() / f"fer2013-{content_key(archive)}-{split}.npz"

        def build() -> dict[str, np.ndarray]:
            root = extract_archive(archive) / "fer2013"
            return _decode_rows(root, _read_index(root / "index.csv", split))

        arrays = load_or_build(cache_file, build)
    return LabeledImages(images=arrays["images"], labels=arrays["labels"])


def _find_root(fer_dir: Path) -> Path:
    for candidate in (fer_dir, fer_dir / "fer2013"):
        if (candidate / "index.csv").is_file():
            return candidate
    raise DataError(
        f"no FER2013 index.csv in {fer_dir} or {fer_dir / 'fer2013'}; pass --fer-dir the folder "
        "that holds index.csv and the <Usage>/<emotion>/*.jpg images"
    )


def _read_index(index: Path, split: str) -> list[tuple[str, int]]:
    """Parse and validate ``index.csv``; return ``(relative path, label)`` of ``split``'s rows."""
    try:
        with index.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(
                    f"{index} lacks column(s) {', '.join(missing)} (has {reader.fieldnames}); "
                    f"it must have the header {','.join(_COLUMNS)}"
                )
            rows = [_parse_row(index, reader.line_num, row, split) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {index} ({exc}); restore the FER2013 dataset") from exc
    selected = [row for row in rows if row is not None]
    if not selected:
        raise DataError(f"{index} lists no {split} images; use a FER2013 copy with that split")
    return selected


def _parse_row(index: Path, line: int, row: dict[str, str], split: str) -> tuple[str, int] | None:
    where = f"{index} line {line}"
    if None in row or any(row.get(c) is None for c in _COLUMNS):
        raise DataError(f"{where} has the wrong number of fields; expected {','.join(_COLUMNS)}")
    path, label_text, emotion, usage = (row[c].strip() for c in _COLUMNS)
    try:
        label = int(label_text)
    except ValueError:
        label = -1
    if not 0 <= label < len(EMOTIONS):
        raise DataError(
            f"{where}: label {label_text!r} is not an integer 0..6; fix or remove the row"
        )
    if emotion != EMOTIONS[label]:
        raise DataError(
            f"{where}: emotion {emotion!r} does not match label {label} ({EMOTIONS[label]}); "
            "fix or remove the row"
        )
    if usage not in _USAGES:
        raise DataError(f"{where}: unknown usage {usage!r}; expected one of {', '.join(_USAGES)}")
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{where}: image path {path!r} must be relative to the folder of index.csv")
    return (path, label) if usage == split else None


def _decode_rows(root: Path, rows: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    logger.info("decoding %d FER2013 images from %s (cached afterwards)", len(rows), root)
    images = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, (path, _) in enumerate(rows):
        image = decode_gray(root / path)
        if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(
                f"FER2013 image {root / path} is {image.shape[1]}x{image.shape[0]}, "
                "expected 48x48; restore the original image"
            )
        images[i] = image
    labels = np.fromiter((label for _, label in rows), dtype=np.int64, count=len(rows))
    return {"images": images, "labels": labels}
