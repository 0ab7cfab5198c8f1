"""LFW reader: real counts, the protocol's people sets and pairs, custom folders, clear errors."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data.archives import extract_archive
from common.data.lfw import ARCHIVE, LfwData, lfw_train_subset, load_lfw, parse_pairs, parse_people
from common.errors import ConfigError, DataError
from common.paths import data_dir


@pytest.fixture(scope="module")
def lfw() -> LfwData:
    return load_lfw()


@pytest.fixture(scope="module")
def lfw_images_root() -> Path:
    return extract_archive(data_dir() / ARCHIVE) / "lfw112" / "images"


def test_counts_match_the_data_readme(lfw: LfwData) -> None:
    assert lfw.images.shape == (6_165, 112, 112, 3)
    assert lfw.images.dtype == np.uint8
    assert len(lfw.names) == 2_835
    assert len(lfw.people_sets) == 5
    assert sum(len(s) for s in lfw.people_sets) == 2_835


def test_pairs_are_five_folds_of_300_matched_and_300_mismatched(lfw: LfwData) -> None:
    assert len(lfw.pairs) == 3_000
    assert Counter((p.fold, p.same) for p in lfw.pairs) == {
        (fold, same): 300 for fold in range(5) for same in (True, False)
    }
    assert all((p.name1 == p.name2) == p.same for p in lfw.pairs)


def test_first_pair_lines_parse_as_in_the_file(lfw: LfwData) -> None:
    # pairs_sets1-5.txt: line 2 "Abel_Pacheco 1 4", line 302 "Abdel_Madi_Shabneh 1 Dean_Barker 1"
    first, first_mismatch = lfw.pairs[0], lfw.pairs[300]
    assert (first.name1, first.num1, first.name2, first.num2) == (
        "Abel_Pacheco",
        1,
        "Abel_Pacheco",
        4,
    )
    assert (first_mismatch.name1, first_mismatch.name2, first_mismatch.same) == (
        "Abdel_Madi_Shabneh",
        "Dean_Barker",
        False,
    )


def test_people_sets_are_disjoint_and_pairs_stay_inside_their_set(lfw: LfwData) -> None:
    set_of = {name: k for k, people in enumerate(lfw.people_sets) for name in people}
    assert len(set_of) == len(lfw.names)
    assert all(set_of[p.name1] == set_of[p.name2] == p.fold for p in lfw.pairs)


def test_image_row_and_identity_agree(lfw: LfwData, lfw_images_root: Path) -> None:
    row = lfw.image_row[("Abel_Pacheco", 4)]
    assert lfw.names[lfw.identity[row]] == "Abel_Pacheco"
    bgr = cv2.imread(str(lfw_images_root / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg"))
    assert bgr is not None
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(lfw.images[row], expected)


def test_pair_arrays_point_at_the_pair_images(lfw: LfwData) -> None:
    row1, row2, same, fold = lfw.pair_arrays()

    assert row1.shape == row2.shape == same.shape == fold.shape == (3_000,)
    np.testing.assert_array_equal(lfw.identity[row1] == lfw.identity[row2], same)
    assert fold.tolist() == [p.fold for p in lfw.pairs]


def test_train_subset_holds_only_the_people_of_the_chosen_sets(lfw: LfwData) -> None:
    subset = lfw_train_subset(lfw, sets=[0, 1])

    chosen = {lfw.names.index(n) for k in (0, 1) for n in lfw.people_sets[k]}
    assert set(subset.labels.tolist()) == chosen
    assert len(subset) == int(np.isin(lfw.identity, list(chosen)).sum())
    held_out = {p.name1 for p in lfw.pairs if p.fold >= 2}
    assert not held_out & {lfw.names[i] for i in subset.labels}


def test_train_subset_min_images_drops_people_with_fewer_images(lfw: LfwData) -> None:
    subset = lfw_train_subset(lfw, sets=[2], min_images=5)

    counts = Counter(subset.labels.tolist())
    assert counts and min(counts.values()) >= 5
    all_counts = np.bincount(lfw.identity)
    eligible = [lfw.names.index(n) for n in lfw.people_sets[2]]
    assert set(counts) == {i for i in eligible if all_counts[i] >= 5}


def test_train_subset_rejects_unknown_sets(lfw: LfwData) -> None:
    with pytest.raises(ConfigError, match=r"sets 0\.\.4"):
        lfw_train_subset(lfw, sets=[5])


def test_missing_archive_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lfw_deepfunneled112_sets1-5\.tar\.gz.*--data-dir"):
        load_lfw(data_dir=tmp_path)


# ---------------------------------------------------------------- custom LFW-layout folders

PEOPLE = ["Abel_Pacheco", "Akhmed_Zakayev", "Zico", "Abdel_Madi_Shabneh", "Dean_Barker"]


def _small_lfw(src: Path, dest: Path) -> Path:
    for name in PEOPLE:
        shutil.copytree(src / name, dest / "images" / name)
    return dest


def _write_pairs(path: Path, text: str) -> Path:
    path.write_text(text.replace(" ", "\t"))
    return path


def test_lfw_dir_with_a_pairs_file_loads_images_and_pairs(
    isolated_cache: Path, lfw_images_root: Path, tmp_path: Path
) -> None:
    root = _small_lfw(lfw_images_root, tmp_path / "lfw")
    pairs = _write_pairs(
        tmp_path / "pairs.txt",
        "2 1\nAbel_Pacheco 1 4\nAbdel_Madi_Shabneh 1 Dean_Barker 1\n"
        "Zico 1 2\nAkhmed_Zakayev 1 Zico 3\n",
    )

    data = load_lfw(lfw_dir=root, pairs_file=pairs)

    assert data.names == tuple(sorted(PEOPLE))
    assert data.people_sets == ()
    assert [(p.fold, p.same) for p in data.pairs] == [(0, True), (0, False), (1, True), (1, False)]
    assert data.images.shape[1:] == (112, 112, 3)


def test_lfw_dir_pair_with_a_missing_image_is_a_data_error(
    isolated_cache: Path, lfw_images_root: Path, tmp_path: Path
) -> None:
    root = _small_lfw(lfw_images_root, tmp_path / "lfw")
    pairs = _write_pairs(tmp_path / "pairs.txt", "1 1\nZico 1 99\nZico 1 Dean_Barker 1\n")

    with pytest.raises(DataError, match=r"Zico_0099\.jpg"):
        load_lfw(lfw_dir=root, pairs_file=pairs)


def test_lfw_dir_without_pairs_file_asks_for_one(
    isolated_cache: Path, lfw_images_root: Path, tmp_path: Path
) -> None:
    root = _small_lfw(lfw_images_root, tmp_path / "lfw")
    with pytest.raises(DataError, match="--pairs"):
        load_lfw(lfw_dir=root)


def test_people_count_disagreeing_with_images_is_a_data_error(
    isolated_cache: Path, lfw_images_root: Path, tmp_path: Path
) -> None:
    root = _small_lfw(lfw_images_root, tmp_path / "lfw")
    pairs = _write_pairs(root / "pairs.txt", "1 1\nZico 1 2\nZico 1 Dean_Barker 1\n")
    people = _write_pairs(tmp_path / "people.txt", "1\n2\nZico 7\nDean_Barker 1\n")

    with pytest.raises(DataError, match="Zico with 7 images but the folder has 3"):
        load_lfw(lfw_dir=root, pairs_file=pairs, people_file=people)


def test_original_250px_images_are_centre_cropped_to_112(
    isolated_cache: Path, tmp_path: Path
) -> None:
    big = np.zeros((250, 250, 3), np.uint8)
    big[50:200, 50:200] = (0, 0, 255)  # BGR red square exactly over the 150 px centre crop
    for name in ("Ann_A", "Bob_B"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / f"{name}_0001.png"), big)  # ignored: not .jpg
        cv2.imwrite(str(tmp_path / name / f"{name}_0001.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 100])
    pairs = _write_pairs(tmp_path / "pairs.txt", "1\nAnn_A 1 1\nAnn_A 1 Bob_B 1\n")

    data = load_lfw(lfw_dir=tmp_path, pairs_file=pairs)

    assert data.images.shape == (2, 112, 112, 3)
    red = data.images[:, 8:-8, 8:-8].reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("2 1\nA 1 2\nA 1 B 2\n", "promises 2 sets"),
        ("1 1\nA 1 B 2\nA 1 B 2\n", "line 2: expected 'name n1 n2'"),
        ("1 1\nA 1 2\nA one B 2\n", "expected an integer"),
    ],
)
def test_malformed_pairs_file_is_a_data_error(text: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        parse_pairs(text.splitlines(), "pairs.txt")


def test_people_file_parses_sets_in_order() -> None:
    sets = parse_people(["2", "1", "A\t3", "2", "B\t1", "C\t2"], "people.txt")
    assert sets == ((("A", 3),), (("B", 1), ("C", 2)))


def test_truncated_people_file_is_a_data_error() -> None:
    with pytest.raises(DataError, match="ends early"):
        parse_people(["2", "1", "A\t3", "2", "B\t1"], "people.txt")
