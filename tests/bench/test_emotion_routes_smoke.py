"""The emotion-routes benchmark runs end to end on real FER2013 faces (numbers mean nothing here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.emotion_routes import HELD_OUT, held_out_split, main


@pytest.mark.parametrize("route", ["scratch", "vgg"])
def test_one_round_reports_a_held_out_accuracy_per_round(
    route: str, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    try:
        main(
            [
                "--route",
                route,
                "--width",
                "4",
                "--sigma",
                "1.0",
                "--batch",
                "64",
                "--steps",
                "2",
                "--rounds",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)

    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1].removeprefix("RESULT "))
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
