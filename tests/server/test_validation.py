"""Poisoned or malformed updates never reach aggregation; well-formed ones do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.errors import IntegrityError
from common.models import EmotionNet, FaceEmbedder
from common.serde import to_arrays
from server.validation import METRIC_RULES, validate_reply
from tests.messages import site_metrics

SENT = to_arrays(FaceEmbedder(8), EmotionNet(8))
REFERENCE = {k: a.numpy() for k, a in SENT.items()}
METRICS = site_metrics()


def content(state: dict[str, torch.Tensor], metrics: dict | None = None) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(METRICS if metrics is None else metrics),
        }
    )


def trained_state(scale: float = 1e-3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.from_numpy(v) + scale * torch.randn(v.shape, generator=generator)
        for k, v in REFERENCE.items()
    }


def test_a_normal_update_passes_and_aggregation_gets_the_values_that_were_checked() -> None:
    state = trained_state()
    validated = validate_reply(content(state), REFERENCE, max_update_norm=100.0)
    assert list(validated.keys()) == list(REFERENCE)
    for key, array in validated.items():
        value = array.numpy()
        np.testing.assert_array_equal(value, state[key].numpy())
        assert not value.flags.writeable  # aggregation cannot alter what was validated
        assert array.data == ArrayRecord(torch_state_dict=state)[key].data


def test_an_array_that_declares_another_shape_than_it_holds_is_refused() -> None:
    arrays = ArrayRecord(torch_state_dict=trained_state())
    key = "face.embed.weight"
    real = arrays[key]
    arrays[key] = Array(real.dtype, tuple(reversed(real.shape)), real.stype, real.data)
    reply = RecordDict({"arrays": arrays, "metrics": MetricRecord(METRICS)})
    with pytest.raises(IntegrityError, match="declares"):
        validate_reply(reply, REFERENCE, max_update_norm=100.0)


@pytest.mark.parametrize(
    ("poison", "reason"),
    [
        (
            lambda s: s.__setitem__("face.embed.bias", s["face.embed.bias"] * np.nan),
            "NaN or infinite",
        ),
        (
            lambda s: s.__setitem__(
                "emotion.classifier.bias", s["emotion.classifier.bias"] + np.inf
            ),
            "NaN or infinite",
        ),
        (lambda s: s.__setitem__("face.embed.bias", torch.zeros(5)), "expected float32"),
        (
            lambda s: s.__setitem__("face.embed.bias", s["face.embed.bias"].double()),
            "expected float32",
        ),
        (lambda s: s.pop("emotion.classifier.weight"), "array keys differ"),
        (lambda s: s.__setitem__("extra.image", torch.zeros(112, 112)), "array keys differ"),
        (lambda s: [t.mul_(1e6) for t in s.values()], "exceeds max-update-norm"),
    ],
    ids=["nan", "inf", "wrong-shape", "wrong-dtype", "missing-key", "extra-key", "norm-1e6"],
)
def test_poisoned_updates_are_refused(poison, reason: str) -> None:
    state = trained_state()
    poison(state)
    with pytest.raises(IntegrityError, match=reason):
        validate_reply(content(state), REFERENCE, max_update_norm=100.0)


@pytest.mark.parametrize("bad", [{"epsilon": float("nan")}, {"steps": [4, 4]}, {"dp": None}])
def test_metrics_must_be_finite_numbers(bad: dict) -> None:
    metrics = {k: v for k, v in {**METRICS, **bad}.items() if v is not None}
    with pytest.raises(IntegrityError, match="metric"):
        validate_reply(content(trained_state(), metrics), REFERENCE, max_update_norm=100.0)


def test_the_whitelist_is_exactly_what_a_site_may_send() -> None:
    assert set(METRIC_RULES) == set(site_metrics())


@pytest.mark.parametrize(
    "key",
    ["num-examples", "dp-weight", "coordinator-weight", "face-loss", "emotion-loss", "train-s"],
)
def test_a_metric_outside_the_whitelist_is_refused_without_echoing_it(key: str) -> None:
    # Weights, losses and timings are un-noised private values that no longer leave a site; a reply
    # that carries one anyway (a claimed weight included) is refused, whatever its value.
    metrics = site_metrics(**{key: 10**9})
    with pytest.raises(IntegrityError, match="1 key\\(s\\) outside the agreed set") as refused:
        validate_reply(content(trained_state(), metrics), REFERENCE, max_update_norm=100.0)
    assert key not in str(refused.value)  # the rule is named, not the content


@pytest.mark.parametrize(
    "bad",
    [
        {"dp": 2},
        {"secret-noise": 0.5},
        {"epsilon": -0.5},
        {"delta": 1.5},
        {"steps": -1},
        {"site-index": 1.5},
        {"egress-refused": -3},
        {"noise-multiplier": None},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_a_metric_out_of_its_range_or_missing_is_refused(bad: dict) -> None:
    metrics = {k: v for k, v in {**METRICS, **bad}.items() if v is not None}
    with pytest.raises(IntegrityError, match="metric"):
        validate_reply(content(trained_state(), metrics), REFERENCE, max_update_norm=100.0)


def test_a_site_without_dp_reports_epsilon_as_minus_one_and_passes() -> None:
    metrics = site_metrics(dp=0, epsilon=-1.0, **{"epsilon-lifetime": -1.0})
    validate_reply(content(trained_state(), metrics), REFERENCE, max_update_norm=100.0)


def test_an_extra_record_is_refused() -> None:
    reply = content(trained_state())
    reply["smuggled"] = ConfigRecord({"x": 1})
    with pytest.raises(IntegrityError, match="config record"):
        validate_reply(reply, REFERENCE, max_update_norm=100.0)
    reply = content(trained_state())
    reply["more-metrics"] = MetricRecord({"epsilon": 1.0})
    with pytest.raises(IntegrityError, match="one MetricRecord"):
        validate_reply(reply, REFERENCE, max_update_norm=100.0)
