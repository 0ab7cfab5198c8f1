"""The site's privacy state across rounds: its DP-SGD event history, kept in Flower's ``Context.state``.

Every DP-SGD event this site ever released is in the history, so epsilon is cumulative over all rounds
the site took part in. (Flower's Opacus example builds a fresh PrivacyEngine each round and so reports
one round's epsilon as if it were the run's.) Epsilon is always recomputed from the history by
:mod:`common.privacy.accounting`, the same code the ledger and ``facefed audit verify`` use.

A missing or malformed state after the site has trained is a hard error: without the history the site
cannot prove how much budget it has spent, so it refuses to train (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from common.errors import ConfigError, PrivacyBudgetError
from common.privacy.accounting import Accountant, compute_epsilon
from common.privacy.events import DpSgdEvent

STATE_KEY = "privacy-state"


@dataclass
class SitePrivacyState:
    """Event history plus the noise multiplier fixed at the site's first round."""

    accountant: Accountant
    noise_multiplier: float | None = None
    history: list[DpSgdEvent] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "accountant": self.accountant,
                "noise-multiplier": -1.0
                if self.noise_multiplier is None
                else self.noise_multiplier,
                "sigmas": [e.noise_multiplier for e in self.history],
                "sample-rates": [e.sample_rate for e in self.history],
                "steps": [e.steps for e in self.history],
                "clips": [e.clip_norm for e in self.history],
                "names": [e.name for e in self.history],
                "units": [e.unit for e in self.history],
                "rounds": list(self.rounds),
            }
        )

    @classmethod
    def load(cls, state: RecordDict, accountant: Accountant) -> SitePrivacyState:
        """Restore from ``Context.state``; a fresh state if the site has never trained."""
        if STATE_KEY not in state:
            return cls(accountant=accountant)
        rec = state.config_records[STATE_KEY]
        try:
            columns: list[list[Any]] = []
            for key in ("sigmas", "sample-rates", "steps", "clips", "names"):
                column = rec[key]
                if not isinstance(column, list):
                    raise TypeError("history fields are not lists")
                columns.append(column)
            # a state saved before units existed holds example-level events only
            units = rec["units"] if "units" in rec else ["example"] * len(columns[0])
            if not isinstance(units, list):
                raise TypeError("history units are not a list")
            if len({len(c) for c in [*columns, units]}) != 1:
                raise ValueError("history fields differ in length")
            history = [
                DpSgdEvent(
                    noise_multiplier=s,
                    sample_rate=q,
                    steps=int(n),
                    clip_norm=c,
                    name=str(nm),
                    unit=str(u),
                )
                for s, q, n, c, nm, u in zip(*columns, units, strict=True)
            ]
            stored_accountant = str(rec["accountant"])
            sigma = float(rec["noise-multiplier"])  # type: ignore[arg-type]
            rounds = [int(r) for r in rec["rounds"]]  # type: ignore[union-attr]
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise PrivacyBudgetError(
                f"the site's accountant state is unreadable ({exc}); refusing to train because the "
                "privacy budget already spent cannot be established"
            ) from None
        if stored_accountant != accountant:
            raise PrivacyBudgetError(
                f"the site's history was accounted with {stored_accountant!r} but this run asks for "
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

    def epsilon(self, delta: float, extra: list[DpSgdEvent] | None = None) -> float:
        """Cumulative epsilon of the recorded history (plus ``extra`` planned events)."""
        return compute_epsilon([*self.history, *(extra or [])], delta, self.accountant)
