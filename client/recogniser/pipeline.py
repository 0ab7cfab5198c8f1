"""On-device face pipeline: image -> detection -> alignment -> embedding / emotion. Nothing leaves.

**Detection.** :class:`YuNetDetector` (``cv2.FaceDetectorYN``, boxes plus 5 landmarks) is the default
for the dlib chip model (:class:`common.facenet.resnet.ChipEmbedder`) whenever its ONNX file is found
(:func:`default_detector`: an explicit path, else ``FACEFED_YUNET``, else
``<data dir>/face_detection_yunet_2026may.onnx``); :class:`HaarDetector` (OpenCV's frontal-face
cascade, shipped in the ``opencv-python-headless`` 4.x wheel) is the fallback, and stays the default
for the older 112x112 models (their calibrations were measured with it).

**Chip models** (:class:`~common.facenet.resnet.ChipEmbedder`) take dlib's 150x150 RGB face chips:
:class:`ChipAligner` maps the face onto :data:`common.facenet.chips.CHIP_TEMPLATE` with the same three
methods as below (5 landmarks; the two Haar eye centres onto the template's eyes; the Haar box, placed
where it sits in chips). Everything below about :data:`LFW112_TEMPLATE` applies to the older 112x112
models, whose behaviour is unchanged.

**Alignment** maps the face onto the geometry the embedder was trained on. The training faces are
the LFW 112x112 centre crops, *not* ArcFace-aligned faces, so the target is :data:`LFW112_TEMPLATE`:
the median YuNet landmarks over 600 of those crops (ArcFace's template would put the mouth 13 px
lower than
the model has ever seen). Three methods, best first:

1. ``landmarks5`` (YuNet): least-squares similarity transform of the 5 points onto the template
   (``cv2.estimateAffinePartial2D``, LMedS);
2. ``eyes`` (Haar): the eye cascade inside the upper face box; the two eye centres fix rotation,
   scale and translation (a similarity transform) onto the template's eyes;
3. ``box`` (Haar, eyes not found): the square around the face box, scaled as the Haar box sits in
   the training crops (83/112), no rotation.

**Outcomes** are explicit (:class:`FaceStatus`): no face, more than one face (an error unless the
policy is ``"largest"``), a face too small to embed reliably. Faces smaller than ``min_face`` do not
count as "another face", so background false positives of the cascade do not block a clear photo.

**Emotion** is decided as ``facefed evaluate`` scores it: the mean of the class probabilities of the
face and of its mirror image (:func:`common.evaluation.emotion_probabilities`).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
from torch import nn

from common.data.chips import open_yunet
from common.data.preprocess import FACE_SIZE, emotion_tensor, face_tensor
from common.errors import ConfigError, DataError
from common.evaluation import emotion_probabilities
from common.facenet.chips import (
    CHIP_TEMPLATE,
    as_rgb,
    chip_transform,
    refine_landmarks,
    warp_chip,
)
from common.facenet.resnet import ChipEmbedder, chip_tensor

logger = logging.getLogger(__name__)

# Median YuNet landmarks (right eye, left eye, nose, right mouth, left mouth; image x, y) on 600
# LFW112
# training crops. The Haar box in those crops is (14, 14, 83, 83) in median.
LFW112_TEMPLATE = np.array(
    [[39.84, 46.10], [72.41, 45.73], [55.67, 64.27], [43.11, 79.73], [71.17, 78.70]],
    dtype=np.float32,
)
_HAAR_BOX_FRACTION = 83.0 / 112.0
# The emotion model sees the centre of the aligned face (FER2013 crops are tighter than LFW's).
EMOTION_CROP = (slice(8, 104), slice(8, 104))

YUNET_ENV = "FACEFED_YUNET"
YUNET_FILE = "face_detection_yunet_2026may.onnx"
# Where the Haar box sits in dlib chips: median over 231 LFW/Yale images of the Haar box mapped into
# the chip by YuNet's landmarks: centre (73.3, 61.9) in chip pixel coordinates, side 142.3 px.
_CHIP_HAAR_CENTRE = (73.3, 61.9)
_CHIP_HAAR_SIDE = 142.3
# FER2013's framing inside a chip. YuNet on 197 of 200 random FER2013 PublicTest images (upscaled 4x)
# puts the median landmarks at (14.18, 17.63), (33.00, 17.94), (23.57, 28.20), (16.39, 35.60),
# (31.12, 35.78) in 48x48 pixels; the least-squares similarity taking CHIP_TEMPLATE onto them has
# scale 0.3260, rotation 0.1 degrees, so a FER image is the square of side 147.3 chip pixels whose
# top-left corner is at (0.28, -8.66) (pixel edges): nearly the whole chip, moved 8.7 px up.
EMOTION_CHIP_BOX = (0.28, -8.66, 147.26)  # (left, top, side) in chip pixels

MultiFacePolicy = Literal["error", "largest"]
AlignMethod = Literal["landmarks5", "eyes", "box"]


class FaceStatus(enum.StrEnum):
    """What detection found in an image."""

    OK = "ok"
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    TOO_SMALL = "too_small"


@dataclass(frozen=True)
class Detection:
    """A face box ``(x, y, w, h)`` in pixels, its score and (YuNet only) 5 landmarks ``(5, 2)``."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None

    @property
    def side(self) -> float:
        """The shorter side of the box, in pixels."""
        return min(self.box[2], self.box[3])


@dataclass(frozen=True)
class FaceResult:
    """The outcome for one image: the aligned RGB face (a 150x150 chip for chip models, else
    112x112) only when ``status`` is OK."""

    status: FaceStatus
    n_faces: int
    detection: Detection | None = None
    face: np.ndarray | None = None
    method: AlignMethod | None = None

    def require(self, name: str, min_face: int) -> np.ndarray:
        """Return the aligned face, or raise a one-line :class:`DataError` explaining why not."""
        if self.status is FaceStatus.OK and self.face is not None:
            return self.face
        if self.status is FaceStatus.NO_FACE:
            msg = f"no face found in {name}; use a well-lit frontal photo of one person"
        elif self.status is FaceStatus.MULTIPLE_FACES:
            msg = (
                f"{self.n_faces} faces found in {name}; crop it to one person or pass --largest "
                "to use the largest face"
            )
        else:
            side = 0.0 if self.detection is None else self.detection.side
            msg = (
                f"the face in {name} is too small ({side:.0f} px, need >= {min_face} px); "
                "use a closer or higher-resolution photo"
            )
        raise DataError(msg)


class Detector(Protocol):
    """Anything that finds faces in an RGB uint8 image."""

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


class HaarDetector:
    """OpenCV's Haar frontal-face cascade (Viola & Jones 2001). Finds boxes, no landmarks."""

    def __init__(self, min_size: int = 24) -> None:
        self._faces = _cascade("haarcascade_frontalface_default.xml")
        self.min_size = min_size

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        found = self._faces.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_size, self.min_size)
        )
        return [Detection(box=_box(b), score=1.0) for b in found]


class YuNetDetector:
    """YuNet (``cv2.FaceDetectorYN``): boxes plus 5 landmarks."""

    def __init__(self, model_path: Path, score_threshold: float = 0.8) -> None:
        self._net = open_yunet(
            model_path,
            score_threshold,
            "pass --detector-model PATH to an ONNX file or leave it unset to use the Haar cascade",
        )

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None:
            return []
        return [
            Detection(box=_box(f[:4]), score=float(f[14]), landmarks=f[4:14].reshape(5, 2))
            for f in faces
        ]

    def central_landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """The 5 landmarks of the face nearest the image centre, or None (landmark refinement)."""
        found = self.detect(rgb)
        if not found:
            return None
        centre = np.array([rgb.shape[1], rgb.shape[0]]) / 2
        best = min(
            found,
            key=lambda d: float(
                np.hypot(*(np.array(d.box[:2]) + np.array(d.box[2:]) / 2 - centre))
            ),
        )
        return best.landmarks


def _box(values: Sequence[float] | np.ndarray) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in values)
    return x, y, w, h


def _cascade(name: str) -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / name  # type: ignore[attr-defined]
    classifier = cv2.CascadeClassifier(str(path))
    if classifier.empty():
        raise ConfigError(
            f"OpenCV cascade {path} is missing; install opencv-python-headless 4.x "
            "(the 5.x wheels ship no cascades) or pass --detector-model for YuNet"
        )
    return classifier


def _similarity_from_eyes(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform taking 2 source points exactly onto 2 destination points."""
    s, d = src[1] - src[0], dst[1] - dst[0]
    scale = np.linalg.norm(d) / max(float(np.linalg.norm(s)), 1e-6)
    angle = np.arctan2(d[1], d[0]) - np.arctan2(s[1], s[0])
    a, b = scale * np.cos(angle), scale * np.sin(angle)
    rot = np.array([[a, -b], [b, a]])
    t = dst[0] - rot @ src[0]
    return np.hstack([rot, t[:, None]]).astype(np.float64)


@dataclass
class Aligner:
    """Warps a detected face onto :data:`LFW112_TEMPLATE` (see the module docstring)."""

    template: np.ndarray = field(default_factory=lambda: LFW112_TEMPLATE.copy())

    def __post_init__(self) -> None:
        self._eyes = _cascade("haarcascade_eye.xml")

    def _eye_centres(self, gray: np.ndarray, det: Detection) -> np.ndarray | None:
        x, y, w, h = (round(v) for v in det.box)
        top, bottom = y + int(0.15 * h), y + int(0.55 * h)
        roi = gray[max(top, 0) : max(bottom, 0), max(x, 0) : max(x + w, 0)]
        if roi.size == 0:
            return None
        min_eye = max(int(w * 0.12), 8)
        eyes = self._eyes.detectMultiScale(roi, 1.1, 3, minSize=(min_eye, min_eye))
        centres = [
            (ex + ew / 2 + max(x, 0), ey + eh / 2 + max(top, 0), ew * eh) for ex, ey, ew, eh in eyes
        ]
        mid = x + w / 2
        left = [c for c in centres if c[0] < mid]  # image-left = the person's right eye
        right = [c for c in centres if c[0] >= mid]
        if not left or not right:
            return None
        p0 = max(left, key=lambda c: c[2])[:2]
        p1 = max(right, key=lambda c: c[2])[:2]
        pts = np.array([p0, p1], dtype=np.float64)
        dist = float(np.linalg.norm(pts[1] - pts[0]))
        tilt = abs(np.degrees(np.arctan2(pts[1, 1] - pts[0, 1], pts[1, 0] - pts[0, 0])))
        if not (0.25 * w <= dist <= 0.7 * w) or tilt > 30:
            return None
        return pts

    def align(self, rgb: np.ndarray, det: Detection) -> tuple[np.ndarray, AlignMethod]:
        """Return the aligned ``(112, 112, 3)`` uint8 face and the method used."""
        method: AlignMethod
        if det.landmarks is not None:
            matrix, _ = cv2.estimateAffinePartial2D(
                det.landmarks.astype(np.float32), self.template, method=cv2.LMEDS
            )
            method = "landmarks5"
        else:
            matrix, method = None, "box"
            eyes = self._eye_centres(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), det)
            if eyes is not None:
                matrix, method = (
                    _similarity_from_eyes(eyes, self.template[:2].astype(np.float64)),
                    "eyes",
                )
        if matrix is None:
            x, y, w, h = det.box
            scale = _HAAR_BOX_FRACTION * FACE_SIZE / max(w, h)
            cx, cy = x + w / 2, y + h / 2
            matrix = np.array(
                [[scale, 0, FACE_SIZE / 2 - scale * cx], [0, scale, FACE_SIZE / 2 - scale * cy]]
            )
            method = "box"
        face = cv2.warpAffine(
            rgb,
            matrix,
            (FACE_SIZE, FACE_SIZE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return face, method


class ChipAligner(Aligner):
    """Warps a detected face onto dlib's chip template (:mod:`common.facenet.chips`)."""

    def __init__(self, refine: Callable[[np.ndarray], np.ndarray | None] | None = None) -> None:
        super().__init__(template=CHIP_TEMPLATE.copy())
        self.refine = refine  # re-detects landmarks on an upright view (common.facenet.chips)

    def align(self, rgb: np.ndarray, det: Detection) -> tuple[np.ndarray, AlignMethod]:
        """Return the ``(150, 150, 3)`` uint8 RGB chip and the method used."""
        rgb = as_rgb(rgb)
        method: AlignMethod
        if det.landmarks is not None:
            points = det.landmarks
            if self.refine is not None:
                points = refine_landmarks(rgb, points, self.refine)
            matrix, method = chip_transform(points), "landmarks5"
        else:
            eyes = self._eye_centres(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), det)
            if eyes is not None:
                matrix = _similarity_from_eyes(eyes, CHIP_TEMPLATE[:2].astype(np.float64))
                method = "eyes"
            else:
                x, y, w, h = det.box
                scale = _CHIP_HAAR_SIDE / max(w, h)
                cx, cy = x + w / 2 - 0.5, y + h / 2 - 0.5  # pixel-centre coordinates
                matrix = np.array(
                    [
                        [scale, 0, _CHIP_HAAR_CENTRE[0] - scale * cx],
                        [0, scale, _CHIP_HAAR_CENTRE[1] - scale * cy],
                    ]
                )
                method = "box"
        return warp_chip(rgb, matrix), method


def emotion_crop_of_chip(chip: np.ndarray) -> np.ndarray:
    """The part of a 150x150 chip framed like a FER2013 image (:data:`EMOTION_CHIP_BOX`)."""
    left, top, side = EMOTION_CHIP_BOX
    n = round(side)
    matrix = np.array([[1.0, 0.0, -left], [0.0, 1.0, -top]])  # pixel edges and centres shift alike
    return cv2.warpAffine(
        chip, matrix, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def default_yunet_path(explicit: Path | str | None = None) -> Path | None:
    """The YuNet model to use: ``explicit``, else ``FACEFED_YUNET``, else the data directory's
    ``face_detection_yunet_2026may.onnx`` if it exists; None when there is none (use Haar).
    """
    if explicit not in (None, ""):
        return Path(explicit)
    if os.environ.get(YUNET_ENV):
        return Path(os.environ[YUNET_ENV]).expanduser()
    from common.paths import data_dir

    try:
        candidate = data_dir() / YUNET_FILE
    except DataError:
        return None
    return candidate if candidate.is_file() else None


def default_detector(model_path: Path | str | None = None) -> Detector:
    """YuNet when a model file is given or found (:func:`default_yunet_path`), else Haar.

    Raises:
        ConfigError: an explicit path or ``FACEFED_YUNET`` names a missing or unreadable file.
    """
    path = default_yunet_path(model_path)
    return HaarDetector() if path is None else YuNetDetector(path)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How the pipeline treats detections."""

    min_face: int = 40
    multi_face: MultiFacePolicy = "error"

    def __post_init__(self) -> None:
        if self.min_face < 16:
            raise ConfigError(f"min_face must be >= 16 px, got {self.min_face}")
        if self.multi_face not in ("error", "largest"):
            raise ConfigError(f"multi_face must be 'error' or 'largest', got {self.multi_face!r}")


@dataclass(frozen=True)
class EmotionResult:
    """The emotion model's verdict on one face (probabilities averaged with its mirror image's)."""

    label: str
    index: int
    probabilities: dict[str, float]


def emotion_names() -> tuple[str, ...]:
    """The 7 FER2013 class names, from the data module when available."""
    try:
        from common.data.fer2013 import EMOTIONS

        return tuple(EMOTIONS)
    except ImportError:
        return ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def model_tag(model: nn.Module) -> str:
    """A short fingerprint of a model's weights; templates compare only under the same tag."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FacePipeline:
    """Detection, alignment and the two federated models, all on the local CPU."""

    def __init__(
        self,
        embedder: nn.Module,
        emotion_net: nn.Module | None = None,
        *,
        detector: Detector | None = None,
        config: PipelineConfig | None = None,
    ) -> None:
        self.embedder = embedder.eval()
        self.emotion_net = None if emotion_net is None else emotion_net.eval()
        self.chips = isinstance(embedder, ChipEmbedder)
        if detector is None:
            detector = default_detector() if self.chips else HaarDetector()
        self.detector: Detector = detector
        self.config = config or PipelineConfig()
        refine = detector.central_landmarks if isinstance(detector, YuNetDetector) else None
        self.aligner: Aligner = ChipAligner(refine) if self.chips else Aligner()
        self.model_tag = model_tag(self.embedder)

    def locate(self, rgb: np.ndarray) -> FaceResult:
        """Detect, apply the multi-face policy and the size limit, and align.

        ``rgb`` is ``(H, W, 3)`` RGB uint8; a gray ``(H, W)`` image is taken as 3 equal channels.
        """
        rgb = as_rgb(rgb)
        detections = self.detector.detect(rgb)
        if not detections:
            return FaceResult(FaceStatus.NO_FACE, 0)
        usable = [d for d in detections if d.side >= self.config.min_face]
        if not usable:
            biggest = max(detections, key=lambda d: d.side)
            return FaceResult(FaceStatus.TOO_SMALL, len(detections), detection=biggest)
        if len(usable) > 1 and self.config.multi_face == "error":
            return FaceResult(FaceStatus.MULTIPLE_FACES, len(usable))
        chosen = max(usable, key=lambda d: d.box[2] * d.box[3])
        face, method = self.aligner.align(rgb, chosen)
        return FaceResult(FaceStatus.OK, len(usable), detection=chosen, face=face, method=method)

    def aligned_face(self, rgb: np.ndarray, name: str = "the image") -> np.ndarray:
        """The aligned face of the single person in ``rgb``, or a one-line :class:`DataError`."""
        return self.locate(rgb).require(name, self.config.min_face)

    @torch.inference_mode()
    def embed_faces(self, faces: np.ndarray, batch: int = 256) -> np.ndarray:
        """Aligned ``(N, 112, 112, 3)`` uint8 faces (``(N, 150, 150, 3)`` chips for chip models) ->
        ``(N, D)`` float32 unit embeddings.

        Flip-augmented exactly like ``common.evaluation.embed`` (the embedding of the face plus that
        of its mirror image, renormalised), so LFW-calibrated thresholds apply unchanged.
        """
        x = chip_tensor(faces) if self.chips else face_tensor(faces)
        out = torch.cat(
            [
                torch.nn.functional.normalize(self.embedder(b) + self.embedder(b.flip(-1)), dim=1)
                for b in x.split(batch)
            ]
        )
        return out.float().cpu().numpy()

    def embed(self, rgb: np.ndarray, name: str = "the image") -> np.ndarray:
        """One image -> its face's unit embedding ``(D,)``."""
        return self.embed_faces(self.aligned_face(rgb, name)[None])[0]

    def template(self, images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
        """Enrolment template: the mean of the images' unit embeddings, renormalised."""
        if not images:
            raise DataError("no images given; pass at least one photo of the person")
        faces = np.stack([self.aligned_face(img, n) for img, n in zip(images, names, strict=True)])
        mean = self.embed_faces(faces).mean(axis=0)
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)

    @torch.inference_mode()
    def emotion(self, rgb: np.ndarray, name: str = "the image") -> EmotionResult:
        """Classify the expression of the single face in ``rgb``."""
        if self.emotion_net is None:
            raise ConfigError("this pipeline has no emotion model; load a checkpoint that has one")
        aligned = self.aligned_face(rgb, name)
        face = emotion_crop_of_chip(aligned) if self.chips else aligned[EMOTION_CROP]
        x = emotion_tensor(face[None])
        probs = emotion_probabilities(self.emotion_net, x, x.flip(-1))[0].cpu().numpy()
        names = emotion_names()
        index = int(np.argmax(probs))
        return EmotionResult(
            label=names[index],
            index=index,
            probabilities={n: round(float(p), 4) for n, p in zip(names, probs, strict=True)},
        )


def load_pipeline(
    checkpoint: Path,
    *,
    detector_model: Path | None = None,
    config: PipelineConfig | None = None,
) -> tuple[FacePipeline, dict[str, object]]:
    """Build the pipeline from a federated checkpoint (``common.checkpoint.load_models``)."""
    from common.checkpoint import load_models

    if not Path(checkpoint).is_file():
        raise ConfigError(
            f"checkpoint {checkpoint} not found; pass --checkpoint PATH or set FACEFED_CHECKPOINT "
            "to a trained facefed checkpoint"
        )
    embedder, emotion_net, meta = load_models(Path(checkpoint))
    detector: Detector
    if detector_model is not None:
        detector = YuNetDetector(detector_model)
    elif isinstance(embedder, ChipEmbedder):
        detector = default_detector()
    else:
        detector = HaarDetector()
    return FacePipeline(embedder, emotion_net, detector=detector, config=config), dict(meta)
