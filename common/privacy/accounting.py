"""Epsilon from recorded DP-SGD events: PRV of record, RDP and PLD as independent cross-checks.

* ``prv`` -- privacy random variables composed by FFT (Gopi, Lee, Wutschitz 2021,
  https://arxiv.org/abs/2106.02848), via ``opacus.accountants.PRVAccountant``; returns the *upper*
  bound of its error interval. This is the accountant of record: tight and still an upper bound.
* ``rdp`` -- Renyi DP of the sampled Gaussian mechanism (Mironov 2017,
  https://arxiv.org/abs/1702.07476; Mironov, Talwar, Zhang 2019, https://arxiv.org/abs/1908.10530)
  via ``opacus.accountants.RDPAccountant``. Looser (larger epsilon) but simple; it bounds PRV from
  above in practice.
* ``pld`` -- privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022,
  https://arxiv.org/abs/2207.04380) via Google's ``dp_accounting`` with pessimistic discretisation,
  used only when that package is importable.

Every function takes events (never an accountant's own running state), so the same numbers can be
recomputed later by anyone holding the ledger. Budget helpers fail closed: when epsilon cannot be
computed, the answer is "would exceed".
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import numpy as np

from common.errors import ConfigError, PrivacyBudgetError
from common.privacy import rdp_cache
from common.privacy.events import DpSgdEvent, compose, with_noise

logger = logging.getLogger(__name__)

Accountant = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[Accountant, ...] = ("prv", "rdp", "pld")
ACCOUNTANT_OF_RECORD: Accountant = "prv"

PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-3

History = tuple[tuple[float, float, int], ...]


def pld_available() -> bool:
    """Return True if Google's ``dp_accounting`` package can be imported."""
    return importlib.util.find_spec("dp_accounting") is not None


def available_accountants() -> tuple[Accountant, ...]:
    """Return the accountants usable here (``pld`` only with ``dp_accounting`` installed)."""
    return tuple(a for a in ACCOUNTANTS if a != "pld" or pld_available())


def parse_accountant(name: str) -> Accountant:
    """Validate an accountant name.

    Raises:
        ConfigError: unknown name, or ``pld`` without ``dp_accounting`` installed.
    """
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")
    if name == "pld" and not pld_available():
        raise ConfigError("accountant 'pld' needs the dp-accounting package; pip install it")
    return cast(Accountant, name)


@functools.cache
def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def accountant_version(accountant: Accountant) -> str:
    """Return the implementation and settings of an accountant, as recorded in the ledger."""
    if accountant == "prv":
        return f"opacus {_package_version('opacus')} PRVAccountant eps_error={PRV_EPS_ERROR}"
    if accountant == "rdp":
        return f"opacus {_package_version('opacus')} RDPAccountant default-alphas"
    return (
        f"dp-accounting {_package_version('dp-accounting')} PLDAccountant "
        f"pessimistic discretization={PLD_DISCRETIZATION}"
    )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta={delta!r} must be in (0, 1); typically 1e-5 or < 1/dataset_size")


def _opacus_epsilon(history: History, delta: float, accountant: Accountant) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp_cache.install()  # same values, computed once per (q, sigma, order)
    acct = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acct.history = list(history)
    if accountant == "prv":
        # q = 1 gives log(1 - q) = -inf, which the PRV formulas handle; silence numpy about it.
        with np.errstate(divide="ignore"):
            return float(acct.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    return float(acct.get_epsilon(delta))


def _pld_epsilon(history: History, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    event = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )
    acct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acct.compose(event)
    return float(acct.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: History, delta: float, accountant: Accountant) -> float:
    if not history:
        return 0.0
    try:
        eps = (
            _pld_epsilon(history, delta)
            if accountant == "pld"
            else _opacus_epsilon(history, delta, accountant)
        )
    except (ValueError, ArithmeticError, RuntimeError, MemoryError) as exc:
        raise PrivacyBudgetError(
            f"the {accountant} accountant could not bound epsilon for {history} at delta={delta:g} "
            f"({type(exc).__name__}: {exc}); use more noise or fewer steps"
        ) from exc
    if not math.isfinite(eps) or eps < 0:
        raise PrivacyBudgetError(
            f"the {accountant} accountant returned epsilon={eps} for {history}; "
            "use more noise or fewer steps"
        )
    return eps


def compute_epsilon(
    events: Iterable[DpSgdEvent], delta: float, accountant: Accountant = ACCOUNTANT_OF_RECORD
) -> float:
    """Return epsilon at ``delta`` for the composition of ``events`` (0.0 for no events).

    Raises:
        ConfigError: bad delta or accountant name.
        PrivacyBudgetError: the accountant cannot bound epsilon (fails closed).
    """
    _check_delta(delta)
    parse_accountant(accountant)
    return _epsilon_cached(compose(events), float(delta), accountant)


def cross_check(events: Sequence[DpSgdEvent], delta: float) -> dict[str, float]:
    """Return epsilon under every available accountant: ``{"prv": .., "rdp": .., "pld": ..}``."""
    return {a: compute_epsilon(events, delta, a) for a in available_accountants()}


def projected_epsilon(
    history: Iterable[DpSgdEvent],
    planned: Iterable[DpSgdEvent],
    delta: float,
    accountant: Accountant = ACCOUNTANT_OF_RECORD,
) -> float:
    """Return the cumulative epsilon after the ``planned`` events run on top of ``history``."""
    return compute_epsilon([*history, *planned], delta, accountant)


def would_exceed(
    history: Iterable[DpSgdEvent],
    planned: Iterable[DpSgdEvent],
    max_epsilon: float,
    delta: float,
    accountant: Accountant = ACCOUNTANT_OF_RECORD,
) -> bool:
    """Return True if running ``planned`` after ``history`` would spend more than ``max_epsilon``.

    Fails closed: if epsilon cannot be computed, the answer is True.
    """
    try:
        return projected_epsilon(history, planned, delta, accountant) > max_epsilon
    except PrivacyBudgetError:
        return True


def require_within_budget(
    who: str,
    history: Iterable[DpSgdEvent],
    planned: Iterable[DpSgdEvent],
    max_epsilon: float,
    delta: float,
    accountant: Accountant = ACCOUNTANT_OF_RECORD,
) -> float:
    """Return the projected epsilon, or raise if ``planned`` would exceed the budget of ``who``.

    Raises:
        PrivacyBudgetError: the projection exceeds ``max_epsilon`` or cannot be computed.
    """
    projected = projected_epsilon(history, planned, delta, accountant)
    if projected > max_epsilon:
        raise PrivacyBudgetError(
            f"{who}: the next round would bring epsilon to {projected:.4f} > budget "
            f"{max_epsilon:.4f} (delta={delta:g}, {accountant}); stop training {who} "
            "or have the privacy officer approve a larger budget"
        )
    return projected


def calibrate_noise(
    plan: Sequence[tuple[float, int]],
    target_epsilon: float,
    delta: float,
    accountant: Accountant = ACCOUNTANT_OF_RECORD,
    *,
    history: Sequence[DpSgdEvent] = (),
    tolerance: float = 0.01,
    min_noise: float = 0.3,
    max_noise: float = 200.0,
) -> float:
    """Return the smallest sigma whose plan stays within ``target_epsilon`` (never above it).

    All mechanisms in ``plan`` -- ``(sample_rate, steps)`` pairs, e.g. one per model per round --
    use the same sigma; they are composed with the fixed-noise ``history``. Binary search on sigma
    (epsilon decreases in sigma); the returned value was itself evaluated and gives
    ``epsilon <= target_epsilon``, and it is within ``tolerance`` (relative) of the smallest such
    sigma in ``[min_noise, max_noise]``.

    Raises:
        ConfigError: empty plan or bad arguments.
        PrivacyBudgetError: even ``max_noise`` exceeds the target (fails closed).
    """
    if not plan:
        raise ConfigError("calibrate_noise needs at least one (sample_rate, steps) in the plan")
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon={target_epsilon!r} must be positive and finite")
    if not (0 < tolerance < 1 and 0 < min_noise < max_noise):
        raise ConfigError("need 0 < tolerance < 1 and 0 < min_noise < max_noise")
    template = [
        DpSgdEvent(noise_multiplier=1.0, sample_rate=q, steps=n, clip_norm=1.0) for q, n in plan
    ]

    def fits(sigma: float) -> bool:
        try:
            eps = compute_epsilon([*history, *with_noise(template, sigma)], delta, accountant)
        except PrivacyBudgetError:
            return False
        return eps <= target_epsilon

    hi = max(1.0, min_noise)
    while not fits(hi):
        if hi >= max_noise:
            raise PrivacyBudgetError(
                f"no noise multiplier up to {max_noise:g} reaches epsilon <= {target_epsilon:g} at "
                f"delta={delta:g} for plan {list(plan)} (history: {len(history)} events); "
                "lower the sampling rate or the number of steps/rounds, or raise the budget"
            )
        hi = min(hi * 2.0, max_noise)
    lo = hi / 2.0
    while lo > min_noise and fits(lo):
        hi, lo = lo, max(lo / 2.0, min_noise)
    if lo <= min_noise and fits(min_noise):
        return min_noise
    # Invariant: fits(hi) is True and fits(lo) is False.
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2.0
        if fits(mid):
            hi = mid
        else:
            lo = mid
    logger.debug(
        "calibrated sigma=%.4f for target epsilon %.3f (%s)", hi, target_epsilon, accountant
    )
    return hi
