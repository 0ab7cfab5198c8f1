"""The operating-points benchmark's Yale protocol and report (an untrained network: no accuracy claim)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.operating_points import markdown, yale_scores
from client.recogniser.pipeline import FacePipeline
from common.models import FaceEmbedder
from common.paths import data_dir


def test_yale_protocol_is_90_genuine_and_1260_impostor_comparisons() -> None:
    root = data_dir()
    if not (root / "yalefaces_243x320.npz").is_file():
        pytest.skip("Yale Faces not available")
    torch.manual_seed(0)
    genuine, impostor, rank1 = yale_scores(FacePipeline(FaceEmbedder(width=8)), root)
    assert genuine.shape == (90,) and impostor.shape == (90 * 14,)
    assert np.all(np.abs(genuine) <= 1 + 1e-5) and np.all(np.abs(impostor) <= 1 + 1e-5)
    assert 0 <= rank1 <= 1


def test_report_has_a_row_per_checkpoint_and_far() -> None:
    row = {
        "checkpoint": "models/x.ckpt",
        "far": 1e-4,
        "threshold": 0.6561,
        "lfw_tar": 0.053,
        "lfw_heldout_tar": 0.064,
        "lfw_heldout_far": 1.046e-4,
        "yale_genuine_accepted": 0.922,
        "yale_impostors_rejected": 0.954,
        "yale_rank1": 0.956,
    }
    table = markdown([row, {**row, "far": 1e-3}])
    assert table.count("| x.ckpt |") == 2
    assert "| x.ckpt | 0.0001 | 0.656 | 0.053 (0.064 / 1.05e-04) | 0.922 | 0.954 | 0.956 |" in table
