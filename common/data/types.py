"""The in-memory form every dataset reader returns: uint8 images with one integer label each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LabeledImages:
    """Images with one integer label each (a class index or an identity index).

    Attributes:
        images: ``uint8`` array, ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB.
        labels: ``int64`` array ``(N,)``; integer labels of another dtype are converted.

    Raises:
        ValueError: if the arrays have the wrong dtype, shape or disagree in length.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8:
            raise ValueError(f"Expected uint8 images, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"Expected (N,H,W) or (N,H,W,3) images, got shape {images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Expected 1-D integer labels, got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(f"Expected {len(labels)=} == {len(images)=}")
        if labels.dtype != np.int64:
            object.__setattr__(self, "labels", labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> LabeledImages:
        """Return the rows at ``indices`` (integer indices or a boolean mask), as a copy."""
        idx = np.asarray(indices)
        return LabeledImages(images=self.images[idx], labels=self.labels[idx])

    @property
    def num_classes(self) -> int:
        """Number of distinct labels present."""
        return len(np.unique(self.labels))
