"""Splitting a dataset across federated sites.

Three schemes, all deterministic for a seed, each returning one sorted index array per site whose
union is exactly ``0..N-1`` with no overlap:

- :func:`partition_by_identity`: every person's images go to exactly one site (as in a real
  deployment, where a person enrols at one site), with sites balanced in image count;
- :func:`partition_iid`: a uniformly random split into near-equal parts;
- :func:`partition_dirichlet`: label skew, each class spread over sites in proportions drawn from
  Dirichlet(alpha) (Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data distribution
  for federated visual classification"), via ``flwr_datasets``' ``DirichletPartitioner``.

``flwr_datasets`` has no image-balanced identity partitioner (``NaturalIdPartitioner`` makes one
partition per id, ``GroupedNaturalIdPartitioner`` balances id counts, not image counts) and its
``IidPartitioner`` only cuts contiguous shards, so those two schemes are implemented here directly.
"""

from __future__ import annotations

import warnings

import numpy as np

from common.errors import ConfigError


def _check_sites(num_sites: int, available: int, what: str) -> None:
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if num_sites > available:
        raise ConfigError(
            f"cannot give each of {num_sites} sites its own data: only {available} {what}; "
            "lower num_sites or use a larger dataset"
        )


def partition_by_identity(
    identities: np.ndarray, num_sites: int, seed: int, min_identities: int = 1
) -> list[np.ndarray]:
    """Assign every identity to exactly one site, balancing the number of images per site.

    Greedy longest-processing-time scheduling: identities in decreasing order of image count (ties
    in a seeded random order) each go to the site with the fewest images so far. Once the identities
    left are only just enough to give every site ``min_identities`` people, each goes to the
    lightest site still short of people: the smallest identities come last, so they fill those sites
    without upsetting the balance. Without that rule, a site that drew one very large identity
    (LFW's largest person has ~530 photos) would hold a single person, and a face model's margin
    loss needs two.

    Args:
        identities: ``(N,)`` integer identity of each image.
        num_sites: number of sites.
        seed: seed for the tie-breaking order.
        min_identities: the fewest distinct people any site may get.

    Returns:
        Per site, the sorted image indices.

    Raises:
        ConfigError: if ``num_sites`` is below 1 or there are fewer than
            ``num_sites * min_identities`` identities.
    """
    identities = np.asarray(identities)
    ids, counts = np.unique(identities, return_counts=True)
    if min_identities < 1:
        raise ValueError(f"min_identities must be >= 1, got {min_identities}")
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if len(ids) < num_sites * min_identities:
        raise ConfigError(
            f"cannot give each of {num_sites} sites {min_identities} or more people of its own: only "
            f"{len(ids)} distinct identities; lower num_sites or use a larger dataset"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(num_sites, dtype=np.int64)
    people = np.zeros(num_sites, dtype=np.int64)
    site_of_id = np.empty(len(ids), dtype=np.int64)
    for left, i in zip(range(len(order), 0, -1), order, strict=True):
        short = people < min_identities
        deficit = int(np.sum(min_identities - people[short]))
        # np.argmin picks the lowest site index among equally loaded sites, as a heap of (load, site)
        candidates = np.flatnonzero(short) if left <= deficit else np.arange(num_sites)
        site = int(candidates[np.argmin(load[candidates])])
        site_of_id[i] = site
        load[site] += counts[i]
        people[site] += 1
    site_of_image = site_of_id[np.searchsorted(ids, identities)]
    return [np.flatnonzero(site_of_image == site) for site in range(num_sites)]


def partition_iid(num_items: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Split ``0..num_items-1`` uniformly at random into ``num_sites`` parts of near-equal size.

    Part sizes differ by at most one.

    Raises:
        ConfigError: if ``num_sites`` is below 1 or exceeds ``num_items``.
    """
    _check_sites(num_sites, num_items, "items")
    permutation = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(part) for part in np.array_split(permutation, num_sites)]


def partition_dirichlet(
    labels: np.ndarray,
    num_sites: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among sites in Dirichlet(alpha) proportions.

    Small ``alpha`` (0.1) gives each site a few dominant classes; large ``alpha`` (100) approaches
    IID. Proportions are redrawn (up to 10 times, as ``flwr_datasets`` does) until every site has at
    least ``min_size`` items.

    Raises:
        ConfigError: if ``alpha <= 0``, ``num_sites`` is invalid, or ``min_size`` cannot be met.
    """
    labels = np.asarray(labels)
    if not alpha > 0:
        raise ConfigError(
            f"Dirichlet alpha must be > 0, got {alpha}; try 0.5 (skewed) to 100 (near IID)"
        )
    _check_sites(num_sites, len(labels), "items")
    if min_size * num_sites > len(labels):
        raise ConfigError(
            f"{num_sites} sites x min_size {min_size} exceeds the {len(labels)} items; lower either"
        )
    # Imported here: flwr_datasets pulls in `datasets` and plotting code (seconds of import time).
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_sites,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    # Arrow format: with `datasets` 4.x, column access in the default format converts row by row
    # (seconds for FER2013), while Arrow columns convert to NumPy at once.
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.tolist(), "index": np.arange(len(labels)).tolist()}
    ).with_format("arrow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # one per redraw; the failure is raised below
            parts = [
                partitioner.load_partition(site)["index"].to_numpy() for site in range(num_sites)
            ]
    except ValueError as exc:
        raise ConfigError(
            f"could not give each of {num_sites} sites >= {min_size} items with Dirichlet "
            f"alpha={alpha} ({exc}); raise alpha or lower min_size"
        ) from exc
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
