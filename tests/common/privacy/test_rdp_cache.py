"""The memoised RDP orders change no epsilon, only how often Opacus's series is evaluated."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp

from common.privacy import rdp_cache
from common.privacy.accounting import PRV_EPS_ERROR, _opacus_epsilon

# (sigma, q, steps) histories as sites record them: face then emotion, growing round by round
FACE, EMOTION = (1.12, 64 / 1350, 25), (1.12, 128 / 7178, 40)
HISTORIES = [
    ((FACE[0], FACE[1], FACE[2] * r), (EMOTION[0], EMOTION[1], EMOTION[2] * r)) for r in (1, 2, 3)
] + [((0.8, 0.25, 3), (0.8, 0.125, 3)), ((2.0, 1.0, 10),), ((0.6, 0.01, 1000),)]


@pytest.fixture
def opacus_alone() -> Iterator[None]:
    rdp_cache.uninstall()
    yield
    rdp_cache.uninstall()


def reference(history: tuple[tuple[float, float, int], ...], accountant: str) -> float:
    """Opacus's own epsilon, its function not wrapped."""
    assert not getattr(rdp._compute_rdp, "__facefed_cached__", False)
    acct = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acct.history = list(history)
    with np.errstate(divide="ignore"):
        if accountant == "prv":
            return float(acct.get_epsilon(1e-5, eps_error=PRV_EPS_ERROR))
        return float(acct.get_epsilon(1e-5))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_every_epsilon_is_bit_for_bit_opacus_own(opacus_alone: None, accountant: str) -> None:
    expected = [reference(h, accountant) for h in HISTORIES]
    got = [_opacus_epsilon(h, 1e-5, accountant) for h in HISTORIES]  # installs the cache
    assert getattr(rdp._compute_rdp, "__facefed_cached__", False)
    assert got == expected


def test_a_later_round_reuses_the_orders_of_the_earlier_ones(opacus_alone: None) -> None:
    rdp_cache.install()
    _opacus_epsilon(HISTORIES[0], 1e-5, "prv")
    before = rdp._compute_rdp.cache_info()  # type: ignore[attr-defined]
    _opacus_epsilon(HISTORIES[1], 1e-5, "prv")  # same (q, sigma), more steps
    after = rdp._compute_rdp.cache_info()  # type: ignore[attr-defined]
    assert after.misses == before.misses  # nothing new to evaluate
    assert after.hits > before.hits


def test_installing_twice_wraps_once(opacus_alone: None) -> None:
    rdp_cache.install()
    wrapped = rdp._compute_rdp
    rdp_cache.install()
    assert rdp._compute_rdp is wrapped
    rdp_cache.uninstall()
    assert not getattr(rdp._compute_rdp, "__facefed_cached__", False)
