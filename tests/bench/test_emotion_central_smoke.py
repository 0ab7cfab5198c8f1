"""The centralised emotion benchmark runs end to end on real FER2013 faces (numbers mean nothing here)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.emotion_central import main


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
