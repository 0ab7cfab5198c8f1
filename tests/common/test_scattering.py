"""The log wavelet scattering of gray faces: its shape, a blank face, and why a mirror needs its own map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.scattering import LOG_FLOOR, log_scattering, scatter_channels


def real_faces(n: int = 32) -> torch.Tensor:
    fer = load_fer2013("Training")
    rows = np.random.default_rng(0).choice(len(fer), n, replace=False)
    return emotion_tensor(fer.images[rows])


@pytest.mark.parametrize(("scales", "channels"), [(1, 9), (2, 81), (3, 217)])
def test_the_coefficients_per_position_are_the_transforms(scales: int, channels: int) -> None:
    out = log_scattering(real_faces(4), scales)

    assert scatter_channels(scales) == channels
    assert out.shape == (4, channels, 48 >> scales, 48 >> scales)
    assert torch.isfinite(out).all()


def test_a_blank_face_scatters_to_the_log_floor_not_to_minus_infinity() -> None:
    out = log_scattering(torch.zeros(2, 1, 48, 48), 2)

    torch.testing.assert_close(out, torch.full_like(out, math.log(LOG_FLOOR)))


def test_no_faces_give_no_maps_of_the_right_shape() -> None:
    assert log_scattering(torch.zeros(0, 1, 48, 48), 2).shape == (0, 81, 12, 12)


def test_a_colour_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="gray faces"):
        log_scattering(torch.zeros(2, 3, 48, 48), 2)


def test_the_map_of_a_mirrored_face_is_not_the_mirrored_map() -> None:
    # why training keeps each face's mirror image's own map (ModelInputs.emotion_training): the
    # orientation channels do not follow a flip of the map, and the 12x12 grid does not either
    faces = real_faces()
    own = log_scattering(faces.flip(-1), 2)
    flipped = log_scattering(faces, 2).flip(-1)

    relative = (own - flipped).square().mean() / own.var()

    assert relative > 0.1
