"""Crash-safe file writes: temporary file in the same directory, fsync, rename, fsync the directory.

A reader sees either the old file or the new one, never a torn mix, even if the process is killed with
SIGKILL or the machine loses power between any two instructions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from common.failpoints import failpoint


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_temp(target: Path, data: bytes, mode: int) -> str:
    """A temporary file beside ``target`` holding ``data`` (``mode``, fsynced); its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return tmp_name


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, with permissions ``mode``."""
    target = Path(path)
    tmp_name = _durable_temp(target, data, mode)
    try:
        failpoint("atomic.before-rename")
        os.replace(tmp_name, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_create_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a new file ``path`` atomically; FileExistsError if ``path`` exists.

    Like :func:`atomic_write_bytes`, but never replaces a file: of two writers racing for one name,
    exactly one succeeds (``link(2)`` is atomic and fails on an existing name).
    """
    target = Path(path)
    tmp_name = _durable_temp(target, data, mode)
    try:
        os.link(tmp_name, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
