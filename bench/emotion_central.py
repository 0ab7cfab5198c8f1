"""How much a from-scratch emotion network learns from FER2013 Training, trained centrally without DP.

The ceiling the federated runs are measured against: one process, all of Training less the held-out
images of :func:`bench.emotion_routes.held_out_split`, Adam with a one-cycle learning rate over
``--epochs`` epochs of batch ``--batch``, each face mirrored, rotated, zoomed and shifted at random as
federated ``vgg`` training does (:func:`client.training.augment.augment`; ``--no-geometric``: mirrored
only). After every epoch it prints accuracy on the held-out Training images and, for the record only
(never for a choice), on PublicTest at Training's sharpness.

Example: ``python -m bench.emotion_central --arch vgg --width 16 --epochs 15``.
Results of 2026-12-02: ``bench/results/pretrained/emotion_routes.txt``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.emotion_routes import held_out_split
from client.training.augment import augment
from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.evaluation import EmotionSet, evaluate_emotion
from common.models import EmotionNet, EmotionVGG


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Scored as the coordinator scores a round (:func:`common.evaluation.evaluate_emotion`)."""
    score = evaluate_emotion(model, EmotionSet(x, y.numpy()))["accuracy"]
    model.train()
    return round(score, 3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("vgg", "scratch"), default="vgg")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the one-cycle schedule's peak")
    p.add_argument(
        "--geometric",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rotate, zoom and shift each face at random too, as federated vgg training does",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="train on this many images only (0: all)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    train, public = load_fer2013("Training"), load_fer2013("PublicTest")
    val, rest = held_out_split(train.images)
    x, y = emotion_tensor(train.images), torch.from_numpy(train.labels).long()
    x_public, y_public = emotion_tensor(public.images), torch.from_numpy(public.labels).long()
    rest = rest[: args.limit or None]
    x_train, y_train = x[rest], y[rest]
    model = EmotionVGG(args.width) if args.arch == "vgg" else EmotionNet(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    per_epoch = len(x_train) // args.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.epochs * per_epoch
    )
    generator = torch.Generator().manual_seed(args.seed)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(per_epoch):
            rows = order[i * args.batch : (i + 1) * args.batch]
            faces = augment(x_train[rows], generator, args.geometric)
            loss = F.cross_entropy(model(faces), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        curve.append(
            {
                "epoch": epoch + 1,
                "val": accuracy(model, x[val], y[val]),
                "publictest": accuracy(model, x_public, y_public),
                "seconds": round(time.perf_counter() - start),
            }
        )
        print(json.dumps(curve[-1]), flush=True)
    print("RESULT", json.dumps(vars(args) | {"curve": curve}), flush=True)


if __name__ == "__main__":
    main()
