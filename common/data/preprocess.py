"""Shared image preprocessing: the one definition used for training, evaluation and on-device inference.

Both models take single-channel images standardised per image, (x - mean) / std. Per-image
standardisation removes the contrast shift between FER2013's Training and PublicTest splits (see the data
README) and the camera/lighting differences between real sites, so a model trained at one site transfers.

Shapes:
- face model:    ``(N, 1, FACE_SIZE, FACE_SIZE)`` float32, from 112x112 aligned grayscale faces;
- emotion model: ``(N, 1, EMOTION_SIZE, EMOTION_SIZE)`` float32, from 48x48 grayscale faces.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

FACE_SIZE = 112
EMOTION_SIZE = 48
_MIN_STD = 1e-3  # blank images (FER2013 has ~13) become all-zero instead of dividing by zero


def to_gray(images: np.ndarray) -> np.ndarray:
    """Convert ``(N,H,W)`` gray or ``(N,H,W,3)`` RGB uint8 images to ``(N,H,W)`` uint8 gray."""
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[-1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(images.astype(np.float32) @ weights + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"expected (N,H,W) or (N,H,W,3) images, got shape {images.shape}")


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N,H,W)`` uint8 images to ``(N,size,size)`` (area interpolation when shrinking)."""
    if images.shape[1:] == (size, size):
        return images
    out = np.empty((images.shape[0], size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        shrink = img.shape[0] > size or img.shape[1] > size
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        out[i] = cv2.resize(img, (size, size), interpolation=interp)
    return out


def standardize(images: np.ndarray) -> torch.Tensor:
    """Per-image standardisation of ``(N,H,W)`` uint8 gray images into a ``(N,1,H,W)`` float32 tensor."""
    if images.ndim != 3:
        raise ValueError(f"expected (N,H,W) gray images, got shape {images.shape}")
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    x = (x - mean) / np.maximum(std, _MIN_STD)
    return torch.from_numpy(x).unsqueeze(1)


def face_tensor(images: np.ndarray) -> torch.Tensor:
    """Gray/RGB uint8 faces of any size -> the face model's ``(N,1,112,112)`` input."""
    return standardize(resize_all(to_gray(images), FACE_SIZE))


def emotion_tensor(images: np.ndarray) -> torch.Tensor:
    """Gray/RGB uint8 faces of any size -> the emotion model's ``(N,1,48,48)`` input."""
    return standardize(resize_all(to_gray(images), EMOTION_SIZE))
