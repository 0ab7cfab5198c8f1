"""bench.gray_pairs: the three kinds of pair it scores."""

from __future__ import annotations

import numpy as np
import pytest

from bench.gray_pairs import pair_scores


def test_mixed_pairs_put_each_side_in_gray_once_and_never_pair_an_image_with_itself() -> None:
    rng = np.random.default_rng(0)
    colour, gray = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    identity = np.array([0, 0, 1, 2])

    kinds = pair_scores(colour, gray, identity)

    assert [len(kinds[k][0]) for k in ("colour", "gray", "mixed")] == [6, 6, 12]
    assert kinds["colour"][0][0] == pytest.approx(colour[0] @ colour[1])
    assert kinds["gray"][0][0] == pytest.approx(gray[0] @ gray[1])
    # the first pair (0, 1): image 0 gray against image 1 colour, then image 1 gray against image 0 colour
    assert kinds["mixed"][0][0] == pytest.approx(gray[0] @ colour[1])
    assert kinds["mixed"][0][6] == pytest.approx(gray[1] @ colour[0])
    assert kinds["mixed"][1].tolist() == [True, *[False] * 5] * 2
