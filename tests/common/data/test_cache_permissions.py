"""The cache of decoded faces is the owner's alone, and ``facefed data clear-cache`` deletes only it."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.data.archives import load_or_build
from common.data.lfw import load_lfw
from common.data.orl import load_orl
from common.paths import CACHE_TAG, DEFAULT_DATA_DIR, cache_dir, is_facefed_cache

needs_data = pytest.mark.skipif(
    not Path(os.environ.get("FACEFED_DATA") or DEFAULT_DATA_DIR).is_dir(),
    reason="the real datasets are not available",
)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would make new files 0644 and folders 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it (links not followed)."""
    found = {".": stat.S_IMODE(root.lstat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def clear_cache_cli(cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", "data", "clear-cache"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FACEFED_CACHE": str(cache)},
    )


# --- permissions ---------------------------------------------------------------------------------


@needs_data
@pytest.mark.usefixtures("open_umask")
def test_decoded_faces_are_cached_owner_only_whatever_the_umask(isolated_cache: Path) -> None:
    load_orl()  # an extracted archive
    load_lfw()  # an extracted archive and a decoded .npz
    load_or_build(cache_dir() / "features-face0-test.npz", lambda: {"x": np.zeros(3)})

    found = modes(isolated_cache)
    folders = {p for p in found if (isolated_cache / p).is_dir()}
    assert len(found) > 6000 and any(p.endswith(".npz") for p in found)
    assert {p: oct(m) for p, m in found.items() if p in folders and m != 0o700} == {}
    assert {p: oct(m) for p, m in found.items() if p not in folders and m != 0o600} == {}


@pytest.mark.usefixtures("open_umask")
def test_an_open_cache_left_by_an_older_facefed_is_tightened(isolated_cache: Path) -> None:
    isolated_cache.mkdir(mode=0o755)
    (isolated_cache / "lfw-0123456789abcdef.npz").write_bytes(b"old")

    cache_dir()

    assert stat.S_IMODE(isolated_cache.stat().st_mode) == 0o700


@pytest.mark.usefixtures("open_umask")
def test_an_open_folder_that_is_not_a_cache_is_only_warned_about(
    isolated_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    isolated_cache.mkdir(mode=0o755)
    (isolated_cache / "notes.txt").write_text("mine")

    with caplog.at_level(logging.WARNING):
        cache_dir()

    assert stat.S_IMODE(isolated_cache.stat().st_mode) == 0o755
    assert "can be read by other users" in caplog.text


# --- facefed data clear-cache --------------------------------------------------------------------


def test_clear_cache_removes_the_cache_and_says_how_much(isolated_cache: Path) -> None:
    cache_dir()
    (isolated_cache / "lfw-0123456789abcdef.npz").write_bytes(b"x" * 1000)
    (isolated_cache / "orl_att_faces_pgm-0123456789abcdef" / "att_faces").mkdir(parents=True)
    (isolated_cache / "orl_att_faces_pgm-0123456789abcdef" / "att_faces" / "1.pgm").write_bytes(
        b"y" * 234
    )

    tag = (isolated_cache / CACHE_TAG).stat().st_size  # the cache tag cache_dir() wrote

    proc = clear_cache_cli(isolated_cache)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"removed {isolated_cache}: 3 files, {1234 + tag:,} bytes\n"
    assert not isolated_cache.exists()


def test_clear_cache_with_no_cache_has_nothing_to_remove(isolated_cache: Path) -> None:
    proc = clear_cache_cli(isolated_cache)

    assert proc.returncode == 0
    assert proc.stdout == f"nothing to remove: {isolated_cache} does not exist\n"


def test_clear_cache_refuses_a_folder_that_is_not_facefeds(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".bashrc").write_text("")

    proc = clear_cache_cli(home)

    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("facefed: error: ")
    assert "does not look like facefed's cache" in proc.stderr and "not deleted" in proc.stderr
    assert (home / ".bashrc").exists() and (home / ".ssh").is_dir()


def test_clear_cache_refuses_a_link_to_a_cache(isolated_cache: Path, tmp_path: Path) -> None:
    cache_dir()
    (isolated_cache / "lfw-0123456789abcdef.npz").write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(isolated_cache)

    proc = clear_cache_cli(link)

    assert proc.returncode == 3
    assert "it is a symbolic link" in proc.stderr
    assert (isolated_cache / "lfw-0123456789abcdef.npz").exists() and link.is_symlink()


def test_an_empty_folder_is_left_in_place(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    proc = clear_cache_cli(empty)

    assert not is_facefed_cache(empty)
    assert proc.returncode == 0 and proc.stdout == f"nothing to remove: {empty} is empty\n"
    assert empty.is_dir()
