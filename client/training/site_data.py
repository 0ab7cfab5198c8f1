"""Each site's local training data, as preprocessed tensors.

In simulation a site is one partition of the shared datasets: face data split **by identity** (each person
at exactly one site) and emotion data split IID or label-skewed by Dirichlet(alpha). In a deployment the
same code runs with the site's own ``node_config`` (``data-dir``, ``partition-id``, ``num-partitions``),
so one ClientApp serves both.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.training.train import SiteTensors
from common.config import RunSettings
from common.data.chips import dataset_chips
from common.data.fer2013 import load_fer2013
from common.data.lfw import lfw_train_rows, load_lfw
from common.data.npz_sets import load_extended_yale_b
from common.data.orl import load_orl
from common.data.partition import partition_by_identity, partition_dirichlet, partition_iid
from common.data.preprocess import FACE_SIZE, resize_all, to_gray
from common.data.types import LabeledImages
from common.errors import ConfigError
from common.features import ModelInputs
from common.model_spec import ModelSpec
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSpec:
    """Which slice of the data a site holds."""

    partition_id: int
    num_partitions: int
    data_dir: str = ""
    site_index: int = 0  # names the site in the privacy ledger ("site-<index>")
    own_data: bool = False  # the node config names the site's own data-dir (a deployed site)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], settings: RunSettings) -> SiteSpec:
        """Read the site's slice and ledger index from its node config.

        Simulation: Flower sets ``partition-id`` and ``num-partitions``; the index is the partition.
        Deployment: a site with its own data sets ``data-dir`` and uses all of it, and is named by
        ``site-index`` or a ``site-N`` ``site-id`` (what ``facefed deploy init`` writes);
        ``partition-id``/``num-partitions`` may be set to rehearse with slices of one shared dataset.
        """
        data = str(node_config.get("data-dir", "") or settings.data_dir)
        try:
            pid = int(node_config.get("partition-id", 0))  # type: ignore[call-overload]
            num = int(
                node_config.get(
                    "num-partitions", 1 if "partition-id" not in node_config else settings.num_sites
                )
            )  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ConfigError(
                "node config partition-id and num-partitions must be integers, e.g. "
                "--node-config 'partition-id=0 num-partitions=2'"
            ) from None
        if not 0 <= pid < num:
            raise ConfigError(f"partition-id {pid} is outside 0..{num - 1}")
        return cls(
            partition_id=pid,
            num_partitions=num,
            data_dir=data,
            site_index=_site_index(node_config, pid),
            own_data=bool(node_config.get("data-dir")),
        )


def _site_index(node_config: Mapping[str, object], partition_id: int) -> int:
    if "site-index" in node_config:
        value = node_config["site-index"]
    elif "site-id" in node_config:
        match = re.fullmatch(r"site-(\d+)", str(node_config["site-id"]))
        if match is None:
            raise ConfigError(
                f"site-id {node_config['site-id']!r} is not of the form site-N; add site-index = N "
                "(a unique integer per site, used to name it in the privacy ledger) to the node config"
            )
        value = match.group(1)
    else:
        value = partition_id
    try:
        index = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"site-index must be an integer >= 0, got {value!r}") from None
    if index < 0:
        raise ConfigError(f"site-index must be an integer >= 0, got {index}")
    return index


def domain_holdout_mask(labels: np.ndarray, holdout: int) -> np.ndarray:
    """Which rows belong to the ``holdout`` people with the largest subject labels (kept from sites)."""
    if holdout <= 0:
        return np.zeros(len(labels), dtype=bool)
    people = np.unique(labels)
    if holdout >= len(people):
        raise ConfigError(
            f"domain-holdout {holdout} would hold out all {len(people)} people of a face source"
        )
    return np.isin(labels, people[-holdout:])


@functools.lru_cache(maxsize=2)
def _gray_face_pool(
    sources: tuple[str, ...],
    lfw_train_sets: tuple[int, ...],
    data_dir: Path,
    chips: bool = False,
    holdout: int = 0,
    disk_cache: bool = True,
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """The face pool as one uint8 image array (the sources in turn), the number of images of each
    source, and disjoint identity labels.

    The images are 112x112 gray faces, or with ``chips`` aligned 150x150 RGB chips
    (``common.data.chips``) for the pretrained face network, written to the cache folder only with
    ``disk_cache`` (never for a site's own faces).

    Kept once per process: a simulation worker serves many sites in turn, and decoding, converting
    and resizing the whole pool (seconds) for each of them dominated a small site's round. Each site
    then turns only its own faces into model inputs.
    """
    parts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    offset = 0
    for source in sources:
        if source == "lfw":
            lfw = load_lfw(data_dir=data_dir)
            rows = lfw_train_rows(lfw, [s - 1 for s in lfw_train_sets], min_images=2)
            imgs = LabeledImages(lfw.images[rows], lfw.identity[rows])
        else:
            imgs = (
                load_orl(data_dir=data_dir) if source == "orl" else load_extended_yale_b(data_dir)
            )
            rows = np.flatnonzero(~domain_holdout_mask(imgs.labels, holdout))
            imgs = imgs.subset(rows)
        if chips:
            parts.append(dataset_chips(source, data_dir, cache=disk_cache).chips[rows])
        else:
            parts.append(resize_all(to_gray(imgs.images), FACE_SIZE))
        _, dense = np.unique(imgs.labels, return_inverse=True)
        labels.append(dense.astype(np.int64) + offset)
        offset += int(dense.max()) + 1
    return np.concatenate(parts), tuple(len(part) for part in parts), np.concatenate(labels)


@functools.lru_cache(maxsize=2)
def model_inputs(spec: ModelSpec, disk_cache: bool) -> ModelInputs:
    """The site's :class:`ModelInputs` for a run's networks (the public weights loaded once).

    A site with its own data never writes its faces' frozen features to disk (``disk_cache``).
    """
    return ModelInputs(spec, disk_cache=disk_cache)


@functools.lru_cache(maxsize=2)
def _partitions(
    settings: RunSettings, num_partitions: int, data_dir: Path
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every site's face and emotion indices, computed once per process and number of sites.

    They depend only on the data and the run's seed and partition settings, and a simulation worker
    serves many sites of the same split in turn.
    """
    _, _, identities = _gray_face_pool(
        settings.face_source_list,
        settings.lfw_train_set_list,
        data_dir,
        holdout=settings.domain_holdout,
    )
    if len(np.unique(identities)) < 2 * num_partitions:
        raise ConfigError(
            f"only {len(np.unique(identities))} identities for {num_partitions} sites (each "
            "needs 2 people for the margin loss); add face-sources or use fewer sites"
        )
    # two people per site at least: the face model's margin loss needs two
    face_idx = partition_by_identity(
        identities, num_partitions, seed=settings.seed, min_identities=2
    )
    fer = _fer_training(data_dir)
    if settings.partition == "iid":
        emo_idx = partition_iid(len(fer), num_partitions, seed=settings.seed)
    else:
        emo_idx = partition_dirichlet(
            fer.labels, num_partitions, alpha=settings.dirichlet_alpha, seed=settings.seed
        )
    return face_idx, emo_idx


@functools.lru_cache(maxsize=1)
def _fer_training(data_dir: Path) -> LabeledImages:
    """FER2013's Training split, kept once per process (see :func:`_gray_face_pool`)."""
    return load_fer2013("Training", data_dir=data_dir)


def _subsample(indices: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if limit and len(indices) > limit:
        return np.sort(rng.choice(indices, size=limit, replace=False))
    return indices


def subsample_people(
    indices: np.ndarray, people: np.ndarray, limit: int, rng: np.random.Generator
) -> np.ndarray:
    """At most ``limit`` of ``indices``, spread over as many people as possible.

    Images are taken round-robin over the people (each person's in a random order): everyone's first
    image, then everyone's second, ..., the last round in a random order of people. A uniform draw
    would instead mostly keep a site's largest person and could leave it with a single one.

    Args:
        indices: a site's image indices.
        people: the identity of each of ``indices``.
        limit: the most to keep; 0 keeps all.
        rng: the randomness.

    Returns:
        The kept indices, sorted.
    """
    if not limit or len(indices) <= limit:
        return indices
    shuffled = rng.permutation(len(indices))
    by_person = shuffled[np.argsort(people[shuffled], kind="stable")]
    starts = np.flatnonzero(np.r_[True, people[by_person][1:] != people[by_person][:-1]])
    rank = np.arange(len(by_person)) - np.repeat(starts, np.diff(np.r_[starts, len(by_person)]))
    tiebreak = rng.permutation(len(indices))
    chosen = by_person[np.lexsort((tiebreak, rank))[:limit]]
    return np.sort(indices[chosen])


@functools.lru_cache(maxsize=2)
def load_site_tensors(settings: RunSettings, site: SiteSpec) -> SiteTensors:
    """Build (and cache per process) the site's preprocessed training tensors."""
    root = resolve_data_dir(site.data_dir or None)
    rng = np.random.default_rng([settings.seed, site.partition_id])

    inputs = model_inputs(ModelSpec.from_settings(settings), not site.own_data)
    pool, _, identities = _gray_face_pool(
        settings.face_source_list,
        settings.lfw_train_set_list,
        root,
        inputs.face_needs_chips,
        settings.domain_holdout,
        not site.own_data,
    )
    face_idx, emo_idx = _partitions(settings, site.num_partitions, root)
    mine = subsample_people(
        face_idx[site.partition_id],
        identities[face_idx[site.partition_id]],
        settings.face_train_limit,
        rng,
    )
    _, local_labels = np.unique(identities[mine], return_inverse=True)
    face_x = inputs.face(pool[mine]).x
    face_y = torch.from_numpy(local_labels.astype(np.int64))

    fer = _fer_training(root)
    emo = _subsample(emo_idx[site.partition_id], settings.emotion_train_limit, rng)
    emotion_x = inputs.emotion_training(fer.images[emo])
    emotion_y = torch.from_numpy(fer.labels[emo].astype(np.int64))
    logger.info(
        "site %d: %d face images of %d people, %d emotion images",
        site.partition_id,
        len(face_y),
        int(face_y.max()) + 1,
        len(emotion_y),
    )
    return SiteTensors(face_x=face_x, face_y=face_y, emotion_x=emotion_x, emotion_y=emotion_y)
