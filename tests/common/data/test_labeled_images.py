"""LabeledImages: the container every reader returns."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.types import LabeledImages


def test_subset_keeps_images_and_labels_aligned() -> None:
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    data = LabeledImages(images=images, labels=np.arange(5, dtype=np.int64) * 10)

    part = data.subset(np.array([4, 1]))

    assert len(part) == 2
    assert part.labels.tolist() == [40, 10]
    np.testing.assert_array_equal(part.images, images[[4, 1]])


def test_integer_labels_are_converted_to_int64() -> None:
    data = LabeledImages(images=np.zeros((2, 3, 3, 3), np.uint8), labels=np.array([1, 2], np.uint8))
    assert data.labels.dtype == np.int64


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64)),  # not uint8
        (np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2, np.int64)),  # 2 channels
        (np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64)),  # length mismatch
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.float64)),  # float labels
    ],
)
def test_rejects_malformed_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        LabeledImages(images=images, labels=labels)
