"""Every claim in the documents names the test (or code) that shows it; those names must stay true.

A reference is a repository path to a Python file, optionally with `::name` (a test, class, function or
module-level constant; `Class.method` is looked up by its last part). A bare `` `::name` `` refers to
the last file named before it in the same document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    {
        ROOT / "README.md",
        ROOT / "BENCHMARKS.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("models/*.md"),
        *ROOT.glob("bench/results/**/*.md"),
    }
)
_REFERENCE = re.compile(
    r"(?<![\w/.])((?:tests|client|common|server|simulations|bench)/[\w/]+\.py)(?:::([\w.]+))?"
    r"|`::([\w.]+)"
)


@dataclass(frozen=True)
class Reference:
    line: int
    path: str
    name: str | None


def references(text: str) -> list[Reference]:
    """The references of a document, each continuation resolved to the file named before it."""
    found: list[Reference] = []
    last: str | None = None
    for match in _REFERENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        path, name, continued = match.groups()
        if path is not None:
            last = path
            found.append(Reference(line, path, name))
        else:
            found.append(Reference(line, last or "", continued))
    return found


def broken(reference: Reference, root: Path) -> str | None:
    """Why a reference does not resolve under root, or None when it does."""
    if not reference.path:
        return f"line {reference.line}: ::{reference.name} follows no file"
    path = root / reference.path
    if not path.is_file():
        return f"line {reference.line}: {reference.path} does not exist"
    if reference.name is None:
        return None
    name = re.escape(reference.name.split(".")[-1])
    pattern = rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]"
    if re.search(pattern, path.read_text(encoding="utf-8"), re.MULTILINE) is None:
        return f"line {reference.line}: {reference.path} defines no {reference.name}"
    return None


def test_the_documents_are_found_and_name_tests() -> None:
    assert ROOT / "BENCHMARKS.md" in DOCUMENTS
    named = [r for d in DOCUMENTS for r in references(d.read_text(encoding="utf-8"))]
    assert sum(r.path.startswith("tests/") and r.name is not None for r in named) > 100


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_file_and_test_a_document_names_exists(document: Path) -> None:
    problems = [
        problem
        for reference in references(document.read_text(encoding="utf-8"))
        if (problem := broken(reference, ROOT)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_a_continuation_is_looked_up_in_the_last_file_named_before_it(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")
    (tmp_path / "tests" / "test_b.py").write_text("def test_two():\n    pass\n")
    text = (
        "`tests/test_a.py::test_one`, `::test_one`;\n"
        "then `tests/test_b.py::test_two` and `::test_one`"
    )

    problems = [p for r in references(text) if (p := broken(r, tmp_path)) is not None]

    assert problems == ["line 2: tests/test_b.py defines no test_one"]


def test_a_missing_file_a_name_nowhere_and_an_orphan_continuation_are_each_reported(
    tmp_path: Path,
) -> None:
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "mod.py").write_text(
        "class Thing:\n    def method(self): ...\nLIMIT = 3\n"
    )
    text = (
        "`::first` then `common/mod.py::Thing.method`, `::LIMIT`, `::gone`,\n"
        "`common/other.py` and a path of another project, `flwr/common/constant.py`"
    )

    problems = [p for r in references(text) if (p := broken(r, tmp_path)) is not None]

    assert problems == [
        "line 1: ::first follows no file",
        "line 1: common/mod.py defines no gone",
        "line 2: common/other.py does not exist",
    ]
