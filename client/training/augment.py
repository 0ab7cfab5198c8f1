"""Per-example training augmentation of preprocessed face batches.

Every training batch is mirrored at random (both models). With ``face-augment`` the face model's batches
are also moved by a random similarity transform: the faces a site's camera delivers are aligned by
on-device detection (:mod:`client.recogniser.pipeline`), which places eyes and chin less exactly than the
deep-funneled training crops, and a model that has only seen perfectly aligned crops loses accuracy on
them. Each example is transformed on its own, so per-example clipping and the DP guarantee are
unchanged: augmentation is part of computing one example's gradient.

Randomness comes only from the injected generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of an ``(N,C,H,W)`` batch left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class Jitter:
    """Ranges of the random similarity transform (uniform in each range, independent per example).

    Attributes:
        max_degrees: largest rotation either way.
        max_scale: largest relative zoom either way (0.1: 0.9x to 1.1x).
        max_shift: largest translation either way, as a fraction of the image side.
    """

    max_degrees: float = 10.0
    max_scale: float = 0.1
    max_shift: float = 0.06

    def __post_init__(self) -> None:
        if not (
            0 <= self.max_degrees <= 45 and 0 <= self.max_scale < 0.5 and 0 <= self.max_shift < 0.5
        ):
            raise ValueError(f"jitter ranges out of bounds: {self}")


def jitter(x: torch.Tensor, generator: torch.Generator, ranges: Jitter = Jitter()) -> torch.Tensor:
    """Rotate, zoom and shift each image of an ``(N,C,H,W)`` batch by its own random amount.

    Bilinear resampling; pixels brought in from outside the image repeat the border.
    """
    n = x.shape[0]
    if n == 0:
        return x

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(ranges.max_degrees))
    scale = 1 + uniform(ranges.max_scale)
    tx, ty = uniform(2 * ranges.max_shift), uniform(2 * ranges.max_shift)  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, generator: torch.Generator, geometric: bool) -> torch.Tensor:
    """The training view of a batch: a random mirror, then (``geometric``) a random similarity move."""
    x = flip(x, generator)
    return jitter(x, generator) if geometric else x
