"""Evaluation metrics: the LFW protocol, TAR@FAR and emotion accuracy / macro-F1."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.metrics import best_threshold, emotion_metrics, lfw_verification, tar_at_far

# ---------------------------------------------------------------- LFW protocol, by hand
#
# fold A: same 0.9, 0.6   different 0.5, 0.1
# fold B: same 0.8, 0.3   different 0.4, 0.2
# fold C: same 0.7, 0.65  different 0.35, 0.15
#
# Test A, threshold from B+C (sorted: .15d .2d .3s .35d .4d .65s .7s .8s): t = (.4+.65)/2 = .525
#   gets 7/8 (every other midpoint gets <= 6). On A: .9 .6 accepted, .5 .1 rejected -> 4/4.
# Test B, threshold from A+C (sorted: .1d .15d .35d .5d .6s .65s .7s .9s): separable, t = .55 gets
#   8/8. On B: .8 accepted, .3 wrongly rejected, .4 .2 rejected -> 3/4.
# Test C, threshold from A+B (sorted: .1d .2d .3s .4d .5d .6s .8s .9s): t = .55 gets 7/8.
#   On C -> 4/4.
# Mean (1 + .75 + 1) / 3 = 11/12; std (ddof=0) = sqrt(((1/12)^2 * 2 + (1/6)^2) / 3) = sqrt(1/72).

HAND_SCORES = np.array([0.9, 0.6, 0.5, 0.1, 0.8, 0.3, 0.4, 0.2, 0.7, 0.65, 0.35, 0.15])
HAND_SAME = np.array([True, True, False, False] * 3)
HAND_FOLDS = np.repeat([0, 1, 2], 4)


def test_lfw_protocol_reproduces_the_hand_computed_result() -> None:
    result = lfw_verification(HAND_SCORES, HAND_SAME, HAND_FOLDS)

    assert result.fold_accuracies == pytest.approx((1.0, 0.75, 1.0))
    assert result.thresholds == pytest.approx((0.525, 0.55, 0.55))
    assert result.accuracy == pytest.approx(11 / 12)
    assert result.std == pytest.approx(math.sqrt(1 / 72))


def test_lfw_threshold_is_not_tuned_on_the_test_fold() -> None:
    # Fold 0 is inverted relative to folds 1 and 2. The threshold learnt on folds 1+2 (0.5) gets
    # every pair of fold 0 wrong; a threshold tuned on fold 0 itself would get at least half right.
    scores = np.array([0.2, 0.8, 0.9, 0.1, 0.85, 0.15])
    same = np.array([True, False, True, False, True, False])
    folds = np.array([0, 0, 1, 1, 2, 2])

    result = lfw_verification(scores, same, folds)

    assert result.thresholds[0] == pytest.approx(0.5)
    assert result.fold_accuracies[0] == 0.0
    assert best_threshold(scores[:2], same[:2]) != pytest.approx(0.5)


def test_fold_ids_need_not_be_contiguous() -> None:
    relabelled = np.array([10, 30, 20])[HAND_FOLDS]
    result = lfw_verification(HAND_SCORES, HAND_SAME, relabelled)
    assert result.fold_accuracies == pytest.approx((1.0, 1.0, 0.75))  # order of sorted fold ids


def test_perfectly_separable_scores_give_full_accuracy() -> None:
    rng = np.random.default_rng(0)
    same = rng.random(600) < 0.5
    scores = np.where(same, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))

    result = lfw_verification(scores, same, np.repeat(np.arange(10), 60))

    assert result.accuracy == 1.0 and result.std == 0.0


def test_random_scores_give_chance_accuracy() -> None:
    rng = np.random.default_rng(1)
    same = np.tile([True, False], 1500)
    result = lfw_verification(rng.random(3000), same, np.repeat(np.arange(5), 600))
    assert 0.45 < result.accuracy < 0.55


def test_lfw_protocol_needs_two_folds() -> None:
    with pytest.raises(ValueError, match=">= 2 folds"):
        lfw_verification(HAND_SCORES, HAND_SAME, np.zeros(12, np.int64))


def test_lfw_protocol_rejects_nan_scores() -> None:
    scores = HAND_SCORES.copy()
    scores[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lfw_verification(scores, HAND_SAME, HAND_FOLDS)


# ---------------------------------------------------------------- LFW protocol vs brute force


def _brute_force_lfw(scores: list[float], same: list[bool], folds: list[int]) -> list[float]:
    accuracies = []
    for fold in sorted(set(folds)):
        train = [(s, y) for s, y, f in zip(scores, same, folds, strict=True) if f != fold]
        test = [(s, y) for s, y, f in zip(scores, same, folds, strict=True) if f == fold]
        values = sorted({s for s, _ in train})
        candidates = (
            [values[0] - 1.0]
            + [(a + b) / 2 for a, b in itertools.pairwise(values)]
            + [values[-1] + 1.0]
        )
        best_t, best_correct = candidates[0], -1
        for t in candidates:
            correct = sum((s > t) == y for s, y in train)
            if correct > best_correct:  # strict: first (smallest) threshold wins ties
                best_t, best_correct = t, correct
        accuracies.append(sum((s > best_t) == y for s, y in test) / len(test))
    return accuracies


@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(
                [-1.0, -0.5, 0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]
            ),  # ties on purpose
            st.booleans(),
            st.integers(min_value=0, max_value=3),
        ),
        min_size=2,
        max_size=40,
    ).filter(lambda rows: len({f for _, _, f in rows}) >= 2)
)
def test_lfw_protocol_matches_brute_force(rows: list[tuple[float, bool, int]]) -> None:
    scores, same, folds = (list(col) for col in zip(*rows, strict=True))

    result = lfw_verification(np.array(scores), np.array(same), np.array(folds))

    expected = _brute_force_lfw(scores, same, folds)
    assert result.fold_accuracies == pytest.approx(tuple(expected))
    assert result.accuracy == pytest.approx(float(np.mean(expected)))


# ---------------------------------------------------------------- TAR @ FAR

TAR_IMPOSTOR = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3]
TAR_GENUINE = [0.95, 0.6, 0.45, 0.35, 0.1]


@pytest.mark.parametrize(
    ("far", "tar", "threshold"),
    [
        (0.0, 0.2, 0.9),  # no impostor above 0.9: only 0.95 accepted
        (0.1, 0.4, 0.5),  # one impostor (0.9) may pass: threshold 0.5, accepts 0.95, 0.6
        (0.2, 0.6, 0.4),
        (0.15, 0.4, 0.5),  # floor(1.5) = 1 impostor allowed
    ],
)
def test_tar_at_far_on_a_hand_computed_fixture(far: float, tar: float, threshold: float) -> None:
    scores = np.array(TAR_IMPOSTOR + TAR_GENUINE)
    same = np.array([False] * 10 + [True] * 5)

    got_tar, got_threshold = tar_at_far(scores, same, far)

    assert got_tar == pytest.approx(tar)
    assert got_threshold == pytest.approx(threshold)


def test_tar_at_far_one_accepts_everyone() -> None:
    scores = np.array(TAR_IMPOSTOR + TAR_GENUINE)
    same = np.array([False] * 10 + [True] * 5)
    tar, threshold = tar_at_far(scores, same, 1.0)
    assert tar == 1.0 and threshold < scores.min()


@pytest.mark.parametrize("far", [-0.1, 1.5])
def test_tar_at_far_rejects_far_outside_unit_interval(far: float) -> None:
    with pytest.raises(ValueError, match="far"):
        tar_at_far(np.array([0.1, 0.2]), np.array([True, False]), far)


def test_tar_at_far_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="impostor"):
        tar_at_far(np.array([0.1, 0.2]), np.array([True, True]), 0.1)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]), st.booleans()),
        min_size=2,
        max_size=40,
    ).filter(lambda rows: len({y for _, y in rows}) == 2),
    far=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.99, 1.0]),
)
def test_tar_at_far_matches_brute_force(rows: list[tuple[float, bool]], far: float) -> None:
    scores = np.array([s for s, _ in rows])
    same = np.array([y for _, y in rows])
    impostor, genuine = scores[~same], scores[same]
    candidates = sorted({*scores.tolist(), float(np.nextafter(scores.min(), -np.inf))})
    # lowest threshold whose empirical FAR (impostors strictly above) is within the budget
    expected_t = next(t for t in candidates if np.sum(impostor > t) <= far * len(impostor) + 1e-9)

    tar, threshold = tar_at_far(scores, same, far)

    assert threshold == expected_t
    assert tar == pytest.approx(float(np.mean(genuine > expected_t)))
    assert np.mean(impostor > threshold) <= far + 1e-9


# ---------------------------------------------------------------- emotion metrics


def test_emotion_metrics_on_a_hand_computed_fixture() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    # F1 per class: 0 -> 2*1/(2+2) = .5; 1 -> 2*2/(2+3) = .8; 2 -> 2*1/(2+1) = 2/3; 3-6 absent

    metrics = emotion_metrics(predictions, labels)

    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_macro_f1_counts_a_predicted_but_absent_class_as_zero() -> None:
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 0, 1, 3])  # class 3 never present: F1 = 0, included

    metrics = emotion_metrics(predictions, labels)

    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_perfect_predictions_score_one() -> None:
    labels = np.arange(7).repeat(3)
    assert emotion_metrics(labels, labels) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_majority_class_guessing_has_low_macro_f1() -> None:
    labels = np.array([3] * 90 + [0] * 5 + [6] * 5)
    metrics = emotion_metrics(np.full(100, 3), labels)
    assert metrics["accuracy"] == pytest.approx(0.9)
    assert metrics["macro_f1"] < 0.35


@pytest.mark.parametrize(
    ("predictions", "labels"),
    [
        (np.array([0, 7]), np.array([0, 1])),  # out of range
        (np.array([0, -1]), np.array([0, 1])),
        (np.array([0]), np.array([0, 1])),  # length mismatch
        (np.array([], np.int64), np.array([], np.int64)),  # empty
        (np.array([0.0, 1.0]), np.array([0, 1])),  # not integers
    ],
)
def test_emotion_metrics_rejects_bad_input(predictions: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        emotion_metrics(predictions, labels)
