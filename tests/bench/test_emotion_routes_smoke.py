"""The emotion-routes benchmark runs end to end on real FER2013 faces (numbers mean nothing here)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.emotion_routes import main


def test_one_round_reports_a_held_out_accuracy_per_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads = torch.get_num_threads()
    try:
        main(
            [
                "--route",
                "scratch",
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
    assert (result["route"], result["sigma"], result["steps"]) == ("scratch", 1.0, 2)
