"""Site partitioners: identity-disjoint, IID and Dirichlet label skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.fer2013 import load_fer2013
from common.data.lfw import load_lfw
from common.data.partition import partition_by_identity, partition_dirichlet, partition_iid
from common.errors import ConfigError


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.fixture(scope="module")
def fer_labels() -> np.ndarray:
    return load_fer2013("Training").labels


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each site's label histogram and the global one."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    dists = [
        0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum() for p in parts
    ]
    return float(np.mean(dists))


# ---------------------------------------------------------------- by identity


def test_identity_partition_of_lfw_keeps_people_at_one_site_and_balances_images() -> None:
    identity = load_lfw().identity

    parts = partition_by_identity(identity, num_sites=5, seed=0)

    _assert_exact_cover(parts, len(identity))
    site_ids = [set(identity[p].tolist()) for p in parts]
    assert sum(len(s) for s in site_ids) == len(set(identity.tolist()))  # no person at two sites
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(identity).max()
    assert max(sizes) / min(sizes) < 1.05


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=25),
    data=st.data(),
)
def test_identity_partition_properties(counts: list[int], data: st.DataObject) -> None:
    num_sites = data.draw(st.integers(min_value=1, max_value=len(counts)))
    seed = data.draw(st.integers(min_value=0, max_value=2**31))
    ids = np.array([7 * i + 3 for i in range(len(counts))])  # arbitrary, non-contiguous ids
    identities = np.random.default_rng(seed).permutation(np.repeat(ids, counts))

    parts = partition_by_identity(identities, num_sites, seed)

    _assert_exact_cover(parts, len(identities))
    assert all(len(p) > 0 for p in parts)
    owners: dict[int, int] = {}
    for site, part in enumerate(parts):
        for person in set(identities[part].tolist()):
            assert owners.setdefault(person, site) == site  # never at two sites
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= max(counts)
    again = partition_by_identity(identities, num_sites, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_every_site_gets_two_people_when_asked_even_beside_very_large_identities() -> None:
    identity = load_lfw().identity
    ids, counts = np.unique(identity, return_counts=True)
    pool = identity[np.isin(identity, ids[counts >= 2])]  # as the face pool: people with 2+ photos

    plain = partition_by_identity(pool, num_sites=100, seed=0)
    parts = partition_by_identity(pool, num_sites=100, seed=0, min_identities=2)

    people = [len(np.unique(pool[p])) for p in parts]
    assert min(len(np.unique(pool[p])) for p in plain) == 1  # a ~530-photo person fills a site
    assert min(people) >= 2
    _assert_exact_cover(parts, len(pool))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= counts.max()  # still balanced as before


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=40), min_size=2, max_size=30),
    data=st.data(),
)
def test_min_identities_holds_whenever_there_are_enough_people(
    counts: list[int], data: st.DataObject
) -> None:
    m = data.draw(st.integers(min_value=1, max_value=3))
    num_sites = data.draw(st.integers(min_value=1, max_value=max(1, len(counts) // m)))
    identities = np.repeat(np.arange(len(counts)), counts)
    parts = partition_by_identity(identities, num_sites, seed=1, min_identities=m)
    _assert_exact_cover(parts, len(identities))
    assert all(len(np.unique(identities[p])) >= m for p in parts)


def test_too_few_people_for_min_identities_is_refused() -> None:
    with pytest.raises(ConfigError, match="only 5 distinct identities"):
        partition_by_identity(np.arange(5), num_sites=3, seed=0, min_identities=2)


def test_identity_partition_rejects_more_sites_than_people() -> None:
    with pytest.raises(ConfigError, match="3 distinct identities"):
        partition_by_identity(np.array([0, 0, 1, 2]), num_sites=4, seed=0)


# ---------------------------------------------------------------- iid


@settings(derandomize=True, max_examples=40, deadline=None)
@given(num_items=st.integers(1, 500), data=st.data())
def test_iid_partition_is_an_exact_near_equal_cover(num_items: int, data: st.DataObject) -> None:
    num_sites = data.draw(st.integers(1, min(num_items, 20)))
    parts = partition_iid(num_items, num_sites, seed=3)

    _assert_exact_cover(parts, num_items)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_depends_on_the_seed_only() -> None:
    a, b, c = (partition_iid(100, 4, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partition_rejects_more_sites_than_items() -> None:
    with pytest.raises(ConfigError):
        partition_iid(3, 4, seed=0)


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_skews_labels_and_iid_does_not(fer_labels: np.ndarray) -> None:
    skewed = partition_dirichlet(fer_labels, num_sites=5, alpha=0.1, seed=0)
    iid = partition_iid(len(fer_labels), num_sites=5, seed=0)

    _assert_exact_cover(skewed, len(fer_labels))
    assert _label_skew(skewed, fer_labels) > 0.3
    assert _label_skew(iid, fer_labels) < 0.03


def test_dirichlet_large_alpha_approaches_iid(fer_labels: np.ndarray) -> None:
    parts = partition_dirichlet(fer_labels, num_sites=5, alpha=1000.0, seed=0)
    assert _label_skew(parts, fer_labels) < 0.05


def test_dirichlet_is_deterministic_for_a_seed_and_respects_min_size() -> None:
    labels = np.repeat(np.arange(4), 100)

    a = partition_dirichlet(labels, num_sites=4, alpha=0.5, seed=11, min_size=20)
    b = partition_dirichlet(labels, num_sites=4, alpha=0.5, seed=11, min_size=20)
    c = partition_dirichlet(labels, num_sites=4, alpha=0.5, seed=12, min_size=20)

    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert min(len(p) for p in a) >= 20
    _assert_exact_cover(a, len(labels))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_rejects_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        partition_dirichlet(np.zeros(100, np.int64), num_sites=2, alpha=alpha, seed=0)


def test_dirichlet_unreachable_min_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_size"):
        partition_dirichlet(np.zeros(30, np.int64), num_sites=4, alpha=1.0, seed=0, min_size=10)
