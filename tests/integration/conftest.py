"""Fixtures for deployment tests; the process helpers live in ``deploy_helpers``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Per-test process group, always stopped."""
    group = Procs(tmp_path / "proc-logs")
    try:
        yield group
    finally:
        group.stop_all()
