"""One DP-SGD privacy event, and how a list of them composes.

A :class:`DpSgdEvent` is ``steps`` applications of the Poisson-subsampled Gaussian mechanism (Abadi
et al. 2016, "Deep Learning with Differential Privacy", https://arxiv.org/abs/1607.00133): each step
samples every example independently with probability ``sample_rate``, clips each per-example
gradient to L2 norm ``clip_norm`` and adds Gaussian noise with standard deviation ``noise_multiplier
* clip_norm``. Epsilon depends only on ``(noise_multiplier, sample_rate, steps)``; ``clip_norm`` is
recorded because it is what makes the sensitivity equal to ``clip_norm``.

The same event type describes client-level DP on the coordinator (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963): one "step" per round, ``sample_rate`` = fraction of sites
sampled, ``clip_norm`` = the clip on each site's update.

The **unit** is what one Poisson-sampled, clipped element is: one ``"example"`` (an image), one
``"person"`` (all of a person's images, clipped together: person-level DP), or one ``"site"`` (client-level
DP). Epsilon is computed the same way for every unit; what it protects differs. A ledger written
before units existed has no ``unit`` field: its events were example-level.

Delta is not part of an event: a guarantee is stated at one delta for the whole composition, so the
ledger records delta once per entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import ConfigError

MECHANISM = "poisson-subsampled-gaussian"
UNITS = ("example", "person", "site")


@dataclass(frozen=True, kw_only=True)
class DpSgdEvent:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism at one noise level.

    Attributes:
        noise_multiplier: sigma; noise std divided by ``clip_norm``. Must be > 0.
        sample_rate: q, the Poisson sampling probability of each unit, in (0, 1].
        steps: number of noisy steps (>= 1).
        clip_norm: per-unit L2 clipping bound C (> 0, finite).
        name: what was trained, e.g. ``"face"`` or ``"emotion"`` (for the report only).
        unit: what one sampled and clipped element is: ``"example"``, ``"person"`` or ``"site"``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    name: str = ""
    unit: str = "example"

    def __post_init__(self) -> None:
        sigma, q = self.noise_multiplier, self.sample_rate
        if isinstance(sigma, bool) or not isinstance(sigma, int | float):
            raise ConfigError(f"noise_multiplier must be a number, got {sigma!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(
                f"noise_multiplier={sigma!r} gives no privacy (epsilon is infinite); "
                "set a positive, finite noise multiplier"
            )
        if isinstance(q, bool) or not isinstance(q, int | float) or not (0 < q <= 1):
            raise ConfigError(f"sample_rate={q!r} must be in (0, 1]; use batch_size / dataset_size")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        clip = self.clip_norm
        if isinstance(clip, bool) or not isinstance(clip, int | float):
            raise ConfigError(f"clip_norm must be a number, got {clip!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(
                f"clip_norm={clip!r} must be positive and finite; without clipping the noise "
                "does not bound any one example's influence"
            )
        if not isinstance(self.name, str):
            raise ConfigError(f"event name must be a string, got {self.name!r}")
        if self.unit not in UNITS:
            raise ConfigError(f"privacy unit {self.unit!r} must be one of {', '.join(UNITS)}")
        # Store plain floats so that the signed JSON is the same however the caller typed them.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "clip_norm", float(clip))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form stored in the ledger (includes ``mechanism``)."""
        return {"mechanism": MECHANISM, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DpSgdEvent:
        """Parse the JSON form written by :meth:`to_dict`.

        Raises:
            ConfigError: unknown mechanism, unknown or missing fields, invalid values.
        """
        fields = dict(data)
        mechanism = fields.pop("mechanism", MECHANISM)
        if mechanism != MECHANISM:
            raise ConfigError(
                f"unknown mechanism {mechanism!r}; only {MECHANISM!r} can be accounted"
            )
        known = {"noise_multiplier", "sample_rate", "steps", "clip_norm", "name", "unit"}
        unknown = set(fields) - known
        missing = known - {"name", "unit"} - set(fields)
        if unknown or missing:
            raise ConfigError(
                f"malformed DP event: unknown fields {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**fields)


def compose(events: Iterable[DpSgdEvent]) -> tuple[tuple[float, float, int], ...]:
    """Return the composition of ``events`` as sorted ``(noise_multiplier, sample_rate, steps)``.

    Composition is commutative, so events with the same ``(sigma, q)`` merge into one entry with
    their steps summed. The result is canonical (sorted), so every accountant sees the same input
    and recomputation is deterministic; it is also the ``history`` format of Opacus accountants.
    """
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        key = (event.noise_multiplier, event.sample_rate)
        steps[key] = steps.get(key, 0) + event.steps
    return tuple((sigma, q, n) for (sigma, q), n in sorted(steps.items()))


def with_noise(events: Iterable[DpSgdEvent], noise_multiplier: float) -> list[DpSgdEvent]:
    """Return copies of ``events`` that all use ``noise_multiplier`` (for calibration)."""
    return [
        DpSgdEvent(
            noise_multiplier=noise_multiplier,
            sample_rate=e.sample_rate,
            steps=e.steps,
            clip_norm=e.clip_norm,
            name=e.name,
            unit=e.unit,
        )
        for e in events
    ]
