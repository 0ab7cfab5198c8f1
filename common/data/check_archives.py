"""Checks of the three image archives (FER2013, LFW, ORL) for ``facefed data check``.

Each archive is streamed once, straight from the data folder (nothing is extracted into the cache),
and every image in it is checked for completeness and decoded as its reader decodes it
(:func:`common.data.integrity.image_problem`). The layouts, names and list-file parsers are the
readers' own (:mod:`common.data.fer2013`, :mod:`common.data.lfw`, :mod:`common.data.orl`).
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.data import fer2013, lfw, orl
from common.data.integrity import image_problem
from common.errors import DataError

MAX_LINES_PER_KIND = 10  # problems of one kind shown per dataset; the rest are counted


@dataclass
class Findings:
    """What one dataset's check found: counts for the summary line and problems with their fix."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _per_kind: Counter[str] = field(default_factory=Counter)

    def problem(self, text: str, kind: str = "") -> None:
        """Record a problem; past :data:`MAX_LINES_PER_KIND` of one ``kind`` only count it."""
        self._per_kind[kind] += 1
        if not kind or self._per_kind[kind] <= MAX_LINES_PER_KIND:
            self.problems.append(text)

    def all_problems(self) -> list[str]:
        """The problem lines, each overflowing kind summed up in one more line."""
        more = [
            f"{n - MAX_LINES_PER_KIND} more problem(s) like these ({kind}); fix them the same way"
            for kind, n in self._per_kind.items()
            if kind and n > MAX_LINES_PER_KIND
        ]
        return self.problems + more


def _replace(archive: Path) -> str:
    return f"replace {archive.name} with an intact copy (README: Getting the data)"


def scan_archive(archive: Path, on_file: Callable[[str, bytes], None], findings: Findings) -> bool:
    """Stream every regular file of ``archive`` to ``on_file(name, bytes)``; False if unreadable.

    The compressed stream is read to its end, so that its checksum is verified too.
    """
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                handle = tar.extractfile(member) if member.isfile() else None
                if handle is not None:
                    on_file(member.name, handle.read())
            stream = tar.fileobj
            while stream is not None and stream.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        findings.problem(
            f"{archive.name} is corrupt or not a tar archive ({type(exc).__name__}: {exc}); "
            + _replace(archive)
        )
        return False
    return True


def check_fer2013(archive: Path) -> Findings:
    """Every image listed in ``fer2013/index.csv`` exists, is whole and is 48x48; split counts."""
    findings, root = Findings(), "fer2013/"
    bad_image: dict[str, str | None] = {}  # path relative to root -> problem, None if good
    index: list[bytes] = []

    def on_file(name: str, data: bytes) -> None:
        if name == root + "index.csv":
            index.append(data)
        elif name.startswith(root) and name.endswith(".jpg"):
            size = (fer2013.IMAGE_SIZE, fer2013.IMAGE_SIZE)
            bad_image[name[len(root) :]] = image_problem(data, gray=True, shape=size, name=name)

    if not scan_archive(archive, on_file, findings):
        return findings
    if not index:
        findings.problem(f"{archive.name} has no {root}index.csv; " + _replace(archive))
        return findings
    per_split: Counter[str] = Counter()
    labels: set[int] = set()
    where = Path(f"{archive.name}:{root}index.csv")
    try:
        reader = csv.DictReader(io.StringIO(index[0].decode("utf-8"), newline=""))
        missing = [c for c in fer2013._COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            findings.problem(
                f"{where} lacks column(s) {', '.join(missing)}; it must have the header "
                f"{','.join(fer2013._COLUMNS)}; " + _replace(archive)
            )
            return findings
        for row in reader:
            usage = (row.get("usage") or "").strip()
            try:
                parsed = fer2013._parse_row(where, reader.line_num, row, usage)
            except DataError as exc:
                findings.problem(str(exc), kind="index.csv row")
                continue
            if parsed is None:
                continue
            path, label = parsed
            if path not in bad_image:
                findings.problem(
                    f"{where} lists {path}, which is not in the archive; " + _replace(archive),
                    kind="listed image missing",
                )
            elif (problem := bad_image[path]) is not None:
                findings.problem(f"{problem}; " + _replace(archive), kind="image")
            per_split[usage] += 1
            labels.add(label)
    except (UnicodeDecodeError, csv.Error) as exc:
        findings.problem(f"cannot read {where} ({exc}); " + _replace(archive))
        return findings
    for split in fer2013.SPLITS:
        if per_split[split] or split != "PrivateTest":  # PrivateTest is optional
            findings.counts[split] = per_split[split]
    for split in ("Training", "PublicTest"):
        if not per_split[split]:
            findings.problem(
                f"{where} lists no {split} images (facefed trains on Training and reports "
                "PublicTest); " + _replace(archive)
            )
    findings.counts["classes"] = len(labels)
    return findings


def check_lfw(archive: Path) -> Findings:
    """Every image is whole; the people and pairs files name people and images that exist."""
    findings, root = Findings(), "lfw112/"
    images: dict[tuple[str, int], str | None] = {}  # (name, number) -> problem, None if good
    texts: dict[str, bytes] = {}
    lists = {root + n for n in (*lfw.PAIRS_NAMES, *lfw.PEOPLE_NAMES)}

    def on_file(name: str, data: bytes) -> None:
        if name in lists:
            texts[name[len(root) :]] = data
            return
        parts = PurePosixPath(name).parts
        if len(parts) == 4 and parts[:2] == ("lfw112", "images"):
            match = re.fullmatch(rf"{re.escape(parts[2])}_(\d{{4}})\.jpg", parts[3])
            if match:
                images[(parts[2], int(match.group(1)))] = image_problem(data, False, name=name)

    if not scan_archive(archive, on_file, findings):
        return findings
    for problem in images.values():
        if problem is not None:
            findings.problem(f"{problem}; " + _replace(archive), kind="image")
    per_person = Counter(name for name, _ in images)
    findings.counts.update(people=len(per_person), images=len(images))
    if not images:
        findings.problem(
            f"{archive.name} has no {root}images/<Name>/<Name>_NNNN.jpg images; "
            + _replace(archive)
        )
    _check_people(archive, texts, per_person, findings)
    _check_pairs(archive, texts, images, per_person, findings)
    return findings


def _list_text(
    archive: Path, texts: dict[str, bytes], names: tuple[str, ...], findings: Findings
) -> tuple[str, list[str]] | None:
    name = next((n for n in names if n in texts), None)
    if name is None:
        findings.problem(
            f"{archive.name} has no lfw112/{' or lfw112/'.join(names)}; " + _replace(archive)
        )
        return None
    try:
        return name, texts[name].decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        findings.problem(
            f"{archive.name}:lfw112/{name} is not UTF-8 text ({exc}); " + _replace(archive)
        )
        return None


def _check_people(
    archive: Path, texts: dict[str, bytes], per_person: Counter[str], findings: Findings
) -> None:
    listed = _list_text(archive, texts, lfw.PEOPLE_NAMES, findings)
    if listed is None:
        return
    name, lines = listed
    try:
        people_sets = lfw.parse_people(lines, name)
    except DataError as exc:
        findings.problem(f"{exc}; " + _replace(archive))
        return
    findings.counts["people sets"] = len(people_sets)
    for k, people in enumerate(people_sets):
        for person, count in people:
            have = per_person.get(person, 0)
            if have != count:
                findings.problem(
                    f"{name} set {k + 1} lists {person} with {count} images but the archive has "
                    f"{have}; use the people file that belongs to these images",
                    kind="people file",
                )


def _check_pairs(
    archive: Path,
    texts: dict[str, bytes],
    images: dict[tuple[str, int], str | None],
    per_person: Counter[str],
    findings: Findings,
) -> None:
    listed = _list_text(archive, texts, lfw.PAIRS_NAMES, findings)
    if listed is None:
        return
    name, lines = listed
    try:
        pairs = lfw.parse_pairs(lines, name)
    except DataError as exc:
        findings.problem(f"{exc}; " + _replace(archive))
        return
    findings.counts.update(pairs=len(pairs), folds=len({p.fold for p in pairs}))
    reported: set[tuple[str, int]] = set()  # one line per missing image, or per missing person
    for pair in pairs:
        for person, num in ((pair.name1, pair.num1), (pair.name2, pair.num2)):
            key = (person, num if person in per_person else 0)
            if (person, num) in images or key in reported:
                continue
            reported.add(key)
            what = (
                f"names {person}, who has no images in the archive"
                if person not in per_person
                else f"refers to {lfw.photo_member(person, num)}, which is not in the archive"
            )
            findings.problem(
                f"{name} (set {pair.fold + 1}) {what}; use the pairs file that belongs to "
                "these images",
                kind="pairs file",
            )


def check_orl(archive: Path) -> Findings:
    """40 subjects x 10 whole 92x112 images in ``att_faces/s<k>/<n>.pgm``."""
    findings = Findings()
    per_subject: Counter[int] = Counter()

    def on_file(name: str, data: bytes) -> None:
        parts = PurePosixPath(name).parts
        if len(parts) != 3 or parts[0] != "att_faces":
            return
        subject, number = orl._SUBJECT.fullmatch(parts[1]), orl._IMAGE.fullmatch(parts[2])
        if subject and number:
            per_subject[int(subject.group(1))] += 1
            problem = image_problem(data, gray=True, shape=orl.IMAGE_SHAPE, name=name)
            if problem is not None:
                findings.problem(f"{problem}; " + _replace(archive), kind="image")

    if not scan_archive(archive, on_file, findings):
        return findings
    findings.counts.update(subjects=len(per_subject), images=sum(per_subject.values()))
    if len(per_subject) != 40 or set(per_subject.values()) != {10}:
        findings.problem(
            f"{archive.name} holds {len(per_subject)} subjects with "
            f"{sorted(set(per_subject.values()))} images each in att_faces/s<k>/<n>.pgm, "
            "expected 40 subjects x 10 images; " + _replace(archive)
        )
    return findings
