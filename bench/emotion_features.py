"""Which frozen public features carry expression: a non-private probe on held-out FER2013 Training.

A feature set is fixed once per face; a small head (:class:`common.facenet.transfer.EmotionHead`, two
3x3 GroupNorm conv layers) is trained on it centrally, without DP (Adam 0.002, ``--batch`` faces a step,
maps mirrored at random), and scored on the held-out Training images of :mod:`bench.emotion_routes`
(:func:`~bench.emotion_routes.held_out_split`): no evaluation split is looked at. It compares features,
not training setups: the route that trains on them federated under DP is :mod:`bench.emotion_routes`.

Feature sets (``--features``, several joined with ``+``, each pooled to the first's side):

* ``dlib:BLOCKS@SIZE``: the map of dlib's frozen trunk after ``BLOCKS`` residual blocks of a
  ``SIZE``-pixel face (the default emotion model's is ``dlib:7@48``), cached as the routes harness does;
* ``mesh:LAYER``: a layer of MediaPipe's face-mesh network (``face_landmark.tflite``, Apache-2.0, inside
  the ``mediapipe==0.10.14`` wheel on the package index; run with OpenCV's TFLite reader, so mediapipe
  itself is not needed; fetch the file once with ``pip download --no-deps --only-binary=:all:
  --python-version 3.11 mediapipe==0.10.14`` and ``unzip -j mediapipe-0.10.14-*.whl
  mediapipe/modules/face_landmark/face_landmark.tflite``). ``mesh:landmarks`` is its 468 3-D
  landmarks as one vector, each face's less their centroid and scaled to unit size (the face's shape,
  not its position or size). Give the file with ``--mesh-model``. Each face is padded by a quarter of
  its side and scaled to 192 pixels.

``--center`` subtracts each map's own mean before the head (per face: no statistic of other faces, so a
DP-SGD site could do it too). ``--standardize`` scales every channel to zero mean and unit variance
over the training faces, so that sets of different scales can be joined fairly; it reads all training
faces, so it measures what the features hold, and is not a transform a DP site could use as it is.

Example: ``python -m bench.emotion_features --features dlib:7@48 --features dlib:7@48+mesh:p_re_lu_15
--mesh-model face_landmark.tflite --seeds 3``. Results: ``bench/results/pretrained/emotion_routes.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bench.emotion_routes import _inputs, cached, centered, held_out_split
from client.training.augment import flip
from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.facenet.transfer import GRAY_CONTRAST, GRAY_LEVEL, EmotionHead

MESH_SIZE = 192
MESH_PAD = 0.25  # of the face's side, on every edge: the mesh network expects some margin


def _mesh(path: Path, faces: torch.Tensor, layer: str) -> torch.Tensor:
    """One layer of the face-mesh network for each standardised ``(N, 1, 48, 48)`` face."""
    net = cv2.dnn.readNetFromTFLite(str(path))
    name = "conv2d_21" if layer == "landmarks" else layer  # the 1,404 landmark coordinates
    pixels = (GRAY_LEVEL + GRAY_CONTRAST * faces[:, 0]).clamp(0, 255).byte().numpy()
    pad = round(pixels.shape[-1] * MESH_PAD)
    out = []
    for i in range(0, len(pixels), 64):
        images = [
            cv2.cvtColor(
                cv2.resize(
                    cv2.copyMakeBorder(p, pad, pad, pad, pad, cv2.BORDER_REPLICATE),
                    (MESH_SIZE, MESH_SIZE),
                ),
                cv2.COLOR_GRAY2RGB,
            )
            for p in pixels[i : i + 64]
        ]
        net.setInput(cv2.dnn.blobFromImages(images, 1 / 127.5, mean=(127.5,) * 3))
        out.append(torch.from_numpy(net.forward(name).copy()).half())
    maps = torch.cat(out)
    return _shape(maps) if layer == "landmarks" else maps


def _shape(landmarks: torch.Tensor) -> torch.Tensor:
    """Landmark coordinates ``(N, 1404, 1, 1)`` -> the face's shape alone: each face's points less
    their centroid, divided by their RMS distance from it in the image plane (position and size go)."""
    points = landmarks.float().view(len(landmarks), -1, 3)
    points = points - points.mean(1, keepdim=True)
    size = points[..., :2].square().sum(-1).mean(1).sqrt().clamp_min(1e-6)
    return (points / size[:, None, None]).reshape(landmarks.shape).half()


def parse_part(part: str) -> tuple[str, str]:
    """``dlib:BLOCKS@SIZE`` or ``mesh:LAYER`` -> ``(kind, what)``; ValueError for anything else."""
    kind, _, what = part.partition(":")
    blocks, at, size = what.partition("@")
    if (kind == "mesh" and what) or (kind == "dlib" and at and blocks.isdigit() and size.isdigit()):
        return kind, what
    raise ValueError(f"{part!r} is neither dlib:BLOCKS@SIZE nor mesh:LAYER")


def _feature_set(args: argparse.Namespace, part: str, faces: torch.Tensor) -> torch.Tensor:
    kind, what = parse_part(part)
    if kind == "dlib":
        blocks, _, size = what.partition("@")
        routes = argparse.Namespace(
            route="transfer",
            trunk_blocks=int(blocks),
            tune_blocks=0,
            size=int(size),
            crop=1.0,
            equalize=False,
            cache=args.cache,
        )
        return _inputs(routes, faces)
    if args.mesh_model is None:
        raise SystemExit(f"{part}: give the face-mesh network with --mesh-model")
    network = hashlib.sha256(Path(args.mesh_model).read_bytes()).hexdigest()[:16]
    cache = Path(args.cache) / f"fer-training-mesh-{network}-{what}-{MESH_PAD}"
    return cached(cache, faces, lambda: _mesh(args.mesh_model, faces, what))


def features(args: argparse.Namespace, spec: str, faces: torch.Tensor) -> torch.Tensor:
    """The ``+``-joined feature sets of ``spec``, each pooled to the first one's side."""
    sets = [_feature_set(args, part, faces) for part in spec.split("+")]
    side = sets[0].shape[-1]
    return torch.cat([F.adaptive_avg_pool2d(s, side) for s in sets], 1)


def probe(
    x: torch.Tensor,
    y: torch.Tensor,
    rest: np.ndarray,
    val: np.ndarray,
    args: argparse.Namespace,
    seed: int,
) -> float:
    """Held-out accuracy of a head trained on ``x[rest]`` for ``args.steps`` steps."""
    torch.manual_seed(seed)
    head = EmotionHead(x.shape[1], min(args.pool, x.shape[-1]), width=args.head_width)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    draw = torch.Generator().manual_seed(seed)
    train = torch.from_numpy(rest)
    for _ in range(args.steps):
        idx = train[torch.randint(len(train), (args.batch,), generator=draw)]
        xb = x[idx]
        if xb.shape[-1] > 1:  # mirror half the maps (a flat vector has no left and right)
            xb = flip(xb, draw)
        opt.zero_grad()
        F.cross_entropy(head(xb), y[idx]).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(b) for b in x[val].split(1000)])
    return round(float((logits.argmax(1) == y[val]).float().mean()), 3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", action="append", required=True, help="repeat to compare sets")
    p.add_argument("--mesh-model", type=Path, help="face_landmark.tflite (mediapipe 0.10.14 wheel)")
    p.add_argument("--center", action="store_true", help="subtract each map's own mean first")
    p.add_argument(
        "--standardize", action="store_true", help="per channel, over the training faces"
    )
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=135)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--pool", type=int, default=3)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cache", default="/tmp/facefed-emotion-routes")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.batch < 1:
        p.error("--seeds, --steps and --batch must be positive")
    for spec in args.features:
        try:
            for part in spec.split("+"):
                parse_part(part)
        except ValueError as err:
            p.error(f"--features {spec!r}: {err}")
    torch.set_num_threads(2)

    train = load_fer2013("Training")
    val, rest = held_out_split(train.images)
    faces = emotion_tensor(train.images)
    y = torch.from_numpy(train.labels).long()
    for spec in args.features:
        start = time.perf_counter()
        x = features(args, spec, faces)
        if args.center:
            x = centered(x)
        if args.standardize:
            fit = x[torch.from_numpy(rest)]
            x = (x - fit.mean((0, 2, 3), keepdim=True)) / fit.std((0, 2, 3), keepdim=True).add(1e-5)
        scores = [probe(x, y, rest, val, args, seed) for seed in range(args.seeds)]
        result = vars(args) | {
            "features": spec,
            "mesh_model": str(args.mesh_model),
            "shape": list(x.shape[1:]),
            "val": scores,
            "median": statistics.median(scores),
            "seconds": round(time.perf_counter() - start),
        }
        print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
