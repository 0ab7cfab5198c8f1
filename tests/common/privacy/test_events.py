"""DP-SGD events: validation (fail closed) and canonical composition."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.privacy.events import DpSgdEvent, compose


def test_event_round_trips_through_its_dict() -> None:
    event = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=50, clip_norm=1, name="face")

    assert DpSgdEvent.from_dict(event.to_dict()) == event
    assert event.to_dict()["mechanism"] == "poisson-subsampled-gaussian"
    assert isinstance(event.clip_norm, float)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", float("nan")),
        ("noise_multiplier", float("inf")),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("steps", 0),
        ("steps", 2.5),
        ("clip_norm", float("inf")),
        ("clip_norm", 0.0),
    ],
)
def test_event_without_privacy_is_refused(field: str, value: float) -> None:
    fields: dict[str, object] = {
        "noise_multiplier": 1.0,
        "sample_rate": 0.01,
        "steps": 10,
        "clip_norm": 1.0,
    }
    fields[field] = value

    with pytest.raises(ConfigError, match=field):
        DpSgdEvent(**fields)  # type: ignore[arg-type]


def test_unknown_mechanism_or_field_is_refused() -> None:
    good = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.01, steps=10, clip_norm=1.0).to_dict()

    with pytest.raises(ConfigError, match="unknown mechanism"):
        DpSgdEvent.from_dict(good | {"mechanism": "laplace"})
    with pytest.raises(ConfigError, match="unknown fields"):
        DpSgdEvent.from_dict(good | {"epsilon": 0.1})


def test_compose_merges_equal_mechanisms_and_sorts() -> None:
    face = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=50, clip_norm=1.0)
    emotion = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.04, steps=25, clip_norm=2.0)

    assert compose([emotion, face, face]) == ((1.1, 0.02, 100), (1.1, 0.04, 25))
    assert compose([face, emotion, face]) == compose([emotion, face, face])
