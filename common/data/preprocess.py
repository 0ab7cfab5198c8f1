"""Shared image preprocessing: the one definition used for training, evaluation and on-device inference.

Both models take single-channel images standardised per image, (x - mean) / std. Per-image
standardisation removes the contrast shift between FER2013's Training and PublicTest splits (see the data
README) and the camera/lighting differences between real sites, so a model trained at one site transfers.

The emotion model's faces are also brought to one sharpness (:func:`match_sharpness`): every FER2013
Training image in the shared copy is blurred (about a 2-pixel Gaussian; PublicTest's are sharp), and a
network cannot learn detail its training images lack, so it must see every face at that bandwidth.

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
# Sharpness of a standardised face: the standard deviation of its Laplacian (cv2.Laplacian, 3x3).
# FER2013 Training's median, measured by `python -m bench.emotion_sharpness` (BENCHMARKS.md, "The
# blur of FER2013 Training"); PublicTest's median is 0.85. Part of the emotion model's input definition.
EMOTION_SHARPNESS = 0.068
_BLUR_STEP = 0.125  # Gaussian sigmas tried, in pixels: 0.125, 0.25, ... up to _MAX_BLUR
_MAX_BLUR = 6.0
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
    return torch.from_numpy(_unit(images.astype(np.float32))).unsqueeze(1)


def _unit(x: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` float32 images, each brought to zero mean and unit variance."""
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return (x - mean) / np.maximum(std, _MIN_STD)


def face_tensor(images: np.ndarray) -> torch.Tensor:
    """Gray/RGB uint8 faces of any size -> the face model's ``(N,1,112,112)`` input."""
    return standardize(resize_all(to_gray(images), FACE_SIZE))


def sharpness(x: np.ndarray) -> float:
    """The standard deviation of a standardised ``(H, W)`` float32 image's Laplacian."""
    return float(cv2.Laplacian(x, cv2.CV_32F).std())


def match_sharpness(x: torch.Tensor, target: float = EMOTION_SHARPNESS) -> torch.Tensor:
    """Blur each standardised ``(N, 1, H, W)`` image sharper than ``target`` until it is not.

    Each image gets the smallest Gaussian blur (in steps of ``_BLUR_STEP`` pixels) that brings its
    :func:`sharpness` to ``target`` or below, and is standardised again; an image already at or below
    ``target`` is returned unchanged. So a sharp face and a blurred copy of it come out alike, whichever
    the camera gave, and the model sees faces only at the bandwidth its training images had.
    """
    out = x.numpy().copy()
    for i, image in enumerate(out[:, 0]):
        if sharpness(image) <= target:
            continue
        sigma = _BLUR_STEP
        while True:
            blurred = _unit(cv2.GaussianBlur(image, (0, 0), sigma))
            if sharpness(blurred) <= target or sigma >= _MAX_BLUR:
                break
            sigma += _BLUR_STEP
        out[i, 0] = blurred
    return torch.from_numpy(out)


def emotion_tensor(images: np.ndarray) -> torch.Tensor:
    """Gray/RGB uint8 faces of any size -> the emotion model's ``(N,1,48,48)`` input, at
    :data:`EMOTION_SHARPNESS` at most."""
    return match_sharpness(standardize(resize_all(to_gray(images), EMOTION_SIZE)))
