"""Evaluation metrics: LFW k-fold verification accuracy, TAR at a fixed FAR, emotion accuracy and
macro-F1.

Conventions: a higher score means more similar, and a pair is declared "same" when its score is
strictly greater than the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VerificationResult:
    """LFW protocol result: mean and standard deviation over the held-out folds."""

    accuracy: float
    std: float  # population std (ddof=0) over folds, as the LFW reference code reports it
    fold_accuracies: tuple[float, ...]  # in increasing fold id order
    thresholds: tuple[float, ...]  # threshold chosen for each fold (on the other folds)


def _check_pairs(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same)
    if scores.ndim != 1 or scores.shape != same.shape:
        raise ValueError(
            f"Expected 1-D scores and same of equal length, got {scores.shape=} {same.shape=}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    if same.dtype != bool:
        if not np.isin(same, (0, 1)).all():
            raise ValueError("same must be boolean (or 0/1)")
        same = same.astype(bool)
    return scores, same


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold with the highest accuracy on ``(scores, same)``.

    Candidates are the midpoints between consecutive sorted unique scores, plus one below the
    minimum (accept all) and one above the maximum (reject all). Ties go to the smallest threshold.
    """
    scores, same = _check_pairs(scores, same)
    unique = np.unique(scores)
    candidates = np.concatenate(
        ([unique[0] - 1.0], (unique[:-1] + unique[1:]) / 2, [unique[-1] + 1.0])
    )
    genuine, impostor = np.sort(scores[same]), np.sort(scores[~same])
    # accepted genuine pairs: score > t; rejected impostor pairs: score <= t
    correct = (len(genuine) - np.searchsorted(genuine, candidates, side="right")) + np.searchsorted(
        impostor, candidates, side="right"
    )
    return float(candidates[int(np.argmax(correct))])


def lfw_verification(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    """Verification accuracy under the standard LFW protocol (LFW_README.txt, 2c).

    For each fold ``f``, the threshold is chosen by :func:`best_threshold` on all pairs of the other
    folds, then accuracy is measured on fold ``f``. The result is the mean and the (ddof=0) standard
    deviation of the per-fold accuracies.

    Args:
        scores: ``(P,)`` similarity of each pair.
        same: ``(P,)`` whether each pair shows the same person.
        folds: ``(P,)`` fold id of each pair (any integers; at least two distinct).

    Raises:
        ValueError: on mismatched shapes, non-finite scores, or fewer than two folds.
    """
    scores, same = _check_pairs(scores, same)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"Expected folds of shape {scores.shape}, got {folds.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"The LFW protocol needs >= 2 folds, got {len(fold_ids)}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(float(np.mean((scores[test] > threshold) == same[test])))
        thresholds.append(threshold)
    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        fold_accuracies=tuple(accuracies),
        thresholds=tuple(thresholds),
    )


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """True accept rate at the lowest threshold whose false accept rate is at most ``far``.

    With ``k = floor(far * #impostor pairs)`` the threshold is the ``(k+1)``-th highest impostor
    score, so at most ``k`` impostor scores lie strictly above it; lowering it further would accept
    one more. When ``far`` allows every impostor through, the threshold lies just below the lowest
    score.

    Returns:
        ``(TAR, threshold)``.

    Raises:
        ValueError: if ``far`` is outside ``[0, 1]`` or either class has no pairs.
    """
    scores, same = _check_pairs(scores, same)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"Expected 0 <= far <= 1, got {far=}")
    genuine, impostor = scores[same], np.sort(scores[~same])[::-1]
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError("TAR@FAR needs both genuine (same) and impostor (different) pairs")
    allowed = int(np.floor(far * len(impostor) + 1e-9))  # tolerance: 0.001 * 1000 must give 1
    if allowed >= len(impostor):
        threshold = float(np.nextafter(scores.min(), -np.inf))
    else:
        threshold = float(impostor[allowed])
    return float(np.mean(genuine > threshold)), threshold


def emotion_metrics(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int = 7
) -> dict[str, float]:
    """Accuracy and macro-F1 of class predictions.

    Macro-F1 is the unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that
    occur in ``labels`` or in ``predictions``. A class with neither support nor predictions has an
    undefined F1 and is left out (so scoring a subset without "disgust" is not penalised); a class
    that is predicted but never present, or present but never predicted, counts with F1 = 0.

    Returns:
        ``{"accuracy": ..., "macro_f1": ...}``.

    Raises:
        ValueError: on empty or mismatched inputs, or labels outside ``0..num_classes-1``.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape or len(labels) == 0:
        raise ValueError(
            f"Expected equal non-empty 1-D arrays, got {predictions.shape=} {labels.shape=}"
        )
    for name, values in (("predictions", predictions), ("labels", labels)):
        if (
            not np.issubdtype(values.dtype, np.integer)
            or values.min() < 0
            or values.max() >= num_classes
        ):
            raise ValueError(f"{name} must be integers in 0..{num_classes - 1}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return {"accuracy": float(tp.sum() / len(labels)), "macro_f1": float(f1.mean())}
