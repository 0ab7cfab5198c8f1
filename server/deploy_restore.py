"""``facefed deploy restore``: a kit back from a backup made by :mod:`server.deploy_backup`.

Nothing is written until every file of the backup matches its manifest (size and SHA-256); the
first one that does not is named in one line (:class:`IntegrityError`, exit 4). The kit is then
built in a staging folder beside ``--kit`` (0700, files owner-only with their recorded mode, each
hashed again as it is copied and fsynced) and moved into place with one rename. A folder that
holds anything is refused unless ``--force``, which moves it aside (``KIT.replaced-<time>``) rather
than deleting it; a site state there that is newer than the backup's is refused even then, unless
``--allow-older-state``: restoring it would make the site forget privacy it has spent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from client.training import site_store
from common.atomic import fsync_dir
from common.errors import IntegrityError, RefusedError
from server.deploy_backup import DIR_MODE, FILES, FORMAT, MANIFEST

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODE = re.compile(r"0?[0-7]{3}")
_FIX = "this backup is damaged or was changed: restore from another backup"


@dataclass(frozen=True)
class Planned:
    """One file to restore, as the manifest describes it."""

    path: PurePosixPath
    sha256: str
    size: int
    mode: int


def read_manifest(source: Path) -> tuple[dict[str, Any], list[Planned]]:
    """The backup's manifest and its files; IntegrityError if it is missing or malformed."""
    path = source / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(
                f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
            )
        files = [_planned(item) for item in manifest["files"]]
        for folder in manifest.get("dirs", []):
            _relative(folder)
    except FileNotFoundError:
        raise IntegrityError(
            f"{source} holds no {MANIFEST}; pass --from a folder written by `facefed deploy backup`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path} is unreadable ({exc}); {_FIX}") from None
    if len({p.path for p in files}) != len(files):
        raise IntegrityError(f"{path} lists a file twice; {_FIX}")
    return manifest, files


def _relative(text: Any) -> PurePosixPath:
    path = PurePosixPath(str(text))
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        raise ValueError(f"path {text!r} leaves the kit")
    return path


def _planned(item: Any) -> Planned:
    path = _relative(item["path"])
    sha, size, mode = str(item["sha256"]), item["size"], str(item["mode"])
    if not _SHA256.fullmatch(sha) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{path}: bad sha256 or size")
    if not _MODE.fullmatch(mode):
        raise ValueError(f"{path}: bad mode {mode!r}")
    return Planned(path, sha, size, int(mode, 8))


def _hash_copy(source: Path, dest: Path | None) -> tuple[str, int]:
    """SHA-256 and size of ``source`` (a plain file, never a link); copied to ``dest`` if given."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{source} is not a plain file")
        out = open(dest, "xb") if dest is not None else None  # noqa: SIM115
        try:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
                if out is not None:
                    out.write(block)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        finally:
            if out is not None:
                out.close()
    return digest.hexdigest(), size


def verify_backup(source: Path) -> tuple[dict[str, Any], list[Planned]]:
    """Every file of the backup against its manifest; IntegrityError naming the first bad one."""
    manifest, files = read_manifest(source)
    root = (source / FILES).resolve()
    for item in files:
        where = source / FILES / item.path
        if root not in where.resolve().parents:  # a folder of the backup linked elsewhere
            raise IntegrityError(f"backup file {where} leads outside the backup; {_FIX}")
        try:
            digest, size = _hash_copy(where, None)
        except OSError:
            raise IntegrityError(
                f"backup file {where} is missing or not a plain file; {_FIX}"
            ) from None
        if size != item.size or digest != item.sha256:
            raise IntegrityError(
                f"backup file {where} does not match its manifest (SHA-256 or size differs); {_FIX}"
            )
    return manifest, files


def _last_release(marker: Path) -> int:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return int(json.loads(marker.read_text(encoding="utf-8")).get("last-release", 0))
    return 0


def _refuse_rollback(source: Path, kit: Path, files: list[Planned]) -> None:
    # Every site state of the kit being replaced, whether or not the backup holds one: a backup
    # taken before the site's first release would otherwise erase the history it has since spent.
    markers = {item.path for item in files if item.path.name == site_store.MARKER}
    markers |= {PurePosixPath(p.relative_to(kit).as_posix()) for p in kit.rglob(site_store.MARKER)}
    for marker in sorted(markers):
        ours = _last_release(source / FILES / marker)  # 0 when the backup has none
        theirs = _last_release(kit / marker)
        if theirs > ours:
            raise RefusedError(
                f"{kit / marker} records release {theirs}, newer than the backup's {ours}: "
                "restoring it would make the site forget privacy budget it has spent; keep the "
                "newer state, or pass --allow-older-state if it is known to be damaged"
            )


def restore(
    source: Path, kit: Path, *, force: bool = False, allow_older_state: bool = False
) -> Path | None:
    """Restore the backup in ``source`` into ``kit``; the folder the old kit was moved to, if any.

    Raises:
        IntegrityError: a backup file does not match the manifest (nothing is written).
        RefusedError: ``kit`` holds anything and not ``force``; or its site state is newer.
    """
    source, kit = source.absolute(), kit.absolute()
    manifest, files = verify_backup(source)
    occupied = kit.exists() and (not kit.is_dir() or any(kit.iterdir()))
    if occupied and not force:
        raise RefusedError(
            f"{kit} is not empty; restore into a new folder, or pass --force to move it aside"
        )
    if occupied and not allow_older_state:
        _refuse_rollback(source, kit, files)
    kit.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    staging = Path(tempfile.mkdtemp(prefix=f".{kit.name}.", suffix=".restore", dir=kit.parent))
    try:
        os.chmod(staging, DIR_MODE)
        for folder in manifest.get("dirs", []):
            (staging / _relative(folder)).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for item in files:
            dest = staging / item.path
            for parent in reversed(dest.parents):
                if staging in parent.parents and not parent.exists():
                    parent.mkdir(mode=DIR_MODE)
                    os.chmod(parent, DIR_MODE)
            digest, size = _hash_copy(source / FILES / item.path, dest)
            if (digest, size) != (item.sha256, item.size):  # changed since it was verified
                raise IntegrityError(
                    f"backup file {source / FILES / item.path} changed during the restore; {_FIX}"
                )
            os.chmod(dest, (item.mode & 0o700) | 0o600)
        _fsync_tree(staging)
        aside = None
        if occupied:
            aside = kit.with_name(f"{kit.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
            os.rename(kit, aside)
        elif kit.exists():
            kit.rmdir()  # empty: the rename takes its place
        os.rename(staging, kit)
        fsync_dir(kit.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return aside


def _fsync_tree(root: Path) -> None:
    """Every folder under ``root`` owner-only (whatever the umask) and fsynced."""
    for here, _dirs, _names in os.walk(root):
        os.chmod(here, DIR_MODE)
        fsync_dir(Path(here))
