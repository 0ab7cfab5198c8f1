"""A site's faces become frozen pretrained features for training; those are near-templates, so a site
with its own data never writes them to disk, while a simulation of the public datasets may cache them."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.training import site_data
from client.training.site_data import SiteSpec, load_site_tensors
from common.config import parse_run_config
from common.paths import DEFAULT_DATA_DIR, cache_dir

PRETRAINED_SITE = {
    "face-model": "pretrained",
    "face-sources": "orl",
    "face-train-limit": 40,
    "emotion-train-limit": 64,
    "num-sites": 2,
    "cohort-size": 2,
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder without features (decoded datasets and chips linked from the real one, so that
    nothing is decoded again), and no site tensors or model inputs kept from other tests."""
    real = cache_dir()
    folder = tmp_path / "cache"
    folder.mkdir()
    for entry in real.iterdir():
        if not entry.name.startswith("features-"):
            (folder / entry.name).symlink_to(entry)
    monkeypatch.setenv("FACEFED_CACHE", str(folder))
    site_data.load_site_tensors.cache_clear()
    site_data.model_inputs.cache_clear()
    yield folder
    site_data.load_site_tensors.cache_clear()
    site_data.model_inputs.cache_clear()


def features_written(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("features-*"))


def test_a_deployed_site_keeps_its_faces_features_in_memory_only(cache: Path) -> None:
    settings = parse_run_config(PRETRAINED_SITE)
    node_config = {"data-dir": str(DEFAULT_DATA_DIR), "partition-id": 0, "num-partitions": 2}
    site = SiteSpec.from_node_config(node_config, settings)
    assert site.own_data

    data = load_site_tensors(settings, site)

    assert data.face_x.shape[1:] == (256,)  # the pooled trunk features the tail trains on
    assert features_written(cache) == []


def test_a_simulated_site_of_the_shared_data_may_cache_them(cache: Path) -> None:
    settings = parse_run_config(PRETRAINED_SITE)
    site = SiteSpec.from_node_config({"partition-id": 0, "num-partitions": 2}, settings)
    assert not site.own_data

    load_site_tensors(settings, site)

    assert len(features_written(cache)) == 1  # the test can fail: the cache is written here
