"""Which threshold a gray enrolment needs: colour, gray and mixed pairs of held-out LFW people at one FAR.

    python -m bench.gray_pairs [--checkpoint models/facefed-face-v4.ckpt] [--lfw-sets 4,5] [--far 1e-4]

``facefed site verify`` decides a gray probe by the gray threshold and a colour probe by the colour one;
the template store does not record whether an enrolment came from gray photos. So a colour probe against
a gray enrolment is decided by the colour threshold. This measures whether that holds the stated FAR.

Every pair of images within each LFW people set (``site calibrate --pairs all``) is scored three ways, as
the pipeline embeds dataset chips: both colour; both turned gray (``as_gray_rgb``); and *mixed*, one side
gray and the other colour, both ways round (a gray enrolment probed in colour, and a colour enrolment
probed in gray). For each, the threshold at ``--far`` (:func:`common.metrics.tar_at_far`, the
calibration's rule) and the FAR that the calibrated colour and gray thresholds give.
Writes ``bench/results/pretrained/gray_pairs.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.recogniser.calibration import as_gray_rgb
from client.recogniser.pipeline import load_pipeline
from client.recogniser.site_cli import parse_lfw_sets
from common.atomic import atomic_write_text
from common.cli import configure_logging, report_errors
from common.data.chips import dataset_chips
from common.data.lfw import lfw_train_rows, load_lfw
from common.metrics import tar_at_far

KINDS = ("colour", "gray", "mixed")
OUT = Path("bench/results/pretrained/gray_pairs.json")


def pair_scores(
    colour: np.ndarray, gray: np.ndarray, identity: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scores and same-person flags of every pair of distinct images, for each of :data:`KINDS`.

    ``colour`` and ``gray`` are the unit embeddings of the same images in colour and in gray. Mixed pairs
    count each pair twice, once per side in gray; an image is never paired with itself.
    """
    i, j = np.triu_indices(len(identity), k=1)
    same = identity[i] == identity[j]
    mixed = gray @ colour.T  # row: the gray side; column: the colour side
    return {
        "colour": ((colour @ colour.T)[i, j], same),
        "gray": ((gray @ gray.T)[i, j], same),
        "mixed": (np.concatenate([mixed[i, j], mixed[j, i]]), np.concatenate([same, same])),
    }


def measure(
    checkpoint: Path, lfw_sets: Sequence[int], far: float, data_dir: Path | None
) -> dict[str, Any]:
    pipeline, _ = load_pipeline(checkpoint)
    lfw = load_lfw(data_dir)
    chips = dataset_chips("lfw", data_dir).chips
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in KINDS}
    for s in lfw_sets:
        rows = lfw_train_rows(lfw, [s - 1])  # every image of the people in set s
        colour = np.asarray(pipeline.embed_faces(chips[rows]), np.float32)
        gray = np.asarray(pipeline.embed_faces(as_gray_rgb(chips[rows])), np.float32)
        for kind, pair in pair_scores(colour, gray, lfw.identity[rows]).items():
            parts[kind].append(pair)
    pooled = {
        k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]))
        for k, v in parts.items()
    }
    at_far = {k: tar_at_far(scores, same, far) for k, (scores, same) in pooled.items()}
    result: dict[str, Any] = {}
    for kind, (scores, same) in pooled.items():
        impostor = scores[~same]
        result[kind] = {
            "genuine_pairs": int(same.sum()),
            "impostor_pairs": len(impostor),
            "threshold": at_far[kind][1],
            "tar": at_far[kind][0],
            **{
                f"far_at_{k}_threshold": float(np.mean(impostor > at_far[k][1]))
                for k in ("colour", "gray")
            },
        }
    return {
        "checkpoint": str(checkpoint),
        "lfw_sets": list(lfw_sets),
        "far": far,
        "kinds": result,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.gray_pairs", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", type=Path, default=Path("models/facefed-face-v4.ckpt"))
    p.add_argument("--lfw-sets", default="4,5", help="LFW people sets (never trained on)")
    p.add_argument("--far", type=float, default=1e-4)
    p.add_argument("--data-dir", type=Path, help="dataset folder (default: $FACEFED_DATA)")
    p.add_argument("--out", type=Path, default=OUT)
    return p


def run(args: argparse.Namespace) -> int:
    sets = parse_lfw_sets(args.lfw_sets) or ()
    report = measure(args.checkpoint, sets, args.far, args.data_dir)
    for kind, r in report["kinds"].items():
        print(
            f"{kind:<7} threshold {r['threshold']:.4f} TAR {r['tar']:.3f} "
            f"({r['genuine_pairs']} genuine, {r['impostor_pairs']} impostor); FAR at the colour "
            f"threshold {r['far_at_colour_threshold']:.2e}, at the gray {r['far_at_gray_threshold']:.2e}"
        )
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(False)
    return report_errors("bench.gray_pairs", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
