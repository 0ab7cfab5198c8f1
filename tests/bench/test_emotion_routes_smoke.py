"""The emotion-routes benchmark runs end to end on real FER2013 faces (numbers mean nothing here)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bench.emotion_routes import (
    HELD_OUT,
    _inputs,
    _lr,
    _model,
    _multiplied,
    _track,
    _view,
    cropped,
    equalized,
    held_out_split,
    main,
    shifted,
)
from common.facenet.resnet import BLOCKS
from common.facenet.transfer import EmotionHead, gray_to_chip
from common.facenet.weights import load_pretrained


def _run(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[list[str], dict[str, Any]]:
    """One tiny harness run (width 4, batch 64, 2 steps, 1 round): its output lines and RESULT."""
    threads = torch.get_num_threads()
    tiny = ["--width", "4", "--sigma", "1.0", "--batch", "64", "--steps", "2", "--rounds", "1"]
    try:
        main([*tiny, *flags])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    return lines, json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("route", ["scratch", "vgg"])
def test_one_round_reports_a_held_out_accuracy_per_round(
    route: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines, result = _run(capsys, "--route", route)

    assert lines[0].startswith("round 1: held-out Training accuracy ")
    assert len(result["val"]) == 1 and 0.0 <= result["val"][0] <= 1.0
    assert (result["route"], result["sigma"], result["steps"]) == (route, 1.0, 2)


def test_a_held_out_face_that_repeats_a_training_face_is_not_scored() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(10, 246, size=(HELD_OUT + 50, 8, 8), dtype=np.uint8)
    val, rest = held_out_split(images)
    images[val[:3]] = images[rest[:3]]  # three held-out faces now repeat training faces...
    jitter = rng.integers(-3, 4, size=(8, 8))
    images[val[3]] = images[rest[3]] + jitter  # ...and one repeats a face re-encoded

    val_after, rest_after = held_out_split(images)

    assert rest_after.tolist() == rest.tolist()  # the training part does not change
    assert sorted(val_after.tolist()) == sorted(val[4:].tolist())


def _args(**overrides: object) -> argparse.Namespace:
    defaults = {
        "route": "transfer",
        "mirror": "map",
        "lr": 0.002,
        "schedule": "constant",
        "warmup": 0,
        "augmult": 1,
        "center": False,
        "head_first_kernel": 3,
    }
    return argparse.Namespace(**(defaults | {"rounds": 3, "steps": 10} | overrides))


def test_the_linear_schedule_falls_from_the_learning_rate_to_zero_over_all_rounds() -> None:
    args = _args(schedule="linear")

    rates = [_lr(args, step) for step in range(30)]

    assert rates[0] == pytest.approx(0.002)
    assert rates[15] == pytest.approx(0.001)
    assert rates[-1] == pytest.approx(0.002 / 30)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert {_lr(_args(), step) for step in range(30)} == {0.002}


def test_a_warmup_ramps_the_rate_up_at_the_start_of_every_round() -> None:
    args = _args(warmup=4)

    rates = [_lr(args, step) for step in range(30)]

    assert rates[:5] == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002])
    assert rates[10:14] == rates[20:24] == rates[:4]


@pytest.mark.parametrize("mirror", ["map", "face", "none"])
def test_a_transfer_view_mirrors_as_the_mirror_option_says(mirror: str) -> None:
    maps = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).view(4, 2, 3, 3)
    of_mirrored_faces = -maps
    generator = torch.Generator().manual_seed(0)

    view = _view(_args(mirror=mirror), maps, of_mirrored_faces, generator)

    rows = list(zip(view, maps, of_mirrored_faces, strict=True))
    if mirror == "none":
        assert torch.equal(view, maps)
    elif mirror == "map":
        assert all(torch.equal(v, m) or torch.equal(v, m.flip(-1)) for v, m, _ in rows)
        assert any(torch.equal(v, m.flip(-1)) for v, m, _ in rows)
    else:
        assert all(torch.equal(v, m) or torch.equal(v, f) for v, m, f in rows)
        assert any(torch.equal(v, f) for v, _, f in rows)


def test_augmentation_multiplicity_puts_an_examples_views_side_by_side_as_one_unit() -> None:
    maps = torch.arange(3 * 2 * 3 * 3, dtype=torch.float32).view(3, 2, 3, 3)
    labels = torch.tensor([4, 0, 6])

    x, y, units = _multiplied(
        _args(augmult=4), maps, None, labels, torch.Generator().manual_seed(0)
    )

    assert units is not None and units.count == 3
    assert units.index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert y.tolist() == [4, 4, 4, 4, 0, 0, 0, 0, 6, 6, 6, 6]
    for i, m in enumerate(maps):  # a map's views alternate between it and its mirror image
        assert [
            torch.equal(v, m if k % 2 == 0 else m.flip(-1))
            for k, v in enumerate(x[4 * i : 4 * i + 4])
        ] == [True] * 4


def test_without_multiplicity_each_example_is_its_own_unit() -> None:
    maps = torch.zeros(5, 2, 3, 3)

    x, y, units = _multiplied(
        _args(augmult=1), maps, None, torch.arange(5), torch.Generator().manual_seed(0)
    )

    assert units is None and x.shape == maps.shape and y.tolist() == [0, 1, 2, 3, 4]


def test_the_harness_runs_with_multiplicity_and_a_moving_average(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, result = _run(capsys, "--route", "vgg", "--augmult", "2", "--ema", "0.5")

    assert (result["augmult"], result["ema"]) == (2, 0.5) and 0.0 <= result["val"][0] <= 1.0


def test_flip_test_time_augmentation_is_scored_beside_the_single_view_with_sgd(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines, result = _run(capsys, "--route", "scratch", "--tta", "--optimizer", "sgd", "--lr", "0.1")

    assert lines[1].startswith("round 1: with flip test-time augmentation ")
    assert len(result["val_tta"]) == 1 and 0.0 <= result["val_tta"][0] <= 1.0
    assert (result["optimizer"], result["momentum"]) == ("sgd", 0.9)


def test_a_run_takes_its_seed_clipping_norm_and_label_smoothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, result = _run(
        capsys,
        "--route",
        "scratch",
        "--equalize",
        *["--seed", "3", "--clip", "0.5", "--label-smoothing", "0.1"],
    )

    assert (result["seed"], result["clip"], result["label_smoothing"]) == (3, 0.5, 0.1)
    assert result["equalize"] and 0.0 <= result["val"][0] <= 1.0


def test_a_cached_map_of_other_faces_is_computed_afresh(tmp_path: Path) -> None:
    args = _args(trunk_blocks=7, tune_blocks=0, size=48, crop=1.0, equalize=False)
    args.cache = str(tmp_path)
    faces, others = torch.randn(3, 1, 48, 48), torch.randn(3, 1, 48, 48)  # as many, other faces
    first = _inputs(args, faces)

    theirs = _inputs(args, others)

    assert theirs.shape == first.shape and not torch.equal(theirs, first)
    assert torch.equal(_inputs(args, faces), first)  # each set's cache serves it alone
    assert len(list(tmp_path.iterdir())) == 2


def test_a_cropped_face_is_its_centre_at_the_full_size() -> None:
    faces = torch.zeros(2, 1, 8, 8)
    faces[..., 2:6, 2:6] = 1.0  # the central half is bright, the border dark

    centre = cropped(faces, 0.5)

    assert centre.shape == faces.shape and torch.allclose(centre, torch.ones_like(centre))
    assert torch.equal(cropped(faces, 1.0), faces)


def test_an_equalized_face_spans_the_full_range_in_the_same_order() -> None:
    rng = np.random.default_rng(0)
    faces = rng.integers(100, 140, size=(3, 12, 12), dtype=np.uint8)  # a narrow range of grays

    out = equalized(faces)

    assert out.dtype == np.uint8 and out.shape == faces.shape
    for face, eq in zip(faces, out, strict=True):
        assert eq.max() == 255 and eq.min() < 30
        order = np.argsort(face, axis=None, kind="stable")
        assert np.all(np.diff(eq.ravel()[order].astype(int)) >= 0)  # brighter stays brighter


def test_a_shifted_view_moves_the_face_and_repeats_its_border() -> None:
    faces = torch.arange(2 * 36, dtype=torch.float32).view(2, 1, 6, 6)

    right = shifted(faces, 2, 0)
    up = shifted(faces, 0, -1)

    assert torch.equal(right[..., 2:], faces[..., :4])  # moved 2 pixels right
    assert torch.equal(right[..., 0], faces[..., 0]) and torch.equal(right[..., 1], faces[..., 0])
    assert torch.equal(up[..., :5, :], faces[..., 1:, :])  # moved 1 pixel up
    assert torch.equal(up[..., 5, :], faces[..., 5, :])
    assert torch.equal(shifted(faces, 0, 0), faces)


@pytest.mark.parametrize(
    "flags",
    [
        "--augmult 0",
        "--tta-shift 2",
        "--route vgg --tta --tta-shift 2",
        "--ema 1.0",
        "--ema -0.1",
        "--tune-blocks 7",
        "--tune-blocks 1 --extra-blocks 3",
        "--route vgg --center",
        "--tune-blocks 1 --center",
        "--clip 0",
        "--label-smoothing 1.0",
        "--crop 0",
        "--crop 1.2",
        "--route scratch --crop 0.8",
    ],
)
def test_out_of_range_options_are_refused(flags: str) -> None:
    with pytest.raises(SystemExit):
        main(f"--sigma 1.0 {flags}".split())


def test_the_moving_average_weighs_recent_iterates_more_and_decay_0_keeps_the_last() -> None:
    iterates = [torch.tensor([4.0]), torch.tensor([0.0]), torch.tensor([8.0])]
    for decay, expected in ((0.5, 5.0), (0.0, 8.0)):  # 0.5: (4 * 0.5 + 0) * 0.5 + 8 * 0.5 = 5
        average = {"w": torch.tensor([4.0])}
        for w in iterates[1:]:
            _track(average, {"w": w}, decay)
        assert average["w"].item() == expected


def test_tuned_blocks_start_from_the_pretrained_trunk_and_continue_its_map() -> None:
    faces = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 1, 48, 48))).float()
    chips = gray_to_chip(faces, 48)
    model = _model(_args(route="transfer", trunk_blocks=7, tune_blocks=2, pool=3, head_width=8), 64)
    assert isinstance(model, nn.Sequential)
    six_blocks, _ = load_pretrained().split(len(BLOCKS) - 5)
    seven_blocks, _ = load_pretrained().split(len(BLOCKS) - 7)

    with torch.no_grad():
        continued = model[1](model[0](six_blocks(chips)))

    assert isinstance(model[2], EmotionHead)
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(continued, seven_blocks(chips), rtol=1e-4, atol=1e-5)


def test_a_centered_head_sees_each_map_less_its_own_mean_and_nothing_of_other_faces() -> None:
    maps = torch.rand(3, 64, 5, 5) + torch.tensor([0.0, 1.0, 5.0]).view(3, 1, 1, 1)
    model = _model(_args(route="transfer", tune_blocks=0, pool=3, head_width=8, center=True), 64)
    assert isinstance(model, nn.Sequential) and isinstance(model[1], EmotionHead)

    centered = model[0](maps)

    torch.testing.assert_close(centered.mean((1, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(centered, maps - maps.mean((1, 2, 3), keepdim=True))
    # a face's logits do not depend on which other faces share its batch
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(maps)[:1], model(maps[:1]))
    assert not list(model[0].parameters())


def test_a_first_kernel_of_1_mixes_the_channels_of_each_position_alone() -> None:
    model = _model(_args(tune_blocks=0, pool=3, head_width=8, head_first_kernel=1), 145)
    assert isinstance(model, EmotionHead)
    first = model.convs[0][0]
    assert first.kernel_size == (1, 1) and first.weight.shape == (8, 145, 1, 1)
    maps = torch.randn(2, 145, 5, 5)
    moved = maps.clone()
    moved[:, :, 0, 0] += 1.0  # one position changes

    with torch.no_grad():
        a, b = first(maps), first(moved)

    assert a.shape == (2, 8, 5, 5)
    changed = (a != b).any(1)  # (N, H, W): where the first layer's output moved
    assert changed[:, 0, 0].all() and changed.sum() == 2
