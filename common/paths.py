"""Where facefed finds its data and where it caches extracted archives.

Resolution order for the data directory: an explicit argument (``--data-dir``), then the ``FACEFED_DATA``
environment variable, then ``../shared/data`` next to the repository checkout. The cache directory for
extracted archives and decoded arrays is ``FACEFED_CACHE`` or ``~/.cache/facefed``.

The cache holds decoded faces, so it is the owner's alone: the folder is created with mode 0700 (and
an older, looser facefed cache is tightened to it), and everything in it is 0700 / 0600 whatever the
umask. ``facefed data clear-cache`` deletes it only if it holds nothing but what facefed writes there
(:func:`is_facefed_cache`), so a mistyped ``FACEFED_CACHE`` never costs anyone their files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError, RefusedError

logger = logging.getLogger(__name__)

DATA_ENV = "FACEFED_DATA"
CACHE_ENV = "FACEFED_CACHE"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
CACHE_DIR_MODE = 0o700
CACHE_FILE_MODE = 0o600
# What facefed writes into its cache: extracted archives (<archive stem>-<16 hex>), decoded arrays
# (common.data.fer2013, .lfw, .chips, common.features) and the temporary names of atomic writes
# and extractions.
_CACHE_ENTRY = re.compile(
    r"[\w.+-]+-[0-9a-f]{16}|(fer2013|lfw|chips|features)-[\w.-]+\.npz|\..+\.tmp|CACHEDIR\.TAG"
)
# The Cache Directory Tagging Specification's tag (https://bford.info/cachedir/): facefed writes it
# into a cache folder it creates, and deletes a folder only if it holds it (names alone can match
# someone else's folder).
CACHE_TAG = "CACHEDIR.TAG"
_TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_TAG_TEXT = f"{_TAG_SIGNATURE}\n# facefed's cache of decoded face data; `facefed data clear-cache` removes it.\n"
_warned: set[Path] = set()


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


def cache_path() -> Path:
    """The cache directory's location (``FACEFED_CACHE`` or ``~/.cache/facefed``), not created."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "facefed").expanduser()


def cache_dir() -> Path:
    """Return (and create, mode 0700) the cache directory for decoded face data.

    A cache folder that an older facefed left readable by others is tightened to 0700 if it is
    empty or holds nothing but facefed's cache entries; any other open folder is only warned about.

    Raises:
        DataError: if the location exists but is not a folder.
    """
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=CACHE_DIR_MODE)
    except FileExistsError:
        _tighten(path)
        if any(path.iterdir()):
            return path  # a folder facefed did not create empty is never tagged as its own
    else:
        os.chmod(path, CACHE_DIR_MODE)  # mkdir's mode is filtered by the umask
    _write_tag(path)
    return path


def _write_tag(path: Path) -> None:
    fd = os.open(path / CACHE_TAG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CACHE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="ascii") as tag:
        tag.write(_TAG_TEXT)


def _tighten(path: Path) -> None:
    if not path.is_dir():
        raise DataError(
            f"cache location {path} is not a folder; set {CACHE_ENV} to a folder for facefed's cache"
        )
    info = path.stat()
    if not info.st_mode & 0o077 or info.st_uid != os.getuid():
        return
    if is_facefed_cache(path) or not any(path.iterdir()):
        os.chmod(path, CACHE_DIR_MODE)
    elif path not in _warned:
        _warned.add(path)
        logger.warning(
            "cache folder %s can be read by other users; run `chmod 700 %s` or set %s to a "
            "private folder",
            path,
            path,
            CACHE_ENV,
        )


def is_facefed_cache(path: Path) -> bool:
    """Whether ``path`` is a real folder holding nothing but what facefed writes into its cache.

    An empty folder is not (nothing shows that it is facefed's).
    """
    if path.is_symlink() or not path.is_dir():
        return False
    names = [entry.name for entry in path.iterdir()]
    return bool(names) and all(_CACHE_ENTRY.fullmatch(name) for name in names)


def is_tagged_cache(path: Path) -> bool:
    """Whether ``path`` holds the cache tag facefed writes into a cache folder it creates."""
    tag = path / CACHE_TAG
    if tag.is_symlink() or not tag.is_file():
        return False
    try:
        return tag.read_text(encoding="ascii", errors="replace").startswith(_TAG_SIGNATURE)
    except OSError:
        return False


@dataclass(frozen=True)
class ClearedCache:
    """What :func:`clear_cache` removed."""

    path: Path
    removed: bool
    files: int
    bytes: int


def clear_cache() -> ClearedCache:
    """Remove facefed's cache folder (:func:`cache_path`) and everything in it.

    Raises:
        RefusedError: if the location does not look like a facefed cache (a home folder, a
            folder holding other files, a symbolic link): it is never deleted.
    """
    path = cache_path()
    if not path.exists() and not path.is_symlink():
        return ClearedCache(path=path, removed=False, files=0, bytes=0)
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return ClearedCache(path=path, removed=False, files=0, bytes=0)
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve(), REPO_ROOT}
    if path.is_symlink() or not path.is_dir():
        why = "it is a symbolic link" if path.is_symlink() else "it is not a folder"
    elif path.resolve() in protected:
        why = "it is the root, home, current or facefed folder"
    elif not is_facefed_cache(path):
        why = "it holds files that facefed does not write there"
    elif not is_tagged_cache(path):
        why = f"it has no {CACHE_TAG}, which facefed writes into a cache folder it creates"
    else:
        why = ""
    if why:
        source = CACHE_ENV if os.environ.get(CACHE_ENV) else "the default"
        raise RefusedError(
            f"{path} (from {source}) does not look like facefed's cache ({why}), so it is not "
            f"deleted; point {CACHE_ENV} at facefed's cache folder, or delete it yourself"
        )
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            info = os.lstat(os.path.join(folder, name))
            files += 1
            size += info.st_size if stat.S_ISREG(info.st_mode) else 0
    shutil.rmtree(path)
    return ClearedCache(path=path, removed=True, files=files, bytes=size)
