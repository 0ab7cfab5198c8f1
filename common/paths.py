"""Where facefed finds its data and where it caches extracted archives.

Resolution order for the data directory: an explicit argument (``--data-dir``), then the ``FACEFED_DATA``
environment variable, then ``../shared/data`` next to the repository checkout. The cache directory for
extracted archives and decoded arrays is ``FACEFED_CACHE`` or ``~/.cache/facefed``.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import DataError

DATA_ENV = "FACEFED_DATA"
CACHE_ENV = "FACEFED_CACHE"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory, checking that it exists.

    Raises:
        DataError: if the resolved directory does not exist.
    """
    if explicit not in (None, ""):
        path, source = Path(explicit).expanduser(), "--data-dir"
    elif os.environ.get(DATA_ENV):
        path, source = Path(os.environ[DATA_ENV]).expanduser(), DATA_ENV
    else:
        path, source = DEFAULT_DATA_DIR, "the default ../shared/data"
    if not path.is_dir():
        raise DataError(
            f"data directory {path} (from {source}) does not exist; "
            f"pass --data-dir DIR or set {DATA_ENV} to the folder holding the face datasets"
        )
    return path


def cache_dir() -> Path:
    """Return (and create) the cache directory for extracted archives and decoded arrays."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "facefed").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
