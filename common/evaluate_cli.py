"""``facefed evaluate``: score a checkpoint on LFW-layout and FER2013-layout data; prints JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a checkpoint",
        description="Score a checkpoint on LFW verification (k-fold protocol over the pairs file's "
        "folds) and FER2013 emotion accuracy / macro-F1. With no folder flags, uses the shared data: "
        "LFW people sets --lfw-folds (default 4,5, held out in the default run) and FER2013 PublicTest.",
    )
    p.add_argument("--checkpoint", required=True, help="a round_NNN.ckpt written by facefed")
    p.add_argument("--lfw-dir", type=Path, help="LFW-layout folder (images/<Name>/<Name>_NNNN.jpg)")
    p.add_argument("--pairs", type=Path, help="pairs file in the LFW pairs.txt format")
    p.add_argument(
        "--fer-dir", type=Path, help="FER2013-layout folder (index.csv + <Usage>/<emotion>/)"
    )
    p.add_argument(
        "--fer-split",
        default="PublicTest",
        choices=("PublicTest", "PrivateTest", "Training"),
        help="FER2013 split to score (PrivateTest: the standard final test split, from --fer-dir)",
    )
    p.add_argument(
        "--lfw-folds",
        default="4,5",
        help="1-based folds of the pairs file to score (default 4,5; 'all' for every fold)",
    )
    p.add_argument(
        "--data-dir", help="shared data folder (default: $FACEFED_DATA or ../shared/data)"
    )
    p.add_argument("--skip-face", action="store_true", help="do not score the face model")
    p.add_argument("--skip-emotion", action="store_true", help="do not score the emotion model")
    p.set_defaults(func=run)


def _folds(text: str) -> tuple[int, ...] | None:
    from common.errors import ConfigError

    if text.strip().lower() == "all":
        return None
    try:
        return tuple(int(f) - 1 for f in text.split(",") if f.strip())
    except ValueError:
        raise ConfigError(
            f"--lfw-folds must be 'all' or comma-separated fold numbers, got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from common.checkpoint import load_federated
    from common.data.chips import dataset_chips
    from common.data.fer2013 import load_fer2013
    from common.data.lfw import load_lfw
    from common.errors import ConfigError
    from common.evaluation import emotion_set, evaluate_emotion, evaluate_face, verification_set
    from common.features import ModelInputs
    from common.paths import data_dir

    if args.pairs and not args.lfw_dir:
        raise ConfigError("--pairs needs --lfw-dir (the folder the pairs refer to)")
    face, emotion, spec, round_ = load_federated(args.checkpoint)
    inputs = ModelInputs(
        spec
    )  # frozen pretrained features, where the checkpoint's networks use them
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "round": round_}
    if not args.skip_face:
        chips = None
        if args.lfw_dir:
            lfw = load_lfw(lfw_dir=args.lfw_dir, pairs_file=args.pairs)
        else:
            lfw = load_lfw(data_dir=data_dir(args.data_dir))
            if inputs.face_needs_chips:  # the shared LFW's chips are cached once for all commands
                chips = dataset_chips("lfw", data_dir(args.data_dir)).chips
        folds = _folds(args.lfw_folds)
        report["face"] = evaluate_face(face, verification_set(lfw, folds, inputs, chips))
        report["face"]["pairs"] = sum(1 for p in lfw.pairs if folds is None or p.fold in folds)
    if not args.skip_emotion:
        if args.fer_dir:
            fer = load_fer2013(args.fer_split, fer_dir=args.fer_dir)
        else:
            fer = load_fer2013(args.fer_split, data_dir=data_dir(args.data_dir))
        report["emotion"] = evaluate_emotion(emotion, emotion_set(fer, inputs))
        report["emotion"]["images"] = len(fer)
    print(json.dumps(report, indent=2))
    return 0
