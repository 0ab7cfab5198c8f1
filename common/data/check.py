"""``facefed data check``: is a data folder complete and intact, before a long run finds out?

One :class:`DatasetCheck` per file that facefed reads from the data folder, in the layout its
reader expects (the file names and layouts are the readers' constants). Every image is checked,
including for truncation (:mod:`common.data.integrity`); LFW's people and pairs files must name
people and images that exist; ``SHA256SUMS``, when present, must match. Nothing is written: the
archives are streamed, not extracted into the cache.

Which files are required is what the default simulation (``simulations/default.toml``) reads:
FER2013 (emotions), LFW, ORL and Extended Yale B (``face-sources``), and the YuNet detector, which
aligns the faces onto chips for the default pretrained face model (``face-model = "pretrained"``).
Yale Faces is optional.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.data import fer2013, lfw, orl
from common.data.check_archives import Findings, check_fer2013, check_lfw, check_orl
from common.data.chips import YUNET_FILE, open_yunet
from common.data.npz_sets import (
    EYALEB_FILE,
    YALE_FILE,
    load_extended_yale_b,
    load_yale_faces,
)
from common.errors import FacefedError

Status = Literal["ok", "problem", "missing", "optional-missing"]
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A file facefed reads from the data folder, and how to check it."""

    name: str
    file: str
    required: bool
    used_for: str
    check: Callable[[Path], Findings]


@dataclass(frozen=True, kw_only=True)
class DatasetCheck:
    """The outcome for one dataset file: its counts and one line per problem (with the fix)."""

    name: str
    file: str
    status: Status
    used_for: str
    counts: dict[str, int]
    problems: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class CheckReport:
    """Everything ``facefed data check`` found in one data folder."""

    data_dir: Path
    datasets: tuple[DatasetCheck, ...]
    seconds: float

    @property
    def problems(self) -> list[str]:
        """Every problem line, prefixed with its dataset's name."""
        return [f"{d.name}: {p}" for d in self.datasets for p in d.problems]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready view of the report."""
        return {
            "data_dir": str(self.data_dir),
            "ok": not self.problems,
            "seconds": round(self.seconds, 2),
            "datasets": [
                {
                    "name": d.name,
                    "file": d.file,
                    "status": d.status,
                    "used_for": d.used_for,
                    "counts": d.counts,
                    "problems": list(d.problems),
                }
                for d in self.datasets
            ],
        }


def _check_npz(load: Callable[[Path], tuple[int, int]]) -> Callable[[Path], Findings]:
    def check(path: Path) -> Findings:
        findings = Findings()
        try:
            images, subjects = load(path.parent)
        except FacefedError as exc:
            findings.problem(str(exc))
        else:
            findings.counts.update(images=images, subjects=subjects)
        return findings

    return check


def _eyaleb(data_dir: Path) -> tuple[int, int]:
    faces = load_extended_yale_b(data_dir)
    return len(faces.images), len(set(faces.labels.tolist()))


def _yale(data_dir: Path) -> tuple[int, int]:
    faces, _ = load_yale_faces(data_dir)
    return len(faces.images), len(set(faces.labels.tolist()))


def _check_yunet(path: Path) -> Findings:
    findings = Findings()
    try:
        open_yunet(path, 0.6, "restore the file (README: Getting the data)")
    except FacefedError as exc:
        findings.problem(str(exc))
    else:
        findings.counts["bytes"] = path.stat().st_size
    return findings


DATASETS: tuple[Dataset, ...] = (
    Dataset(
        name="FER2013",
        file=fer2013.ARCHIVE,
        required=True,
        used_for="the emotion model's training and test splits",
        check=check_fer2013,
    ),
    Dataset(
        name="LFW",
        file=lfw.ARCHIVE,
        required=True,
        used_for="face training people sets and the verification pairs",
        check=check_lfw,
    ),
    Dataset(
        name="ORL",
        file=orl.ARCHIVE,
        required=True,
        used_for="a face source of the default simulation",
        check=check_orl,
    ),
    Dataset(
        name="Extended Yale B",
        file=EYALEB_FILE,
        required=True,
        used_for="a face source of the default simulation",
        check=_check_npz(_eyaleb),
    ),
    Dataset(
        name="YuNet",
        file=YUNET_FILE,
        required=True,
        used_for="aligning faces for the default pretrained face model and `facefed site`",
        check=_check_yunet,
    ),
    Dataset(
        name="Yale Faces",
        file=YALE_FILE,
        required=False,
        used_for="face detection and alignment tests and benchmarks",
        check=_check_npz(_yale),
    ),
)


def check_sums(data_dir: Path) -> DatasetCheck | None:
    """Compare every present file that ``SHA256SUMS`` lists with its digest; None if no such file."""
    sums = data_dir / SUMS_FILE
    if not sums.is_file():
        return None
    findings = Findings()
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        findings.problem(f"cannot read {sums} ({exc}); restore it or delete it")
        lines = []
    checked = 0
    for number, line in enumerate(lines, start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        name = fields[-1].lstrip("*").strip()
        if len(fields) != 2 or len(fields[0]) != 64 or "/" in name:
            findings.problem(f"{SUMS_FILE} line {number} is not '<sha256>  <file name>'; fix it")
            continue
        path = data_dir / name
        if not path.is_file():
            continue  # a missing dataset is reported by its own line
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            findings.problem(f"cannot read {path} ({exc.strerror}); check its permissions")
            continue
        checked += 1
        if digest.hexdigest() != fields[0].lower():
            findings.problem(
                f"{name} differs from its SHA-256 in {SUMS_FILE}, and facefed refuses to read it; "
                "replace it with an intact copy (or, if you changed it on purpose, its line)"
            )
    findings.counts["files checked"] = checked
    return _outcome("SHA256SUMS", SUMS_FILE, "checksums of the files above", findings)


def _outcome(name: str, file: str, used_for: str, findings: Findings) -> DatasetCheck:
    problems = tuple(findings.all_problems())
    return DatasetCheck(
        name=name,
        file=file,
        status="problem" if problems else "ok",
        used_for=used_for,
        counts=findings.counts,
        problems=problems,
    )


def check_dataset(dataset: Dataset, data_dir: Path) -> DatasetCheck:
    """Check one dataset file in ``data_dir`` (missing required files are a problem)."""
    path = data_dir / dataset.file
    if not path.is_file():
        if not dataset.required:
            return DatasetCheck(
                name=dataset.name,
                file=dataset.file,
                status="optional-missing",
                used_for=dataset.used_for,
                counts={},
                problems=(),
            )
        fix = (
            f"{dataset.file} is missing from {data_dir} (needed for {dataset.used_for}); "
            "put it there (README: Getting the data)"
        )
        return DatasetCheck(
            name=dataset.name,
            file=dataset.file,
            status="missing",
            used_for=dataset.used_for,
            counts={},
            problems=(fix,),
        )
    return _outcome(dataset.name, dataset.file, dataset.used_for, dataset.check(path))


def check_data_dir(data_dir: Path) -> CheckReport:
    """Check every dataset file of ``data_dir`` and ``SHA256SUMS``; never raises for bad data."""
    start = time.perf_counter()
    results = [check_dataset(dataset, data_dir) for dataset in DATASETS]
    sums = check_sums(data_dir)
    if sums is not None:
        results.append(sums)
    return CheckReport(
        data_dir=data_dir, datasets=tuple(results), seconds=time.perf_counter() - start
    )
