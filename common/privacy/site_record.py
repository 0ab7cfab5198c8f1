"""The privacy record a site attaches to each training reply, and the ledger entry both sides rebuild.

The site signs the canonical JSON of its ledger entry body (:mod:`common.privacy.entry`) with its Ed25519
key. The egress guard lets only finite scalars and two fixed-size byte strings leave a site, so the
record carries the entry's *numbers* and the signature; the coordinator rebuilds the very same body with
:func:`entry_body` from those numbers plus what it already knows (run id, the hash of the model it sent,
the accountant), then appends it to the ledger, which verifies the signature and recomputes epsilon.

Whether the release's noise was secret travels as the scalar ``secret-noise``: exactly the integer 1
(OS CSPRNG, fresh per release) or 0 (seeded, research simulations only); any other value is refused.
``epsilon-lifetime`` is the site's epsilon over every run it ever took part in (>= the run's
``epsilon-cumulative``).

Each model's privacy unit travels as the scalar ``<model>-unit``: exactly the integer 0 (example) or
1 (person); the emotion model is always example-level (FER2013 has no person ids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flwr.app import ConfigRecord

from common.errors import IntegrityError
from common.privacy.accounting import Accountant
from common.privacy.entry import make_entry_body
from common.privacy.events import DpSgdEvent

RECORD_NAME = "privacy"
# A site's signed records of its earlier rounds of the run, resent with each reply: if an earlier reply
# never arrived (the site died after training), the coordinator records that round first, so the
# ledger's history and the site's own cumulative epsilon stay equal. Already recorded ones are skipped.
PREVIOUS_PREFIX = "privacy-previous-"
MODELS = ("face", "emotion")
UNIT_CODES = {"example": 0, "person": 1}
SCALAR_FIELDS = (
    "site-index",
    "round",
    "noise-multiplier",
    "delta",
    "budget-epsilon",
    "epsilon-round",
    "epsilon-cumulative",
    "epsilon-lifetime",
    "secret-noise",
    "started-at",
    "finished-at",
    *(f"{m}-{f}" for m in MODELS for f in ("sample-rate", "steps", "clip", "unit")),
)
SIGNATURE_FIELD, PUBLIC_KEY_FIELD = "site-signature", "site-public-key"
BYTES_FIELDS = {SIGNATURE_FIELD: 64, PUBLIC_KEY_FIELD: 32}


def site_id(index: int) -> str:
    return f"site-{index}"


def _iso(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    """The numbers of one site's round, as sent in the privacy record."""

    site_index: int
    round: int
    mechanisms: tuple[DpSgdEvent, ...]
    delta: float
    budget_epsilon: float
    epsilon_round: float
    epsilon_cumulative: float
    epsilon_lifetime: float
    secret_noise: bool
    started_at: float
    finished_at: float

    def entry_body(self, run_id: str, model_hash: str, accountant: Accountant) -> dict[str, Any]:
        """The ledger entry body this report stands for (identical on the site and the server)."""
        return make_entry_body(
            run_id=run_id,
            site_id=site_id(self.site_index),
            round=self.round,
            mechanisms=list(self.mechanisms),
            accountant=accountant,
            epsilon_round=self.epsilon_round,
            epsilon_cumulative=self.epsilon_cumulative,
            delta=self.delta,
            budget_epsilon=self.budget_epsilon,
            model_hash=model_hash,
            secret_noise=self.secret_noise,
            epsilon_lifetime=self.epsilon_lifetime,
            started_at=_iso(self.started_at),
            finished_at=_iso(self.finished_at),
        )

    def to_record(self, signature: bytes, public_key: bytes) -> ConfigRecord:
        by_name = {m.name: m for m in self.mechanisms}
        fields: dict[str, Any] = {
            "site-index": self.site_index,
            "round": self.round,
            "noise-multiplier": self.mechanisms[0].noise_multiplier,
            "delta": self.delta,
            "budget-epsilon": self.budget_epsilon,
            "epsilon-round": self.epsilon_round,
            "epsilon-cumulative": self.epsilon_cumulative,
            "epsilon-lifetime": self.epsilon_lifetime,
            "secret-noise": 1 if self.secret_noise else 0,
            "started-at": self.started_at,
            "finished-at": self.finished_at,
        }
        for model in MODELS:  # a model trained for 0 steps is sent as steps 0
            event = by_name.get(model)
            fields[f"{model}-sample-rate"] = event.sample_rate if event else 0.0
            fields[f"{model}-steps"] = event.steps if event else 0
            fields[f"{model}-clip"] = event.clip_norm if event else 0.0
            fields[f"{model}-unit"] = UNIT_CODES[event.unit] if event else 0
        fields[SIGNATURE_FIELD] = signature
        fields[PUBLIC_KEY_FIELD] = public_key
        return ConfigRecord(fields)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> tuple[RoundReport, bytes, bytes]:
        """Parse a received privacy record; any malformed field is an IntegrityError."""
        unknown = set(record) - set(SCALAR_FIELDS) - set(BYTES_FIELDS)
        missing = (set(SCALAR_FIELDS) | set(BYTES_FIELDS)) - set(record)
        if unknown or missing:
            raise IntegrityError(
                f"privacy record has unknown {sorted(unknown)} / missing {sorted(missing)} fields"
            )
        for key in SCALAR_FIELDS:
            value = record[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise IntegrityError(f"privacy record field {key!r} is not a finite number")
        secret = record["secret-noise"]
        if not isinstance(secret, int) or secret not in (0, 1):
            raise IntegrityError("privacy record field 'secret-noise' must be the integer 0 or 1")
        for key, size in BYTES_FIELDS.items():
            if not isinstance(record[key], bytes) or len(record[key]) != size:
                raise IntegrityError(f"privacy record field {key!r} must be {size} bytes")
        sigma = float(record["noise-multiplier"])
        mechanisms = []
        units = {code: unit for unit, code in UNIT_CODES.items()}
        try:
            for model in MODELS:
                steps = int(record[f"{model}-steps"])
                code = record[f"{model}-unit"]
                if isinstance(code, bool) or code not in units or not isinstance(code, int):
                    raise IntegrityError(
                        f"privacy record field '{model}-unit' must be the integer 0 or 1"
                    )
                if steps > 0:
                    mechanisms.append(
                        DpSgdEvent(
                            noise_multiplier=sigma,
                            sample_rate=float(record[f"{model}-sample-rate"]),
                            steps=steps,
                            clip_norm=float(record[f"{model}-clip"]),
                            name=model,
                            unit=units[code],
                        )
                    )
        except IntegrityError:
            raise
        except Exception as exc:  # ConfigError from the event's own validation
            raise IntegrityError(f"privacy record has an invalid mechanism: {exc}") from None
        report = cls(
            site_index=int(record["site-index"]),
            round=int(record["round"]),
            mechanisms=tuple(mechanisms),
            delta=float(record["delta"]),
            budget_epsilon=float(record["budget-epsilon"]),
            epsilon_round=float(record["epsilon-round"]),
            epsilon_cumulative=float(record["epsilon-cumulative"]),
            epsilon_lifetime=float(record["epsilon-lifetime"]),
            secret_noise=secret == 1,
            started_at=float(record["started-at"]),
            finished_at=float(record["finished-at"]),
        )
        return report, record[SIGNATURE_FIELD], record[PUBLIC_KEY_FIELD]
