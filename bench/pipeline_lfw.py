"""The on-device pipeline from JPEG on LFW View 2 pairs: decode, detect, landmarks, align, embed.

    python -m bench.pipeline_lfw [--checkpoint models/facefed-face-v4.ckpt] [--sets 4,5] [--json OUT]

Every image of the chosen people sets' pairs is read as the JPEG bytes stored in the LFW archive and
goes through :class:`client.recogniser.pipeline.FacePipeline` exactly as ``facefed site`` uses it
(default detector, alignment and flip-augmented embedding). Accuracy follows LFW's protocol: the
threshold is chosen on the other folds (``common.metrics.lfw_verification``). A pair with a photo in
which no face is found counts as a "different" verdict (score -1).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from client.recogniser.imageio import decode_image
from client.recogniser.pipeline import load_pipeline
from common.atomic import atomic_write_text
from common.data.lfw import ARCHIVE, archive_pair_photos, photo_member
from common.metrics import lfw_verification
from common.paths import REPO_ROOT, data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models/facefed-face-v4.ckpt"
    )
    parser.add_argument("--sets", default="4,5", help="1-based LFW people sets (pairs-file folds)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    folds = [int(s) - 1 for s in args.sets.split(",")]

    pipeline, _ = load_pipeline(args.checkpoint)
    pairs, jpegs = archive_pair_photos(
        data_dir() / ARCHIVE, lambda all_pairs: [p for p in all_pairs if p.fold in folds]
    )
    names = sorted(jpegs)
    start = time.perf_counter()
    found = [pipeline.locate(decode_image(jpegs[n], name=n)) for n in names]
    side = 150 if pipeline.chips else 112
    faces = np.stack(
        [r.face if r.face is not None else np.zeros((side, side, 3), np.uint8) for r in found]
    )
    emb = pipeline.embed_faces(faces)
    seconds = time.perf_counter() - start
    row = {n: i for i, n in enumerate(names)}
    ok = np.array([r.face is not None for r in found])

    def index(name: str, num: int) -> int:
        return row[photo_member(name, num)]

    left = np.array([index(p.name1, p.num1) for p in pairs])
    right = np.array([index(p.name2, p.num2) for p in pairs])
    scores = np.where(ok[left] & ok[right], np.sum(emb[left] * emb[right], axis=1), -1.0)
    result = lfw_verification(
        scores, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "sets": args.sets,
        "pairs": len(pairs),
        "images": len(names),
        "no_face": int((~ok).sum()),
        "accuracy": result.accuracy,
        "std": result.std,
        "seconds": round(seconds, 1),
        "ms_per_image": round(1000 * seconds / len(names), 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
