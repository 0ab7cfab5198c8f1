"""The DP throughput benchmark: its Opacus ghost criterion, memory probe and report, on a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.dp_throughput import Workload, load_workloads, main, probe_memory, workload_settings
from common.config import RunSettings
from common.model_spec import ModelSpec
from common.models import FaceTrainer, cosface_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_ghost_criterion_is_the_training_loss() -> None:
    cosine = torch.rand(6, 5) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    work = Workload("face", torch.zeros(6, 1, 4, 4), labels, RunSettings())
    criterion = work.criterion()
    assert torch.allclose(criterion(cosine, labels), cosface_loss(cosine, labels))
    criterion.reduction = "none"
    assert criterion(cosine, labels).shape == (6,)


def test_memory_probe_reports_a_peak_at_least_the_starting_rss() -> None:
    (work,) = load_workloads(["emotion"], limit=64)
    result = probe_memory(work, "fast", steps=1, device=torch.device("cpu"))
    assert result["peak_rss_mib"] >= result["rss_before_steps_mib"] > 0


def test_tiny_run_writes_a_table_with_every_requested_mode(tmp_path: Path) -> None:
    code = main(
        [
            "--models=emotion",
            "--modes=non-private,opacus-hooks,fast",
            "--limit=64",
            "--windows=2",
            "--steps=1",
            "--warmup=1",
            "--no-memory",
            "--device=cpu",
            f"--out={tmp_path}",
        ]
    )
    report = json.loads((tmp_path / "dp_throughput.json").read_text())
    table = (tmp_path / "dp_throughput.md").read_text()
    assert code == 0
    emotion = report["results"]["emotion"]
    assert set(emotion) == {"non-private", "opacus-hooks", "fast"}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in emotion.values())
    assert emotion["non-private"]["ratio_vs_non_private"] == 1.0
    assert len(emotion["fast"]["windows_images_per_s"]) == 2
    assert report["threads"] == 1 and report["load_before"] is not None
    assert "| fast |" in table and "| opacus-hooks |" in table


def test_pretrained_tail_workloads_train_dlibs_tail_on_frozen_features(tmp_path: Path) -> None:
    code = main(
        [
            "--models=face-tail0,face-tail2",
            "--modes=non-private,opacus-hooks,fast",
            "--limit=32",
            "--windows=1",
            "--steps=1",
            "--warmup=1",
            "--no-memory",
            "--device=cpu",
            f"--out={tmp_path}",
        ]
    )
    report = json.loads((tmp_path / "dp_throughput.json").read_text())
    assert code == 0
    for name in ("face-tail0", "face-tail2"):
        modes = report["results"][name]
        assert set(modes) == {"non-private", "opacus-hooks", "fast"}
        assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in modes.values()), modes
    assert "## face-tail2" in (tmp_path / "dp_throughput.md").read_text()

    tail0, tail2 = load_workloads(["face-tail0", "face-tail2"], limit=8)
    assert tail0.x.shape[1:] == (256,) and tail2.x.dim() == 4  # pooled features / feature maps
    assert not tail0.images and tail0.face
    start, _ = ModelSpec.from_settings(workload_settings("face-tail2")).initial(0)
    trainer = tail2.model(torch.device("cpu"))
    assert isinstance(trainer, FaceTrainer)
    for (k, v), w in zip(
        trainer.backbone.state_dict().items(), start.state_dict().values(), strict=True
    ):
        assert torch.equal(v, w), k  # dlib's pretrained tail, not random weights
