"""Attack review of the face-data cache: permissions whatever the umask, and a clear-cache that
deletes only facefed's own folder. FAILING tests demonstrate a claim not delivered."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.data.archives import load_or_build
from common.errors import RefusedError
from common.paths import cache_dir, clear_cache

ENTRY = "lfw-0123456789abcdef"


@pytest.fixture
def zero_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_one_facefed_entry_beside_user_files_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    (cache / ENTRY).mkdir(parents=True)
    (cache / "thesis.docx").write_text("mine")
    monkeypatch.setenv("FACEFED_CACHE", str(cache))
    with pytest.raises(RefusedError):
        clear_cache()
    assert (cache / "thesis.docx").exists()


def test_an_entry_that_links_to_user_files_deletes_only_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("x")
    cache = tmp_path / "c"
    monkeypatch.setenv("FACEFED_CACHE", str(cache))
    cache_dir()  # facefed's own, tagged cache folder
    (cache / ENTRY).symlink_to(photos)
    clear_cache()
    assert (photos / "a.jpg").exists()


@pytest.mark.parametrize("value", ["~", "~/.", "{tmp}/x/../home", "/"])
def test_home_and_root_are_refused_however_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    home = tmp_path / "home"
    (home / ENTRY).mkdir(parents=True)
    (tmp_path / "x").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FACEFED_CACHE", value.format(tmp=tmp_path))
    with pytest.raises(RefusedError):
        clear_cache()
    assert (home / ENTRY).exists()


def test_a_user_folder_with_one_hex_suffixed_subfolder_is_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BREAK (low): 'looks like facefed's cache' is decided on top-level NAMES only, with a pattern
    (`[\\w.+-]+-[0-9a-f]{16}`) that any name ending in 16 hex digits matches, e.g. a timestamped
    export folder; what is inside is never looked at. A mis-set FACEFED_CACHE pointing at such a
    folder loses the user's files."""
    folder = tmp_path / "exports"
    (folder / "export-2024061512300000").mkdir(parents=True)
    (folder / "export-2024061512300000" / "patients.csv").write_text("name,diagnosis\n")
    monkeypatch.setenv("FACEFED_CACHE", str(folder))
    with contextlib.suppress(RefusedError):
        clear_cache()
    assert (folder / "export-2024061512300000" / "patients.csv").exists()


def test_clear_cache_refusal_is_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "x.txt").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "data", "clear-cache"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FACEFED_CACHE": str(cache)},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("facefed: error:")


@pytest.mark.usefixtures("zero_umask")
def test_old_world_readable_cache_is_closed_and_new_files_are_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    (cache / ENTRY).mkdir(parents=True, mode=0o755)
    (cache / ENTRY / "face.jpg").write_text("x")
    os.chmod(cache, 0o755)
    os.chmod(cache / ENTRY / "face.jpg", 0o644)
    monkeypatch.setenv("FACEFED_CACHE", str(cache))

    root = cache_dir()
    load_or_build(root / "lfw-x.npz", lambda: {"a": np.zeros(2)})

    assert _mode(root) == 0o700  # the older, open entries are behind an owner-only folder
    assert _mode(root / "lfw-x.npz") == 0o600


@pytest.mark.usefixtures("zero_umask")
def test_a_new_cache_under_umask_0_is_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFED_CACHE", str(tmp_path / "new" / "cache"))
    assert _mode(cache_dir()) == 0o700
