"""FER2013 reader: real counts and labels, cache behaviour, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data import fer2013
from common.data.fer2013 import EMOTIONS, load_fer2013
from common.data.images import decode_gray
from common.errors import ConfigError, DataError

HEADER = "path,label,emotion,usage\n"


@pytest.fixture(scope="module")
def training() -> fer2013.LabeledImages:
    return load_fer2013("Training")


@pytest.fixture(scope="module")
def public_test() -> fer2013.LabeledImages:
    return load_fer2013("PublicTest")


def test_training_split_matches_the_data_readme(training: fer2013.LabeledImages) -> None:
    assert training.images.shape == (28_709, 48, 48)
    assert training.images.dtype == np.uint8
    assert training.labels.dtype == np.int64
    assert set(np.unique(training.labels)) == set(range(7))


def test_public_test_split_matches_the_data_readme(public_test: fer2013.LabeledImages) -> None:
    assert public_test.images.shape == (3_589, 48, 48)
    assert set(np.unique(public_test.labels)) == set(range(7))


def test_emotion_names_follow_the_project_label_order() -> None:
    assert EMOTIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_rows_are_the_decoded_images_of_index_csv(
    public_test: fer2013.LabeledImages, fer_root: Path
) -> None:
    lines = (fer_root / "index.csv").read_text().splitlines()[1:]
    rows = [line.split(",") for line in lines if line.endswith(",PublicTest")]

    for i in (0, 1234, len(rows) - 1):
        path, label, emotion, _ = rows[i]
        np.testing.assert_array_equal(public_test.images[i], decode_gray(fer_root / path))
        assert public_test.labels[i] == int(label)
        assert EMOTIONS[int(label)] == emotion


def test_contrast_shift_between_splits_is_as_documented(
    training: fer2013.LabeledImages, public_test: fer2013.LabeledImages
) -> None:
    # README: median per-image std 38 (Training) vs 54 (PublicTest)
    train_std = np.median(training.images[:3000].reshape(3000, -1).std(axis=1))
    test_std = np.median(public_test.images.reshape(len(public_test), -1).std(axis=1))
    assert 33 < train_std < 43
    assert 49 < test_std < 59


def test_second_load_from_the_archive_is_fast(training: fer2013.LabeledImages) -> None:
    start = time.perf_counter()
    again = load_fer2013("Training")
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(again.labels, training.labels)


def test_unknown_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PublicTest"):
        load_fer2013("Validation")  # type: ignore[arg-type]


def test_missing_archive_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"fer2013_train_publictest\.tar\.gz.*--data-dir"):
        load_fer2013("Training", data_dir=tmp_path)


# ---------------------------------------------------------------- small --fer-dir copies


def _small_fer_dir(fer_root: Path, dest: Path, per_split: int = 5) -> Path:
    """Copy ``per_split`` real images of each split (and their index rows) into ``dest``."""
    lines = (fer_root / "index.csv").read_text().splitlines()[1:]
    chosen = [line for line in lines if line.endswith(",Training")][:per_split] + [
        line for line in lines if line.endswith(",PublicTest")
    ][:per_split]
    for line in chosen:
        rel = line.split(",")[0]
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fer_root / rel, dest / rel)
    (dest / "index.csv").write_text(HEADER + "\n".join(chosen) + "\n")
    return dest


def test_fer_dir_loads_an_extracted_folder(
    isolated_cache: Path, fer_root: Path, tmp_path: Path
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")

    data = load_fer2013("PublicTest", fer_dir=root)

    assert data.images.shape == (5, 48, 48)
    first = (root / "index.csv").read_text().splitlines()[6].split(",")[0]
    np.testing.assert_array_equal(data.images[0], decode_gray(root / first))


def test_fer_dir_may_be_the_parent_of_fer2013(
    isolated_cache: Path, fer_root: Path, tmp_path: Path
) -> None:
    _small_fer_dir(fer_root, tmp_path / "parent" / "fer2013")
    assert len(load_fer2013("Training", fer_dir=tmp_path / "parent")) == 5


def test_fer_dir_second_load_comes_from_the_cache(
    isolated_cache: Path, fer_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")
    first = load_fer2013("Training", fer_dir=root)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(fer2013, "decode_gray", no_decoding)
    second = load_fer2013("Training", fer_dir=root)

    np.testing.assert_array_equal(first.images, second.images)
    assert len(list(isolated_cache.glob("fer2013-dir-*-Training.npz"))) == 1


def test_fer_dir_cache_notices_a_changed_image(
    isolated_cache: Path, fer_root: Path, tmp_path: Path
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")
    before = load_fer2013("Training", fer_dir=root)
    rel = (root / "index.csv").read_text().splitlines()[1].split(",")[0]
    _, encoded = cv2.imencode(".png", np.full((48, 48), 7, np.uint8))
    (root / rel).write_bytes(encoded.tobytes())

    after = load_fer2013("Training", fer_dir=root)

    assert not np.array_equal(before.images[0], after.images[0])
    assert (after.images[0] == 7).all()


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("Training/angry/x.jpg,9,angry,Training", "label '9'"),
        ("Training/angry/x.jpg,zero,angry,Training", "label 'zero'"),
        ("Training/angry/x.jpg,3,angry,Training", "does not match label 3"),
        ("Training/angry/x.jpg,0,angry,Validation", "unknown usage"),
        ("../../etc/passwd,0,angry,Training", "must be relative"),
        ("Training/angry/x.jpg,0,angry", "wrong number of fields"),
    ],
)
def test_bad_index_row_is_a_data_error_naming_the_line(
    isolated_cache: Path, fer_root: Path, tmp_path: Path, bad_row: str, expected: str
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")
    with (root / "index.csv").open("a") as handle:
        handle.write(bad_row + "\n")

    with pytest.raises(DataError, match=expected) as err:
        load_fer2013("Training", fer_dir=root)

    assert "index.csv line 12" in str(err.value)


def test_missing_column_is_a_data_error(isolated_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "index.csv").write_text("path,label,usage\nTraining/a.jpg,0,Training\n")
    with pytest.raises(DataError, match=r"lacks column.*emotion"):
        load_fer2013("Training", fer_dir=tmp_path)


def test_unreadable_image_is_a_data_error_naming_it(
    isolated_cache: Path, fer_root: Path, tmp_path: Path
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")
    rel = (root / "index.csv").read_text().splitlines()[2].split(",")[0]
    (root / rel).write_bytes(b"\xff\xd8\xff not really a jpeg")

    with pytest.raises(DataError, match=Path(rel).name):
        load_fer2013("Training", fer_dir=root)


def test_wrong_image_size_is_a_data_error(
    isolated_cache: Path, fer_root: Path, tmp_path: Path
) -> None:
    root = _small_fer_dir(fer_root, tmp_path / "fer")
    rel = (root / "index.csv").read_text().splitlines()[1].split(",")[0]
    cv2.imwrite(str(root / rel), np.zeros((64, 64), np.uint8))

    with pytest.raises(DataError, match="expected 48x48"):
        load_fer2013("Training", fer_dir=root)


def test_folder_without_index_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--fer-dir"):
        load_fer2013("Training", fer_dir=tmp_path)


def _private_test_dir(fer_root: Path, dest: Path, n: int = 12) -> Path:
    """A FER2013 copy whose index lists ``n`` real PublicTest images as PrivateTest rows."""
    lines = [line for line in (fer_root / "index.csv").read_text().splitlines()[1:]]
    chosen = [line for line in lines if line.endswith(",PublicTest")][::300][:n]
    rows = []
    for line in chosen:
        rel, label, emotion, _ = line.split(",")
        new = rel.replace("PublicTest", "PrivateTest")
        (dest / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fer_root / rel, dest / new)
        rows.append(f"{new},{label},{emotion},PrivateTest")
    (dest / "index.csv").write_text(HEADER + "\n".join(rows) + "\n")
    return dest


def test_private_test_is_read_from_a_copy_that_lists_it(fer_root: Path, tmp_path: Path) -> None:
    root = _private_test_dir(fer_root, tmp_path / "fer")
    data = load_fer2013("PrivateTest", fer_dir=root)
    assert len(data) == 12 and data.images.shape[1:] == (48, 48)


def test_private_test_of_a_copy_without_it_is_one_clear_data_error() -> None:
    with pytest.raises(DataError, match="lists no PrivateTest images"):
        load_fer2013("PrivateTest")


def test_evaluate_scores_the_private_test_split(fer_root: Path, tmp_path: Path) -> None:
    from common.checkpoint import save_checkpoint
    from common.model_spec import ModelSpec

    spec = ModelSpec(face_width=8, emotion_width=8)
    ckpt = save_checkpoint(tmp_path / "c.ckpt", *spec.build(), spec, 1)
    root = _private_test_dir(fer_root, tmp_path / "fer")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "common.cli", "evaluate", "--checkpoint", str(ckpt)),
            *("--skip-face", "--fer-dir", str(root), "--fer-split", "PrivateTest"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["emotion"]["images"] == 12
    assert 0.0 <= report["emotion"]["accuracy"] <= 1.0
