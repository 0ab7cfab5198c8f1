"""Labeled Faces in the Wild: images, the View 2 people sets and the verification pairs.

Layout: ``<root>/images/<Name>/<Name>_NNNN.jpg`` (or ``<root>/<Name>/...`` as in the original
``lfw/`` folder), plus ``people*.txt`` and ``pairs*.txt`` in the original LFW text formats
(``LFW_README.txt`` 3c, 3d). The shipped archive holds people sets 1-5 as 112x112 RGB crops;
original 250x250 images are centre-cropped to 150 px and resized to 112 the same way. People sets
and folds are 0-based here. Decoded images are cached like FER2013's.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.data.archives import (
    content_key,
    extract_archive,
    files_key,
    load_or_build,
    require_file,
)
from common.data.images import decode_rgb
from common.data.types import LabeledImages
from common.errors import ConfigError, DataError
from common.paths import cache_dir
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)

ARCHIVE = "lfw_deepfunneled112_sets1-5.tar.gz"
IMAGE_SIZE = 112
_ORIGINAL_SIZE, _ORIGINAL_CROP = 250, 150
PAIRS_NAMES = ("pairs_sets1-5.txt", "pairs.txt")
PEOPLE_NAMES = ("people_sets1-5.txt", "people.txt")


@dataclass(frozen=True)
class LfwPair:
    """One verification pair: image ``num1`` of ``name1`` against image ``num2`` of ``name2``."""

    name1: str
    num1: int
    name2: str
    num2: int
    same: bool
    fold: int  # 0-based set index in the pairs file


@dataclass(frozen=True, eq=False)
class LfwData:
    """Every image of an LFW folder, with the people sets and pairs that refer to them."""

    images: np.ndarray  # uint8 (N, 112, 112, 3) RGB
    identity: np.ndarray  # int64 (N,), index into names
    names: tuple[str, ...]
    image_row: dict[tuple[str, int], int]  # (name, image number) -> row in images
    people_sets: tuple[tuple[str, ...], ...]  # people set k (0-based) -> names
    pairs: tuple[LfwPair, ...]  # all pairs of all folds

    def pair_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(row1, row2, same, fold)`` arrays over :attr:`pairs`, ready for the metrics."""
        row1 = np.array([self.image_row[(p.name1, p.num1)] for p in self.pairs], dtype=np.int64)
        row2 = np.array([self.image_row[(p.name2, p.num2)] for p in self.pairs], dtype=np.int64)
        same = np.array([p.same for p in self.pairs], dtype=bool)
        fold = np.array([p.fold for p in self.pairs], dtype=np.int64)
        return row1, row2, same, fold


def load_lfw(
    data_dir: Path | None = None,
    lfw_dir: Path | None = None,
    pairs_file: Path | None = None,
    people_file: Path | None = None,
) -> LfwData:
    """Load LFW images, people sets and pairs.

    Args:
        data_dir: folder holding ``lfw_deepfunneled112_sets1-5.tar.gz`` (resolved with
            :func:`common.paths.data_dir` when ``None``); ignored when ``lfw_dir`` is given.
        lfw_dir: an LFW-layout folder to load instead of the archive.
        pairs_file: the pairs file; default ``pairs_sets1-5.txt`` or ``pairs.txt`` in the folder.
        people_file: the people file; default ``people_sets1-5.txt`` or ``people.txt`` in the
            folder if present, else no people sets.

    Raises:
        DataError: if files are missing or malformed, a people count disagrees with the images, or a
            pair refers to an image that does not exist.
    """
    if lfw_dir is not None:
        root = Path(lfw_dir)
        if not root.is_dir():
            raise DataError(
                f"LFW folder {root} does not exist; pass --lfw-dir an LFW-layout folder"
            )
        image_root = root / "images" if (root / "images").is_dir() else root
        listing = _list_images(image_root)
        key = files_key(image_root, [f"{n}/{n}_{k:04d}.jpg" for n, k in listing])
        cache_file = cache_dir() / f"lfw-dir-{key}.npz"
        arrays = load_or_build(cache_file, lambda: _decode(image_root, listing))
    else:
        archive = require_file(resolve_data_dir(data_dir) / ARCHIVE, "LFW archive")
        root = extract_archive(archive) / "lfw112"
        image_root = root / "images"
        arrays = load_or_build(
            cache_dir() / f"lfw-{content_key(archive)}.npz",
            lambda: _decode(image_root, _list_images(image_root)),
        )
    pairs_path = pairs_file or _find(root, PAIRS_NAMES)
    if pairs_path is None:
        raise DataError(
            f"no LFW pairs file ({' or '.join(PAIRS_NAMES)}) in {root}; pass --pairs FILE"
        )
    people_path = people_file or _find(root, PEOPLE_NAMES)
    return _assemble(arrays, Path(pairs_path), None if people_path is None else Path(people_path))


def lfw_train_subset(data: LfwData, sets: Sequence[int], min_images: int = 1) -> LabeledImages:
    """Images of the people in the given 0-based people sets with at least ``min_images`` images.

    Labels are identity indices as in ``data.identity`` (into ``data.names``; not renumbered).
    """
    rows = lfw_train_rows(data, sets, min_images)
    return LabeledImages(images=data.images[rows], labels=data.identity[rows])


def lfw_train_rows(data: LfwData, sets: Sequence[int], min_images: int = 1) -> np.ndarray:
    """The rows of :func:`lfw_train_subset`'s images in ``data.images``.

    Raises:
        ConfigError: if a set index is out of range or ``min_images < 1``.
        DataError: if no image qualifies.
    """
    if min_images < 1:
        raise ConfigError(f"min_images must be >= 1, got {min_images}")
    bad = [s for s in sets if not 0 <= s < len(data.people_sets)]
    if bad:
        raise ConfigError(
            f"LFW people set(s) {bad} do not exist; "
            f"this copy has sets 0..{len(data.people_sets) - 1}"
        )
    name_index = {name: i for i, name in enumerate(data.names)}
    wanted = np.array([name_index[n] for s in sets for n in data.people_sets[s]], dtype=np.int64)
    counts = np.bincount(data.identity, minlength=len(data.names))
    wanted = wanted[counts[wanted] >= min_images]
    rows = np.flatnonzero(np.isin(data.identity, wanted))
    if rows.size == 0:
        raise DataError(f"no LFW images of people in sets {list(sets)} with >= {min_images} images")
    return rows


def _find(root: Path, candidates: Sequence[str]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_file()), None)


def _list_images(image_root: Path) -> list[tuple[str, int]]:
    listing: list[tuple[str, int]] = []
    for person in sorted(p for p in image_root.iterdir() if p.is_dir()):
        pattern = re.compile(rf"{re.escape(person.name)}_(\d{{4}})\.jpg")
        for file in sorted(person.iterdir()):
            match = pattern.fullmatch(file.name)
            if match:
                listing.append((person.name, int(match.group(1))))
            else:
                logger.warning("ignoring %s: not named <Name>_NNNN.jpg", file)
    if not listing:
        raise DataError(
            f"no LFW images (<Name>/<Name>_NNNN.jpg) under {image_root}; pass an LFW-layout folder"
        )
    return listing


def _to_face_size(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    if (h, w) == (_ORIGINAL_SIZE, _ORIGINAL_SIZE):
        off = (_ORIGINAL_SIZE - _ORIGINAL_CROP) // 2
        image = image[off : off + _ORIGINAL_CROP, off : off + _ORIGINAL_CROP]
    interp = cv2.INTER_AREA if min(image.shape[:2]) > IMAGE_SIZE else cv2.INTER_LINEAR
    return cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=interp)


def _decode(image_root: Path, listing: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    logger.info("decoding %d LFW images from %s (cached afterwards)", len(listing), image_root)
    images = np.empty((len(listing), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (name, num) in enumerate(listing):
        images[i] = _to_face_size(decode_rgb(image_root / name / f"{name}_{num:04d}.jpg"))
    return {
        "images": images,
        "person": np.array([name for name, _ in listing], dtype=str),
        "number": np.array([num for _, num in listing], dtype=np.int64),
    }


def _assemble(arrays: dict[str, np.ndarray], pairs_path: Path, people_path: Path | None) -> LfwData:
    person = [str(p) for p in arrays["person"]]
    numbers = [int(n) for n in arrays["number"]]
    names = tuple(sorted(set(person)))
    name_index = {name: i for i, name in enumerate(names)}
    identity = np.array([name_index[p] for p in person], dtype=np.int64)
    image_row = {(p, n): row for row, (p, n) in enumerate(zip(person, numbers, strict=True))}
    people_sets: tuple[tuple[str, ...], ...] = ()
    if people_path is not None:
        counts = np.bincount(identity, minlength=len(names))
        people = parse_people(_read_text(people_path), str(people_path))
        for k, people_set in enumerate(people):
            for name, count in people_set:
                have = int(counts[name_index[name]]) if name in name_index else 0
                if have != count:
                    raise DataError(
                        f"{people_path} set {k + 1} lists {name} with {count} images but the "
                        f"folder has {have}; use the people file that belongs to these images"
                    )
        people_sets = tuple(tuple(name for name, _ in s) for s in people)
    pairs = parse_pairs(_read_text(pairs_path), str(pairs_path))
    for pair in pairs:
        for name, num in ((pair.name1, pair.num1), (pair.name2, pair.num2)):
            if (name, num) not in image_row:
                raise DataError(
                    f"{pairs_path} (set {pair.fold + 1}) refers to {name}/{name}_{num:04d}.jpg, "
                    "which is not among the images; use the pairs file that belongs to these images"
                )
    return LfwData(
        images=arrays["images"],
        identity=identity,
        names=names,
        image_row=image_row,
        people_sets=people_sets,
        pairs=pairs,
    )


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read LFW list {path} ({exc}); check the path") from exc


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: expected an integer, got {text!r}") from None


def parse_people(lines: list[str], source: str) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Parse a View 2 people file: number of sets, then per set a count and ``name count`` lines.

    Raises:
        DataError: naming the file and line if the format is wrong.
    """
    rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    pos = 0

    def take(n_fields: int, what: str) -> list[str]:
        nonlocal pos
        if pos >= len(rows):
            raise DataError(f"{source} ends early; expected {what}")
        line_no, fields = rows[pos]
        if len(fields) != n_fields:
            raise DataError(f"{source} line {line_no}: expected {what}, got {' '.join(fields)!r}")
        pos += 1
        return fields

    num_sets = _int(take(1, "the number of sets")[0], f"{source} line 1")
    sets = []
    for k in range(num_sets):
        size = _int(take(1, f"the number of people in set {k + 1}")[0], source)
        people = []
        for _ in range(size):
            name, count = take(2, "'name count'")
            people.append((name, _int(count, f"{source} (set {k + 1}, {name})")))
        sets.append(tuple(people))
    if pos != len(rows):
        raise DataError(f"{source} line {rows[pos][0]}: unexpected content after set {num_sets}")
    return tuple(sets)


def parse_pairs(lines: list[str], source: str) -> tuple[LfwPair, ...]:
    """Parse a pairs file: ``num_sets N`` (or just ``N`` for one set), then per set N matched
    ``name n1 n2`` and N mismatched ``name1 n1 name2 n2`` lines.

    Raises:
        DataError: naming the file and line if the format is wrong.
    """
    rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise DataError(f"{source} is empty; expected an LFW pairs file")
    header = rows[0][1]
    if len(header) not in (1, 2):
        raise DataError(f"{source} line 1: expected 'num_sets pairs_per_set', got {header!r}")
    num_sets, per_set = (
        (1, _int(header[0], source))
        if len(header) == 1
        else (
            _int(header[0], source),
            _int(header[1], source),
        )
    )
    if len(rows) - 1 != 2 * num_sets * per_set:
        raise DataError(
            f"{source} has {len(rows) - 1} pair lines; its header promises {num_sets} sets x "
            f"{2 * per_set} = {2 * num_sets * per_set}"
        )
    pairs = []
    for offset, (line_no, fields) in enumerate(rows[1:]):
        fold, same = offset // (2 * per_set), offset % (2 * per_set) < per_set
        where = f"{source} line {line_no}"
        if same and len(fields) == 3:
            name, n1, n2 = fields
            pairs.append(LfwPair(name, _int(n1, where), name, _int(n2, where), True, fold))
        elif not same and len(fields) == 4:
            name1, n1, name2, n2 = fields
            pairs.append(LfwPair(name1, _int(n1, where), name2, _int(n2, where), False, fold))
        else:
            expected = "'name n1 n2'" if same else "'name1 n1 name2 n2'"
            raise DataError(f"{where}: expected {expected}, got {' '.join(fields)!r}")
    return tuple(pairs)


def archive_pair_photos(
    archive: Path, select: Callable[[tuple[LfwPair, ...]], list[LfwPair]]
) -> tuple[list[LfwPair], dict[str, bytes]]:
    """The pairs ``select`` picks from the archive's pairs file, and the JPEG bytes of their photos,
    keyed by :func:`photo_member` (read straight from the archive, as a device would get them)."""
    with tarfile.open(archive, "r:gz") as tar:
        handle = tar.extractfile("lfw112/pairs_sets1-5.txt")
        if handle is None:
            raise DataError(f"{archive} has no lfw112/pairs_sets1-5.txt")
        pairs = select(parse_pairs(handle.read().decode().splitlines(), "pairs_sets1-5.txt"))
        wanted = {
            photo_member(n, i) for p in pairs for n, i in ((p.name1, p.num1), (p.name2, p.num2))
        }
        photos = {}
        for member in tar:
            if member.name in wanted and (f := tar.extractfile(member)) is not None:
                photos[member.name] = f.read()
    return pairs, photos


def photo_member(name: str, num: int) -> str:
    """The archive member of LFW photo ``num`` of ``name``."""
    return f"lfw112/images/{name}/{name}_{num:04d}.jpg"
