"""Make the emotion head's fixed input statistics from ORL's public faces (``models/emotion-input-stats-v1.json``).

The emotion head's input joins dlib's trunk map and the face's log wavelet scattering
(:class:`common.facenet.transfer.EmotionFeatures`); each channel is standardised with a mean and a
standard deviation shipped with the release (:mod:`common.facenet.emotion_input`). They come from
the 400 faces of ORL (AT&T), which no emotion site holds: no FER2013 face and no site's face sets
them. Each face goes through the emotion model's own preprocessing (48x48 gray, standardised, at
FER2013 Training's sharpness); the statistic is over faces and positions, per channel.

Run from the repository root with ``../shared/data`` (or ``FACEFED_DATA``) holding
``orl_att_faces_pgm.tar.gz``: ``python -m bench.emotion_input_stats``. It writes the file and prints
its SHA-256, which ``common/facenet/emotion_input.py`` pins (``STATS_SHA256``). Values are rounded
to 6 significant digits, so that a rerun on another machine writes the same bytes unless the
features themselves changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import torch

from common.atomic import atomic_write_text
from common.data.archives import content_key
from common.data.orl import ARCHIVE, load_orl
from common.data.preprocess import emotion_tensor
from common.facenet.emotion_input import STATS_FILE, STATS_FORMAT, stats_key
from common.facenet.resnet import BLOCKS
from common.facenet.transfer import EmotionFeatures, frozen_features
from common.facenet.weights import default_pretrained_path, load_pretrained
from common.model_spec import state_sha256
from common.paths import data_dir


def channel_stats(maps: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` maps over faces and positions,
    rounded to 6 significant digits; a constant channel gets standard deviation 1."""
    flat = maps.double().transpose(0, 1).flatten(1)
    mean, std = flat.mean(1), flat.std(1)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [float(f"{v:.6g}") for v in mean], [float(f"{v:.6g}") for v in std]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trunk-blocks", type=int, default=7)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--scatter", type=int, default=2)
    p.add_argument("--out", type=Path, default=STATS_FILE)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    network = load_pretrained(default_pretrained_path())
    trunk, _ = network.split(len(BLOCKS) - args.trunk_blocks)
    features = EmotionFeatures(trunk, args.size, args.scatter)
    archive = data_dir(None) / ARCHIVE
    faces = emotion_tensor(load_orl().images)
    mean, std = channel_stats(frozen_features(features, faces))
    key = stats_key(args.trunk_blocks, args.size, args.scatter, state_sha256(network))
    sets = json.loads(args.out.read_text())["sets"] if args.out.exists() else {}
    sets[key] = {
        "faces": len(faces),
        "source": f"ORL (AT&T) faces, {archive.name}, content key {content_key(archive)}",
        "kymatio": version("kymatio"),
        "mean": mean,
        "std": std,
    }
    text = json.dumps({"format": STATS_FORMAT, "sets": sets}, indent=1, sort_keys=True) + "\n"
    atomic_write_text(args.out, text)
    print(f"wrote {key} ({len(mean)} channels) to {args.out}")
    print(f"SHA-256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
