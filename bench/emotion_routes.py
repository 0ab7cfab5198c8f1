"""Emotion routes under federated DP-SGD, in one process: which network and batch to choose.

Four IID sites split FER2013 Training (less 2,000 images held out for validation, seed 0); each round
every site takes ``--steps`` fast DP-SGD steps from the global model (Adam, clip ``--clip``, default 1,
Poisson batches of expected size ``--batch``, noise multiplier ``--sigma``), and the coordinator
averages the four models.
The score is accuracy on the held-out Training images after each round (2,000 drawn, less those that
nearly repeat a training face, as no PublicTest face does: :func:`held_out_split`): no evaluation split
(PublicTest, PrivateTest) is looked at, so the choice it informs is not tuned on them.

``--sigma`` is given rather than calibrated, so that settings compare at the noise a site's
calibration would give them (``facefed simulate`` logs it; ``0`` trains without clipping or noise).
The noise here is seeded: a research measurement, not a release.

Routes:

* ``scratch``: :class:`common.models.EmotionNet` on the 48x48 faces, mirrored at random;
* ``vgg``: :class:`common.models.EmotionVGG` (``--width``) on the 48x48 faces, mirrored, rotated,
  zoomed and shifted at random (:mod:`client.training.augment`);
* ``transfer``: :class:`common.facenet.transfer.EmotionHead` on the frozen map of dlib's trunk after
  ``--trunk-blocks`` blocks of a ``--size``-pixel face (computed once, cached under ``--cache``),
  the maps mirrored at random; with ``--tune-blocks N`` the trunk's last N blocks are trained with the
  head, from their pretrained weights.

DP-SGD practice from the literature, each a flag: ``--augmult K`` (augmentation multiplicity: K views of
each example, their gradients averaged before clipping), ``--ema D`` (each site sends the moving average
of its iterates), ``--warmup``, ``--schedule``, ``--keep-optimizer``; ``--center`` (the transfer head
subtracts each map's own mean first), ``--label-smoothing``, ``--crop`` (the transfer trunk sees each
face's centre, enlarged), ``--equalize`` (each face's histogram equalised first). ``--seed`` changes
the head's initialisation, the mirroring and the noise together, so settings compare over seeds.
``--scatter J`` joins the face's log wavelet scattering (:mod:`common.scattering`) to the trunk's map;
``--standardize training|orl`` standardises every channel with statistics of the training faces (an
upper bound: not a transform a DP site could use as it is) or of ORL's public faces (what the default
ships); with the scattering, ``--mirror face`` is what the default does (see BENCHMARKS.md, "Wavelet
scattering beside the trunk (twelfth session)").

Example: ``python -m bench.emotion_routes --route transfer --sigma 1.344 --batch 1024 --steps 60``.
Results since 2026-12-02: ``bench/results/pretrained/emotion_routes.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

from client.training.augment import augment, flip
from client.training.dp_random import SeededRandomness
from client.training.fast_dp import PHYSICAL_BATCH, FastDpSgd, Units, poisson_indices
from client.training.train import make_optimizer
from common.data.archives import load_or_build
from common.data.fer2013 import load_fer2013
from common.data.orl import load_orl
from common.data.preprocess import EMOTION_SHARPNESS, emotion_tensor
from common.evaluation import emotion_probabilities
from common.facenet.resnet import BLOCKS
from common.facenet.transfer import EmotionHead, frozen_features, gray_to_chip
from common.facenet.weights import load_pretrained
from common.models import EmotionNet, EmotionVGG
from common.scattering import log_scattering

SITES = 4
HELD_OUT = 2000
NEAR_DUPLICATE = 0.975  # above the closest any PublicTest face comes to a Training face (0.974)


def held_out_split(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the held-out images and of the training part: :data:`HELD_OUT` drawn at random, less
    those that nearly repeat a face of the training part.

    FER2013's Training split repeats faces: of a random 2,000, 149 have a byte-identical copy among the
    other 26,709 (95% with the same label), and more have a copy that differs only in its encoding. No
    PublicTest face comes that close to a Training face, so a held-out copy would reward a route for
    remembering a training image, which PublicTest never does. A face counts as a repeat when its
    12x12 thumbnail, less its mean, has cosine above :data:`NEAR_DUPLICATE` with a training face's: the
    closest any PublicTest face comes to a Training face is 0.974.
    """
    order = np.random.default_rng(seed).permutation(len(images))
    val, rest = order[:HELD_OUT], order[HELD_OUT:]
    train = _thumbnails(images[rest])
    nearest = torch.cat(
        [(_thumbnails(images[val[i : i + 500]]) @ train.T).amax(1) for i in range(0, len(val), 500)]
    )
    return val[(nearest <= NEAR_DUPLICATE).numpy()], rest


def _thumbnails(images: np.ndarray) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(torch.from_numpy(images).float()[:, None], 12).flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def _inputs(args: argparse.Namespace, faces: torch.Tensor, mirrored: bool = False) -> torch.Tensor:
    if args.route in ("scratch", "vgg"):
        return faces
    blocks = args.trunk_blocks - args.tune_blocks  # the frozen part ends here
    name = f"fer-training-{blocks}-{args.size}-{EMOTION_SHARPNESS}"
    if args.crop != 1.0:
        name += f"-crop{args.crop}"
        faces = cropped(faces, args.crop)
    if args.equalize:
        name += "-equalized"
    cache = Path(args.cache) / f"{name}{'-mirrored' if mirrored else ''}"
    if mirrored:
        faces = faces.flip(-1)

    def compute() -> torch.Tensor:
        trunk, _ = load_pretrained().split(len(BLOCKS) - blocks)
        return torch.cat(
            [
                frozen_features(trunk, gray_to_chip(b, args.size), dtype=torch.float16)
                for b in faces.split(512)
            ]
        )

    return cached(cache, faces, compute)


def cached(stem: Path, faces: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``'s maps of ``faces`` as float32, stored beside ``stem`` under a digest of the
    faces themselves (:func:`common.data.archives.load_or_build`: atomic, an unreadable file
    rebuilt), so another face set never reads these maps."""
    digest = hashlib.sha256(faces.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    path = stem.with_name(f"{stem.name}-{digest}.npz")
    arrays = load_or_build(path, lambda: {"x": compute().numpy()})
    return torch.from_numpy(arrays["x"]).float()


def cropped(faces: torch.Tensor, keep: float) -> torch.Tensor:
    """The central ``keep`` fraction of each ``(N,1,H,W)`` face, resized back to ``H x W``."""
    h, w = faces.shape[-2:]
    ch, cw = round(h * keep), round(w * keep)
    top, left = (h - ch) // 2, (w - cw) // 2
    centre = faces[..., top : top + ch, left : left + cw]
    return F.interpolate(centre, size=(h, w), mode="bilinear", align_corners=False)


def equalized(images: np.ndarray) -> np.ndarray:
    """Each uint8 gray face with its histogram equalised (OpenCV)."""
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(im)) for im in images])


def shifted(faces: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``(N,1,H,W)`` faces moved ``dx`` pixels right and ``dy`` down, the border repeated."""
    pad = max(abs(dx), abs(dy))
    h, w = faces.shape[-2:]
    padded = F.pad(faces, (pad, pad, pad, pad), mode="replicate")
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def _shift_views(args: argparse.Namespace, faces: torch.Tensor) -> list[torch.Tensor]:
    """The trunk's maps of the faces moved ``--tta-shift`` pixels each way, and of their mirrors."""
    trunk, _ = load_pretrained().split(len(BLOCKS) - args.trunk_blocks)
    s = args.tta_shift
    views = []
    for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s)):
        moved = shifted(faces, dx, dy)
        for x in (moved, moved.flip(-1)):
            views.append(frozen_features(trunk, gray_to_chip(x, args.size)))
    return views


def _scattering(
    args: argparse.Namespace, faces: torch.Tensor, mirrored: bool = False
) -> torch.Tensor:
    """The log wavelet scattering (:func:`common.scattering.log_scattering`, ``J = --scatter``) of
    each face."""
    cache = (
        Path(args.cache) / f"fer-training-logscatter{args.scatter}{'-mirrored' if mirrored else ''}"
    )
    if mirrored:
        faces = faces.flip(-1)
    return cached(cache, faces, lambda: log_scattering(faces, args.scatter).half())


def _features(
    args: argparse.Namespace, faces: torch.Tensor, mirrored: bool = False
) -> torch.Tensor:
    """The route's inputs; with ``--extra-blocks``, an earlier map pooled to the main map's size too."""
    x = _inputs(args, faces, mirrored)
    if args.route == "transfer" and args.scatter:
        x = torch.cat(
            [x, F.adaptive_avg_pool2d(_scattering(args, faces, mirrored), x.shape[-1])], 1
        )
    if args.route != "transfer" or not args.extra_blocks:
        return x
    early_args = argparse.Namespace(
        **(vars(args) | {"trunk_blocks": args.extra_blocks, "tune_blocks": 0})
    )
    early = _inputs(early_args, faces, mirrored)
    return torch.cat([x, F.adaptive_avg_pool2d(early, x.shape[-1])], 1)


def _view(
    args: argparse.Namespace,
    x: torch.Tensor,
    mirrored: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The training view: mirrored at random; the vgg route's faces also rotated, zoomed and shifted.

    For the transfer route ``--mirror`` says how: ``map`` flips the trunk's map, ``face`` takes the
    trunk's map of the mirrored face (``mirrored``), ``none`` does not mirror.
    """
    if args.route == "vgg":
        return augment(x, generator, geometric=True)
    if args.route == "scratch" or args.mirror == "map":
        return flip(x, generator)
    if args.mirror == "none" or mirrored is None:
        return x
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], mirrored, x)


def _multiplied(
    args: argparse.Namespace,
    x: torch.Tensor,
    mirrored: torch.Tensor | None,
    y: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, Units | None]:
    """The batch to clip: with ``--augmult K``, K views of every example, side by side, as one unit.

    Augmentation multiplicity (De et al. 2022, https://arxiv.org/abs/2204.13650): the gradients of an
    example's K views are averaged before clipping (the loss is divided by K, see :func:`main`), so
    each example still moves the clipped sum by at most C. For the transfer route the views alternate
    between the map and its mirror image (the only augmentation of a map); otherwise each is drawn
    independently by :func:`_view`.
    """
    k = args.augmult
    if k == 1:
        return _view(args, x, mirrored, generator), y, None
    if args.route == "transfer":
        flipped = x.flip(-1) if mirrored is None else mirrored
        views = [x if i % 2 == 0 else flipped for i in range(k)]
    else:
        views = [_view(args, x, mirrored, generator) for _ in range(k)]
    stacked = torch.stack(views, 1).flatten(0, 1)  # example 0's K views, then example 1's, ...
    units = Units(torch.arange(len(y)).repeat_interleave(k), len(y))
    return stacked, y.repeat_interleave(k), units


def _track(average: dict[str, torch.Tensor], state: dict[str, torch.Tensor], decay: float) -> None:
    """Move the moving average of a site's iterates towards its model's ``state``, in place.

    Post-processing of the noised steps, so it costs no privacy; ``decay`` 0 keeps the last iterate.
    """
    for k, v in state.items():
        average[k].mul_(decay).add_(v.detach(), alpha=1 - decay)


def _lr(args: argparse.Namespace, step: int) -> float:
    """The learning rate of local step ``step`` (counted over all rounds)."""
    local = step % args.steps
    if local < args.warmup:  # each round's first steps: up from lr / warmup
        return float(args.lr) * (local + 1) / args.warmup
    if args.schedule == "constant":
        return float(args.lr)
    return float(args.lr) * (1 - step / (args.rounds * args.steps))


def centered(maps: torch.Tensor) -> torch.Tensor:
    """Each ``(N, C, H, W)`` map less its own mean over channels and positions: no other face's
    statistic enters, so it is an example-level DP-safe input transform."""
    return maps - maps.mean((1, 2, 3), keepdim=True)


class _Centered(nn.Module):
    """:func:`centered` as the head's first, parameter-free layer."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return centered(h)


def _model(args: argparse.Namespace, channels: int) -> nn.Module:
    if args.route == "scratch":
        return EmotionNet(width=32)
    if args.route == "vgg":
        return EmotionVGG(width=args.width)
    if not args.tune_blocks:
        head = EmotionHead(
            channels, args.pool, width=args.head_width, first_kernel=args.head_first_kernel
        )
        return nn.Sequential(_Centered(), head) if args.center else head
    # the trunk's last --tune-blocks blocks, from their pretrained weights, trained with the head
    _, tail = load_pretrained().split(len(BLOCKS) - args.trunk_blocks + args.tune_blocks)
    head = EmotionHead(BLOCKS[args.trunk_blocks - 1][0], args.pool, width=args.head_width)
    return nn.Sequential(*tail.blocks[: args.tune_blocks], head)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--route", choices=("scratch", "vgg", "transfer"), default="transfer")
    p.add_argument("--width", type=int, default=16, help="vgg: channels of the first stage")
    p.add_argument("--sigma", type=float, required=True, help="noise multiplier; 0 = non-private")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="local steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    p.add_argument(
        "--seed", type=int, default=0, help="the head's init, the mirroring and the noise"
    )
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--crop", type=float, default=1.0, help="transfer: the central fraction of each face kept"
    )
    p.add_argument(
        "--equalize", action="store_true", help="equalise each face's histogram before all else"
    )
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    p.add_argument(
        "--schedule",
        choices=("constant", "linear"),
        default="constant",
        help="linear: the learning rate falls linearly to 0 over all rounds' local steps",
    )
    p.add_argument(
        "--warmup", type=int, default=0, help="each round's first N steps ramp the rate up"
    )
    p.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="each site keeps its Adam moments from round to round (fresh by default)",
    )
    p.add_argument("--trunk-blocks", type=int, default=7)
    p.add_argument(
        "--tune-blocks",
        type=int,
        default=0,
        help="transfer: train the trunk's last N blocks (from their pretrained weights) with the head",
    )
    p.add_argument("--size", type=int, default=96)
    p.add_argument(
        "--extra-blocks",
        type=int,
        default=0,
        help="transfer: also the map after this many blocks, pooled to the main map's size",
    )
    p.add_argument(
        "--scatter",
        type=int,
        default=0,
        help="transfer: also the log wavelet scattering of each face at this scale J, pooled",
    )
    p.add_argument(
        "--standardize",
        choices=("training", "orl"),
        help="every input channel to zero mean, unit variance over the training faces, or over "
        "ORL's public faces (no site's data)",
    )
    p.add_argument("--pool", type=int, default=3)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument(
        "--head-first-kernel",
        type=int,
        choices=(1, 3),
        default=3,
        help="transfer: the kernel of the head's first convolution (1: a per-position mix of the "
        "input channels)",
    )
    p.add_argument(
        "--mirror",
        choices=("map", "face", "none"),
        default="map",
        help="transfer: mirror the trunk's map, use the map of the mirrored face, or neither",
    )
    p.add_argument(
        "--physical-batch",
        type=int,
        default=PHYSICAL_BATCH,
        help="examples whose per-sample gradients are formed at once (speed only)",
    )
    p.add_argument(
        "--augmult",
        type=int,
        default=1,
        help="augmentation multiplicity: views of each example, gradients averaged before clipping",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="a site sends the exponential moving average of its local iterates at this decay",
    )
    p.add_argument(
        "--center",
        action="store_true",
        help="transfer: the head subtracts each map's own mean before its first layer",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="also score with flip test-time augmentation: the mean of the probabilities of a "
        "face and of its mirror image (transfer: the trunk's map of the mirrored face)",
    )
    p.add_argument(
        "--tta-shift",
        type=int,
        default=0,
        help="with --tta, transfer: also score the mean over the face and its mirror moved this "
        "many pixels left, right, up and down (10 views)",
    )
    p.add_argument("--cache", default="/tmp/facefed-emotion-routes")
    args = p.parse_args(argv)
    if args.augmult < 1 or not 0 <= args.ema < 1:
        p.error("--augmult must be >= 1 and --ema in [0, 1)")
    if args.clip <= 0 or not 0 <= args.label_smoothing < 1 or not 0 < args.crop <= 1:
        p.error("--clip must be > 0, --label-smoothing in [0, 1) and --crop in (0, 1]")
    if args.crop != 1.0 and args.route != "transfer":
        p.error("--crop applies to the transfer route's trunk input alone")
    if not 0 <= args.tune_blocks < args.trunk_blocks or (args.tune_blocks and args.extra_blocks):
        p.error("--tune-blocks must be below --trunk-blocks, and without --extra-blocks")
    if args.tta_shift and not (
        args.tta and args.route == "transfer" and not args.tune_blocks and not args.extra_blocks
    ):
        p.error("--tta-shift needs --tta on the plain transfer head")
    if args.center and (args.route != "transfer" or args.tune_blocks):
        p.error("--center applies to the transfer head alone (--route transfer, no --tune-blocks)")
    torch.set_num_threads(2)

    train = load_fer2013("Training")
    val, rest = held_out_split(train.images)
    faces = emotion_tensor(equalized(train.images) if args.equalize else train.images)
    x = _features(args, faces)
    x_mirrored = (
        _features(args, faces, mirrored=True)
        if args.route == "transfer" and args.mirror == "face"
        else None
    )
    x_tta = None
    if args.tta:
        x_tta = faces.flip(-1) if args.route != "transfer" else x_mirrored
        if x_tta is None:
            x_tta = _features(args, faces, mirrored=True)
    if args.standardize:
        fit = x[torch.from_numpy(rest)]
        if args.standardize == "orl":
            fit = _features(args, emotion_tensor(load_orl().images))
        mean, std = fit.mean((0, 2, 3), keepdim=True), fit.std((0, 2, 3), keepdim=True) + 1e-5
        x = (x - mean) / std
        x_mirrored = None if x_mirrored is None else (x_mirrored - mean) / std
        x_tta = None if x_tta is None else (x_tta - mean) / std
    shift_views = _shift_views(args, faces[val]) if args.tta_shift else []
    y = torch.from_numpy(train.labels).long()
    torch.manual_seed(args.seed)
    global_model = _model(args, x.shape[1])
    mirror = torch.Generator().manual_seed(args.seed)
    scores: list[float] = []
    tta_scores: list[float] = []
    shift_scores: list[float] = []
    start = time.perf_counter()
    moments: dict[int, dict[str, object]] = {}  # each site's Adam state after its last round
    for r in range(args.rounds):
        states = []
        for s, part in enumerate(np.array_split(rest, SITES)):
            model = _model(args, x.shape[1])
            model.load_state_dict(global_model.state_dict())
            model.train()
            opt = make_optimizer(model, args.optimizer, args.lr, args.momentum)
            if args.keep_optimizer and s in moments:
                opt.load_state_dict(moments[s])
            xs, ys, n = x[part], y[part], len(part)
            xm = None if x_mirrored is None else x_mirrored[part]
            q = 1.0 / math.ceil(n / args.batch)
            noise = SeededRandomness(torch.Generator().manual_seed(1000 * args.seed + 10 * r + s))
            dp = FastDpSgd(
                model,
                opt,
                lambda out, t: (
                    F.cross_entropy(out, t, label_smoothing=args.label_smoothing) / args.augmult
                ),
                noise_multiplier=args.sigma,
                max_grad_norm=args.clip if args.sigma > 0 else 1e9,
                expected_batch_size=int(n * q),
                sample_rate=q,
                accountant=RDPAccountant(),
                randomness=noise,
                physical_batch=args.physical_batch,
            )
            average = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for t in range(args.steps):
                opt.param_groups[0]["lr"] = _lr(args, r * args.steps + t)
                idx = poisson_indices(n, q, noise)
                dp.step(
                    *_multiplied(args, xs[idx], None if xm is None else xm[idx], ys[idx], mirror)
                )
                _track(average, model.state_dict(), args.ema)
            states.append(average)
            moments[s] = opt.state_dict()
        global_model.load_state_dict(
            {k: torch.stack([st[k].float() for st in states]).mean(0) for k in states[0]}
        )
        global_model.eval()
        with torch.no_grad():
            logits = torch.cat([global_model(b) for b in x[val].split(1000)])
        scores.append(round(float((logits.argmax(1) == y[val]).float().mean()), 3))
        print(f"round {r + 1}: held-out Training accuracy {scores[-1]:.3f}", flush=True)
        if x_tta is not None:
            with torch.no_grad():  # the face and its mirror weigh 2 each, a shifted view 1
                probs = 2 * torch.cat(
                    [
                        emotion_probabilities(global_model, a, b)
                        for a, b in zip(x[val].split(1000), x_tta[val].split(1000), strict=True)
                    ]
                )
            tta_scores.append(round(float((probs.argmax(1) == y[val]).float().mean()), 3))
            print(f"round {r + 1}: with flip test-time augmentation {tta_scores[-1]:.3f}")
        if shift_views:
            with torch.no_grad():
                probs = probs + sum(global_model(v).softmax(1) for v in shift_views)
            shift_scores.append(round(float((probs.argmax(1) == y[val]).float().mean()), 3))
            print(f"round {r + 1}: with shifted views too {shift_scores[-1]:.3f}")
    result = vars(args) | {
        "val": scores,
        **({"val_tta": tta_scores} if args.tta else {}),
        **({"val_tta_shift": shift_scores} if shift_views else {}),
        "seconds": round(time.perf_counter() - start),
    }
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
