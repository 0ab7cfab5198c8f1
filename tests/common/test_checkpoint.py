"""Checkpoints round-trip exactly and refuse corrupt or foreign files with one clear error."""

from pathlib import Path

import pytest
import torch

from common.checkpoint import load_models, save_checkpoint
from common.errors import DataError, IntegrityError
from common.model_spec import ModelSpec


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    config = ModelSpec(face_width=16, emotion_width=16)
    face, emotion = config.build()
    path = save_checkpoint(tmp_path / "round_001.ckpt", face, emotion, config, 1, {"k": "v"})
    return path, face, emotion


def test_round_trip_restores_both_models(checkpoint) -> None:
    path, face, emotion = checkpoint
    face2, emotion2, meta = load_models(path)
    x = torch.randn(2, 1, 112, 112)
    torch.testing.assert_close(face2(x), face.eval()(x))
    e = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(emotion2(e), emotion.eval()(e))
    assert meta == {"k": "v", "round": 1, "model_spec": ModelSpec(16, 16).to_dict()}
    assert not face2.training and not emotion2.training


def test_flipped_byte_is_detected(checkpoint) -> None:
    path = checkpoint[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_models(path)


def test_truncated_file_is_detected(checkpoint) -> None:
    path = checkpoint[0]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IntegrityError):
        load_models(path)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(IntegrityError, match="not a facefed checkpoint"):
        load_models(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_models(tmp_path / "nope.ckpt")
