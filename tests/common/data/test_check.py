"""``facefed data check``: a good data folder passes; each kind of damage is one problem line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data import fer2013, lfw, orl
from common.data.check import check_data_dir
from common.data.chips import YUNET_FILE
from common.data.integrity import image_problem, jpeg_is_complete, pgm_is_complete
from common.data.npz_sets import EYALEB_FILE, YALE_FILE
from common.paths import DATA_ENV, DEFAULT_DATA_DIR

REAL = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)
needs_data = pytest.mark.skipif(
    not (REAL / lfw.ARCHIVE).is_file(), reason=f"the real datasets are not in {REAL}"
)
TRUNCATED = "lfw112/images/Abel_Pacheco/Abel_Pacheco_0001.jpg"
NOBODY = "No_Such_Person"
Run = tuple[subprocess.CompletedProcess[str], Path]  # the command's result, its FACEFED_CACHE


def facefed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def problem_lines(proc: subprocess.CompletedProcess[str], dataset: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(f"problem: {dataset}:")]


# --- the shared data folder ----------------------------------------------------------------------


@needs_data
def test_the_real_data_folder_passes_with_its_counts() -> None:
    proc = facefed("data", "check", str(REAL))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "problem:" not in proc.stdout and proc.stderr == ""
    lines = proc.stdout.splitlines()
    expected = {
        "FER2013": "ok: 28,709 Training, 3,589 PublicTest, 7 classes",
        "LFW": "ok: 2,835 people, 6,165 images, 5 people sets, 3,000 pairs, 5 folds",
        "ORL": "ok: 40 subjects, 400 images",
        "Extended Yale B": "ok: 2,414 images, 38 subjects",
        "Yale Faces": "ok: 164 images, 15 subjects",
        "YuNet": "ok: 229,738 bytes",
        "SHA256SUMS": "ok: 7 files checked",
    }
    for name, summary in expected.items():
        assert any(line.split()[: len(name.split())] == name.split() for line in lines), name
        assert any(line.endswith(summary) for line in lines), summary
    assert lines[-1].startswith("all good")


def test_a_folder_that_does_not_exist_is_one_error_line(tmp_path: Path) -> None:
    proc = facefed("data", "check", str(tmp_path / "nowhere"))

    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("facefed: error:") == 1
    assert "does not exist" in proc.stderr


# --- a damaged copy: missing FER2013, a truncated JPEG and a stranger in LFW's pairs, -----------
# --- a truncated PGM in ORL, no Yale Faces (optional), and SHA256SUMS of the originals -----------


def _repack(source: Path, target: Path, change: dict[str, bytes]) -> None:
    """Copy a tar.gz member by member, with the bytes of the members in ``change`` replaced."""
    with tarfile.open(source, "r:gz") as old, tarfile.open(target, "w:gz", compresslevel=1) as new:
        for member in old:
            data = old.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name in change:
                data = change[member.name]
                member.size = len(data)
            new.addfile(member, None if data is None else io.BytesIO(data))


def _member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REAL / lfw.ARCHIVE).is_file():
        pytest.skip(f"the real datasets are not in {REAL}")
    folder = tmp_path_factory.mktemp("damaged")
    for name in (EYALEB_FILE, YUNET_FILE):
        (folder / name).symlink_to(REAL / name)
    shutil.copy(REAL / "SHA256SUMS", folder / "SHA256SUMS")
    jpeg = _member(REAL / lfw.ARCHIVE, TRUNCATED)
    pairs = _member(REAL / lfw.ARCHIVE, "lfw112/pairs_sets1-5.txt").decode().splitlines()
    name, n1, n2 = pairs[1].split()  # the first matched pair of set 1
    pairs[1] = f"{NOBODY} {n1} {n2}"
    changed = {
        TRUNCATED: jpeg[: len(jpeg) // 2],
        "lfw112/pairs_sets1-5.txt": "\n".join(pairs).encode(),
    }
    _repack(REAL / lfw.ARCHIVE, folder / lfw.ARCHIVE, changed)
    pgm = _member(REAL / orl.ARCHIVE, "att_faces/s7/3.pgm")
    _repack(REAL / orl.ARCHIVE, folder / orl.ARCHIVE, {"att_faces/s7/3.pgm": pgm[:-500]})
    return folder


@pytest.fixture(scope="module")
def damaged_run(damaged: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    cache = tmp_path_factory.mktemp("cache") / "facefed"
    return facefed("data", "check", str(damaged), env={"FACEFED_CACHE": str(cache)}), cache


def test_damage_exits_2_with_one_error_line_and_no_traceback(damaged_run: Run) -> None:
    proc, _ = damaged_run

    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("facefed: error: 6 problem(s) in ")


def test_a_missing_required_archive_is_one_problem_line(damaged_run: Run) -> None:
    proc, _ = damaged_run

    (line,) = problem_lines(proc, "FER2013")
    assert f"{fer2013.ARCHIVE} is missing" in line and "put it there" in line


def test_a_truncated_jpeg_inside_a_repacked_archive_is_caught(damaged_run: Run) -> None:
    proc, _ = damaged_run

    truncated = [line for line in problem_lines(proc, "LFW") if "truncated" in line]
    assert len(truncated) == 1
    assert f"image {TRUNCATED} is truncated" in truncated[0]
    assert f"replace {lfw.ARCHIVE} with an intact copy" in truncated[0]


def test_a_pairs_file_naming_a_missing_person_is_caught(damaged_run: Run) -> None:
    proc, _ = damaged_run

    strangers = [line for line in problem_lines(proc, "LFW") if NOBODY in line]
    assert strangers == [
        f"problem: LFW: pairs_sets1-5.txt (set 1) names {NOBODY}, who has no images in the "
        "archive; use the pairs file that belongs to these images"
    ]


def test_a_truncated_pgm_is_caught(damaged_run: Run) -> None:
    proc, _ = damaged_run

    (line,) = problem_lines(proc, "ORL")
    assert "image att_faces/s7/3.pgm is truncated" in line


def test_a_file_that_differs_from_sha256sums_is_a_problem(damaged_run: Run) -> None:
    proc, _ = damaged_run

    lines = problem_lines(proc, "SHA256SUMS")
    assert sorted(lines) == sorted(
        f"problem: SHA256SUMS: {name} differs from its SHA-256 in SHA256SUMS, and facefed "
        "refuses to read it; replace it with an intact copy (or, if you changed it on purpose, "
        "its line)"
        for name in (lfw.ARCHIVE, orl.ARCHIVE)
    )


def test_a_missing_optional_file_is_reported_but_not_a_problem(damaged_run: Run) -> None:
    proc, _ = damaged_run

    (line,) = [line for line in proc.stdout.splitlines() if YALE_FILE in line]
    assert "missing (optional: face detection and alignment tests and benchmarks)" in line
    assert problem_lines(proc, "Yale Faces") == []


def test_the_check_writes_nothing_into_the_cache(damaged_run: Run) -> None:
    _, cache = damaged_run

    assert not cache.exists()


def test_json_report_names_every_dataset_and_its_problems(damaged: Path) -> None:
    report = json.loads(json.dumps(check_data_dir(damaged).to_json()))

    assert report["ok"] is False
    status = {d["name"]: d["status"] for d in report["datasets"]}
    assert status == {
        "FER2013": "missing",
        "LFW": "problem",
        "ORL": "problem",
        "Extended Yale B": "ok",
        "YuNet": "ok",
        "Yale Faces": "optional-missing",
        "SHA256SUMS": "problem",
    }
    lfw_result = next(d for d in report["datasets"] if d["name"] == "LFW")
    assert lfw_result["counts"]["images"] == 6165 and len(lfw_result["problems"]) == 2


# --- whole images, whatever the decoder lets through ----------------------------------------------


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (48, 48), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def test_every_truncation_of_a_jpeg_is_caught() -> None:
    data = _jpeg()

    assert jpeg_is_complete(data)
    assert not any(jpeg_is_complete(data[:cut]) for cut in range(len(data) - 1))
    assert jpeg_is_complete(data + b"\0" * 16)  # padding after the end marker is harmless


def test_every_truncation_of_a_pgm_is_caught() -> None:
    ok, buf = cv2.imencode(".pgm", np.full((112, 92), 7, np.uint8))
    data = buf.tobytes()

    assert ok and pgm_is_complete(data) and image_problem(data, gray=True, name="x.pgm") is None
    assert all(image_problem(data[:cut], gray=True, name="x.pgm") for cut in range(len(data)))


def test_an_image_of_the_wrong_size_is_named() -> None:
    problem = image_problem(_jpeg(), gray=True, shape=(112, 92), name="x.jpg")

    assert problem == "image x.jpg is 48x48, expected 92x112"
