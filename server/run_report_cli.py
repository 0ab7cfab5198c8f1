"""``facefed report RUN [RUN ...] --html OUT.html [--json OUT.json]``: a research report of runs.

Reads each run's ``results.json`` (:mod:`server.run_report`) and writes one self-contained page
(:mod:`server.run_report_html`): accuracy per round, each site's epsilon against its budget, the
round time split, refusals and dropouts, and with several runs a privacy-utility plot. ``--json``
writes the same content as data. A folder without results.json, a corrupt one, or an output that
cannot be written is one error line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.errors import DataError


def _check_writable(path: Path, flag: str) -> None:
    """Fail before the work if ``path`` cannot be written (a folder, a read-only place)."""
    if path.is_dir():
        raise DataError(f"{flag} {path} is a folder; name a file to write, e.g. {path}/report.html")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # atomic_write_text creates the missing folders
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(
            f"cannot write {flag} {path}: {parent} is not writable; choose another path"
        )


def _write(path: Path, text: str, flag: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise DataError(
            f"cannot write {flag} {path} ({exc.strerror or exc}); choose another path"
        ) from None


def _cmd_report(args: argparse.Namespace) -> int:
    from server.run_report import load_runs  # light
    from server.run_report_html import render_html  # matplotlib only when needed

    html_path = Path(args.html)
    json_path = Path(args.json) if args.json else None
    _check_writable(html_path, "--html")
    if json_path is not None:
        _check_writable(json_path, "--json")
    runs = load_runs(args.runs)
    _write(html_path, render_html(runs), "--html")
    if json_path is not None:
        data: dict[str, Any] = {"runs": [run.to_dict() for run in runs]}
        _write(json_path, json.dumps(data, indent=2, sort_keys=True) + "\n", "--json")
    for run in runs:
        last = run.rounds[-1] if run.rounds else None
        lfw = f"{last.lfw_accuracy:.4f}" if last and last.lfw_accuracy is not None else "-"
        fer = f"{last.fer_accuracy:.4f}" if last and last.fer_accuracy is not None else "-"
        print(f"{run.name}: {run.status}, {len(run.rounds)} rounds, LFW {lfw}, FER2013 {fer}")
    print(f"report written to {html_path}" + (f" and {json_path}" if json_path else ""))
    return 0


def register(subparsers: Any) -> None:
    """Add ``report`` to the ``facefed`` parser."""
    parser = subparsers.add_parser(
        "report",
        help="render runs' accuracy, privacy and timing as HTML",
        description="Write a self-contained HTML page (and optionally JSON) from one or more "
        "runs' results.json: accuracy per round, each site's epsilon against its budget, round "
        "time split, refusals and dropouts; with several runs, accuracy against epsilon.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="a run's output folder (or its results.json)"
    )
    parser.add_argument("--html", required=True, metavar="OUT.html", help="the page to write")
    parser.add_argument("--json", metavar="OUT.json", help="also write the report data as JSON")
    parser.set_defaults(func=_cmd_report)
