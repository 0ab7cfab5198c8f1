"""A checkpoint names its networks: the pretrained family rebuilds dlib's network around the trained
heads, and a checkpoint of another network or another pretrained trunk is refused in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import load_models, save_checkpoint
from common.data.chips import dataset_chips
from common.errors import FacefedError, IntegrityError
from common.facenet.resnet import ChipEmbedder, chip_tensor
from common.facenet.transfer import EmotionTransfer, gray_to_chip
from common.facenet.weights import default_pretrained_path, load_pretrained
from common.model_spec import ModelSpec, state_sha256
from common.models import EmotionVGG

PRETRAINED = ModelSpec(face_model="pretrained", face_tail_blocks=1, emotion_model="transfer")


@pytest.fixture(scope="module")
def dlib_net() -> torch.nn.Module:
    return load_pretrained(default_pretrained_path())


@pytest.fixture(scope="module")
def chips() -> torch.Tensor:
    """Four real ORL faces of two people, aligned onto dlib's chip."""
    orl = dataset_chips("orl")
    rows = np.flatnonzero(orl.labels < 2)[[0, 1, 10, 11]]
    return chip_tensor(orl.chips[rows])


def test_the_initial_pretrained_face_model_is_dlibs_network(dlib_net, chips, tmp_path) -> None:
    spec = dataclasses.replace(PRETRAINED, pretrained_sha256=state_sha256(dlib_net))
    face, emotion = spec.initial(seed=0)
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, spec, 0)

    embedder, emotion_model, meta = load_models(path)

    assert isinstance(embedder, ChipEmbedder)
    assert isinstance(emotion_model, EmotionTransfer)
    with torch.no_grad():
        torch.testing.assert_close(embedder(chips), F.normalize(dlib_net(chips), dim=1))
        assert emotion_model(torch.randn(2, 1, 48, 48)).shape == (2, 7)
    assert meta["model_spec"]["face_model"] == "pretrained"


def test_same_person_is_closer_than_another_person(dlib_net, chips) -> None:
    face, _ = PRETRAINED.initial(seed=0)
    embedder = ChipEmbedder(dlib_net.split(1)[0], face).eval()
    with torch.no_grad():
        e = embedder(chips)
    same = min(float(e[0] @ e[1]), float(e[2] @ e[3]))
    other = max(float(e[0] @ e[2]), float(e[1] @ e[3]))
    assert same > other


def test_a_checkpoint_trained_on_another_pretrained_trunk_is_refused(tmp_path) -> None:
    spec = dataclasses.replace(PRETRAINED, pretrained_sha256="0" * 64)
    face, emotion = spec.build()
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, spec, 0)
    with pytest.raises(IntegrityError, match="differs from the one this model was trained on"):
        load_models(path)


def test_a_checkpoint_whose_weights_are_not_the_named_network_is_refused(tmp_path) -> None:
    scratch, pretrained = ModelSpec(), PRETRAINED
    face, emotion = pretrained.build()  # weights of one network ...
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, scratch, 0)  # ... named as another
    with pytest.raises(IntegrityError, match="does not match the networks it names"):
        load_models(path)


def test_evaluate_on_a_checkpoint_of_the_wrong_network_is_one_line_exit_4(tmp_path) -> None:
    face, emotion = PRETRAINED.build()
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, ModelSpec(), 0)
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "evaluate", "--checkpoint", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 4
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("facefed: error: checkpoint")


def test_a_missing_pretrained_network_is_one_line(tmp_path, monkeypatch) -> None:
    spec = dataclasses.replace(PRETRAINED, pretrained_sha256="0" * 64)
    face, emotion = spec.build()
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, spec, 0)
    monkeypatch.setenv("FACEFED_PRETRAINED", str(tmp_path / "absent.ffnet"))
    with pytest.raises(FacefedError, match=r"absent\.ffnet") as info:
        load_models(path)
    assert "\n" not in str(info.value)


def test_scratch_checkpoints_written_before_model_specs_still_load(tmp_path) -> None:
    face, emotion = ModelSpec(face_width=8, emotion_width=8).build()
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, ModelSpec(8, 8), 3)
    # the old format stored only the two widths
    from common.checkpoint import MAGIC, read_checkpoint

    payload = read_checkpoint(path)
    payload["model_config"] = {"face_width": 8, "emotion_width": 8}
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    face2, _, meta = load_models(path)
    assert meta["round"] == 3
    assert sum(p.numel() for p in face2.parameters()) == sum(p.numel() for p in face.parameters())


def test_run_settings_name_the_model_spec() -> None:
    from common.config import parse_run_config

    settings = parse_run_config({"face-model": "pretrained", "face-tail-blocks": 2})
    spec = ModelSpec.from_settings(settings, pretrained_sha256="ab" * 32)
    assert (spec.face_model, spec.face_tail_blocks) == ("pretrained", 2)
    assert spec.pretrained_sha256 == "ab" * 32
    # a run without the pretrained network names none
    assert ModelSpec.from_settings(parse_run_config({}), "ab" * 32).pretrained_sha256 == ""


def test_a_transfer_emotion_head_with_convolutions_round_trips_a_checkpoint(tmp_path) -> None:
    from common.config import parse_run_config

    settings = parse_run_config(
        {"emotion-model": "transfer", "emotion-trunk-blocks": 7, "emotion-head-width": 16}
    )
    spec = ModelSpec.from_settings(settings, pretrained_sha256=state_sha256(load_pretrained()))
    face, emotion = spec.build()
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, spec, 1)

    _, device, _ = load_models(path)

    assert isinstance(device, EmotionTransfer) and device.head.linear.in_features == 16 * 2 * 2
    faces = torch.randn(3, 1, 48, 48)  # shapes only
    torch.testing.assert_close(
        device(faces), emotion(device.features.trunk(gray_to_chip(faces, 96)))
    )


def test_a_transfer_spec_written_before_conv_heads_builds_the_linear_head() -> None:
    old = ModelSpec(emotion_model="transfer").to_dict()
    del old["emotion_head_width"]

    _, emotion = ModelSpec.from_dict(old).build()

    assert [type(m).__name__ for m in emotion.children()] == ["Identity", "Linear"]
    with pytest.raises(ValueError, match="emotion_head_width"):
        ModelSpec(emotion_model="transfer", emotion_head_width=10**6)


def test_a_vgg_emotion_checkpoint_rebuilds_the_same_network(tmp_path) -> None:
    spec = ModelSpec(emotion_model="vgg", emotion_width=4)
    face, emotion = spec.initial(seed=0)
    path = save_checkpoint(tmp_path / "c.ckpt", face, emotion, spec, 0)

    _, loaded, meta = load_models(path)

    faces = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(faces), emotion.eval()(faces))
    assert isinstance(loaded, EmotionVGG)
    assert meta["model_spec"]["emotion_model"] == "vgg"
