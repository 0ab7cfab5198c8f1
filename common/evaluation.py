"""Scoring the two models: LFW verification (10-fold protocol) and FER2013 emotion accuracy / macro-F1.

Used by the server after every round and by ``facefed evaluate``. Both models use flip test-time
augmentation, as is standard for LFW and FER2013 reporting: the embedding of an image is the normalised
sum of its and its mirror's embeddings, and an emotion verdict is the class of highest mean probability
over the face and its mirror image (:func:`emotion_probabilities`; the on-device pipeline decides the
same way). The emotion scores also carry ``single_view_accuracy``, the face alone's verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import RunSettings
from common.data.chips import LandmarkDetector, build_chips, dataset_chips, default_yunet_path
from common.data.fer2013 import load_fer2013
from common.data.lfw import LfwData, load_lfw
from common.data.types import LabeledImages
from common.errors import DataError
from common.features import ModelInputs
from common.metrics import emotion_metrics, lfw_verification
from common.model_spec import ModelSpec

EVAL_SUBSET_SALT = 104729  # seeds the emotion-eval-limit subset, apart from the other seeded draws


@dataclass(frozen=True)
class VerificationSet:
    """The face module's inputs for the faces of some pairs, and the pairs to verify between them."""

    faces: torch.Tensor  # (M, 1, 112, 112) preprocessed faces, or frozen features (M, ...)
    flipped: torch.Tensor  # the same for the mirrored faces (flip test-time augmentation)
    left: np.ndarray  # row into faces, per pair
    right: np.ndarray
    same: np.ndarray  # bool per pair
    folds: np.ndarray  # fold per pair


@dataclass(frozen=True)
class EmotionSet:
    images: torch.Tensor  # (N, 1, 48, 48), or frozen features
    labels: np.ndarray
    flipped: torch.Tensor | None = None  # the mirrored faces (flip test-time augmentation)


def verification_set(
    lfw: LfwData,
    folds: tuple[int, ...] | None = None,
    inputs: ModelInputs | None = None,
    chips: np.ndarray | None = None,
) -> VerificationSet:
    """The pairs of the given 0-based folds (all folds when None), with only the images they use.

    ``inputs`` turns the images into the face module's inputs (default: the scratch family's);
    ``chips`` are the aligned chips of ``lfw.images`` (row for row), needed by the pretrained family.
    """
    pairs = [p for p in lfw.pairs if folds is None or p.fold in folds]
    if not pairs:
        raise DataError("no LFW pairs to evaluate; check the pairs file and lfw-eval-sets")
    rows = sorted(
        {lfw.image_row[(p.name1, p.num1)] for p in pairs}
        | {lfw.image_row[(p.name2, p.num2)] for p in pairs}
    )
    where = {row: i for i, row in enumerate(rows)}
    inputs = inputs or ModelInputs(ModelSpec())
    if inputs.face_needs_chips:
        if chips is None:  # an LFW folder of the user's: align the images of these pairs here
            detect = LandmarkDetector(default_yunet_path()).landmarks
            faces = inputs.face(build_chips(lfw.images[rows], detect)["chips"], flips=True)
        else:
            faces = inputs.face(chips[rows], flips=True)
    else:
        faces = inputs.face(lfw.images[rows], flips=True)
    assert faces.flipped is not None
    return VerificationSet(
        faces=faces.x,
        flipped=faces.flipped,
        left=np.array([where[lfw.image_row[(p.name1, p.num1)]] for p in pairs]),
        right=np.array([where[lfw.image_row[(p.name2, p.num2)]] for p in pairs]),
        same=np.array([p.same for p in pairs], dtype=bool),
        folds=np.array([p.fold for p in pairs]),
    )


def held_out_sets(
    settings: RunSettings, root: Path, inputs: ModelInputs
) -> tuple[VerificationSet, EmotionSet]:
    """The coordinator's evaluation sets: LFW pairs of ``lfw-eval-sets`` and FER2013 PublicTest.

    With ``emotion-eval-limit`` a seeded random subset of PublicTest is drawn (the split is stored class
    by class, so a prefix would be a single class).
    """
    data = load_lfw(data_dir=root)
    chips = dataset_chips("lfw", data_dir=root).chips if inputs.face_needs_chips else None
    lfw = verification_set(data, tuple(s - 1 for s in settings.lfw_eval_set_list), inputs, chips)
    fer = load_fer2013("PublicTest", data_dir=root)
    if settings.emotion_eval_limit and settings.emotion_eval_limit < len(fer):
        rng = np.random.default_rng([settings.seed, EVAL_SUBSET_SALT])
        fer = fer.subset(np.sort(rng.choice(len(fer), settings.emotion_eval_limit, replace=False)))
    return lfw, emotion_set(fer, inputs)


def emotion_set(fer: LabeledImages, inputs: ModelInputs | None = None) -> EmotionSet:
    """The emotion module's inputs for the faces and for their mirror images, and the labels."""
    inputs = inputs or ModelInputs(ModelSpec())
    mirrored = np.ascontiguousarray(fer.images[:, :, ::-1])
    return EmotionSet(
        images=inputs.emotion(fer.images),
        labels=fer.labels.astype(np.int64),
        flipped=inputs.emotion(mirrored),
    )


@torch.no_grad()
def embed(
    face: nn.Module, faces: torch.Tensor, flipped: torch.Tensor, batch: int = 256
) -> torch.Tensor:
    """Flip-augmented, L2-normalised embeddings: the face module on the inputs of the faces and of
    their mirror images."""
    face.eval()
    out = [
        F.normalize(face(x) + face(xf), dim=1)
        for x, xf in zip(faces.split(batch), flipped.split(batch), strict=True)
    ]
    return torch.cat(out)


def evaluate_face(face: nn.Module, data: VerificationSet) -> dict[str, float]:
    emb = embed(face, data.faces, data.flipped)
    scores = (emb[data.left] * emb[data.right]).sum(dim=1).numpy()
    result = lfw_verification(scores, data.same, data.folds)
    return {"lfw_accuracy": result.accuracy, "lfw_std": result.std}


def _probabilities(emotion: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return emotion(x).float().softmax(dim=1)


def emotion_probabilities(
    emotion: nn.Module, x: torch.Tensor, flipped: torch.Tensor
) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the class probabilities of the faces (the emotion
    module's inputs ``x``) and of their mirror images (``flipped``). A face and its mirror image get
    the same verdict."""
    return (_probabilities(emotion, x) + _probabilities(emotion, flipped)) / 2


@torch.no_grad()
def evaluate_emotion(emotion: nn.Module, data: EmotionSet, batch: int = 512) -> dict[str, float]:
    """Accuracy and macro-F1 of the verdicts; with ``data.flipped``, of the flip-augmented verdicts
    (:func:`emotion_probabilities`), with the single view's accuracy as ``single_view_accuracy``."""
    emotion.eval()
    alone = torch.cat([_probabilities(emotion, x) for x in data.images.split(batch)])
    single = emotion_metrics(alone.argmax(dim=1).numpy(), data.labels)
    if data.flipped is None:
        return single
    mirrored = torch.cat([_probabilities(emotion, x) for x in data.flipped.split(batch)])
    metrics = emotion_metrics(((alone + mirrored) / 2).argmax(dim=1).numpy(), data.labels)
    return metrics | {"single_view_accuracy": single["accuracy"]}
