"""`facefed report`: the research page of one or more runs, read back and checked against results.json.

The fast tests render real runs' results.json files (copied from the benchmark's 3-round runs on the
pretrained model at epsilon 1 and 8 and without DP, into ``run_report_data/``); the slow test makes
two tiny real runs on real data and checks the page against what they wrote, including the fields
added for the report (time split, sites sampled and heard from, each site's budget).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from common.cli import main

DATA = Path(__file__).parent / "run_report_data"
RECORDED = ("eps-1", "eps-8", "eps-inf")
CHROMIUM = next(
    (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
)


class Tables(HTMLParser):
    """The text of every ``<table id=...>`` in a page: id -> rows (header row excluded) of cells."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._table is not None and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def shown(value: float, digits: int = 4) -> str:
    """A results.json number as the page must show it."""
    return "∞" if math.isinf(value) else f"{value:.{digits}f}"


def eps(value: float | str) -> float:
    return math.inf if value == "inf" else float(value)


def copy_runs(tmp_path: Path, names: tuple[str, ...] = RECORDED) -> list[Path]:
    runs = []
    for name in names:
        shutil.copytree(DATA / name, tmp_path / name)
        runs.append(tmp_path / name)
    return runs


def render(tmp_path: Path, runs: list[Path]) -> tuple[str, dict[str, Any]]:
    html_path, json_path = tmp_path / "out" / "report.html", tmp_path / "out" / "report.json"
    code = main(["report", *map(str, runs), "--html", str(html_path), "--json", str(json_path)])
    assert code == 0
    return html_path.read_text(), json.loads(json_path.read_text())


def check_against_results(page: str, runs: list[Path]) -> None:
    """Every accuracy, epsilon, time and count in the page is the one in each run's results.json."""
    tables = Tables(page).tables
    for i, run in enumerate(runs):
        results = json.loads((run / "results.json").read_text())
        rounds = results["rounds"]
        assert [row[0] for row in tables[f"accuracy-{i}"]] == [str(r["round"]) for r in rounds]
        for row, r in zip(tables[f"accuracy-{i}"], rounds, strict=True):
            assert row[1:] == [
                shown(r["face"]["lfw_accuracy"]),
                shown(r["face"]["lfw_std"]),
                shown(r["emotion"]["accuracy"]),
                shown(r["emotion"]["macro_f1"]),
            ]
        sites = sorted(rounds[0]["clients"], key=lambda s: int(s.split("-")[1]))
        *per_round, budgets = tables[f"epsilon-{i}"]
        for row, r in zip(per_round, rounds, strict=True):
            assert row == [str(r["round"])] + [
                shown(eps(r["clients"][s]["epsilon"])) for s in sites
            ]
        recorded = [rounds[-1]["clients"][s].get("budget_epsilon") for s in sites]
        if results["config"]["dp"]:
            assert budgets[1:] == [shown(b) if b is not None else "not recorded" for b in recorded]
        else:
            assert set(budgets[1:]) == {"none (no DP)"}
        for row, r in zip(tables[f"time-{i}"], rounds, strict=True):
            phases = r["phases"]
            split = r.get("time_split") or {
                "training_s": round(phases["wait_s"] - phases["accept_s"], 2),
                "evaluation_s": r["eval_s"],
                "overhead_s": round(
                    r["time_s"] - (phases["wait_s"] - phases["accept_s"]) - r["eval_s"], 2
                ),
            }
            assert row[1] == shown(r["time_s"], 2)
            expected = [split["training_s"], split["evaluation_s"], split["overhead_s"]]
            assert [float(c) for c in row[2:]] == pytest.approx(expected, abs=0.011)
        for row, r in zip(tables[f"sites-{i}"], rounds, strict=True):
            cohort = r.get("cohort", {})
            assert row[1] == str(cohort.get("sampled", "not recorded"))
            assert row[2] == str(cohort.get("replied", "not recorded"))
            assert row[3:6] == [
                str(len(r["clients"])),
                str(len(r["dropouts"])),
                str(sum(c["egress_refused"] for c in r["clients"].values())),
            ]
    if len(runs) > 1:
        expected_rows = []
        for run in runs:
            results = json.loads((run / "results.json").read_text())
            last = results["rounds"][-1]
            for site in sorted(last["clients"], key=lambda s: int(s.split("-")[1])):
                expected_rows.append(
                    [
                        shown(eps(last["clients"][site]["epsilon"])),
                        shown(last["face"]["lfw_accuracy"]),
                        shown(last["emotion"]["accuracy"]),
                        shown(last["emotion"]["macro_f1"]),
                    ]
                )
        got = [[row[2], *row[4:]] for row in tables["privacy-utility"]]
        assert got == expected_rows


# --- recorded runs (fast) ---------------------------------------------------------------------


def test_report_of_recorded_runs_shows_the_numbers_of_their_results_json(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)

    page, _ = render(tmp_path, runs)

    check_against_results(page, runs)
    # the privacy-utility plot, then accuracy, epsilon and time per run (no epsilon plot without DP)
    assert page.count('src="data:image/png;base64,') == 1 + 3 + 3 + 2
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_json_output_carries_each_runs_final_numbers(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)

    _, data = render(tmp_path, runs)

    assert [r["name"] for r in data["runs"]] == list(RECORDED)
    for summary, run in zip(data["runs"], runs, strict=True):
        results = json.loads((run / "results.json").read_text())
        last = results["rounds"][-1]
        assert summary["final"]["lfw_accuracy"] == last["face"]["lfw_accuracy"]
        assert summary["final"]["fer_accuracy"] == last["emotion"]["accuracy"]
        assert summary["final"]["epsilon"] == {k: c["epsilon"] for k, c in last["clients"].items()}
        assert summary["config"] == results["config"]


def test_a_run_without_dp_shows_infinite_epsilon_and_no_budget(tmp_path: Path) -> None:
    page, data = render(tmp_path, copy_runs(tmp_path, ("eps-inf",)))

    *rounds, budgets = Tables(page).tables["epsilon-0"]
    assert {cell for row in rounds for cell in row[1:]} == {"∞"}
    assert set(budgets[1:]) == {"none (no DP)"}
    assert "privacy-utility" not in Tables(page).tables  # one run: no comparison
    assert data["runs"][0]["notes"] == [  # no budget to record without DP
        "the sites sampled and the replies received in each round"
    ]


def test_what_an_older_run_did_not_record_is_shown_as_not_recorded(tmp_path: Path) -> None:
    (run,) = copy_runs(tmp_path, ("eps-1",))
    results = json.loads((run / "results.json").read_text())
    for r in results["rounds"]:
        del r["phases"]
    (run / "results.json").write_text(json.dumps(results))

    page, data = render(tmp_path, [run])

    for row in Tables(page).tables["time-0"]:
        assert row[2:] == ["not recorded"] * 3
    assert "each round's time split" in " ".join(data["runs"][0]["notes"])


def test_a_run_that_failed_before_its_first_round_still_renders(tmp_path: Path) -> None:
    (run,) = copy_runs(tmp_path, ("eps-1",))
    results = json.loads((run / "results.json").read_text())
    results |= {
        "status": "failed",
        "error": "FacefedError: only 1 of 4 sites connected",
        "rounds": [],
    }
    (run / "results.json").write_text(json.dumps(results))

    page, data = render(tmp_path, [run, *copy_runs(tmp_path, ("eps-8",))])

    assert "failed after 0 of 3 rounds: FacefedError: only 1 of 4 sites connected" in page
    assert Tables(page).tables["accuracy-0"] == []
    assert data["runs"][0]["final"]["lfw_accuracy"] is None


def test_two_runs_from_folders_of_the_same_name_get_distinct_labels(tmp_path: Path) -> None:
    for parent in ("a", "b"):
        shutil.copytree(DATA / "eps-1", tmp_path / parent / "run")

    _, data = render(tmp_path, [tmp_path / "a" / "run", tmp_path / "b" / "run" / "results.json"])

    assert [r["name"] for r in data["runs"]] == ["a/run", "b/run"]


# --- bad input: one line, exit code 2, nothing written -----------------------------------------


def one_error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(["report", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("facefed: error: "), err
    assert "Traceback" not in err
    return err


def test_a_folder_without_results_json_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    err = one_error_line(capsys, str(tmp_path / "empty"), "--html", str(tmp_path / "r.html"))
    assert "holds no results.json" in err
    err = one_error_line(capsys, str(tmp_path / "nowhere"), "--html", str(tmp_path / "r.html"))
    assert "does not exist" in err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    "content",
    [
        '{"status": "completed", "rounds": [',  # truncated
        "[1, 2]",
        '{"config": {}, "rounds": "none"}',
        '{"config": {}, "rounds": [{"round": "1"}]}',
        '{"config": {}, "rounds": [{"round": 1, "face": {"lfw_accuracy": "high"}}]}',
        '{"config": {}, "rounds": [{"round": 1, "clients": {"site-0": {"epsilon": null}}}]}',
        '{"config": {}, "rounds": [{"round": 1, "dropouts": ["x"]}]}',
        '{"config": {}, "rounds": [], "resumes": 3}',
        "\xff\xfe",
    ],
)
def test_a_corrupt_results_json_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_bytes(content.encode("latin-1"))
    err = one_error_line(capsys, str(run), "--html", str(tmp_path / "r.html"))
    assert "results.json" in err
    assert not (tmp_path / "r.html").exists()


def test_an_unwritable_output_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = copy_runs(tmp_path, ("eps-1",))
    (tmp_path / "a-file").write_text("")

    err = one_error_line(capsys, str(run), "--html", str(tmp_path / "a-file" / "r.html"))
    assert "--html" in err and "not writable" in err
    err = one_error_line(capsys, str(run), "--html", str(tmp_path))
    assert "is a folder" in err
    err = one_error_line(
        capsys,
        str(run),
        "--html",
        str(tmp_path / "r.html"),
        "--json",
        str(tmp_path / "a-file" / "x"),
    )
    assert "--json" in err
    assert not (tmp_path / "r.html").exists()  # checked before anything was written


def test_no_run_named_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--html", "r.html"]) == 2
    assert capsys.readouterr().err.startswith("facefed: error: ")


# --- the page in a browser ---------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path)
    render(tmp_path, runs)
    shot = tmp_path / "report.png"

    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1800",
            f"--screenshot={shot}",
            (tmp_path / "out" / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 0.05  # not a blank page


# --- two tiny real runs (slow) -----------------------------------------------------------------

SIMULATE = [
    sys.executable,
    "-m",
    "common.cli",
    "simulate",
    "--sites",
    "2",
    "--cohort",
    "2",
    "--set",
    "face-steps=3",
    "--set",
    "emotion-steps=3",
    "--set",
    "emotion-eval-limit=400",
    "--set",
    'face-sources="orl,eyaleb"',
    "--set",
    'accountant="rdp"',
]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real runs on real data: 2 rounds at epsilon 4, 1 round at epsilon 2."""
    from common.errors import DataError
    from common.paths import data_dir

    try:
        data_dir()
    except DataError:
        pytest.skip("the real datasets are not here (set FACEFED_DATA)")
    runs = []
    for epsilon, rounds in (("4", "2"), ("2", "1")):
        out = tmp_path_factory.mktemp(f"eps-{epsilon}")
        proc = subprocess.run(
            [*SIMULATE, "--rounds", rounds, "--epsilon", epsilon, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(out)
    return runs


@pytest.mark.slow
def test_a_two_run_report_of_real_runs_shows_their_results_json(
    tiny_runs: list[Path], tmp_path: Path
) -> None:
    page, data = render(tmp_path, tiny_runs)

    check_against_results(page, tiny_runs)
    for run in tiny_runs:  # what the run now records for the report is there, and on the page
        results = json.loads((run / "results.json").read_text())
        for r in results["rounds"]:
            assert r["cohort"] == {"sampled": 2, "replied": 2}
            assert set(r["time_split"]) == {"training_s", "evaluation_s", "overhead_s"}
            assert sum(r["time_split"].values()) == pytest.approx(r["time_s"], abs=0.03)
            budget = float(results["config"]["max-epsilon"])
            assert {c["budget_epsilon"] for c in r["clients"].values()} == {budget}
    assert all(summary["notes"] == [] for summary in data["runs"])
