"""Extended Yale B and Yale Faces readers: real counts and strict validation of npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.npz_sets import EYALEB_FILE, YALE_FILE, load_extended_yale_b, load_yale_faces
from common.errors import DataError


def test_extended_yale_b_matches_the_data_readme() -> None:
    faces = load_extended_yale_b()

    assert faces.images.shape == (2_414, 96, 84)
    assert faces.images.dtype == np.uint8
    assert faces.labels.dtype == np.int64
    assert len(np.unique(faces.labels)) == 38


def test_yale_faces_matches_the_data_readme() -> None:
    faces, condition = load_yale_faces()

    assert faces.images.shape == (164, 243, 320)
    assert len(np.unique(faces.labels)) == 15
    assert condition.shape == (164,)
    assert {"happy", "sad", "glasses", "wink"} <= set(condition.tolist())
    assert len(set(condition.tolist())) == 11


def _write(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_missing_file_names_it_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{EYALEB_FILE}.*--data-dir.*FACEFED_DATA"):
        load_extended_yale_b(data_dir=tmp_path)


def test_missing_key_is_a_data_error(tmp_path: Path) -> None:
    _write(tmp_path / EYALEB_FILE, images=np.zeros((2, 96, 84), np.uint8))
    with pytest.raises(DataError, match=r"lacks array.*identity"):
        load_extended_yale_b(data_dir=tmp_path)


@pytest.mark.parametrize(
    ("images", "identity", "expected"),
    [
        (np.zeros((2, 96, 84), np.float32), np.zeros(2, np.uint8), "'images' must be uint8"),
        (np.zeros((2, 84, 96), np.uint8), np.zeros(2, np.uint8), r"\(N, 96, 84\)"),
        (np.zeros((2, 96, 84), np.uint8), np.zeros(3, np.uint8), "'identity' must be 2 integers"),
        (np.zeros((2, 96, 84), np.uint8), np.array([0.0, 1.0]), "'identity' must be 2 integers"),
        (np.zeros((2, 96, 84), np.uint8), np.array([0, -1]), "negative"),
    ],
)
def test_wrong_dtype_or_shape_is_a_data_error(
    tmp_path: Path, images: np.ndarray, identity: np.ndarray, expected: str
) -> None:
    _write(tmp_path / EYALEB_FILE, images=images, identity=identity)
    with pytest.raises(DataError, match=expected):
        load_extended_yale_b(data_dir=tmp_path)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    _write(
        tmp_path / YALE_FILE,
        images=np.zeros((1, 243, 320), np.uint8),
        identity=np.zeros(1, np.uint8),
        condition=np.array([{"evil": 1}], dtype=object),
    )
    with pytest.raises(DataError, match=YALE_FILE):
        load_yale_faces(data_dir=tmp_path)


def test_non_npz_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / YALE_FILE).write_bytes(b"definitely not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_yale_faces(data_dir=tmp_path)
