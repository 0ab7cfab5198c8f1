"""What federation adds on identities of the sites' own kind: verification on held-out ORL / Yale B people.

Run ``python -m bench.domain_gain CKPT [CKPT ...] --holdout N [--skip-last K] [--far 1e-3] [--json OUT]``.

With run config ``domain-holdout = N`` the last N subjects of ORL and of Extended Yale B (those
:func:`client.training.site_data.domain_holdout_mask` selects) are kept out of every site. For each
checkpoint this embeds the aligned chips of exactly those people (``common.data.chips``) with the
checkpoint's face module and flip test-time augmentation (as :func:`common.evaluation.embed`), scores
every pair of their images by cosine similarity, and reports per source and pooled (both sources' pairs
together, never a pair across sources): the numbers of genuine and impostor pairs, TAR at the target FAR
and the ROC AUC.

The threshold is the one :func:`common.metrics.tar_at_far` picks (at most ``floor(FAR * #impostors)``
impostor pairs score strictly above it), the same rule as :func:`client.recogniser.calibration.calibrate`;
``calibrate`` itself is not used because its per-fold held-out measurement needs LFW's folds, which these
pairs do not have. AUC is the Mann-Whitney probability that a genuine pair outscores an impostor pair
(ties count one half).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.training.site_data import domain_holdout_mask
from common.atomic import atomic_write_text
from common.checkpoint import load_federated
from common.cli import configure_logging, report_errors
from common.data.chips import dataset_chips
from common.errors import ConfigError
from common.evaluation import embed
from common.features import ModelInputs
from common.metrics import tar_at_far
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)

SOURCES = ("orl", "eyaleb")  # the face sources that domain-holdout applies to
POOLED = "pooled"


@dataclass(frozen=True)
class PairScores:
    """Cosine scores of every pair of images of some held-out people, and whether each is genuine."""

    scores: np.ndarray
    same: np.ndarray


@dataclass(frozen=True)
class Verification:
    genuine_pairs: int
    impostor_pairs: int
    tar: float
    threshold: float
    auc: float


def holdout_rows(labels: np.ndarray, holdout: int, skip_last: int = 0) -> np.ndarray:
    """Rows of the ``holdout`` held-out people of one source (the ones no site trains on), less the
    last ``skip_last`` of them: a run with ``domain-holdout = 15`` scored with ``skip_last = 10`` gives
    5 validation people to choose settings on, and leaves the benchmark's 10 test people unseen."""
    if holdout <= 0:
        raise ConfigError("--holdout must be at least 1 (the run's domain-holdout)")
    if not 0 <= skip_last < holdout:
        raise ConfigError(
            f"--skip-last must be in 0..{holdout - 1} (below --holdout), got {skip_last}"
        )
    mask = domain_holdout_mask(labels, holdout) & ~domain_holdout_mask(labels, skip_last)
    return np.flatnonzero(mask)


def all_pairs(embeddings: torch.Tensor, labels: np.ndarray) -> PairScores:
    """Cosine scores of every unordered pair of distinct images (the embeddings are unit vectors)."""
    i, j = np.triu_indices(len(labels), k=1)
    sims = (embeddings @ embeddings.T).numpy()
    return PairScores(scores=sims[i, j].astype(np.float64), same=labels[i] == labels[j])


def auc(scores: np.ndarray, same: np.ndarray) -> float:
    """ROC AUC: P(genuine score > impostor score) + P(tie) / 2, from average ranks."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank over each run of tied scores (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both genuine and impostor pairs")
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def verification(pairs: PairScores, far: float) -> Verification:
    n_impostor = int((~pairs.same).sum())
    if far * n_impostor < 1:
        raise ConfigError(
            f"FAR {far:g} allows no impostor pair among {n_impostor}; raise --far or --holdout"
        )
    tar, threshold = tar_at_far(pairs.scores, pairs.same, far)
    return Verification(
        genuine_pairs=int(pairs.same.sum()),
        impostor_pairs=n_impostor,
        tar=tar,
        threshold=threshold,
        auc=auc(pairs.scores, pairs.same),
    )


def checkpoint_pairs(
    checkpoint: str | Path, holdout: int, data_dir: Path | None = None, skip_last: int = 0
) -> dict[str, PairScores]:
    """Each source's pair scores under one checkpoint's face module (flip TTA)."""
    face, _, spec, _ = load_federated(checkpoint)
    inputs = ModelInputs(spec)  # checks the pretrained weights match the checkpoint's
    if not inputs.face_needs_chips:
        raise ConfigError(
            f"{checkpoint} holds a scratch face model; domain gain is measured for face-model "
            '"pretrained" checkpoints (aligned chips through the frozen trunk)'
        )
    root = resolve_data_dir(data_dir)
    result: dict[str, PairScores] = {}
    for source in SOURCES:
        chips = dataset_chips(source, root)
        rows = holdout_rows(chips.labels, holdout, skip_last)
        faces = inputs.face(chips.chips[rows], flips=True)
        assert faces.flipped is not None
        result[source] = all_pairs(embed(face, faces.x, faces.flipped), chips.labels[rows])
    return result


def domain_gain(
    checkpoint: str | Path,
    holdout: int,
    far: float = 1e-3,
    data_dir: Path | None = None,
    skip_last: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per source and pooled: pair counts, TAR at ``far``, threshold and AUC of one checkpoint."""
    per_source = checkpoint_pairs(checkpoint, holdout, data_dir, skip_last)
    pooled = PairScores(
        scores=np.concatenate([p.scores for p in per_source.values()]),
        same=np.concatenate([p.same for p in per_source.values()]),
    )
    return {
        name: asdict(verification(pairs, far))
        for name, pairs in [*per_source.items(), (POOLED, pooled)]
    }


def markdown(results: dict[str, dict[str, dict[str, Any]]], far: float) -> str:
    """One row per checkpoint and source: pairs, TAR@FAR, AUC."""
    lines = [
        f"| model | source | genuine pairs | impostor pairs | TAR @ FAR {far:g} | AUC |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, table in results.items():
        for source, v in table.items():
            lines.append(
                f"| {model} | {source} | {v['genuine_pairs']} | {v['impostor_pairs']} | "
                f"{v['tar']:.3f} | {v['auc']:.4f} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.domain_gain",
        description="Verification of checkpoints on the ORL / Extended Yale B people no site trained on.",
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="facefed checkpoints (.ckpt)")
    p.add_argument("--holdout", type=int, required=True, help="the run's domain-holdout N")
    p.add_argument(
        "--skip-last",
        type=int,
        default=0,
        help="leave out the last K held-out people: score validation people only (see holdout_rows)",
    )
    p.add_argument("--far", type=float, default=1e-3, help="target false-accept rate")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--data-dir", type=Path, help="dataset folder (default: $FACEFED_DATA)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run(args: argparse.Namespace) -> int:
    results = {
        str(ckpt): domain_gain(ckpt, args.holdout, args.far, args.data_dir, args.skip_last)
        for ckpt in args.checkpoints
    }
    print(markdown(results, args.far))
    if args.json:
        report = {
            "holdout": args.holdout,
            "skip_last": args.skip_last,
            "far": args.far,
            "checkpoints": results,
        }
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return report_errors("bench.domain_gain", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
