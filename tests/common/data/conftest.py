"""Fixtures shared by the dataset-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.data import fer2013
from common.data.archives import extract_archive
from common.paths import data_dir


@pytest.fixture
def isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty FACEFED_CACHE for tests that exercise extraction or caching."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FACEFED_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def fer_root() -> Path:
    """The real FER2013 folder, extracted once into the default (shared) cache."""
    return extract_archive(data_dir() / fer2013.ARCHIVE) / "fer2013"
