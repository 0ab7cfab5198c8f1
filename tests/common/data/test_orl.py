"""ORL / AT&T faces reader."""

from __future__ import annotations

import numpy as np

from common.data.orl import load_orl


def test_orl_has_40_subjects_with_10_images_each() -> None:
    faces = load_orl()

    assert faces.images.shape == (400, 112, 92)
    assert faces.images.dtype == np.uint8
    assert np.bincount(faces.labels).tolist() == [10] * 40


def test_orl_rows_are_ordered_by_subject() -> None:
    faces = load_orl()
    assert faces.labels.tolist() == sorted(faces.labels.tolist())
    assert faces.images.std() > 20  # real faces, not blank decodes
