"""Operating points of face checkpoints: LFW-calibrated thresholds and what they do on Yale Faces.

    python -m bench.operating_points models/facefed-face-v2.ckpt OLD.ckpt --fars 1e-2,1e-3,1e-4

For each checkpoint and FAR, the threshold is calibrated exactly as ``facefed site calibrate --pairs all
--lfw-sets 4,5`` does (every pair within the held-out LFW people sets 4-5), then applied to the Yale
acceptance set of ``tests/client/recogniser/test_acceptance.py``: each of the 15 Yale people enrolled from the
photos ``normal``, ``noglasses`` and ``centerlight`` (a template is the renormalised mean of their
embeddings), probed with ``happy``, ``sad``, ``sleepy``, ``surprised``, ``wink`` and ``glasses``:
90 genuine and 1,260 impostor comparisons through the default Haar pipeline. Accuracy only, no timing.
Writes ``bench/results/operating_points.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from client.recogniser.calibration import calibrate_on_lfw
from client.recogniser.pipeline import FacePipeline, load_pipeline
from common.atomic import atomic_write_text
from common.paths import data_dir

ENROL = ("normal", "noglasses", "centerlight")
PROBES = ("happy", "sad", "sleepy", "surprised", "wink", "glasses")
RESULTS = Path("bench/results")


def yale_scores(pipeline: FacePipeline, root: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """``(genuine, impostor, rank1)`` cosine scores of the Yale probes against every template."""
    with np.load(root / "yalefaces_243x320.npz", allow_pickle=False) as npz:
        images, people, conditions = npz["images"], npz["identity"], npz["condition"]
    faces, keys = [], []
    for gray, person, condition in zip(images, people, conditions, strict=True):
        if condition in ENROL + PROBES:
            rgb = np.repeat(gray[:, :, None], 3, axis=2)
            faces.append(pipeline.aligned_face(rgb, f"{person}-{condition}"))
            keys.append((int(person), str(condition)))
    emb = dict(zip(keys, pipeline.embed_faces(np.stack(faces)), strict=True))
    templates = {}
    for person in sorted({p for p, _ in keys}):
        mean = np.mean([v for (p, c), v in emb.items() if p == person and c in ENROL], axis=0)
        templates[person] = mean / np.linalg.norm(mean)
    genuine: list[float] = []
    impostor: list[float] = []
    hits = 0
    for (person, condition), probe in sorted(emb.items()):
        if condition in PROBES:
            scores = {other: float(t @ probe) for other, t in templates.items()}
            genuine.append(scores.pop(person))
            impostor.extend(scores.values())
            hits += genuine[-1] > max(scores.values())
    return np.array(genuine), np.array(impostor), hits / len(genuine)


def operating_points(checkpoint: Path, fars: list[float], root: Path) -> list[dict[str, Any]]:
    pipeline, _ = load_pipeline(checkpoint)
    genuine, impostor, rank1 = yale_scores(pipeline, root)
    rows = []
    for far in fars:
        cal = calibrate_on_lfw(
            pipeline.embed_faces, model_tag=pipeline.model_tag, far=far, lfw_sets=(4, 5)
        )
        rows.append(
            {
                "checkpoint": str(checkpoint),
                "model_tag": pipeline.model_tag,
                "far": far,
                "threshold": round(cal.threshold, 4),
                "lfw_tar": round(cal.tar or 0.0, 3),
                "lfw_heldout_tar": round(cal.heldout_tar or 0.0, 3),
                "lfw_heldout_far": cal.heldout_far,
                "yale_genuine_accepted": round(float(np.mean(genuine > cal.threshold)), 3),
                "yale_impostors_rejected": round(float(np.mean(impostor <= cal.threshold)), 3),
                "yale_rank1": round(rank1, 3),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| checkpoint | LFW FAR | threshold | LFW TAR (held-out TAR / FAR) | Yale genuine accepted "
        "| Yale impostors rejected | Yale rank-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['checkpoint']).name} | {r['far']:g} | {r['threshold']:.3f} | "
            f"{r['lfw_tar']:.3f} ({r['lfw_heldout_tar']:.3f} / {r['lfw_heldout_far']:.2e}) | "
            f"{r['yale_genuine_accepted']:.3f} | {r['yale_impostors_rejected']:.3f} | "
            f"{r['yale_rank1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--fars", default="1e-2,1e-3,1e-4", help="comma-separated target FARs")
    parser.add_argument("--data-dir", type=Path, help="folder with LFW and Yale (default: shared)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    fars = [float(f) for f in args.fars.split(",")]
    root = data_dir(args.data_dir)
    rows = [row for ckpt in args.checkpoints for row in operating_points(ckpt, fars, root)]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "operating_points.json", json.dumps(rows, indent=2))
    atomic_write_text(args.out / "operating_points.md", markdown(rows))
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
