"""Federated accuracy vs privacy (issue 2): epsilon 1, 3, 8, infinity and a centralised baseline, in one run.

Run ``python -m bench.accuracy [--rounds N] [--epsilons 1,3,8,inf] [--out DIR] [--quick]``.

* Each finite epsilon is one ``facefed simulate --scenario bench --epsilon E`` run (every site's noise is
  calibrated to spend at most E over the run); ``inf`` is the same run with ``dp = false``.
* The centralised baseline trains the same models on the union of all sites' data without DP, with as
  many training examples processed as the non-private federated run (see :mod:`bench.centralised`).
* Every setting is scored by the coordinator's code on the held-out LFW people sets and FER2013
  PublicTest. ``DIR/accuracy.json`` is rewritten after every setting (so a crash keeps what finished) and
  a Markdown table goes to stdout and ``DIR/accuracy.md``.

``--quick`` shrinks rounds, steps and data and runs only epsilon 8 and inf (unless ``--epsilons`` is
given), so that a smoke run takes about three minutes, not most of an hour; its numbers mean nothing and
it writes under ``runs/bench-quick`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.centralised import run_centralised
from bench.report import markdown_table
from common.atomic import atomic_write_text
from common.cli import configure_logging, report_errors
from common.config import Scalar
from common.errors import ConfigError, FacefedError
from simulations.scenarios import load_scenario, load_site_policies, resolve

logger = logging.getLogger(__name__)

SCENARIO = "bench"
DEFAULT_OUT = Path("bench/results")
QUICK_OUT = Path("runs/bench-quick")
# --quick: tiny local training, data and evaluation subsets (LFW pairs stay complete: few images).
QUICK_EPSILONS = (
    "8,inf"  # one private and the non-private path; each simulation costs about a minute
)
QUICK_OVERRIDES: dict[str, Scalar] = {
    "num-rounds": 1,
    "face-steps": 2,
    "emotion-steps": 3,
    "face-train-limit": 160,
    "emotion-train-limit": 400,
    "emotion-eval-limit": 400,
}


def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` -> ``[1.0, 3.0, 8.0, inf]``; each must be > 0 (``inf`` = non-private)."""
    values: list[float] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value > 0:
            raise ConfigError(
                f"--epsilons entry {item!r} is not a positive number; use e.g. --epsilons 1,3,8,inf"
            )
        values.append(value)
    if not values:
        raise ConfigError("--epsilons is empty; use e.g. --epsilons 1,3,8,inf")
    return values


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def federated_overrides(epsilon: float, out: Path) -> dict[str, Scalar]:
    """Run-config overrides that make one federated setting of the bench scenario."""
    if math.isinf(epsilon):
        return {"dp": False, "out-dir": str(out)}
    return {"dp": True, "max-epsilon": epsilon, "out-dir": str(out)}


def simulate_command(overrides: dict[str, Scalar]) -> str:
    """The ``facefed simulate`` command line that reproduces one federated setting."""
    parts = ["facefed", "simulate", "--scenario", SCENARIO]
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts += ["--set", f"{key}={text}"]
    return shlex.join(parts)


def summarise_federated(results: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The final round's metrics and each site's final (cumulative) epsilon from ``results.json``."""
    last = results["rounds"][-1]
    epsilon: dict[str, Any] = {}
    noise: dict[str, float] = {}
    for record in results["rounds"]:  # a site not sampled last round keeps its latest epsilon
        for site, client in record["clients"].items():
            epsilon[site] = client["epsilon"]
            noise[site] = client["noise_multiplier"]
    return {
        "emotion": last["emotion"],
        "face": last["face"],
        "site_epsilon": dict(sorted(epsilon.items())),
        "site_noise_multiplier": dict(sorted(noise.items())),
        "rounds_completed": len(results["rounds"]),
        "per_round": [
            {
                "round": r["round"],
                "emotion_accuracy": r["emotion"]["accuracy"],
                "lfw_accuracy": r["face"]["lfw_accuracy"],
            }
            for r in results["rounds"]
        ],
        "wall_time_s": round(wall_s, 2),
        "checkpoint": results["checkpoint"],
        "ledger": results.get("ledger"),
    }


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy",
        description="Federated accuracy at several epsilons vs a centralised non-private baseline.",
    )
    p.add_argument("--rounds", type=int, help="federated rounds (default: the bench scenario's)")
    p.add_argument(
        "--epsilons",
        help=f"comma-separated; inf = non-private (default: 1,3,8,inf; {QUICK_EPSILONS} with --quick)",
    )
    p.add_argument("--out", type=Path, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (numbers mean nothing)")
    p.add_argument("--no-baseline", action="store_true", help="skip the centralised baseline")
    p.add_argument("--data-dir", help="dataset folder (default: $FACEFED_DATA or ../shared/data)")
    p.add_argument("--num-cpus", type=int, help="CPUs for Ray and the baseline (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def bench_overrides(args: argparse.Namespace) -> dict[str, Scalar]:
    """Run-config overrides of the bench scenario that every setting shares (quick, rounds, data)."""
    overrides: dict[str, Scalar] = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    if args.data_dir:
        overrides["data-dir"] = args.data_dir
    return overrides


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from simulations.runner import simulate  # heavy imports (flwr, ray) only when running

    epsilons = parse_epsilons(args.epsilons or (QUICK_EPSILONS if args.quick else "1,3,8,inf"))
    shared = bench_overrides(args)
    settings = resolve(load_scenario(SCENARIO), shared)
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runs_dir = out / "runs"
    cpus = args.num_cpus or os.cpu_count() or 1
    report: dict[str, Any] = {
        "benchmark": "federated accuracy vs privacy (issue 2)",
        "command": shlex.join(["python", "-m", "bench.accuracy", *argv]),
        "quick": bool(args.quick),
        "scenario": f"simulations/{SCENARIO}.toml",
        "config": settings.to_flat(),
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {},
    }
    path = out / "accuracy.json"

    def save() -> None:
        atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")

    failed = 0
    if not args.no_baseline:
        logger.info("centralised non-private baseline")
        central_dir = runs_dir / "centralised"
        started = time.monotonic()
        try:
            result = run_centralised(settings, central_dir, num_threads=cpus)
            report["settings"]["centralised"] = {"kind": "centralised", "epsilon": "inf", **result}
        except FacefedError as exc:
            failed += 1
            report["settings"]["centralised"] = _failure("centralised", "inf", exc, started)
        report["settings"]["centralised"]["command"] = report["command"]
        save()
    for epsilon in epsilons:
        name = f"eps-{label(epsilon)}"
        overrides = {**shared, **federated_overrides(epsilon, runs_dir / name)}
        cmd = simulate_command(overrides)
        logger.info("federated %s: %s", name, cmd)
        started = time.monotonic()
        try:
            results = simulate(
                resolve(load_scenario(SCENARIO), overrides),
                num_cpus=args.num_cpus,
                site_policies=load_site_policies(SCENARIO),
            )
            entry = {"kind": "federated", "epsilon": label(epsilon)}
            entry |= summarise_federated(results, time.monotonic() - started)
        except FacefedError as exc:
            failed += 1
            entry = _failure("federated", label(epsilon), exc, started)
        entry["command"] = cmd
        report["settings"][name] = entry
        save()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    table = markdown_table(report)
    atomic_write_text(out / "accuracy.md", table + "\n")
    print(table)
    print(f"\nwrote {path}")
    return 1 if failed else 0


def _failure(kind: str, epsilon: str, exc: FacefedError, started: float) -> dict[str, Any]:
    logger.error("%s epsilon %s failed: %s", kind, epsilon, exc)
    return {
        "kind": kind,
        "epsilon": epsilon,
        "error": str(exc),
        "wall_time_s": round(time.monotonic() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    configure_logging(args.verbose)
    return report_errors("bench.accuracy", lambda: run(args, args_list))


if __name__ == "__main__":
    sys.exit(main())
