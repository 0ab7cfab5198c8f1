"""Session fixtures for the privacy tests: keys and a golden ledger (see ``ledger_fixtures``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ledger_fixtures import Keys, build_ledger

from common.crypto.signing import generate_private_key


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        coordinator=generate_private_key(),
        sites={"hospital-a": generate_private_key(), "clinic-b": generate_private_key()},
    )


@pytest.fixture(scope="session")
def golden_ledger(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    """A closed 3-round ledger of run ``run-a`` (never modify it: copy it with ``ledger_copy``)."""
    return build_ledger(tmp_path_factory.mktemp("golden") / "ledger.db", "run-a", keys, rounds=3)


@pytest.fixture
def ledger_copy(golden_ledger: Path, tmp_path: Path) -> Path:
    """A private copy of the golden ledger that a test may tamper with."""
    target = tmp_path / "ledger.db"
    shutil.copy(golden_ledger, target)
    return target
