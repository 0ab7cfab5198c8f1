"""The blur of FER2013 Training, and what seeing the test faces at the training faces' sharpness is worth.

Every Training image in the shared FER2013 copy is blurred; PublicTest's are sharp. This measures it
(the sharpness of each standardised face, :func:`common.data.preprocess.sharpness`) and prints the
Training median, which is where :data:`common.data.preprocess.EMOTION_SHARPNESS` comes from: only
Training images are used to set it.

With ``--train-steps N`` it also trains :class:`common.models.EmotionNet` centrally and without DP for
``N`` steps of batch 128 on Training (less the held-out images of ``bench.emotion_routes``), once per
``--seeds``, and scores each model on the held-out Training images and on PublicTest twice: with the
test faces as they are (standardised only) and brought to the training sharpness
(:func:`common.data.preprocess.match_sharpness`, as ``emotion_tensor`` does). Nothing is chosen by
these scores; they measure a mismatch.

Example: ``python -m bench.emotion_sharpness --train-steps 800 --seeds 3``.
Results: ``bench/results/emotion_sharpness.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.emotion_routes import held_out_split
from client.training.augment import flip
from common.data.fer2013 import load_fer2013
from common.data.preprocess import (
    EMOTION_SHARPNESS,
    emotion_tensor,
    match_sharpness,
    sharpness,
    standardize,
)
from common.evaluation import EmotionSet, evaluate_emotion
from common.models import EmotionNet

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def sharpness_quantiles(x: torch.Tensor) -> list[float]:
    """:data:`QUANTILES` of the sharpness of standardised faces ``(N, 1, H, W)``."""
    values = np.array([sharpness(image) for image in x.numpy()[:, 0]])
    return [round(float(v), 4) for v in np.quantile(values, QUANTILES)]


def _accuracy(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray) -> float:
    """Scored as the coordinator scores a round (:func:`common.evaluation.evaluate_emotion`)."""
    return round(evaluate_emotion(model, EmotionSet(x, labels))["accuracy"], 3)


def _train(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, steps: int, seed: int) -> EmotionNet:
    torch.manual_seed(seed)
    model = EmotionNet(width=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.002)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rows[torch.randint(len(rows), (128,), generator=g).numpy()])
        loss = F.cross_entropy(model(flip(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=0, help="0: measure the blur only")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="bench/results/emotion_sharpness.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    train, test = load_fer2013("Training"), load_fer2013("PublicTest")
    raw_train, raw_test = standardize(train.images), standardize(test.images)
    matched_test = match_sharpness(raw_test)
    result: dict[str, object] = {
        "quantiles": QUANTILES,
        "training": sharpness_quantiles(raw_train),
        "publictest": sharpness_quantiles(raw_test),
        "publictest_matched": sharpness_quantiles(matched_test),
        "emotion_sharpness": EMOTION_SHARPNESS,
    }
    print(json.dumps(result), flush=True)
    if args.train_steps:
        x, y = emotion_tensor(train.images), torch.from_numpy(train.labels).long()
        val, rest = held_out_split(train.images)
        runs = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            model = _train(x, y, rest, args.train_steps, seed)
            run = {
                "seed": seed,
                "held_out": _accuracy(model, x[val], train.labels[val]),
                "publictest_as_is": _accuracy(model, raw_test, test.labels),
                "publictest_matched": _accuracy(model, matched_test, test.labels),
                "seconds": round(time.perf_counter() - start),
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
        result["train_steps"] = args.train_steps
        result["runs"] = runs
        result["median"] = {
            k: statistics.median(float(r[k]) for r in runs)
            for k in ("held_out", "publictest_as_is", "publictest_matched")
        }
        print("MEDIAN", json.dumps(result["median"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
