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
from tests.specs import scatter_transfer

DEFAULT = scatter_transfer(head_width=16, face_model="pretrained")


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


def test_the_scattering_is_read_only_by_the_transfer_conv_head() -> None:
    from common.config import parse_run_config

    vgg = parse_run_config({"emotion-model": "vgg", "emotion-scatter": 2})
    linear = parse_run_config({"emotion-model": "transfer", "emotion-scatter": 2})

    assert ModelSpec.from_settings(vgg).emotion_scatter == 0  # ignored, as emotion-head-width is
    assert ModelSpec.from_settings(linear).emotion_scatter == 0
    with pytest.raises(ConfigError, match=r"emotion-scatter must be in 0\.\.3"):
        parse_run_config({"emotion-scatter": 9})
    with pytest.raises(ValueError, match="emotion_scatter"):  # a checkpoint that says otherwise
        ModelSpec(emotion_model="transfer", emotion_scatter=2)


def test_the_statistics_file_is_pinned() -> None:
    from common.facenet import emotion_input

    assert hashlib.sha256(Path(STATS_FILE).read_bytes()).hexdigest() == emotion_input.STATS_SHA256


def _rewritten(tmp_path: Path, change) -> tuple[Path, str]:
    """The shipped file with ``change(sets)`` applied, and the SHA-256 of the result."""
    document = json.loads(STATS_FILE.read_text())
    change(document["sets"])
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(document))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _first(sets: dict) -> dict:
    return next(iter(sets.values()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sets: _first(sets).update(mean=[0.0]), "does not hold 145"),
        (lambda sets: _first(sets)["std"].__setitem__(3, 0.0), "deviation <= 0"),
        (lambda sets: _first(sets)["mean"].__setitem__(3, float("nan")), "non-finite"),
        (lambda sets: _first(sets).update(mean="2.0"), "no numeric mean and std"),
        (lambda sets: _first(sets).pop("std"), "no numeric mean and std"),
    ],
    ids=["short", "zero-std", "nan", "string", "missing"],
)
def test_statistics_that_do_not_fit_the_cut_are_refused_even_with_a_matching_hash(
    tmp_path, network, change, message
) -> None:
    # a future regenerated file is checked for what it holds, not only for its pinned hash
    path, sha = _rewritten(tmp_path, change)

    with pytest.raises(IntegrityError, match=message):
        load_stats(7, 48, 2, state_sha256(network), path=path, sha256=sha)


def test_a_file_of_another_format_is_refused(tmp_path, network) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"format": "something/9", "sets": {}}))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(IntegrityError, match="is not a facefed-emotion-input-stats/1 file"):
        load_stats(7, 48, 2, state_sha256(network), path=path, sha256=sha)


def test_a_run_asking_for_a_cut_without_statistics_is_refused_before_any_site_trains() -> None:
    from common.config import parse_run_config

    conv_head = {"emotion-model": "transfer", "emotion-head-width": 64, "emotion-input-size": 48}
    with pytest.raises(ConfigError, match="emotion-scatter 1 with 7 trunk blocks at 48 px"):
        parse_run_config(conv_head | {"emotion-trunk-blocks": 7, "emotion-scatter": 1})
    with pytest.raises(ConfigError, match="no shipped input statistics"):
        parse_run_config(conv_head | {"emotion-trunk-blocks": 6, "emotion-scatter": 2})
    parse_run_config(conv_head | {"emotion-trunk-blocks": 7, "emotion-scatter": 2})  # shipped


def test_without_kymatio_the_scattering_is_one_line(monkeypatch) -> None:
    import sys

    from common import scattering

    scattering._transform.cache_clear()
    monkeypatch.setitem(sys.modules, "kymatio.scattering2d.frontend.torch_frontend", None)
    try:
        with pytest.raises(ConfigError, match="emotion-scatter needs kymatio"):
            scattering.log_scattering(torch.zeros(1, 1, 48, 48), 2)
    finally:
        scattering._transform.cache_clear()
