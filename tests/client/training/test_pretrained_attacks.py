"""Attacks on the pretrained face network change by an untrusted coordinator, run submitter or file
supplier. Each test states what should hold; a failing test is a reproduced break."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.training import site_data
from client.training.site_data import SiteSpec, load_site_tensors
from common.checkpoint import load_federated, load_models, save_checkpoint
from common.config import parse_run_config
from common.errors import ConfigError, IntegrityError
from common.facenet.dlib_format import network_layers, parse
from common.facenet.resnet import FaceTail, Trunk
from common.facenet.transfer import EmotionHead
from common.model_spec import ModelSpec
from common.paths import DEFAULT_DATA_DIR, cache_dir

PRETRAINED = ModelSpec(face_model="pretrained", emotion_model="transfer")


class _RawSpec:
    """A model_config as a hostile checkpoint writer stores it: any values at all."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        return self.values


def _checkpoint(
    tmp_path: Path,
    overrides: dict[str, Any],
    base: ModelSpec = PRETRAINED,
    face: torch.nn.Module | None = None,
    emotion: torch.nn.Module | None = None,
) -> Path:
    built_face, built_emotion = base.build()
    values = {**base.to_dict(), **overrides}
    path = tmp_path / "hostile.ckpt"
    save_checkpoint(path, face or built_face, emotion or built_emotion, _RawSpec(values), 1)  # type: ignore[arg-type]
    return path


# --- 2. a checkpoint's model_config is not validated -------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "base"),
    [
        ({"emotion_pool": 10**6}, PRETRAINED),  # Linear(256 * 10^12, 7)
        ({"face_width": 10**7}, ModelSpec()),  # scratch FaceEmbedder of width 10^7
        ({"emotion_width": 10**7}, ModelSpec()),
    ],
)
def test_a_checkpoint_naming_absurd_sizes_is_refused_before_allocating(
    tmp_path: Path, overrides: dict[str, Any], base: ModelSpec
) -> None:
    """BROKEN today: ModelSpec.from_dict builds whatever sizes the file names; torch tries to
    allocate petabytes (a moderate value allocates GBs) and a RuntimeError traceback escapes
    load_federated / load_models (``facefed evaluate``, ``facefed site``)."""
    path = _checkpoint(tmp_path, overrides, base)
    with pytest.raises(IntegrityError):
        load_federated(path)


@pytest.mark.parametrize(
    ("overrides", "face", "emotion"),
    [
        ({"face_tail_blocks": 20}, FaceTail(20), None),
        ({"face_tail_blocks": -1}, FaceTail(-1), None),
        ({"emotion_trunk_blocks": -1}, None, EmotionHead(256, 2)),
        ({"pretrained_sha256": 5}, None, None),
    ],
)
def test_a_checkpoint_naming_out_of_range_settings_is_an_integrity_error(
    tmp_path: Path,
    overrides: dict[str, Any],
    face: torch.nn.Module | None,
    emotion: torch.nn.Module | None,
) -> None:
    """BROKEN today: out-of-range tail/trunk cuts build (negative slices) and then raise ValueError
    in DlibResNet.split; a non-string SHA raises TypeError in check_pretrained: tracebacks instead of
    the one-line refusal."""
    path = _checkpoint(tmp_path, overrides, face=face, emotion=emotion)
    with pytest.raises(IntegrityError):
        load_models(path)


def test_a_checkpoint_naming_a_huge_emotion_input_size_is_refused_at_load(tmp_path: Path) -> None:
    """BROKEN today: emotion_input_size = 10^5 loads; every face the on-device pipeline classifies
    is then interpolated to 3 x 10^5 x 10^5 floats (120 GB) per image."""
    path = _checkpoint(tmp_path, {"emotion_input_size": 100_000})
    with pytest.raises(IntegrityError):
        load_models(path)


def test_a_pretrained_checkpoint_without_the_trunk_hash_is_refused(tmp_path: Path) -> None:
    """BROKEN today: check_pretrained compares only a non-empty hash, so a checkpoint trained on
    another trunk loads once its writer blanks pretrained_sha256 (threat model: "a checkpoint
    trained on another copy is refused")."""
    path = _checkpoint(tmp_path, {"pretrained_sha256": ""})
    with pytest.raises(IntegrityError):
        load_models(path)


# --- 2. the run config cannot choose the weights (PASSES: pins the property) ---------------------


@pytest.mark.parametrize("key", ["pretrained", "pretrained-sha256", "pretrained-path"])
def test_the_run_config_cannot_name_pretrained_weights(key: str) -> None:
    """HOLDS: the coordinator's run config has no key naming the weights file or its hash, and a
    site's spec never carries a hash, so ModelInputs always loads the site's own copy."""
    with pytest.raises(ConfigError):
        parse_run_config({"face-model": "pretrained", key: "ab" * 32})
    settings = parse_run_config({"face-model": "pretrained", "emotion-model": "transfer"})
    assert ModelSpec.from_settings(settings).pretrained_sha256 == ""


# --- 1. accepted run configs that cannot run -----------------------------------------------------


@pytest.mark.parametrize(("blocks", "size"), [(14, 48), (14, 80), (11, 48), (13, 52)])
def test_every_accepted_emotion_cut_runs_at_its_input_size(blocks: int, size: int) -> None:
    """BROKEN today (low severity): config validation accepts trunk cuts whose feature map shrinks
    below a 3x3 kernel at the chosen input size; every round then raises a RuntimeError in
    load_site_tensors (the egress guard sends only the fixed site-internal-error code, uncharged and
    data-independent, so nothing leaks; the site is simply unusable for that run)."""
    try:
        parse_run_config(
            {
                "emotion-model": "transfer",
                "emotion-trunk-blocks": blocks,
                "emotion-input-size": size,
            }
        )
    except ConfigError:
        return
    with torch.no_grad():
        Trunk(blocks).eval()(torch.zeros(1, 3, size, size))


# --- 3. hostile dlib .dat file ---------------------------------------------------------------------


def _int(value: int) -> bytes:
    body = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def _string(text: str) -> bytes:
    return _int(len(text)) + text.encode("latin-1")


def _hostile_dat(dims: tuple[int, int, int, int]) -> bytes:
    """A well-formed header up to the stem convolution, whose parameter tensor has ``dims``."""
    layers = network_layers()
    out = _int(1) + _string("loss_metric_")
    for i in reversed(range(len(layers))):
        out += _int(2 if i == 0 else 1)
    out += _string("input_rgb_image_sized")
    for mean in (123, 117, 104):
        out += _int(mean) + _int(0)
    out += _int(150) + _int(150)
    out += _string("con_5") + _int(2) + b"".join(_int(d) for d in dims)
    return out + b"\0" * 64


@pytest.mark.parametrize("dims", [(0, 2**63 - 1, 1, 1), (0, 2**64 - 1, 2**64 - 1, 1)])
def test_a_hostile_dat_with_a_zero_sized_huge_tensor_is_an_integrity_error(
    tmp_path: Path, dims: tuple[int, int, int, int]
) -> None:
    """BROKEN today: _Reader.dims bounds n*k*r*c (0 here) but not each dimension, and numpy's
    reshape raises ValueError; ``facefed convert-dlib`` prints a traceback instead of its one-line
    error."""
    data = _hostile_dat(dims)
    with pytest.raises(IntegrityError):
        parse(data)
    source = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    source.write_bytes(data)
    from common.cli import main

    assert main(["convert-dlib", "--source", str(source), "--out", str(tmp_path / "w.ffnet")]) != 0


# --- 4. a deployed site's faces in the cache folder ------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder holding the decoded datasets but no chips and no features."""
    folder = tmp_path / "cache"
    folder.mkdir()
    for entry in cache_dir().iterdir():
        if not entry.name.startswith(("features-", "chips-")):
            (folder / entry.name).symlink_to(entry)
    monkeypatch.setenv("FACEFED_CACHE", str(folder))
    # YuNet on 400 images is slow; median-landmark chips exercise the same caching
    monkeypatch.setattr(
        "common.data.chips._parallel_landmarks", lambda model, images, workers=2: lambda _i: None
    )
    for cached in (site_data.load_site_tensors, site_data.model_inputs, site_data._gray_face_pool):
        cached.cache_clear()
    yield folder
    for cached in (site_data.load_site_tensors, site_data.model_inputs, site_data._gray_face_pool):
        cached.cache_clear()


def test_a_deployed_site_writes_no_chips_of_its_faces_to_the_cache(fresh_cache: Path) -> None:
    """BROKEN today: the frozen features of a site with its own data-dir stay in memory, but the
    aligned 150x150 chips of all its faces go to <cache>/chips-<source>-*.npz unencrypted, and the
    features are one public forward pass away from them (features = trunk(chips)). (The raw
    archives were already extracted into the cache folder before this change.)"""
    settings = parse_run_config(
        {
            "face-model": "pretrained",
            "face-sources": "orl",
            "face-train-limit": 40,
            "emotion-train-limit": 64,
            "num-sites": 2,
            "cohort-size": 2,
        }
    )
    node_config = {"data-dir": str(DEFAULT_DATA_DIR), "partition-id": 0, "num-partitions": 2}
    site = SiteSpec.from_node_config(node_config, settings)
    assert site.own_data

    load_site_tensors(settings, site)

    assert sorted(p.name for p in fresh_cache.glob("features-*")) == []
    assert sorted(p.name for p in fresh_cache.glob("chips-*")) == []
