"""Fixtures shared by the coordinator-side tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """``main`` points logging at the stderr of its call; a later test's stderr is another one."""
    saved = logging.root.handlers[:]
    logging.root.handlers = []
    yield
    logging.root.handlers = saved
