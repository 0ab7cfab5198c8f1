"""The site's privacy state across rounds: the accountant history, kept in Flower's ``Context.state``.

Every DP-SGD step this site ever took is in the history, so epsilon is cumulative over all rounds the
site took part in. (Flower's Opacus example builds a fresh PrivacyEngine each round and so reports one
round's epsilon as if it were the run's; facefed restores the accountant with ``load_state_dict``.)

A missing or malformed state after round 1 is a hard error: without the history the site cannot prove how
much budget it has spent, so it refuses to train (fail closed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import IAccountant, create_accountant

from common.errors import PrivacyBudgetError

logger = logging.getLogger(__name__)

STATE_KEY = "privacy-state"
Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps): Opacus's history format


@dataclass
class SitePrivacyState:
    """Accountant history plus the noise multiplier fixed at the site's first round."""

    accountant: str
    noise_multiplier: float | None = None
    history: list[Event] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "accountant": self.accountant,
                "noise-multiplier": -1.0
                if self.noise_multiplier is None
                else self.noise_multiplier,
                "sigmas": [float(e[0]) for e in self.history],
                "sample-rates": [float(e[1]) for e in self.history],
                "steps": [int(e[2]) for e in self.history],
                "rounds": [int(r) for r in self.rounds],
            }
        )

    @classmethod
    def load(cls, state: RecordDict, accountant: str) -> SitePrivacyState:
        """Restore from ``Context.state``; a fresh state if the site has never trained."""
        if STATE_KEY not in state:
            return cls(accountant=accountant)
        rec = state.config_records[STATE_KEY]
        try:
            sigmas, rates, steps = rec["sigmas"], rec["sample-rates"], rec["steps"]
            if not (
                isinstance(sigmas, list) and isinstance(rates, list) and isinstance(steps, list)
            ):
                raise TypeError("history fields are not lists")
            if not len(sigmas) == len(rates) == len(steps):
                raise ValueError("history fields differ in length")
            history = [
                (float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)
            ]
            stored_acc = str(rec["accountant"])
            sigma = float(rec["noise-multiplier"])  # type: ignore[arg-type]
            rounds = [int(r) for r in rec["rounds"]]  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyBudgetError(
                f"the site's accountant state is unreadable ({exc}); refusing to train because the "
                "privacy budget already spent cannot be established"
            ) from None
        if stored_acc != accountant:
            raise PrivacyBudgetError(
                f"the site's history was accounted with {stored_acc!r} but this run asks for "
                f"{accountant!r}; refusing to mix accountants within one site's budget"
            )
        return cls(
            accountant=accountant,
            noise_multiplier=None if sigma < 0 else sigma,
            history=history,
            rounds=rounds,
        )

    def save(self, state: RecordDict) -> None:
        state.config_records[STATE_KEY] = self.to_record()

    def make_accountant(self) -> IAccountant:
        """An Opacus accountant restored to this history (``load_state_dict``, not a fresh one)."""
        acc = create_accountant(self.accountant)
        if self.history:
            acc.load_state_dict({"history": list(self.history), "mechanism": acc.mechanism()})
        return acc

    def epsilon(self, delta: float, extra: list[Event] | None = None) -> float:
        """Cumulative epsilon of the recorded history (plus ``extra`` planned events)."""
        return epsilon_of(self.history + list(extra or []), delta, self.accountant)


def epsilon_of(history: list[Event], delta: float, accountant: str) -> float:
    """Epsilon of composing ``history`` under ``accountant`` (0 for an empty history)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [e for e in history if e[2] > 0]
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def calibrate_noise(
    planned: list[tuple[float, int]],
    target_epsilon: float,
    delta: float,
    accountant: str,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose composition of ``planned`` (sample rate, steps) stays <= target.

    Bisection on sigma; the returned sigma never overshoots the target (the upper end of the bracket
    always satisfies it). Raises :class:`PrivacyBudgetError` if even sigma=1000 does not.
    """

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, q, n) for q, n in planned], delta, accountant)

    lo, hi = 0.3, 2.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1000:
            raise PrivacyBudgetError(
                f"no noise multiplier reaches epsilon <= {target_epsilon} for this plan; "
                "raise max-epsilon, or lower the rounds, steps or batch size"
            )
    if eps(lo) <= target_epsilon:
        return lo
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
