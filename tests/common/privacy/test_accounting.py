"""Epsilon accounting: published golden values, cross-checks, calibration and budget checks."""

from __future__ import annotations

import pytest

from common.errors import ConfigError, PrivacyBudgetError
from common.privacy import accounting
from common.privacy.accounting import (
    calibrate_noise,
    compute_epsilon,
    cross_check,
    projected_epsilon,
    require_within_budget,
    would_exceed,
)
from common.privacy.events import DpSgdEvent


def event(sigma: float, q: float, steps: int) -> DpSgdEvent:
    return DpSgdEvent(noise_multiplier=sigma, sample_rate=q, steps=steps, clip_norm=1.0)


def test_rdp_golden_value_from_opacus() -> None:
    # Opacus's own test: sigma=1.5, q=0.04, 2250 steps (90 epochs of batch 0.04), delta=1e-5.
    assert compute_epsilon([event(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-3)


def test_golden_values_rdp_prv_pld_at_q001_sigma1() -> None:
    eps = cross_check([event(1.0, 0.01, 1000)], 1e-5)

    assert eps["rdp"] == pytest.approx(2.101, abs=2e-3)
    assert eps["prv"] == pytest.approx(1.83, abs=0.02)
    if "pld" in eps:
        assert eps["pld"] == pytest.approx(1.83, abs=0.02)


def test_prv_is_tighter_than_rdp_and_close_to_pld() -> None:
    events = [event(1.1, 0.02, 100), event(1.1, 0.04, 50)]

    eps = cross_check(events, 1e-5)

    assert eps["prv"] < eps["rdp"]
    if "pld" in eps:
        assert eps["prv"] == pytest.approx(eps["pld"], rel=0.02)


def test_composition_splits_like_one_long_run() -> None:
    split = [event(1.0, 0.01, 400), event(1.0, 0.01, 600)]

    assert compute_epsilon(split, 1e-5, "rdp") == compute_epsilon(
        [event(1.0, 0.01, 1000)], 1e-5, "rdp"
    )


def test_more_steps_spend_more_epsilon() -> None:
    assert compute_epsilon([event(1.0, 0.01, 200)], 1e-5, "rdp") < compute_epsilon(
        [event(1.0, 0.01, 400)], 1e-5, "rdp"
    )


def test_no_events_spend_nothing() -> None:
    assert compute_epsilon([], 1e-5) == 0.0


def test_bad_delta_and_accountant_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="delta"):
        compute_epsilon([event(1.0, 0.01, 10)], 0.0)
    with pytest.raises(ConfigError, match="unknown accountant"):
        compute_epsilon([event(1.0, 0.01, 10)], 1e-5, "gdp")  # type: ignore[arg-type]


def test_pld_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "pld_available", lambda: False)

    assert accounting.available_accountants() == ("prv", "rdp")
    with pytest.raises(ConfigError, match="dp-accounting"):
        compute_epsilon([event(1.0, 0.01, 10)], 1e-5, "pld")


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibrate_then_recompute_never_overshoots(target: float) -> None:
    plan = [(0.02, 300), (0.04, 150)]

    sigma = calibrate_noise(plan, target, 1e-5, "rdp", tolerance=0.005)
    events = [event(sigma, q, n) for q, n in plan]
    slightly_less = [event(sigma * 0.99, q, n) for q, n in plan]

    assert compute_epsilon(events, 1e-5, "rdp") <= target
    assert compute_epsilon(slightly_less, 1e-5, "rdp") > target  # and it is (near) the smallest


def test_calibrate_with_prv_round_trips() -> None:
    sigma = calibrate_noise([(0.02, 100)], 3.0, 1e-5, "prv", tolerance=0.02)

    assert compute_epsilon([event(sigma, 0.02, 100)], 1e-5, "prv") <= 3.0
    assert compute_epsilon([event(sigma * 0.95, 0.02, 100)], 1e-5, "prv") > 3.0


def test_calibrate_accounts_for_history() -> None:
    history = [event(1.0, 0.02, 500)]
    spent = compute_epsilon(history, 1e-5, "rdp")

    fresh = calibrate_noise([(0.02, 100)], spent + 1.0, 1e-5, "rdp")
    after_history = calibrate_noise([(0.02, 100)], spent + 1.0, 1e-5, "rdp", history=history)

    assert after_history > fresh
    assert projected_epsilon(history, [event(after_history, 0.02, 100)], 1e-5, "rdp") <= spent + 1


def test_calibrate_fails_closed_when_the_target_is_out_of_reach() -> None:
    history = [event(1.0, 0.02, 500)]  # already spent more than the target

    with pytest.raises(PrivacyBudgetError, match="no noise multiplier"):
        calibrate_noise([(0.02, 100)], 0.1, 1e-5, "rdp", history=history, max_noise=50)


def test_would_exceed_and_require_within_budget() -> None:
    history = [event(1.0, 0.02, 200)]
    planned = [event(1.0, 0.02, 200)]
    projected = projected_epsilon(history, planned, 1e-5, "rdp")

    assert not would_exceed(history, planned, projected + 0.01, 1e-5, "rdp")
    assert would_exceed(history, planned, projected - 0.01, 1e-5, "rdp")
    assert (
        require_within_budget("site-a", history, planned, projected + 0.01, 1e-5, "rdp")
        == projected
    )
    with pytest.raises(PrivacyBudgetError, match="site-a: the next round"):
        require_within_budget("site-a", history, planned, projected - 0.01, 1e-5, "rdp")


def test_would_exceed_fails_closed_when_epsilon_cannot_be_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> float:
        raise PrivacyBudgetError("accountant failed")

    monkeypatch.setattr(accounting, "compute_epsilon", broken)

    assert would_exceed([], [event(1.0, 0.01, 10)], 100.0, 1e-5, "rdp")
