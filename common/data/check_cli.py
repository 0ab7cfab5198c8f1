"""``facefed data check [DIR]`` and ``facefed data clear-cache``: thin wrappers, logic elsewhere.

``check`` prints one line per dataset with its counts, then one line per problem with its fix, and
exits 2 if there is any problem (:mod:`common.data.check`). ``clear-cache`` removes facefed's cache
folder, refusing (exit 3) one that does not look like facefed's (:func:`common.paths.clear_cache`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.data.check import CheckReport, DatasetCheck, check_data_dir
from common.errors import DataError
from common.paths import clear_cache, data_dir


def register(subparsers: Any) -> None:
    """Add ``facefed data`` and its ``check`` and ``clear-cache`` subcommands."""
    parser = subparsers.add_parser(
        "data",
        help="check a data folder before a long run; clear the decoded-face cache",
        description="Check the face datasets in a data folder, or clear facefed's cache.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="check every dataset file, image and list in a data folder (exit 2 on any problem)",
        description="Check that DIR holds every dataset facefed's default simulation reads, "
        "intact: archive layouts, image counts, every image decodable and whole, LFW's people "
        "and pairs files, and SHA256SUMS when present. Nothing is written.",
    )
    check.add_argument(
        "dir",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="the data folder (default: $FACEFED_DATA, else ../shared/data)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=run_check)
    clear = actions.add_parser(
        "clear-cache",
        help="delete facefed's cache of extracted and decoded faces ($FACEFED_CACHE)",
        description="Delete facefed's cache folder ($FACEFED_CACHE, default ~/.cache/facefed). "
        "A folder that does not look like facefed's cache is refused, never deleted.",
    )
    clear.set_defaults(func=run_clear_cache)


def _summary(result: DatasetCheck) -> str:
    if result.status == "optional-missing":
        return f"missing (optional: {result.used_for})"
    if result.status == "missing":
        return "MISSING"
    counts = ", ".join(f"{value:,} {key}" for key, value in result.counts.items())
    return f"{'ok' if result.status == 'ok' else 'PROBLEM'}: {counts}" if counts else "PROBLEM"


def print_report(report: CheckReport) -> None:
    """The human-readable report: a line per dataset, then a line per problem."""
    print(f"data folder {report.data_dir}")
    width = max(len(d.name) for d in report.datasets)
    file_width = max(len(d.file) for d in report.datasets)
    for result in report.datasets:
        print(f"  {result.name:<{width}}  {result.file:<{file_width}}  {_summary(result)}")
    for problem in report.problems:
        print(f"problem: {problem}")


def run_check(args: argparse.Namespace) -> int:
    """``facefed data check``: report, then exit 0 if all is well, else raise (exit 2)."""
    folder = data_dir(args.dir)
    report = check_data_dir(folder)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    if report.problems:
        sys.stdout.flush()  # the report before the error line, also when both go to one pipe
        raise DataError(
            f"{len(report.problems)} problem(s) in {folder} (listed above); fix them and run "
            f"`facefed data check {folder}` again"
        )
    if not args.json:
        print(f"all good ({report.seconds:.1f} s)")
    return 0


def run_clear_cache(args: argparse.Namespace) -> int:
    """``facefed data clear-cache``: remove the cache folder; say what went and how much."""
    cleared = clear_cache()
    if cleared.removed:
        print(f"removed {cleared.path}: {cleared.files:,} files, {cleared.bytes:,} bytes")
    else:
        state = "is empty" if cleared.path.is_dir() else "does not exist"
        print(f"nothing to remove: {cleared.path} {state}")
    return 0
