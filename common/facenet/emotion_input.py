"""The emotion head's input, built from a :class:`~common.model_spec.ModelSpec`, and its fixed statistics.

With ``emotion-scatter`` the head reads two kinds of channel side by side: dlib's trunk map and the
face's log wavelet scattering. Their scales differ by orders of magnitude, so every channel is
standardised by a mean and a standard deviation that are **constants of the release**: computed once
from the 400 public ORL faces (no FER2013 face, no site's face) by ``python -m
bench.emotion_input_stats`` and shipped in :data:`STATS_FILE`, whose SHA-256 is pinned here. A site's
own faces never set them, so the input of each face depends on that face alone and DP-SGD's
per-example clipping bounds what any face can change (a statistic over the site's faces would let one
face move every other face's input). Tramèr and Boneh computed such statistics under DP; constants
from public faces cost no budget at all, and measured on FER2013 they train as well as statistics of
the training faces themselves (BENCHMARKS.md, "Wavelet scattering beside the trunk (twelfth session)").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError, IntegrityError
from common.facenet.transfer import EmotionFeatures
from common.paths import REPO_ROOT

STATS_FILE = REPO_ROOT / "models" / "emotion-input-stats-v1.json"
STATS_FORMAT = "facefed-emotion-input-stats/1"
STATS_SHA256 = "2927581f67ecd5e0f8e758d2e8112170999332f6e13c67836716b74ef63b6087"


def stats_key(trunk_blocks: int, input_size: int, scatter: int, pretrained_sha256: str) -> str:
    return f"blocks{trunk_blocks}-size{input_size}-scatter{scatter}-{pretrained_sha256[:16]}"


def load_stats(
    trunk_blocks: int,
    input_size: int,
    scatter: int,
    pretrained_sha256: str,
    path: Path = STATS_FILE,
    sha256: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped ``(mean, std)`` per channel for this cut of this trunk; refuses a changed file."""
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
    sets: dict[str, Any] = json.loads(raw)["sets"]
    key = stats_key(trunk_blocks, input_size, scatter, pretrained_sha256)
    if key not in sets:
        raise ConfigError(
            f"no shipped emotion input statistics for {key}; emotion-scatter is supported with "
            f"{', '.join(sorted(sets))} (python -m bench.emotion_input_stats makes others)"
        )
    entry = sets[key]
    return torch.tensor(entry["mean"]), torch.tensor(entry["std"])


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
