"""The one-run audit's lower bound on epsilon (Steinke, Nasr and Jagielski 2023), on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import ConfigError
from common.privacy.audit_bound import check_design, epsilon_lower_bound, p_value


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_guesses_right_without_delta_gives_the_closed_form_bound(r: int) -> None:
    # P[Binomial(r, q) >= r] = q^r; the bound is the epsilon where q^r = 0.05, q = 1/(1+e^-eps)
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(1000, r, r, delta=0.0) == pytest.approx(expected, abs=1e-5)


def test_delta_only_ever_lowers_the_bound() -> None:
    without = epsilon_lower_bound(1000, 100, 90, delta=0.0)
    with_delta = epsilon_lower_bound(1000, 100, 90, delta=1e-5)
    assert 0 < with_delta < without


def test_random_guesses_give_a_bound_of_about_zero() -> None:
    rng = np.random.default_rng(0)
    bounds = [
        epsilon_lower_bound(1000, 200, int(rng.binomial(200, 0.5)), delta=1e-5) for _ in range(50)
    ]
    assert np.median(bounds) == 0.0
    assert max(bounds) < 0.4  # at 95%, about 1 in 20 coin-flip audits shows a small bound


def test_the_p_value_at_the_bound_is_the_significance() -> None:
    bound = epsilon_lower_bound(500, 100, 80, delta=1e-6, confidence=0.95)
    assert p_value(500, 100, 80, bound, 1e-6) == pytest.approx(0.05, abs=1e-4)


def test_more_right_answers_never_lower_the_bound() -> None:
    bounds = [epsilon_lower_bound(1000, 100, v, delta=1e-5) for v in range(50, 101, 5)]
    assert bounds == sorted(bounds)


def test_an_audit_too_small_for_its_confidence_is_refused_with_the_fix() -> None:
    # four right answers of four: 0.5^4 = 0.0625 > 0.05, so no epsilon can be refuted at 95%
    with pytest.raises(ConfigError, match="use at least 5 guesses"):
        check_design(100, 4, delta=0.0, confidence=0.95)
    check_design(100, 5, delta=0.0, confidence=0.95)
