"""The emotion head's input, built from a :class:`~common.model_spec.ModelSpec`, and its fixed statistics.

With ``emotion-scatter`` the head reads two kinds of channel side by side: dlib's trunk map and the
face's log wavelet scattering. Their scales differ by orders of magnitude, so every channel is
standardised by a mean and a standard deviation that are **constants of the release**: computed once
from the 400 public ORL faces (no FER2013 face, no site's face) by ``python -m
bench.emotion_input_stats`` and shipped in :data:`STATS_FILE`, whose SHA-256 is pinned here. No
emotion site's faces set them (a simulation also gives ORL's people to face-model sites; the constants
are fixed before any run, as the pretrained weights are), so the input of each face depends on that face alone and DP-SGD's
per-example clipping bounds what any face can change (a statistic over the site's faces would let one
face move every other face's input). Tramèr and Boneh computed such statistics under DP; constants
from public faces cost no budget at all, and measured on FER2013 they train as well as statistics of
the training faces themselves (BENCHMARKS.md, "Wavelet scattering beside the trunk (twelfth session)").
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, IntegrityError
from common.facenet.transfer import EmotionFeatures
from common.paths import REPO_ROOT
from common.scattering import scatter_channels

STATS_FILE = REPO_ROOT / "models" / "emotion-input-stats-v1.json"
STATS_FORMAT = "facefed-emotion-input-stats/1"
STATS_SHA256 = "2927581f67ecd5e0f8e758d2e8112170999332f6e13c67836716b74ef63b6087"


def stats_key(trunk_blocks: int, input_size: int, scatter: int, pretrained_sha256: str) -> str:
    return f"blocks{trunk_blocks}-size{input_size}-scatter{scatter}-{pretrained_sha256[:16]}"


def _shipped_sets(path: Path, sha256: str | None) -> dict[str, Any]:
    """The file's sets, after checking its SHA-256 against the pinned one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IntegrityError(
            f"cannot read the emotion input statistics {path}: {exc.strerror}"
        ) from None
    if hashlib.sha256(raw).hexdigest() != (STATS_SHA256 if sha256 is None else sha256):
        raise IntegrityError(
            f"{path} differs from the statistics this release pins; restore it from the repository"
        )
    try:
        document = json.loads(raw)
        if document["format"] != STATS_FORMAT or not isinstance(document["sets"], dict):
            raise ValueError(document["format"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{path} is not a {STATS_FORMAT} file") from None
    sets: dict[str, Any] = document["sets"]
    return sets


def shipped_cuts(path: Path = STATS_FILE) -> set[tuple[int, int, int]]:
    """``(trunk blocks, input size, scales)`` of every shipped set (any trunk)."""
    found = set()
    for key in _shipped_sets(path, None):
        match = re.fullmatch(r"blocks(\d+)-size(\d+)-scatter(\d+)-[0-9a-f]{16}", key)
        if match:
            found.add((int(match[1]), int(match[2]), int(match[3])))
    return found


def load_stats(
    trunk_blocks: int,
    input_size: int,
    scatter: int,
    pretrained_sha256: str,
    path: Path = STATS_FILE,
    sha256: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped ``(mean, std)`` per channel for this cut of this trunk; refuses a changed file,
    and statistics that do not fit the cut (wrong length, not finite, a standard deviation <= 0)."""
    from common.facenet.resnet import BLOCKS

    sets = _shipped_sets(path, sha256)
    key = stats_key(trunk_blocks, input_size, scatter, pretrained_sha256)
    if key not in sets:
        raise ConfigError(
            f"no shipped emotion input statistics for {key}; emotion-scatter is supported with "
            f"{', '.join(sorted(sets))} (python -m bench.emotion_input_stats makes others)"
        )
    channels = BLOCKS[trunk_blocks - 1][0] + scatter_channels(scatter)
    try:
        mean = torch.tensor(sets[key]["mean"], dtype=torch.float32)
        std = torch.tensor(sets[key]["std"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{path}: {key} has no numeric mean and std") from None
    if mean.shape != (channels,) or std.shape != (channels,):
        raise IntegrityError(f"{path}: {key} does not hold {channels} means and deviations")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise IntegrityError(f"{path}: {key} holds a non-finite value or a deviation <= 0")
    return mean, std


def emotion_features(spec: Any, network: Any) -> EmotionFeatures:
    """The frozen input stage of ``spec``'s transfer emotion model, on the loaded dlib ``network``."""
    from common.facenet.resnet import BLOCKS
    from common.model_spec import state_sha256

    trunk, _ = network.split(len(BLOCKS) - spec.emotion_trunk_blocks)
    if not spec.emotion_scatter:
        return EmotionFeatures(trunk, spec.emotion_input_size).eval()
    mean, std = load_stats(
        spec.emotion_trunk_blocks,
        spec.emotion_input_size,
        spec.emotion_scatter,
        spec.pretrained_sha256 or state_sha256(network),
    )
    return EmotionFeatures(trunk, spec.emotion_input_size, spec.emotion_scatter, mean, std).eval()
