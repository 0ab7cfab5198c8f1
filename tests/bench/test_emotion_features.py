"""The feature probe joins feature sets as it says, refuses what it cannot read, and can tell a
feature that carries the label from one that does not."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.emotion_features import _shape, features, main, probe
from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor


def _args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    defaults = {"cache": str(tmp_path), "mesh_model": None, "batch": 64, "steps": 60, "lr": 0.01}
    return argparse.Namespace(**(defaults | {"pool": 3, "head_width": 8} | overrides))


def test_a_joined_feature_set_pools_each_part_to_the_first_ones_side(tmp_path: Path) -> None:
    faces = emotion_tensor(load_fer2013("Training").images[:3])

    x = features(_args(tmp_path), "dlib:7@48+dlib:3@48", faces)

    assert x.shape == (3, 64 + 32, 5, 5)  # block 7's map is 5x5 at 48 px, block 3's 10x10 pooled
    alone = features(_args(tmp_path), "dlib:7@48", faces)
    torch.testing.assert_close(x[:, :64], alone)


def test_a_mesh_feature_without_the_network_file_is_refused(tmp_path: Path) -> None:
    faces = torch.zeros(2, 1, 48, 48)
    with pytest.raises(SystemExit, match="--mesh-model"):
        features(_args(tmp_path), "mesh:landmarks", faces)


@pytest.mark.parametrize("spec", ["dlib:7", "dlib:x@48", "mesh:", "vgg:3", "dlib:7@48+"])
def test_a_feature_spec_it_cannot_read_is_refused(spec: str) -> None:
    with pytest.raises(SystemExit):
        main(["--features", spec])


def test_the_probe_reads_a_feature_that_carries_the_label_and_not_one_that_does_not(
    tmp_path: Path,
) -> None:
    y = torch.arange(7).repeat(60)
    lit = torch.zeros(len(y), 7, 3, 3)
    lit[torch.arange(len(y)), y] = 1.0  # the channel of each face's class is on
    noise = torch.randn(len(y), 7, 3, 3, generator=torch.Generator().manual_seed(0))
    order = np.random.default_rng(0).permutation(len(y))
    val, rest = order[:100], order[100:]

    carried = probe(lit + 0.1 * noise, y, rest, val, _args(tmp_path), seed=0)
    absent = probe(noise, y, rest, val, _args(tmp_path), seed=0)

    assert carried > 0.9 and absent < 0.35


def test_landmarks_become_a_shape_that_forgets_position_and_size() -> None:
    points = torch.randn(1, 468, 3, generator=torch.Generator().manual_seed(0))
    moved = points * 3.0 + torch.tensor([50.0, 20.0, 0.0])  # the same face, larger and elsewhere

    a, b = (_shape(p.reshape(1, 1404, 1, 1)) for p in (points, moved))

    torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=0)
    xy = a.float().view(468, 3)[:, :2]
    assert xy.mean(0).abs().max() < 1e-3 and abs(xy.square().sum(1).mean().sqrt() - 1) < 1e-2
