"""dlib chip alignment (common.facenet.chips) on real LFW and Yale faces, with YuNet's landmarks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data.chips import LandmarkDetector
from common.data.lfw import load_lfw
from common.data.npz_sets import load_yale_faces
from common.facenet.chips import (
    CHIP_SIZE,
    CHIP_TEMPLATE,
    align_chip,
    chip_transform,
    similarity_lstsq,
)
from common.paths import data_dir

YUNET = data_dir() / "face_detection_yunet_2026may.onnx"
pytestmark = pytest.mark.skipif(not YUNET.is_file(), reason="YuNet model not in the data dir")


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector(Path(YUNET))


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    """40 LFW crops (RGB 112x112) and 21 uncropped Yale photos (gray 243x320)."""
    lfw = load_lfw().images[:400:10]
    yale = load_yale_faces()[0].images[::8]
    return [*lfw, *yale]


def test_template_is_dlibs_mean_face_mapped_into_the_chip() -> None:
    assert CHIP_TEMPLATE.shape == (5, 2) and CHIP_TEMPLATE.dtype == np.float32
    # left/right symmetric about dlib's face midline x = 0.490127 -> 150 * 0.740127 / 1.5
    mid = 150 * (0.25 + 0.490127) / 1.5
    np.testing.assert_allclose(
        CHIP_TEMPLATE[[0, 3], 0] + CHIP_TEMPLATE[[1, 4], 0], 2 * mid, atol=0.1
    )
    np.testing.assert_allclose(CHIP_TEMPLATE[2, 0], mid, atol=1e-3)
    assert CHIP_TEMPLATE[0, 0] < CHIP_TEMPLATE[1, 0]  # the person's right eye is image-left
    assert CHIP_TEMPLATE[0, 1] < CHIP_TEMPLATE[2, 1] < CHIP_TEMPLATE[3, 1]
    np.testing.assert_allclose(chip_transform(CHIP_TEMPLATE), np.eye(2, 3), atol=1e-6)


def test_similarity_fit_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -40.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fitted = similarity_lstsq(src, src @ rot.T + shift)
    np.testing.assert_allclose(fitted, np.hstack([rot, shift[:, None]]), atol=1e-9)
    with pytest.raises(ValueError):
        chip_transform(np.zeros((4, 2)))


def test_redetected_landmarks_land_on_the_template(
    detector: LandmarkDetector, faces: list[np.ndarray]
) -> None:
    offsets = []
    for image in faces:
        points = detector.landmarks(image)
        assert points is not None
        chip = align_chip(image, points)
        assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.dtype == np.uint8
        # YuNet sees the chip best with some context around it and upscaled
        again = detector.detect_at(chip, 0.25, 2.0)
        assert again is not None, "the chip must still look like a face"
        offsets.append(again - CHIP_TEMPLATE)
    median = np.linalg.norm(np.median(np.stack(offsets), axis=0), axis=1)
    # eyes and nose within 3 px; YuNet's mouth corners sit a little inside dlib's (points 48, 54)
    assert median[:3].max() < 3.0, median
    assert median[3:].max() < 4.5, median


def test_rotated_and_scaled_copy_gives_the_same_chip(
    detector: LandmarkDetector, faces: list[np.ndarray]
) -> None:
    def chip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = detector.landmarks(image)
        assert points is not None
        blurred = cv2.GaussianBlur(align_chip(image, points), (0, 0), 2.0)
        return points, blurred[30:130, 30:120].astype(np.float32)  # the face, not the background

    subset = faces[::4]
    same, other, moved_points = [], [], []
    for i, image in enumerate(subset):
        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), 8.0, 0.9)
        moved = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REPLICATE)
        points, reference = chip(image)
        points_moved, chip_moved = chip(moved)
        same.append(np.abs(reference - chip_moved).mean())
        other.append(np.abs(reference - chip(subset[i - 1])[1]).mean())
        # where the original landmarks, carried along with the face, land in the moved face's chip
        carried = points @ matrix[:, :2].T + matrix[:, 2]
        to_chip = chip_transform(points_moved)
        moved_points.append(carried @ to_chip[:, :2].T + to_chip[:, 2] - CHIP_TEMPLATE)
    # YuNet's landmarks jitter by a few pixels as the face moves (about 3-4 chip px per point in
    # median on these small images); the chips still agree far better than chips of other faces
    jitter = np.median(np.linalg.norm(np.stack(moved_points), axis=2).mean(axis=1))
    assert jitter < 5.0, jitter
    assert np.median(same) < 0.45 * np.median(other), (same, other)


def test_gray_image_is_embedded_as_three_equal_channels(detector: LandmarkDetector) -> None:
    gray = load_yale_faces()[0].images[0]
    points = detector.landmarks(gray)
    assert points is not None
    chip = align_chip(gray, points)
    assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)
    np.testing.assert_array_equal(chip[:, :, 0], chip[:, :, 2])
    np.testing.assert_array_equal(chip, align_chip(np.repeat(gray[:, :, None], 3, 2), points))


def test_refinement_maps_the_view_back_to_image_coordinates() -> None:
    from common.facenet.chips import CHIP_TEMPLATE, REFINE_BORDER, REFINE_SCALE, refine_landmarks

    image = np.zeros((200, 240, 3), np.uint8)
    landmarks = CHIP_TEMPLATE * 0.7 + np.array([40.0, 30.0], np.float32)
    offset = CHIP_SIZE * REFINE_SCALE * REFINE_BORDER
    # a detector that finds exactly the template in the view: the landmarks come back unchanged
    agree = refine_landmarks(image, landmarks, lambda view: CHIP_TEMPLATE * REFINE_SCALE + offset)
    np.testing.assert_allclose(agree, landmarks, atol=1e-3)
    # one that finds the face 4 view pixels to the right: 4 * 0.7 / 2 image pixels to the right
    moved = refine_landmarks(
        image, landmarks, lambda view: CHIP_TEMPLATE * REFINE_SCALE + offset + [4, 0]
    )
    np.testing.assert_allclose(
        moved - landmarks, np.tile([[4 * 0.7 / REFINE_SCALE, 0]], (5, 1)), atol=1e-3
    )
    # none found: the input landmarks
    np.testing.assert_array_equal(refine_landmarks(image, landmarks, lambda view: None), landmarks)
