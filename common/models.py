"""The two federated networks, built only from layers Opacus can clip per sample.

* :class:`FaceEmbedder` maps an aligned 112x112 grayscale face to an L2-normalised 128-d embedding. Its
  head is a global depthwise convolution (MobileFaceNet's GDC) rather than a 12k-wide linear layer, which
  keeps per-sample gradients small on a CPU.
* :class:`CosineHead` is the site-local class-centre matrix, trained with the CosFace margin loss
  (:func:`cosface_loss`). It never leaves the site; only the backbone is federated.
* :class:`EmotionNet` classifies 48x48 grayscale faces into the 7 FER2013 emotions.

Normalisation is GroupNorm throughout: BatchNorm mixes examples in a batch, which breaks per-sample
gradient clipping, and Opacus's ``ModuleValidator`` rejects it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_DIM = 128
NUM_EMOTIONS = 7


def conv_gn(
    c_in: int, c_out: int, stride: int = 1, groups: int = 8, kernel: int = 3
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.SiLU(),
    )


class FaceEmbedder(nn.Module):
    """Face backbone: ``(N, 1, 112, 112)`` standardised gray faces -> ``(N, 128)`` unit vectors."""

    def __init__(self, width: int = 32, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_gn(1, w, stride=2),  # 56x56
            conv_gn(w, 2 * w, stride=2),  # 28x28
            conv_gn(2 * w, 2 * w),
            conv_gn(2 * w, 4 * w, stride=2),  # 14x14
            conv_gn(4 * w, 4 * w),
            conv_gn(4 * w, 8 * w, stride=2),  # 7x7
            conv_gn(8 * w, 8 * w),
        )
        # Global depthwise conv: a learned spatial weighting per channel (MobileFaceNet, Chen et al. 2018).
        self.gdc = nn.Conv2d(8 * w, 8 * w, 7, groups=8 * w, bias=False)
        self.gdc_norm = nn.GroupNorm(8, 8 * w)
        self.embed = nn.Linear(8 * w, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = self.gdc_norm(self.gdc(h)).flatten(1)
        return F.normalize(self.embed(h), dim=1)


class CosineHead(nn.Module):
    """Site-local class centres: ``(N, D)`` unit embeddings -> ``(N, C)`` cosine similarities.

    The margin lives in :func:`cosface_loss`, outside the parametrised layer, so Opacus can compute the
    head's per-sample gradients from a single-input layer.
    """

    def __init__(self, num_classes: int, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a margin head needs at least 2 identities, got {num_classes=}")
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(embeddings, F.normalize(self.weight, dim=1))


def cosface_loss(
    cosine: torch.Tensor, labels: torch.Tensor, scale: float = 16.0, margin: float = 0.2
) -> torch.Tensor:
    """CosFace large-margin cosine loss (Wang et al., 2018): CE over ``s * (cos - m * onehot)``."""
    one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return F.cross_entropy(scale * (cosine - margin * one_hot), labels)


class FaceTrainer(nn.Module):
    """Backbone + local head in one module, so DP-SGD clips their joint per-sample gradient.

    The head must be trained under the same DP-SGD as the backbone: the backbone's update depends on the
    head, so a head trained without noise would leak through the federated backbone.
    """

    def __init__(self, backbone: nn.Module, head: CosineHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class EmotionNet(nn.Module):
    """Emotion classifier: ``(N, 1, 48, 48)`` standardised gray faces -> ``(N, 7)`` logits.

    A stride-2 stem halves the resolution first (most of a 48x48 CNN's cost is its full-resolution
    layers), and the classifier sees the 6x6 spatial map flattened rather than globally pooled, because
    where a feature is (mouth corners vs. brows) is what separates the emotions.
    """

    def __init__(self, width: int = 32, num_classes: int = NUM_EMOTIONS) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_gn(1, w, stride=2),  # 24
            conv_gn(w, w),
            nn.MaxPool2d(2),  # 12
            conv_gn(w, 2 * w),
            conv_gn(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 6
        )
        self.classifier = nn.Linear(2 * w * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EmotionVGG(nn.Module):
    """Deeper emotion classifier at full resolution: ``(N, 1, 48, 48)`` -> ``(N, 7)`` logits.

    Four stages of two 3x3 convolutions (GroupNorm, SiLU) and a 2x2 max pool take the face from 48x48
    to a 3x3 map of ``8 * width`` channels, which the classifier sees flattened (where a feature is
    matters, as in :class:`EmotionNet`), after dropout. At width 16 a face costs about 3x what
    ``EmotionNet(32)`` costs, and trained centrally it reaches 0.51 on FER2013 PublicTest; under DP at
    small batches its 302k parameters drown in noise (BENCHMARKS.md, "A deeper emotion network").
    """

    def __init__(
        self, width: int = 16, num_classes: int = NUM_EMOTIONS, dropout: float = 0.3
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (width, 2 * width, 4 * width, 8 * width):
            layers += [conv_gn(c_in, c_out), conv_gn(c_out, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_in * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x).flatten(1)))
