"""The emotion head's input: dlib's trunk map beside the log scattering, standardised with statistics
that ship with the release (from ORL's public faces, never from a site's), and the same on device as
in training."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import emotion_input_stats
from common.checkpoint import load_models, save_checkpoint
from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.errors import ConfigError, IntegrityError
from common.facenet.emotion_input import STATS_FILE, emotion_features, load_stats
from common.facenet.transfer import EmotionTransfer, frozen_features
from common.facenet.weights import load_pretrained
from common.features import ModelInputs
from common.model_spec import ModelSpec, state_sha256
from common.scattering import log_scattering

DEFAULT = ModelSpec(
    face_model="pretrained",
    emotion_model="transfer",
    emotion_trunk_blocks=7,
    emotion_input_size=48,
    emotion_pool=3,
    emotion_head_width=16,
    emotion_scatter=2,
)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return load_pretrained()


@pytest.fixture(scope="module")
def fer_images() -> np.ndarray:
    fer = load_fer2013("Training")
    return fer.images[np.random.default_rng(0).choice(len(fer), 300, replace=False)]


def test_the_shipped_statistics_cover_the_default_cut(network) -> None:
    mean, std = load_stats(7, 48, 2, state_sha256(network))

    assert mean.shape == std.shape == (64 + 81,)
    assert (std > 0).all()


def test_the_shipped_statistics_are_what_orls_faces_give(tmp_path) -> None:
    out = tmp_path / "stats.json"

    emotion_input_stats.main(["--out", str(out)])

    shipped = json.loads(STATS_FILE.read_text())["sets"]
    made = json.loads(out.read_text())["sets"]
    assert made.keys() == shipped.keys()
    for key, entry in made.items():
        assert entry["faces"] == 400 and "ORL" in entry["source"]
        for name in ("mean", "std"):
            np.testing.assert_allclose(entry[name], shipped[key][name], rtol=1e-4, atol=1e-5)


def test_public_statistics_standardise_fer2013_faces(network, fer_images) -> None:
    # ORL's faces set the constants, yet FER2013's channels come out near zero mean and unit
    # variance, while the raw log coefficients sit 0.6 to 6 below zero
    faces = emotion_tensor(fer_images)
    x = frozen_features(emotion_features(DEFAULT, network), faces)
    raw = log_scattering(faces, 2).mean((0, 2, 3))

    assert x.mean((0, 2, 3)).abs().max() < 1.5
    assert x.std((0, 2, 3)).min() > 0.5 and x.std((0, 2, 3)).max() < 2
    assert raw.max() - raw.min() > 4


def test_a_changed_statistics_file_is_refused(tmp_path, network) -> None:
    changed = tmp_path / "stats.json"
    shutil.copy(STATS_FILE, changed)
    changed.write_text(changed.read_text().replace('"mean": [\n    2.', '"mean": [\n    3.', 1))

    with pytest.raises(IntegrityError, match="differs from the statistics this release pins"):
        load_stats(7, 48, 2, state_sha256(network), path=changed)
    with pytest.raises(IntegrityError, match="cannot read"):
        load_stats(7, 48, 2, state_sha256(network), path=tmp_path / "missing.json")


def test_a_cut_without_shipped_statistics_is_a_config_error(network) -> None:
    with pytest.raises(ConfigError, match="blocks7-size48-scatter2"):
        load_stats(6, 48, 2, state_sha256(network))


def test_statistics_of_another_trunk_are_not_used(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no shipped emotion input statistics"):
        load_stats(7, 48, 2, "0" * 64)


def test_training_keeps_each_faces_map_and_its_mirror_images(network, fer_images) -> None:
    inputs = ModelInputs(DEFAULT, disk_cache=False)

    views = inputs.emotion_training(fer_images[:8])

    assert views.shape == (8, 2, 145, 5, 5)
    torch.testing.assert_close(views[:, 0], inputs.emotion(fer_images[:8]))
    mirrored = np.ascontiguousarray(fer_images[:8, :, ::-1])
    torch.testing.assert_close(views[:, 1], inputs.emotion(mirrored))


def test_the_device_model_sees_what_training_saw(tmp_path, network, fer_images) -> None:
    spec = ModelSpec(**(DEFAULT.to_dict() | {"pretrained_sha256": state_sha256(network)}))
    face, head = spec.initial(seed=0)
    path = save_checkpoint(tmp_path / "c.ckpt", face, head, spec, 1)

    _, device, _ = load_models(path)
    inputs = ModelInputs(spec, disk_cache=False)

    assert isinstance(device, EmotionTransfer)
    with torch.no_grad():
        on_device = device(emotion_tensor(fer_images[:16]))
        trained = head(inputs.emotion(fer_images[:16]))
    torch.testing.assert_close(on_device, trained, atol=2e-2, rtol=1e-2)  # maps kept in float16


def test_a_scatter_without_the_transfer_conv_head_is_refused() -> None:
    from common.config import parse_run_config

    with pytest.raises(ConfigError, match="emotion-scatter needs"):
        parse_run_config({"emotion-model": "scratch", "emotion-scatter": 2})
    with pytest.raises(ConfigError, match=r"emotion-scatter must be in 0\.\.3"):
        parse_run_config({"emotion-scatter": 9})
    with pytest.raises(ValueError, match="emotion_scatter"):
        ModelSpec(emotion_model="transfer", emotion_scatter=2)  # a linear head


def test_the_statistics_file_is_pinned() -> None:
    from common.facenet import emotion_input

    assert hashlib.sha256(Path(STATS_FILE).read_bytes()).hexdigest() == emotion_input.STATS_SHA256
