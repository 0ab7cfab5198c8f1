"""Frozen pretrained features and the small trainable heads that sites fine-tune on them.

Both federated models can start from dlib's pretrained face network (``common.facenet.resnet``):

* **face**: the frozen :class:`~common.facenet.resnet.Trunk` turns an aligned chip into a feature map;
  the federated model is the :class:`~common.facenet.resnet.FaceTail` (last blocks + embedding layer).
* **emotion**: the same public trunk, cut earlier (where features still carry expression rather than
  identity), turns a face into a feature map; the federated model is an :class:`EmotionHead`.

Sites compute the frozen features once (they depend only on public weights and the site's own images)
and train only the heads under DP-SGD. On device, :class:`EmotionTransfer` chains trunk and head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.facenet.resnet import CHIP_MEAN, CHIP_SCALE
from common.models import conv_gn
from common.scattering import log_scattering

# A standardised gray face (zero mean, unit variance per image) becomes a gray "photo" with this
# brightness and contrast before the chip normalisation: typical values of an aligned face chip.
GRAY_LEVEL = 128.0
GRAY_CONTRAST = 50.0


def gray_to_chip(x: torch.Tensor, size: int) -> torch.Tensor:
    """Standardised gray faces ``(N, 1, H, W)`` -> the trunk's ``(N, 3, size, size)`` input."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    pixels = GRAY_LEVEL + GRAY_CONTRAST * x
    mean = torch.tensor(CHIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (pixels - mean) / CHIP_SCALE


class EmotionHead(nn.Module):
    """Feature map ``(N, C, H, W)`` -> ``(N, classes)`` logits.

    With ``width`` 0, pool to ``pool x pool``, then linear. With ``width`` > 0, two 3x3 convolutions
    of ``width`` channels (GroupNorm, SiLU: no batch statistics, as DP-SGD needs) read the whole map
    first. dlib's features are trained to ignore expression, so a linear read-out of them does no
    better than one of raw pixels; a small convolutional head on an early cut does (BENCHMARKS.md,
    "Emotion: two routes"). Keeping a coarse spatial layout lets the head tell where a feature fires
    (mouth vs brows).
    """

    def __init__(
        self,
        channels: int,
        pool: int,
        num_classes: int = 7,
        width: int = 0,
        first_kernel: int = 3,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.convs = (
            nn.Sequential(conv_gn(channels, width, kernel=first_kernel), conv_gn(width, width))
            if width
            else nn.Identity()
        )
        self.linear = nn.Linear((width or channels) * pool * pool, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(self.convs(h), self.pool).flatten(1))


class EmotionFeatures(nn.Module):
    """Standardised gray faces ``(N, 1, 48, 48)`` -> the emotion head's input map.

    The frozen trunk's map of a ``size``-pixel face; with ``scatter`` > 0 also the face's log wavelet
    scattering at ``scatter`` scales (:mod:`common.scattering`), pooled to the trunk map's side and
    joined as more channels. Every channel is then standardised with fixed public statistics
    (``mean``, ``std``: :mod:`common.facenet.emotion_input`, computed once from ORL's faces, never from
    a site's), so the input of every face is a function of that face alone.
    """

    def __init__(
        self,
        trunk: nn.Module,
        size: int,
        scatter: int = 0,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.size = size
        self.scatter = scatter
        self.standardise = mean is not None and std is not None
        self.register_buffer(
            "mean", (mean if mean is not None else torch.zeros(1)).view(1, -1, 1, 1)
        )
        self.register_buffer("std", (std if std is not None else torch.ones(1)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(gray_to_chip(x, self.size))
        if self.scatter:
            s = log_scattering(x, self.scatter)
            h = torch.cat([h, F.adaptive_avg_pool2d(s, h.shape[-1])], 1)
        return (h - self.mean) / self.std if self.standardise else h


class EmotionTransfer(nn.Module):
    """On device: standardised 48x48 gray faces ``(N, 1, 48, 48)`` -> emotion logits."""

    def __init__(self, features: EmotionFeatures, head: EmotionHead) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()  # not inference_mode: the features are training inputs
def frozen_features(
    trunk: nn.Module, x: torch.Tensor, batch: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``trunk(x)`` in batches, without gradients (the trunk is public and frozen)."""
    trunk.eval()
    return torch.cat([trunk(b).to(dtype) for b in x.split(batch)])
