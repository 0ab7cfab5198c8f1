"""Federated accuracy vs privacy (issue 2): epsilon 1, 3, 8, infinity and a centralised baseline, in one run.

Run ``python -m bench.accuracy [--rounds N] [--epsilons 1,3,8,inf] [--set KEY=VALUE]
[--set-at EPSILON:KEY=VALUE] [--out DIR] [--quick]``.

* Each finite epsilon is one ``facefed simulate --scenario bench --epsilon E`` run (every site's noise is
  calibrated to spend at most E over the run); ``inf`` is the same run with ``dp = false``.
* The centralised baseline trains the same models on the union of all sites' data without DP, with as
  many training examples processed as the non-private federated run (see :mod:`bench.centralised`).
* ``--set`` changes a run-config key of every setting; ``--set-at E:KEY=VALUE`` of the epsilon-E
  setting only (``inf:...`` also of the centralised baseline, which matches the non-private run), so that
  each budget can train at the batch and steps chosen for it (on held-out Training images, never on
  an evaluation split).
* Every setting is scored by the coordinator's code on the held-out LFW people sets and FER2013
  PublicTest.
* Domain gain (:mod:`bench.domain_gain`): the bench scenario keeps the last ``domain-holdout`` people of
  ORL and of Extended Yale B out of every site (and out of the baseline). Each trained model's final
  checkpoint, and the run's starting point (``ModelSpec.initial(seed)``: dlib's pretrained tail, saved
  as ``DIR/runs/start.ckpt``), is scored on every pair of those people's images: TAR at FAR 1e-3 and
  AUC, per source and pooled; the gain is the epsilon-8 run's pooled TAR minus the start's. ``DIR/accuracy.json`` is rewritten after every setting (so a crash keeps what finished) and
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

from bench.centralised import initial_models, run_centralised
from bench.domain_gain import POOLED, domain_gain
from bench.report import markdown_table
from common.atomic import atomic_write_text
from common.checkpoint import save_checkpoint
from common.cli import configure_logging, report_errors
from common.config import RunSettings, Scalar
from common.errors import ConfigError, FacefedError
from common.features import ModelInputs
from common.model_spec import ModelSpec
from common.paths import data_dir as resolve_data_dir
from simulations.scenarios import load_scenario, load_site_policies, parse_assignment, resolve

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
DOMAIN_FAR = 1e-3
DOMAIN_REFERENCE = "eps-8"  # the setting whose gain over the pretrained start is reported
START = "start"


def parse_epsilon(item: str, flag: str, example: str) -> float:
    """One epsilon of ``flag``; it must be > 0 (``inf`` = non-private)."""
    try:
        value = float(item)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ConfigError(f"{flag} entry {item!r} is not a positive number; use e.g. {example}")
    return value


def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` -> ``[1.0, 3.0, 8.0, inf]``; each must be > 0 (``inf`` = non-private)."""
    values = [
        parse_epsilon(item, "--epsilons", "--epsilons 1,3,8,inf")
        for item in filter(None, (s.strip() for s in text.split(",")))
    ]
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


def start_checkpoint(settings: RunSettings, path: Path) -> Path:
    """The run's starting point (the coordinator's initial global model) as a checkpoint."""
    spec = ModelInputs(ModelSpec.from_settings(settings)).spec  # with the pretrained weights' hash
    face, emotion = initial_models(spec, settings.seed)
    return save_checkpoint(path, face, emotion, spec, 0, meta={"kind": "initial-model"})


def domain_gain_entry(
    settings: RunSettings, checkpoint: str | Path, data_dir: Path
) -> dict[str, Any]:
    """One model's domain-gain scores (bench.domain_gain), or the error that stopped them."""
    started = time.monotonic()
    try:
        scores: dict[str, Any] = domain_gain(
            checkpoint, settings.domain_holdout, DOMAIN_FAR, data_dir
        )
    except FacefedError as exc:
        logger.error("domain gain of %s failed: %s", checkpoint, exc)
        return {"checkpoint": str(checkpoint), "error": str(exc)}
    return {
        "checkpoint": str(checkpoint),
        "scores": scores,
        "wall_time_s": round(time.monotonic() - started, 2),
    }


def domain_gain_summary(table: dict[str, Any]) -> dict[str, float] | None:
    """Pooled TAR and AUC of the reference setting minus the pretrained start's, if both were scored."""
    start, ref = table["models"].get(START, {}), table["models"].get(DOMAIN_REFERENCE, {})
    if "scores" not in start or "scores" not in ref:
        return None
    a, b = start["scores"][POOLED], ref["scores"][POOLED]
    return {"tar": round(b["tar"] - a["tar"], 4), "auc": round(b["auc"] - a["auc"], 4)}


def domain_gain_markdown(table: dict[str, Any]) -> str:
    """The domain-gain rows: each model's TAR@FAR and AUC per source and pooled."""
    far = table["far"]
    lines = [
        f"Domain gain: the {table['holdout']} last people of ORL and of Extended Yale B, kept out of "
        f"every site; all pairs of their images, TAR at FAR {far:g} / AUC.",
        "",
        "| model | ORL TAR | ORL AUC | Yale B TAR | Yale B AUC | pooled TAR | pooled AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in table["models"].items():
        if "scores" not in entry:
            lines.append(f"| {name} | failed: {entry.get('error', '')} | | | | | |")
            continue
        cells = [
            f"{entry['scores'][src][key]:.3f}"
            for src in ("orl", "eyaleb", POOLED)
            for key in ("tar", "auc")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gain = table.get("gain")
    if gain is not None:
        lines += [
            "",
            f"{DOMAIN_REFERENCE} vs the pretrained start: pooled TAR {gain['tar']:+.3f}, "
            f"AUC {gain['auc']:+.3f}.",
        ]
    return "\n".join(lines)


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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key of every setting, e.g. --set emotion-model=vgg (repeatable)",
    )
    p.add_argument(
        "--set-at",
        action="append",
        default=[],
        metavar="EPSILON:KEY=VALUE",
        help="override a run-config key of one setting, e.g. --set-at inf:emotion-batch=256 "
        "(inf: the non-private run and the centralised baseline; repeatable)",
    )
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
    for assignment in args.set:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    return overrides


def setting_overrides(
    args: argparse.Namespace, epsilons: Sequence[float]
) -> dict[str, dict[str, Scalar]]:
    """``--set-at`` by setting label (``"8"``, ``"inf"``): the overrides of that setting alone.

    Raises:
        ConfigError: an entry that is not ``EPSILON:KEY=VALUE``, or names a setting this run skips.
    """
    runs = {label(e) for e in epsilons} | (set() if args.no_baseline else {"inf"})
    at: dict[str, dict[str, Scalar]] = {}
    for entry in args.set_at:
        where, sep, assignment = entry.partition(":")
        if not sep:
            raise ConfigError(f"--set-at expects EPSILON:KEY=VALUE, got {entry!r}")
        name = label(parse_epsilon(where.strip(), "--set-at", "--set-at inf:emotion-batch=256"))
        if name not in runs:
            raise ConfigError(f"--set-at names epsilon {where!r}, which this run does not train")
        key, value = parse_assignment(assignment)
        at.setdefault(name, {})[key] = value
    return at


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from simulations.runner import simulate  # heavy imports (flwr, ray) only when running

    epsilons = parse_epsilons(args.epsilons or (QUICK_EPSILONS if args.quick else "1,3,8,inf"))
    shared = bench_overrides(args)
    settings = resolve(load_scenario(SCENARIO), shared)
    at = setting_overrides(args, epsilons)
    for overrides in at.values():  # a bad key fails now, not after hours of the other settings
        resolve(load_scenario(SCENARIO), {**shared, **overrides})
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runs_dir = out / "runs"
    cpus = args.num_cpus or os.cpu_count() or 1
    report: dict[str, Any] = {
        "benchmark": "federated accuracy vs privacy (issue 2)",
        "command": shlex.join(["python", "-m", "bench.accuracy", *argv]),
        "quick": bool(args.quick),
        "scenario": f"simulations/{SCENARIO}.toml",
        "config": settings.to_flat(),
        "set_at": at,
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {},
    }
    path = out / "accuracy.json"
    root = resolve_data_dir(settings.data_dir or None)
    gains: dict[str, Any] | None = None
    if settings.domain_holdout > 0:
        gains = {"holdout": settings.domain_holdout, "far": DOMAIN_FAR, "models": {}, "gain": None}
        report["domain_gain"] = gains

    def save() -> None:
        atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")

    def score_domain(name: str, entry: dict[str, Any]) -> None:
        if gains is not None and "checkpoint" in entry and "error" not in entry:
            gains["models"][name] = domain_gain_entry(settings, entry["checkpoint"], root)
            gains["gain"] = domain_gain_summary(gains)

    if gains is not None:
        start = start_checkpoint(settings, runs_dir / "start.ckpt")
        gains["models"][START] = domain_gain_entry(settings, start, root)

    failed = 0
    if not args.no_baseline:
        logger.info("centralised non-private baseline")
        central_dir = runs_dir / "centralised"
        started = time.monotonic()
        try:
            central = resolve(load_scenario(SCENARIO), {**shared, **at.get("inf", {})})
            result = run_centralised(central, central_dir, num_threads=cpus)
            report["settings"]["centralised"] = {"kind": "centralised", "epsilon": "inf", **result}
        except FacefedError as exc:
            failed += 1
            report["settings"]["centralised"] = _failure("centralised", "inf", exc, started)
        report["settings"]["centralised"]["command"] = report["command"]
        score_domain("centralised", report["settings"]["centralised"])
        save()
    for epsilon in epsilons:
        name = f"eps-{label(epsilon)}"
        overrides = {
            **shared,
            **at.get(label(epsilon), {}),
            **federated_overrides(epsilon, runs_dir / name),
        }
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
        score_domain(name, entry)
        save()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    table = markdown_table(report)
    if gains is not None:
        table += "\n\n" + domain_gain_markdown(gains)
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
