"""The centralised emotion benchmark runs end to end on real FER2013 faces (numbers mean nothing here),
and its shift augmentation moves each face by whole pixels within its bound."""

from __future__ import annotations

import json

import pytest
import torch

from bench.emotion_central import main, shift


def test_one_epoch_reports_held_out_and_publictest_accuracy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = torch.get_num_threads()
    try:
        main(["--width", "4", "--epochs", "1", "--batch", "64", "--limit", "256"])
    finally:
        torch.set_num_threads(threads)

    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1].removeprefix("RESULT "))
    (epoch,) = result["curve"]
    assert epoch["epoch"] == 1
    assert 0.0 <= epoch["val"] <= 1.0 and 0.0 <= epoch["publictest"] <= 1.0
    assert (result["arch"], result["limit"]) == ("vgg", 256)


def test_shift_moves_each_face_by_whole_pixels_within_the_bound() -> None:
    face = torch.arange(12 * 12, dtype=torch.float32).reshape(1, 1, 12, 12)  # every window differs
    moved = shift(face.repeat(20, 1, 1, 1), torch.Generator().manual_seed(0), pad=2)

    offsets = []
    for out in moved:
        centre = out[0, 2:10, 2:10]  # never reaches the repeated border at a shift of at most 2
        offsets += [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(centre, face[0, 0, 2 + dy : 10 + dy, 2 + dx : 10 + dx])
        ]
    assert len(offsets) == 20  # each face is a whole-pixel move of at most 2 ...
    assert len(set(offsets)) > 5  # ... drawn at random, not one move for all
