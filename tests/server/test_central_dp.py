"""Client-level central DP on the coordinator: only a plain mean is wrapped, each release is recorded
at the round's true sampling rate, and its noise is secret (OS CSPRNG, not reproducible from a seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace
from scipy import stats

from common.config import RunSettings, parse_run_config
from common.errors import ConfigError
from common.models import EmotionNet, FaceEmbedder
from common.privacy.events import DpSgdEvent
from common.privacy.secret_noise import secret_gaussian
from common.serde import to_arrays
from server.central_dp import CentralDp
from server.strategy import make_strategy
from tests.server.test_strategy import FakeGrid, reply, task_identity  # noqa: F401 (fixture)

ARRAYS = to_arrays(FaceEmbedder(8), EmotionNet(8))


def bypassing_config(settings: RunSettings, **fields: Any) -> RunSettings:
    """``settings`` with ``fields`` set as a hostile or buggy caller would: past config validation."""
    for name, value in fields.items():
        object.__setattr__(settings, name, value)
    return settings


def central(**overrides: Any) -> RunSettings:
    return parse_run_config({"central-dp": True, **overrides})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"strategy": "fedadam"}, "fedadam"), ({"aggregation": "trimmed-mean"}, "trimmed-mean")],
)
def test_central_dp_refuses_to_wrap_anything_but_a_plain_mean(fields: dict, reason: str) -> None:
    # FedAdam would apply its adaptive server step to the noised mean, rescaling the noise that was
    # sized for the mean's sensitivity C/n; a robust aggregate has another sensitivity altogether.
    settings = bypassing_config(central(), **fields)
    inner = make_strategy(settings)
    with pytest.raises(ConfigError, match=reason):
        CentralDp(inner, settings)


def test_central_dp_wraps_fedavg() -> None:
    settings = central()
    assert isinstance(CentralDp(make_strategy(settings), settings), CentralDp)


@dataclass
class Keeper:
    """A ledger keeper that keeps the coordinator's releases and lets some sites be out of budget."""

    out_of_budget: set[int]
    delta: float = 1e-5
    model_hash: str = ""
    releases: list[tuple[int, DpSgdEvent]] = field(default_factory=list)

    class ledger:  # stands in for the keeper's Ledger
        @staticmethod
        def history(site: str, guarantee: str) -> list[DpSgdEvent]:
            return []

    def can_train(self, node: int) -> bool:
        return node not in self.out_of_budget

    def record(self, *args: Any) -> None:  # the sites' signed records are not under test here
        pass

    def record_central(self, server_round: int, event: DpSgdEvent, budget: float) -> None:
        self.releases.append((server_round, event))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("out_of_budget", "rate"), [(set(), 2 / 4), ({3}, 2 / 3), ({1, 4}, 2 / 2)])
def test_the_recorded_sampling_rate_is_the_cohort_over_the_sites_it_was_drawn_from(
    out_of_budget: set[int], rate: float
) -> None:
    # The cohort is drawn from the connected sites still within budget, not from all num-sites: a
    # site's chance to be in it is cohort / eligible, and that is the q the accountant must see.
    settings = central(**{"num-sites": 4, "cohort-size": 2})
    inner = make_strategy(settings)
    keeper = Keeper(out_of_budget)
    inner.keeper = keeper  # type: ignore[assignment]
    strategy = CentralDp(inner, settings)
    sent = list(strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3, 4])))
    cohort = [m.metadata.dst_node_id for m in sent]
    assert not set(cohort) & out_of_budget
    arrays, _ = strategy.aggregate_train(1, [reply(n) for n in cohort])
    assert arrays is not None
    [(released_round, event)] = keeper.releases
    assert released_round == 1
    assert event.sample_rate == pytest.approx(rate)
    assert (event.noise_multiplier, event.clip_norm, event.steps) == (
        settings.privacy.central_noise_multiplier,
        settings.privacy.central_clip,
        1,
    )


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float64).ravel() for a in arrays.values()])


def release(strategy: CentralDp, seed: int) -> np.ndarray:
    """One noised release of ARRAYS, after re-seeding every global RNG and the run seed's torch."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    return flat(strategy._add_noise_to_aggregated_arrays(ARRAYS))


def test_two_releases_from_identical_state_carry_independent_noise() -> None:
    settings = central(**{"cohort-size": 3, "num-sites": 3, "seed": 5})
    strategy = CentralDp(make_strategy(settings), settings)
    std = settings.privacy.central_noise_multiplier * settings.privacy.central_clip / 3
    first, second = release(strategy, settings.seed), release(strategy, settings.seed)
    count = first.size
    # Each release is the model plus N(0, std^2) per coordinate ...
    assert np.std(first - flat(ARRAYS)) == pytest.approx(std, rel=0.02)
    # ... and two of them differ by the norm of independent noise, sqrt(2 * count) * std: re-seeding
    # numpy's global RNG and torch with the run seed reproduces nothing.
    assert np.linalg.norm(first - second) == pytest.approx(math.sqrt(2 * count) * std, rel=0.02)
    # The control: Flower's own helper, re-seeded the same way, repeats its noise exactly.
    flower = []
    for _ in range(2):
        np.random.seed(settings.seed)
        noised = [np.zeros(count, dtype=np.float32)]
        add_gaussian_noise_inplace(noised, std)
        flower.append(noised[0])
    np.testing.assert_array_equal(flower[0], flower[1])


def test_the_secret_noise_is_gaussian_of_the_stated_std_and_a_wrong_std_is_rejected() -> None:
    std = 0.7
    samples = secret_gaussian((100_000,), std)
    assert samples.dtype == np.float64
    assert stats.kstest(samples, "norm", args=(0.0, std)).pvalue > 1e-6
    assert stats.kstest(samples, "norm", args=(0.0, 1.1 * std)).pvalue < 1e-6
    assert stats.kstest(samples, "norm", args=(0.0, std / 1.1)).pvalue < 1e-6
