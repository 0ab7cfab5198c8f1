"""The datasets as dlib face chips (150x150 RGB, :mod:`common.facenet.chips`), cached on disk.

Each image is run through YuNet (``cv2.FaceDetectorYN``) and warped onto the chip template by its 5
landmarks. The datasets' tight crops (ORL 92x112, Extended Yale B 84x96, LFW 112x112) can leave too
little context around the face for the detector, so an image where YuNet finds nothing is retried with
a constant border of :data:`PAD_FRACTION` of its size on each side, then also upscaled 2x; landmarks
are mapped back to the original image. Where YuNet still finds nothing, the chip is cut with the
source's median landmarks (relative to the image size) over its detected images, and the image is
flagged ``aligned = False``.

Chips are cached as ``<cache>/chips-<source>-<key>.npz`` (``common.data.archives.load_or_build``:
written atomically, an unreadable cache is rebuilt); the key covers the source file's SHA-256, the
YuNet model's and :data:`common.facenet.chips.TEMPLATE_VERSION`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from common.data.archives import content_key, load_or_build, require_file
from common.errors import ConfigError, DataError
from common.facenet.chips import (
    CHIP_SIZE,
    TEMPLATE_VERSION,
    align_chip,
    as_rgb,
    refine_landmarks,
)
from common.paths import cache_dir
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)

Source = Literal["lfw", "orl", "eyaleb", "yale"]
SOURCES: tuple[Source, ...] = ("lfw", "orl", "eyaleb", "yale")
YUNET_FILE = "face_detection_yunet_2026may.onnx"
PAD_FRACTION = 0.4
# (border as a fraction of the image size on each side, upscale factor), tried in order
ATTEMPTS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (PAD_FRACTION, 1.0), (PAD_FRACTION, 2.0))
SCORE_THRESHOLD = 0.6


@dataclass(frozen=True, eq=False)
class ChipSet:
    """A dataset's chips in its loader's row order.

    Attributes:
        chips: uint8 ``(N, 150, 150, 3)`` RGB.
        labels: int64 ``(N,)`` identity of each image (the loader's labels).
        aligned: bool ``(N,)``: YuNet found the face (else the source's median landmarks were used).
        landmarks: float32 ``(N, 5, 2)`` landmarks used, in the source image's coordinates.
        seconds: time to build the chips (0 when they came from the cache).
    """

    source: str
    chips: np.ndarray
    labels: np.ndarray
    aligned: np.ndarray
    landmarks: np.ndarray
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def detection_rate(self) -> float:
        """The fraction of images where YuNet found the face."""
        return float(self.aligned.mean()) if len(self.aligned) else 0.0


def open_yunet(model_path: Path, score_threshold: float, hint: str) -> cv2.FaceDetectorYN:
    """OpenCV's YuNet detector from an ONNX file; a missing or unreadable file is a one-line
    :class:`ConfigError` ending in ``hint`` (what to do about it)."""
    if not Path(model_path).is_file():
        raise ConfigError(f"YuNet model {model_path} not found; {hint}")
    try:
        return cv2.FaceDetectorYN.create(
            str(model_path), "", (320, 320), score_threshold, 0.3, 5000
        )
    except cv2.error as exc:
        raise ConfigError(f"cannot load YuNet model {model_path} ({exc}); check the file") from exc


class LandmarkDetector:
    """YuNet's 5 landmarks of the most central face, retrying with a border and upscaling."""

    def __init__(self, model_path: Path, score_threshold: float = SCORE_THRESHOLD) -> None:
        self._net = open_yunet(
            model_path,
            score_threshold,
            f"pass the path of {YUNET_FILE} or put it in the data directory",
        )

    def detect_at(self, rgb: np.ndarray, pad: float, scale: float) -> np.ndarray | None:
        """Landmarks of the most central face in ``rgb`` with a ``pad`` border, upscaled ``scale``x."""
        h, w = rgb.shape[:2]
        px, py = round(pad * w), round(pad * h)
        image = cv2.copyMakeBorder(rgb, py, py, px, px, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        if scale != 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None or len(faces) == 0:
            return None
        centre = np.array([bgr.shape[1], bgr.shape[0]]) / 2
        middles = faces[:, :2] + faces[:, 2:4] / 2
        best = faces[int(np.argmin(np.linalg.norm(middles - centre, axis=1)))]
        points = best[4:14].reshape(5, 2).astype(np.float64)
        # pixel centres are at integer coordinates in both images
        return ((points + 0.5) / scale - 0.5 - np.array([px, py])).astype(np.float32)

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """``(5, 2)`` landmarks of the face in a gray or RGB image, or None if none is found."""
        rgb = as_rgb(image)
        for pad, scale in ATTEMPTS:
            points = self.detect_at(rgb, pad, scale)
            if points is not None:
                return refine_landmarks(rgb, points, lambda view: self.detect_at(view, 0.0, 1.0))
        return None


def default_yunet_path(data_dir: Path | None = None) -> Path:
    """``<data dir>/face_detection_yunet_2026may.onnx``."""
    return resolve_data_dir(data_dir) / YUNET_FILE


def _source_images(source: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """The loader's images and labels and the file they come from."""
    if source == "lfw":
        from common.data.lfw import ARCHIVE, load_lfw

        lfw = load_lfw(data_dir=data_dir)
        return lfw.images, lfw.identity, data_dir / ARCHIVE
    if source == "orl":
        from common.data.orl import ARCHIVE as ORL_ARCHIVE
        from common.data.orl import load_orl

        orl = load_orl(data_dir)
        return orl.images, orl.labels, data_dir / ORL_ARCHIVE
    if source == "eyaleb":
        from common.data.npz_sets import EYALEB_FILE, load_extended_yale_b

        eyaleb = load_extended_yale_b(data_dir)
        return eyaleb.images, eyaleb.labels, data_dir / EYALEB_FILE
    if source == "yale":
        from common.data.npz_sets import YALE_FILE, load_yale_faces

        yale, _ = load_yale_faces(data_dir)
        return yale.images, yale.labels, data_dir / YALE_FILE
    raise ConfigError(f"unknown chip source {source!r}; use one of {', '.join(SOURCES)}")


def build_chips(
    images: np.ndarray, detect: Callable[[np.ndarray], np.ndarray | None]
) -> dict[str, np.ndarray]:
    """Chips of ``images`` (gray or RGB), with median-landmark fallback; arrays for the cache."""
    n = len(images)
    found: list[np.ndarray | None] = [detect(img) for img in images]
    aligned = np.array([p is not None for p in found], dtype=bool)
    h, w = images.shape[1:3]
    size = np.array([w, h], dtype=np.float32)
    relative = [p / size for p in found if p is not None]
    if relative:
        fallback: np.ndarray = np.median(np.stack(relative), axis=0) * size
    else:  # nothing detected at all: a frontal face filling the image, roughly
        fallback = (
            np.array(
                [[0.35, 0.4], [0.65, 0.4], [0.5, 0.58], [0.38, 0.75], [0.62, 0.75]], np.float32
            )
            * size
        )
    landmarks = np.stack([fallback if p is None else p for p in found]).astype(np.float32)
    chips = np.empty((n, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        chips[i] = align_chip(images[i], landmarks[i])
    return {"chips": chips, "aligned": aligned, "landmarks": landmarks}


def _parallel_landmarks(
    model: Path, images: np.ndarray, workers: int = 2
) -> Callable[[np.ndarray], np.ndarray | None]:
    """``LandmarkDetector(model).landmarks`` of all ``images``, computed ahead in ``workers`` threads
    (OpenCV releases the GIL; each thread has its own network, which is not thread-safe). The
    returned callable hands them out in order, for :func:`build_chips`."""

    def detect_all(part: np.ndarray) -> list[np.ndarray | None]:
        detector = LandmarkDetector(model)
        return [detector.landmarks(img) for img in part]

    parts = np.array_split(np.arange(len(images)), workers)
    with ThreadPoolExecutor(workers) as pool:
        found = [p for batch in pool.map(detect_all, (images[idx] for idx in parts)) for p in batch]
    queue = iter(found)
    return lambda _image: next(queue)


def dataset_chips(
    source: str,
    data_dir: Path | None = None,
    *,
    yunet_path: Path | None = None,
    cache: bool = True,
) -> ChipSet:
    """The chips of every image of ``source`` ("lfw", "orl", "eyaleb", "yale"), in loader order.

    For "lfw" the rows follow ``load_lfw().images`` (so ``image_row`` and the pairs index them).
    Without ``cache`` (a site's own faces) the chips are built in memory and never written to disk.

    Raises:
        ConfigError: unknown source, or the YuNet model is missing or unreadable.
        DataError: the dataset is missing or corrupt.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown chip source {source!r}; use one of {', '.join(SOURCES)}")
    root = resolve_data_dir(data_dir)
    model = Path(yunet_path) if yunet_path is not None else root / YUNET_FILE
    if not model.is_file():
        raise ConfigError(
            f"YuNet model {model} not found; pass its path or put {YUNET_FILE} in the data directory"
        )
    images, labels, source_file = _source_images(source, root)
    require_file(source_file, f"{source} data")
    key = hashlib.sha256(
        f"{content_key(source_file)}\0{content_key(model)}\0{TEMPLATE_VERSION}".encode()
    ).hexdigest()[:16]
    cache_file = cache_dir() / f"chips-{source}-{key}.npz"
    seconds = 0.0

    def build() -> dict[str, np.ndarray]:
        nonlocal seconds
        start = time.perf_counter()
        arrays = build_chips(images, _parallel_landmarks(model, images))
        seconds = time.perf_counter() - start
        logger.info(
            "%s chips: %d images, YuNet found %.1f%%, %.1f s",
            source,
            len(images),
            100 * arrays["aligned"].mean(),
            seconds,
        )
        return arrays

    arrays = load_or_build(cache_file, build) if cache else build()
    chips = arrays.get("chips")
    if chips is None or chips.shape != (len(images), CHIP_SIZE, CHIP_SIZE, 3):
        raise DataError(
            f"chip cache {cache_file} does not match the {source} data; delete it and retry"
        )
    return ChipSet(
        source=source,
        chips=chips,
        labels=np.asarray(labels, dtype=np.int64),
        aligned=arrays["aligned"].astype(bool),
        landmarks=arrays["landmarks"],
        seconds=seconds,
    )
