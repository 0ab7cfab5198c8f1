"""The run directory as the coordinator's durable state: what ``--resume`` continues from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from common.checkpoint import save_checkpoint
from common.config import parse_run_config
from common.errors import ConfigError
from common.model_spec import ModelSpec
from common.models import EmotionNet, FaceEmbedder
from common.serde import arrays_digest, to_arrays
from server.run_dir import resume_point, server_state, start_run

SETTINGS = parse_run_config({"face-width": 8, "emotion-width": 8, "num-rounds": 5})


def checkpoint(out: Path, server_round: int, seed: int) -> ArrayRecord:
    """A round's checkpoint with coordinator state, as RunRecorder writes it."""
    face, emotion = FaceEmbedder(8), EmotionNet(8)
    arrays = to_arrays(face, emotion)
    arrays["face.embed.weight"] = arrays["face.embed.weight"].__class__(
        np.full_like(arrays["face.embed.weight"].numpy(), seed)
    )
    sampling = dict(np.random.default_rng(seed).bit_generator.state)
    moments = {"m_t": {"face.embed.weight": np.ones(3, np.float32) * seed}}
    history = {
        "rounds": [{"round": r, "checkpoint": f"round_{r:03d}"} for r in range(1, server_round + 1)]
    }
    save_checkpoint(
        out / "checkpoints" / f"round_{server_round:03d}.ckpt",
        face,
        emotion,
        ModelSpec(8, 8),
        server_round,
        server=server_state(arrays, sampling, moments, history),
    )
    return arrays


def test_resume_continues_after_the_newest_checkpoint_with_the_exact_model(tmp_path: Path) -> None:
    run_id = start_run(tmp_path, SETTINGS)
    checkpoint(tmp_path, 1, seed=1)
    sent = checkpoint(tmp_path, 2, seed=2)
    point = resume_point(tmp_path, SETTINGS)
    assert (point.run_id, point.round) == (run_id, 2)
    assert point.arrays is not None and arrays_digest(point.arrays) == arrays_digest(sent)
    assert json.loads(point.server["sampling"]) == dict(
        np.random.default_rng(2).bit_generator.state
    )
    assert point.server["moments"]["m_t"]["face.embed.weight"].tolist() == [2.0, 2.0, 2.0]


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start_run(tmp_path, SETTINGS)
    checkpoint(tmp_path, 1, seed=1)
    checkpoint(tmp_path, 2, seed=2)
    newest = tmp_path / "checkpoints" / "round_002.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        point = resume_point(tmp_path, SETTINGS)
    assert point.round == 1
    assert "round_002.ckpt is unusable" in caplog.text and "checksum" in caplog.text


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path: Path) -> None:
    run_id = start_run(tmp_path, SETTINGS)
    point = resume_point(tmp_path, SETTINGS)
    assert (point.run_id, point.round, point.arrays) == (run_id, 0, None)


def test_resuming_with_another_config_is_refused(tmp_path: Path) -> None:
    start_run(tmp_path, SETTINGS)
    other = parse_run_config({**SETTINGS.to_flat(), "max-epsilon": 3.0, "resume": True})
    with pytest.raises(ConfigError, match="max-epsilon changed"):
        resume_point(tmp_path, other)


def test_there_is_nothing_to_resume_in_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_point(tmp_path, SETTINGS)


def test_a_fresh_run_archives_the_previous_one_instead_of_losing_it(tmp_path: Path) -> None:
    first = start_run(tmp_path, SETTINGS)
    checkpoint(tmp_path, 1, seed=1)
    (tmp_path / "ledger.db").write_bytes(b"previous ledger")
    second = start_run(tmp_path, SETTINGS)
    assert first != second
    (archived,) = (tmp_path / "archive").iterdir()
    assert (archived / "ledger.db").read_bytes() == b"previous ledger"
    assert (archived / "checkpoints" / "round_001.ckpt").exists()
    assert json.loads((archived / "run.json").read_text())["run_id"] == first
    assert not (tmp_path / "checkpoints").exists()
