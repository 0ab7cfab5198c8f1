"""bench.face_recognition_lfw: how each pipeline's photos become pair scores and a row of the table."""

from __future__ import annotations

import numpy as np
import pytest

from bench.face_recognition_lfw import (
    both_found,
    cosine,
    describe_all,
    largest,
    minus_distance,
    pair_scores,
    score,
)
from common.data.lfw import LfwPair, photo_member


def _pairs() -> list[LfwPair]:
    return [
        LfwPair("A", 1, "A", 2, True, 0),
        LfwPair("A", 1, "B", 1, False, 0),
        LfwPair("B", 1, "B", 2, True, 1),
        LfwPair("A", 2, "B", 2, False, 1),
    ]


def _descriptors(**vectors: list[float] | None) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for key, v in vectors.items():
        name, num = key[0], int(key[1])
        out[photo_member(name, num)] = None if v is None else np.array(v, np.float64)
    return out


def test_the_largest_box_is_chosen_whatever_its_place() -> None:
    boxes = [(0, 30, 20, 10), (5, 90, 65, 30), (0, 200, 10, 100)]  # areas 400, 3600, 1000

    assert largest(boxes) == (5, 90, 65, 30)


def test_a_pair_missing_a_face_scores_below_every_pair_with_both_faces() -> None:
    descriptors = _descriptors(A1=[0.0, 0.0], A2=[0.3, 0.0], B1=[2.0, 0.0], B2=None)

    scores = pair_scores(_pairs(), descriptors, minus_distance)

    assert scores[:2] == pytest.approx([-0.3, -2.0])
    assert scores[2] == scores[3] == pytest.approx(-3.0)


def test_cosine_ignores_length_and_minus_distance_does_not() -> None:
    a, b = np.array([1.0, 0.0]), np.array([3.0, 0.0])

    assert cosine(a, b) == pytest.approx(1.0)
    assert minus_distance(a, b) == pytest.approx(-2.0)


def test_a_row_scores_the_tolerance_as_compare_faces_does_and_takes_the_median_time() -> None:
    # same-person pairs at distance 0.5 and 0.7, different-person pairs at 0.59 and 1.2
    descriptors = _descriptors(A1=[0.0], A2=[0.5], B1=[0.59], B2=[1.29])
    pairs = _pairs()
    pairs[2] = LfwPair("B", 1, "B", 2, True, 1)  # 0.59 -> 1.29: distance 0.7
    pairs[3] = LfwPair("A", 2, "B", 2, False, 1)  # 0.5 -> 1.29: distance 0.79
    runs = [(descriptors, 0.8), (descriptors, 0.4), (descriptors, 2.0)]

    row = score("theirs", pairs, runs, minus_distance, tolerance=0.6)

    # verdicts at 0.6: same (right), same (wrong: 0.59), different (wrong: 0.7), different (right)
    assert row["accuracy_at_tolerance"] == 0.5
    assert row["no_face"] == 0
    assert row["ms_per_photo"] == pytest.approx(1000 * 0.8 / 4)
    assert row["ms_per_photo_runs"] == [200.0, 100.0, 500.0]


def test_a_row_counts_the_photos_without_a_face_and_scores_their_pairs_different() -> None:
    descriptors = _descriptors(A1=[1.0, 0.0], A2=[0.9, 0.1], B1=[0.0, 1.0], B2=[0.1, 0.9], C1=None)
    pairs = [
        LfwPair("A", 1, "A", 2, True, 0),
        LfwPair("A", 1, "C", 1, False, 0),
        LfwPair("B", 1, "B", 2, True, 1),
        LfwPair("A", 2, "C", 1, False, 1),
    ]

    row = score("ours", pairs, [(descriptors, 1.0)], cosine)

    assert row["no_face"] == 1
    assert "accuracy_at_tolerance" not in row
    assert (
        row["accuracy"] == 1.0
    )  # each fold: the same pair scores high, the pair without a face lowest


def test_every_photo_is_described_once_in_name_order() -> None:
    seen: list[str] = []

    def describe(jpeg: bytes, name: str) -> np.ndarray | None:
        seen.append(name)
        return None if jpeg == b"" else np.frombuffer(jpeg, np.uint8).astype(np.float64)

    out, seconds = describe_all(describe, {"b": b"\x02", "a": b"\x01", "c": b""})

    assert seen == ["a", "b", "c"]
    assert out["c"] is None and out["a"] is not None and out["a"].tolist() == [1.0]
    assert seconds >= 0.0


def test_common_pairs_leave_out_every_pair_either_pipeline_lost_a_face_of() -> None:
    pairs = [
        LfwPair("A", 1, "A", 2, True, 0),
        LfwPair("A", 1, "B", 1, False, 0),
        LfwPair("B", 1, "B", 3, True, 1),
        LfwPair("A", 2, "B", 3, False, 1),
        LfwPair("B", 1, "B", 2, True, 1),
        LfwPair("A", 2, "B", 2, False, 1),
    ]
    # ours finds every face but takes B2 for A; theirs finds no face in B2
    ours = _descriptors(A1=[1.0, 0.0], A2=[0.9, 0.1], B1=[0.0, 1.0], B2=[1.0, 0.0], B3=[0.1, 0.9])
    theirs = {**ours, photo_member("B", 2): None}

    common = both_found(pairs, ours) & both_found(pairs, theirs)
    row = score("ours", pairs, [(ours, 1.0)], cosine, common=common)

    assert common.tolist() == [True, True, True, True, False, False]
    assert row["common_pairs"] == 4
    assert row["accuracy_on_common_pairs"] == 1.0
    assert row["accuracy"] < 1.0
