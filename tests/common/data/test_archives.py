"""Archive extraction: once, safe against traversal, atomic under concurrency, clear errors."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from common.data import archives
from common.data.archives import extract_archive, load_or_build
from common.data.orl import ARCHIVE as ORL_ARCHIVE
from common.data.orl import load_orl
from common.errors import DataError
from common.paths import CACHE_TAG, data_dir


def entries(cache: Path) -> list[str]:
    """What the cache holds besides the CACHEDIR.TAG facefed writes into a cache it creates."""
    return sorted(p.name for p in cache.iterdir() if p.name != CACHE_TAG)


def _make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_extracts_into_cache_folder_named_by_archive_and_content(
    isolated_cache: Path, tmp_path: Path
) -> None:
    archive = _make_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"alpha", "toy/sub/b.txt": b"beta"})

    root = extract_archive(archive)

    assert root.parent == isolated_cache
    assert root.name.startswith("toy-")
    assert (root / "toy" / "a.txt").read_bytes() == b"alpha"
    assert (root / "toy" / "sub" / "b.txt").read_bytes() == b"beta"
    assert entries(isolated_cache) == [root.name]  # no temp folder left behind


def test_second_call_reuses_the_extraction(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _make_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"alpha"})
    first = extract_archive(archive)

    def no_reopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("archive extracted twice")

    monkeypatch.setattr(archives.tarfile, "open", no_reopen)
    start = time.perf_counter()
    second = extract_archive(archive)

    assert second == first
    assert time.perf_counter() - start < 0.5


def test_different_content_gets_a_different_folder(isolated_cache: Path, tmp_path: Path) -> None:
    one = extract_archive(_make_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"one"}))
    (tmp_path / "v2").mkdir()
    two = extract_archive(_make_tar(tmp_path / "v2" / "toy.tar.gz", {"toy/a.txt": b"two"}))

    assert one != two
    assert (two / "toy" / "a.txt").read_bytes() == b"two"


def test_concurrent_extractions_agree_and_leave_one_complete_copy(
    isolated_cache: Path, tmp_path: Path
) -> None:
    members = {f"toy/{i}.bin": bytes([i]) * 5000 for i in range(50)}
    archive = _make_tar(tmp_path / "toy.tar.gz", members)

    with ThreadPoolExecutor(max_workers=4) as pool:
        roots = list(pool.map(lambda _: extract_archive(archive), range(8)))

    assert len(set(roots)) == 1
    assert sorted(p.name for p in (roots[0] / "toy").iterdir()) == sorted(
        Path(m).name for m in members
    )
    assert entries(isolated_cache) == [roots[0].name]


def test_rejects_members_that_escape_the_target(isolated_cache: Path, tmp_path: Path) -> None:
    archive = _make_tar(tmp_path / "evil.tar.gz", {"ok.txt": b"fine", "../escaped.txt": b"pwned"})

    with pytest.raises(DataError, match="unsafe"):
        extract_archive(archive)

    assert not (isolated_cache / "escaped.txt").exists()
    assert entries(isolated_cache) == []  # the temp folder was cleaned up


def test_absolute_member_paths_stay_inside_the_target(isolated_cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    archive = _make_tar(tmp_path / "abs.tar.gz", {str(outside): b"pwned"})

    root = extract_archive(archive)

    assert not outside.exists()
    assert (root / str(outside).lstrip("/")).read_bytes() == b"pwned"


def test_rejects_a_symlink_pointing_outside(isolated_cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("toy/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(DataError, match=str(archive)):
        extract_archive(archive)


def test_missing_archive_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_orl(data_dir=tmp_path)

    message = str(err.value)
    assert ORL_ARCHIVE in message
    assert "--data-dir" in message and "FACEFED_DATA" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_archive_is_a_data_error(isolated_cache: Path, tmp_path: Path, damage: str) -> None:
    original = (data_dir() / ORL_ARCHIVE).read_bytes()
    if damage == "truncate":
        broken = original[: len(original) // 2]
    elif damage == "garbage":
        broken = b"this is not a tarball" * 100
    else:
        middle = len(original) // 2
        broken = original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :]
    (tmp_path / ORL_ARCHIVE).write_bytes(broken)

    with pytest.raises(DataError, match="corrupt") as err:
        load_orl(data_dir=tmp_path)

    assert ORL_ARCHIVE in str(err.value)
    assert entries(isolated_cache) == []


def test_archive_disagreeing_with_sha256sums_is_rejected(
    isolated_cache: Path, tmp_path: Path
) -> None:
    archive = _make_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"alpha"})
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  toy.tar.gz\n")

    with pytest.raises(DataError, match="SHA256SUMS"):
        extract_archive(archive)


def test_a_copy_of_a_real_archive_extracts_and_loads(isolated_cache: Path, tmp_path: Path) -> None:
    shutil.copy(data_dir() / ORL_ARCHIVE, tmp_path / ORL_ARCHIVE)

    faces = load_orl(data_dir=tmp_path)

    assert faces.images.shape == (400, 112, 92)


def test_load_or_build_builds_once_then_reads_the_cache(isolated_cache: Path) -> None:
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(4, dtype=np.uint8)}

    target = isolated_cache / "thing.npz"
    first = load_or_build(target, build)
    second = load_or_build(target, build)

    assert len(calls) == 1
    np.testing.assert_array_equal(first["x"], second["x"])


def test_load_or_build_rebuilds_an_unreadable_cache(isolated_cache: Path) -> None:
    target = isolated_cache / "thing.npz"
    isolated_cache.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"PK\x03\x04 truncated")

    arrays = load_or_build(target, lambda: {"x": np.ones(3, np.int64)})

    assert arrays["x"].tolist() == [1, 1, 1]
    assert load_or_build(target, lambda: {"x": np.zeros(1, np.int64)})["x"].tolist() == [1, 1, 1]
