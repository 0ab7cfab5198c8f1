"""The lower bound on epsilon of a one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

"Privacy auditing with one (1) training run" (https://arxiv.org/abs/2305.08846): ``m`` canaries are each
included in one training run with probability 1/2, independently. An auditor who sees only the
released model guesses, for ``r`` of them, whether they were included, and ``v`` guesses are right.

If the run is (epsilon, delta)-DP for each canary, the guesses are no better than randomised response:
the number right is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))``, plus a term in
``delta`` (their Theorem 3.1 and Algorithm 2). The p-value of ``v`` or more right answers under that
null hypothesis is

    P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v > Binomial(r, q) >= v - i] / i,

with ``q = 1 / (1 + e^-eps)``. The audit's bound is the largest epsilon that this p-value still
rejects at the chosen confidence: the run cannot be more private than that, except with probability
``1 - confidence``. The bound says nothing about how private the run *is*; it can only show a claim
false, never prove it true.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from common.errors import ConfigError

MAX_CANARIES = 1_000_000
EPSILON_CEILING = 100.0  # the search interval's top; a bound there means "any epsilon is refuted"


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability of ``v`` or more correct guesses out of ``r`` if each of ``m`` canaries is
    protected at ``(epsilon, delta)``-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"Expected 0 <= {v=} <= {r=} <= {m=}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"Expected {epsilon=} >= 0 and {delta=} in [0, 1]")
    q = 1 / (1 + math.exp(-epsilon))  # how often epsilon-DP randomised response answers right
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i]
    alpha = float((below / i).max()) if v else 0.0
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95, tolerance: float = 1e-6
) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` (of ``m`` canaries) refute with
    probability ``confidence``; 0 when they refute none."""
    if not 0 < confidence < 1:
        raise ValueError(f"Expected 0 < {confidence=} < 1")
    significance = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, EPSILON_CEILING
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def check_design(m: int, r: int, delta: float, confidence: float) -> None:
    """Refuse an audit that could not show anything: even ``r`` correct guesses out of ``r`` would
    give a bound of 0 at this confidence.

    Raises:
        ConfigError: with the smallest number of guesses that could.
    """
    if m > MAX_CANARIES:
        raise ConfigError(f"an audit takes at most {MAX_CANARIES:,} canaries, got {m:,}")
    if m < 2 or not 2 <= r <= m:
        raise ConfigError(
            f"an audit needs at least 2 canaries and 2 <= guesses <= canaries, got {m} canaries "
            f"and {r} guesses"
        )

    def shows(n: int) -> bool:  # n right answers of n refute epsilon = 0 (monotone in n)
        return p_value(m, n, n, 0.0, delta) < 1 - confidence

    if shows(r):
        return
    if not shows(m):
        fix = "use more canaries, a smaller delta or a lower confidence"
    else:
        low, high = r, m  # shows(low) is false, shows(high) is true
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if shows(middle) else (middle, high)
        fix = f"use at least {high} guesses"
    raise ConfigError(
        f"{r} guesses on {m} canaries cannot show any epsilon at {confidence:.0%} confidence "
        f"(delta {delta:g}); {fix}"
    )
