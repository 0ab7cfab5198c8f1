"""Shared fixtures for the on-device pipeline, template store and egress guard tests.

Real faces: the uncropped Yale photos (``yalefaces_243x320.npz``) and a few LFW JPEGs read straight
from the shipped archive. Plumbing tests use small random-initialised networks (seeded); tests that
need recognition accuracy use the trained checkpoint in ``FACEFED_TEST_CHECKPOINT``, else the
shipped public model ``models/facefed-face-v4.ckpt``.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.checkpoint import save_checkpoint
from common.crypto import keys
from common.model_spec import ModelSpec
from common.models import EmotionNet, FaceEmbedder
from common.paths import DEFAULT_DATA_DIR

DATA = Path(os.environ.get("FACEFED_DATA") or DEFAULT_DATA_DIR)
YALE = DATA / "yalefaces_243x320.npz"
LFW = DATA / "lfw_deepfunneled112_sets1-5.tar.gz"
YUNET = DATA / "face_detection_yunet_2026may.onnx"
TRAINED_ENV = "FACEFED_TEST_CHECKPOINT"
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "facefed-face-v4.ckpt"


@pytest.fixture(scope="session")
def yale() -> dict[str, np.ndarray]:
    """Yale Faces: ``images`` uint8 (164, 243, 320) gray, ``identity``, ``condition``."""
    if not YALE.is_file():
        pytest.skip(f"{YALE} not available")
    with np.load(YALE, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def yale_rgb(yale: dict[str, np.ndarray]) -> Callable[[int, str], np.ndarray]:
    """``yale_rgb(subject, condition)``: one Yale photo as (243, 320, 3) RGB."""

    def get(subject: int, condition: str) -> np.ndarray:
        idx = np.flatnonzero((yale["identity"] == subject) & (yale["condition"] == condition))[0]
        return np.repeat(yale["images"][idx][:, :, None], 3, axis=2)

    return get


@pytest.fixture(scope="session")
def lfw_jpegs() -> dict[str, bytes]:
    """The raw JPEG bytes of the first 6 LFW images in the archive (name -> bytes)."""
    if not LFW.is_file():
        pytest.skip(f"{LFW} not available")
    out: dict[str, bytes] = {}
    with tarfile.open(LFW, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                handle = tar.extractfile(member)
                assert handle is not None
                out[Path(member.name).name] = handle.read()
                if len(out) == 6:
                    break
    return out


@pytest.fixture(scope="session")
def small_models() -> tuple[FaceEmbedder, EmotionNet]:
    """Seeded, untrained, narrow models (shape and plumbing tests only)."""
    torch.manual_seed(0)
    return FaceEmbedder(width=8).eval(), EmotionNet(width=8).eval()


@pytest.fixture(scope="session")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, small_models: tuple[FaceEmbedder, EmotionNet]
) -> Path:
    """A real checkpoint file of the small untrained models."""
    path = tmp_path_factory.mktemp("ckpt") / "round_0.ckpt"
    face, emotion = small_models
    save_checkpoint(path, face, emotion, ModelSpec(face_width=8, emotion_width=8), round_=0)
    return path


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """A trained checkpoint: ``FACEFED_TEST_CHECKPOINT`` if set, else the shipped public model."""
    value = os.environ.get(TRAINED_ENV)
    path = Path(value) if value else SHIPPED_MODEL
    if not path.is_file():
        pytest.skip(f"trained checkpoint {path} not found (set {TRAINED_ENV} to one)")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Iterator[keys.MasterKey]:
    """A fresh master key in a 0600 key file outside any store."""
    yield keys.new_key_file(tmp_path / "keys" / "site.key")


def site_cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> Path:
    """A clean environment for ``facefed site``: store and key folders under tmp, ``checkpoint``."""
    for name in ("FACEFED_SITE_KEY", "FACEFED_SITE_PASSPHRASE", "FACEFED_DETECTOR_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FACEFED_SITE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("FACEFED_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("FACEFED_CHECKPOINT", str(checkpoint))
    return tmp_path


def _write_image(path: Path, rgb: np.ndarray) -> Path:
    ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, path
    return path


@pytest.fixture(scope="session")
def write_image() -> Callable[[Path, np.ndarray], Path]:
    """``write_image(path, rgb)``: write with OpenCV (JPEG or PNG by suffix), return the path."""
    return _write_image


def _store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def store_files() -> Callable[[Path], dict[str, bytes]]:
    """``store_files(dir)``: every file of a store folder with its bytes (DB, WAL, SHM...)."""
    return _store_files
