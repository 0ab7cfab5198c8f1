"""Dataset archives and decoded-array caches under :func:`common.paths.cache_dir`.

Archives in the data directory are never modified. :func:`extract_archive` unpacks one, once, into
``<cache>/<name>-<content key>/``; :func:`load_or_build` keeps decoded image arrays next to it as
``.npz`` files so that a second load takes well under a second. Both are safe when several processes
(Flower simulation workers, parallel test runs) race on a cold cache: each builds privately, then
publishes with an atomic rename, and a loser of the race simply uses the winner's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes
from common.errors import DataError
from common.paths import CACHE_DIR_MODE, CACHE_ENV, CACHE_FILE_MODE, DATA_ENV, cache_dir

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
_KEY_CHARS = 16
_SUMS_FILE = "SHA256SUMS"
_digest_memo: dict[tuple[str, int, int, int], str] = {}


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise a :class:`DataError` that says how to fix it."""
    if not path.is_file():
        raise DataError(
            f"{what} {path} not found; pass --data-dir DIR or set {DATA_ENV} to the folder "
            f"that holds {path.name}"
        )
    return path


def content_key(path: Path) -> str:
    """Short SHA-256 key of a file's content, memoised per (path, size, mtime, inode) per process.

    If a ``SHA256SUMS`` file next to ``path`` lists it, the digest must match.

    Raises:
        DataError: if the digest disagrees with ``SHA256SUMS``.
    """
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo_key not in _digest_memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hexdigest = digest.hexdigest()
        expected = _listed_digest(path)
        if expected is not None and expected != hexdigest:
            raise DataError(
                f"{path} is corrupt: its SHA-256 {hexdigest[:12]}... differs from "
                f"{expected[:12]}... in {path.parent / _SUMS_FILE}; replace it with an intact copy"
            )
        _digest_memo[memo_key] = hexdigest[:_KEY_CHARS]
    return _digest_memo[memo_key]


def _listed_digest(path: Path) -> str | None:
    """The digest that ``SHA256SUMS`` in the file's folder lists for it, if any."""
    try:
        lines = (path.parent / _SUMS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        fields = line.split(maxsplit=1)
        if len(fields) == 2 and fields[1].lstrip("*").strip() == path.name:
            return fields[0].lower()
    return None


def files_key(root: Path, relpaths: Iterable[str]) -> str:
    """Short key of a folder's identity: its resolved path plus each listed file's size and mtime.

    Used to key decoded caches of already-extracted folders (``--fer-dir``, ``--lfw-dir``) cheaply:
    any added, removed, resized or touched file changes the key.

    Raises:
        DataError: if a listed file is missing.
    """
    digest = hashlib.sha256(str(root.resolve()).encode())
    for rel in relpaths:
        try:
            st = (root / rel).stat()
        except OSError as exc:
            raise DataError(
                f"dataset file {root / rel} is missing or unreadable ({exc.strerror}); "
                "restore the dataset folder"
            ) from exc
        digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:_KEY_CHARS]


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return archive.stem


def extract_archive(archive: Path) -> Path:
    """Extract a tar archive once into the cache; return the folder holding its top-level entries.

    The target is ``cache_dir()/<archive name>-<content key>``; an existing target is reused without
    touching the archive again beyond hashing it. Extraction uses ``tarfile``'s ``"data"`` filter,
    which rejects ``..`` traversal, links pointing outside and device files, and strips leading
    slashes from absolute names. It happens in a private temporary folder that is then renamed into
    place, so a crash or a concurrent extraction never leaves a half-filled target. The compressed
    stream is read to its end so that its checksum is verified too.

    Raises:
        DataError: if the archive is missing, corrupt or contains unsafe members.
    """
    archive = require_file(Path(archive), "dataset archive")
    target = cache_dir() / f"{_archive_stem(archive)}-{content_key(archive)}"
    if target.is_dir():
        return target
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise DataError(
            f"cannot write to the cache directory {target.parent} ({exc.strerror}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from exc
    try:
        logger.info("extracting %s into %s", archive, target)
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter=_private_data_filter)
            _drain(tar)
        for folder, _, _ in os.walk(tmp):  # also the parents that tarfile made with the umask
            os.chmod(folder, CACHE_DIR_MODE)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not the "another process won the race" case
                raise
            logger.debug("%s was extracted concurrently; using that copy", target)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"dataset archive {archive} is corrupt or unsafe to extract "
            f"({type(exc).__name__}: {exc}); replace it with an intact copy "
            "(compare with SHA256SUMS)"
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _private_data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``"data"`` filter, with owner-only modes: the cache holds faces (0600 / 0700)."""
    member = tarfile.data_filter(member, dest)
    if member.isdir():
        return member.replace(mode=CACHE_DIR_MODE, deep=False)
    if member.isfile():
        return member.replace(mode=CACHE_FILE_MODE, deep=False)
    return member


def _drain(tar: tarfile.TarFile) -> None:
    """Read the compressed stream to its end so that the gzip/bz2/xz checksum is verified.

    ``tarfile`` stops at the end-of-archive marker, before the compressor's trailer; without this a
    flipped byte inside a member could go unnoticed.
    """
    stream = tar.fileobj
    if stream is not None:
        while stream.read(1 << 20):
            pass


def load_or_build(
    cache_file: Path,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Load named arrays from the ``.npz`` ``cache_file``, or build them and write it atomically.

    A cache file that cannot be read (truncated by a full disk, say) is rebuilt rather than trusted.
    """
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            logger.warning("ignoring unreadable cache %s (%s); rebuilding it", cache_file, exc)
    arrays = build()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        atomic_write_bytes(cache_file, buffer.getvalue(), mode=CACHE_FILE_MODE)
    return arrays
