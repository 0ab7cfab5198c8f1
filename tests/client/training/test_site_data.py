"""A site's face subset under face-train-limit: as many of its people as the limit allows."""

from __future__ import annotations

import numpy as np
import pytest

from client.training.site_data import subsample_people
from common.data.lfw import load_lfw


@pytest.fixture(scope="module")
def site_people() -> np.ndarray:
    """Identities of a site holding LFW's largest person (~530 photos) and 5 people with 2-3 photos."""
    identity = load_lfw().identity
    ids, counts = np.unique(identity, return_counts=True)
    small = ids[(counts >= 2) & (counts <= 3)][:5]
    keep = np.isin(identity, np.r_[ids[np.argmax(counts)], small])
    return identity[keep]


def test_a_limited_site_keeps_every_person_it_can(site_people: np.ndarray) -> None:
    indices = np.arange(1000, 1000 + len(site_people))
    kept = subsample_people(indices, site_people, 12, np.random.default_rng(0))
    people = site_people[kept - 1000]
    assert len(kept) == 12 and len(np.unique(kept)) == 12 and np.all(np.diff(kept) > 0)
    assert len(np.unique(people)) == 6  # a uniform draw of 12 of ~540 keeps ~1.2 of them
    assert np.bincount(np.unique(people, return_inverse=True)[1]).max() <= 12 - 2 * 5


def test_the_images_of_each_person_are_a_random_choice(site_people: np.ndarray) -> None:
    indices = np.arange(len(site_people))
    draws = [
        set(subsample_people(indices, site_people, 12, np.random.default_rng(s)).tolist())
        for s in range(3)
    ]
    assert draws[0] != draws[1] != draws[2]
    again = subsample_people(indices, site_people, 12, np.random.default_rng(0))
    assert set(again.tolist()) == draws[0]


@pytest.mark.parametrize("limit", [0, 10_000])
def test_no_limit_or_a_large_one_keeps_everything(site_people: np.ndarray, limit: int) -> None:
    indices = np.arange(len(site_people))
    kept = subsample_people(indices, site_people, limit, np.random.default_rng(0))
    assert np.array_equal(kept, indices)
