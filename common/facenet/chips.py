"""dlib's 150x150 face chips from 5 facial landmarks (YuNet's), for :mod:`common.facenet.resnet`.

dlib's face-recognition ResNet was trained on chips cut by ``get_face_chip_details(shape, size=150,
padding=0.25)`` (``dlib/image_transforms/interpolation.h``): a least-squares similarity transform of
the 68-point landmarks onto dlib's mean face shape, scaled into the chip as
``chip = size * (padding + mean) / (2 * padding + 1)``. YuNet gives 5 points instead (right eye,
left eye, nose tip, right mouth corner, left mouth corner; "right" is the person's right, i.e. the
image-left side), so :data:`CHIP_TEMPLATE` holds the same 5 points of dlib's mean face, mapped the
same way, and :func:`chip_transform` fits a similarity transform of the 5 detected points onto it.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

CHIP_SIZE = 150
CHIP_PADDING = 0.25
# Bump when the template or the warp changes: it keys the dataset chip caches (common.data.chips).
TEMPLATE_VERSION = "dlib-mean5-v2-refined"

# dlib's mean face shape (interpolation.h, get_face_chip_details: mean_face_shape_x/y hold the
# 68-point landmarks 17..67, so point i sits at index i - 17), in units of the face box:
#   right eye = mean of points 36..41 = (0.225492, 0.215990)
#   left eye  = mean of points 42..47 = (0.754761, 0.215990)
#   nose tip  = point 30              = (0.490127, 0.515625)
#   right mouth corner = point 48     = (0.254149, 0.780233)
#   left mouth corner  = point 54     = (0.726104, 0.780233)
# mapped into the chip with 150 * (0.25 + p) / 1.5, YuNet's landmark order, chip pixel coordinates.
CHIP_TEMPLATE = np.array(
    [
        [47.5492, 46.5990],
        [100.4761, 46.5990],
        [74.0127, 76.5625],
        [50.4149, 103.0233],
        [97.6104, 103.0233],
    ],
    dtype=np.float32,
)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, translation; no reflection) that maps
    ``src`` onto ``dst`` with the least squared error (Umeyama 1991). Both are ``(K, 2)``, K >= 2.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(
            f"need matching (K, 2) point sets with K >= 2, got {src.shape}, {dst.shape}"
        )
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = float((s**2).sum())
    if var_s < 1e-12:
        raise ValueError("the source points coincide; cannot fit a similarity transform")
    # For 2-D points a similarity is z -> (a + ib) z + t in complex form; least squares gives a, b.
    a = float((s * d).sum()) / var_s
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / var_s
    rot = np.array([[a, -b], [b, a]])
    t = mu_d - rot @ mu_s
    return np.hstack([rot, t[:, None]])


def chip_transform(landmarks5: np.ndarray) -> np.ndarray:
    """The 2x3 float64 matrix taking image coordinates of 5 YuNet landmarks onto the chip template.

    An exact least-squares similarity fit over all 5 points (dlib fits its chips the same way): with
    5 well-spread landmarks and no outliers it is deterministic and steadier than LMedS, which fits
    2-point samples.
    """
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"expected 5 finite (x, y) landmarks, got shape {points.shape}")
    return similarity_lstsq(points, CHIP_TEMPLATE)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 -> ``(H, W, 3)`` RGB (gray -> 3 equal channels)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"expected an (H, W) gray or (H, W, 3) RGB image, got shape {image.shape}")


def warp_chip(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp ``image`` (gray or RGB uint8) by the 2x3 ``matrix`` into a (150, 150, 3) RGB chip."""
    return cv2.warpAffine(
        as_rgb(image),
        np.asarray(matrix, dtype=np.float64),
        (CHIP_SIZE, CHIP_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def align_chip(image: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """The ``(150, 150, 3)`` uint8 RGB dlib chip of the face whose 5 YuNet landmarks are given.

    ``image`` is ``(H, W, 3)`` RGB or ``(H, W)`` gray (embedded as 3 equal channels).
    """
    return warp_chip(image, chip_transform(landmarks5))


# Landmark refinement: the face is re-detected in a view where it is upright and large. The view is
# the chip geometry scaled by REFINE_SCALE inside a canvas with REFINE_BORDER chip-widths of margin.
REFINE_SCALE = 2.0
REFINE_BORDER = 0.5
REFINE_SIZE = round(CHIP_SIZE * REFINE_SCALE * (1 + 2 * REFINE_BORDER))


def refine_landmarks(
    image: np.ndarray,
    landmarks5: np.ndarray,
    detect: Callable[[np.ndarray], np.ndarray | None],
) -> np.ndarray:
    """Landmarks re-detected on an upright, upscaled view of the face; the input ones if none found.

    YuNet's landmarks jitter by 3-4 chip pixels with the face's size and tilt in the photo; detecting
    again where the face has the chip's pose at twice its size steadies them (measured on LFW:
    TAR at FAR 1e-4 over all pairs of people sets 4-5 rose from 0.895 to 0.907, BENCHMARKS.md).
    ``detect`` returns the 5 landmarks of the most central face of an RGB image, or None.
    """
    offset = CHIP_SIZE * REFINE_SCALE * REFINE_BORDER
    view = np.vstack([chip_transform(landmarks5), [0.0, 0.0, 1.0]])
    scale = np.array([[REFINE_SCALE, 0, offset], [0, REFINE_SCALE, offset], [0, 0, 1.0]])
    forward = (scale @ view)[:2]
    canvas = cv2.warpAffine(
        as_rgb(image),
        forward,
        (REFINE_SIZE, REFINE_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    found = detect(canvas)
    if found is None:
        return np.asarray(landmarks5, dtype=np.float32)
    back = cv2.invertAffineTransform(forward)
    points = np.asarray(found, dtype=np.float64)
    return (points @ back[:, :2].T + back[:, 2]).astype(np.float32)
