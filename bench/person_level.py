"""The utility of person-level DP (issue 16): the face model at epsilon 1, 3, 8 per example and per person.

Run ``python -m bench.person_level [--epsilons 1,3,8] [--repeats 3] [--rounds N] [--out DIR]``.

Each setting is one ``facefed simulate --scenario bench`` run from dlib's pretrained start with
``dp-unit`` = ``example`` or ``person`` and ``emotion-steps = 0`` (the emotion model has no person ids and
is the same under both units, so it is not trained here). It reports, per setting, the median over
``--repeats`` runs (each with its own secret noise and a different seed) of

* LFW verification accuracy on the held-out people sets 4-5 (the coordinator's 10-fold protocol);
* the domain-gain measure (:mod:`bench.domain_gain`): TAR at FAR 1e-3 on every pair of images of the
  ORL and Extended Yale B people that the bench scenario keeps out of every site, pooled;
* each site's final epsilon, in its own unit.

The pretrained start is scored once, as the baseline both units are compared with.
``DIR/person_level.json`` is rewritten after every run; a Markdown table goes to stdout and
``DIR/person_level.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.accuracy import (
    SCENARIO,
    domain_gain_entry,
    machine,
    parse_epsilons,
    simulate_command,
    start_checkpoint,
    summarise_federated,
)
from bench.domain_gain import POOLED
from common.atomic import atomic_write_text
from common.cli import configure_logging, report_errors
from common.config import Scalar
from common.paths import data_dir as resolve_data_dir
from simulations.scenarios import load_scenario, load_site_policies, resolve

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("bench/results/person_level")
UNITS = ("example", "person")


def overrides(
    unit: str, epsilon: float, seed: int, out: Path, rounds: int | None
) -> dict[str, Scalar]:
    values: dict[str, Scalar] = {
        "dp-unit": unit,
        "max-epsilon": epsilon,
        "emotion-steps": 0,
        "seed": seed,
        "out-dir": str(out),
    }
    if rounds is not None:
        values["num-rounds"] = rounds
    return values


def pooled_tar(entry: dict[str, Any]) -> float | None:
    scores = entry.get("scores")
    return None if scores is None else float(scores[POOLED]["tar"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median LFW accuracy, pooled domain TAR and largest site epsilon over a setting's runs."""
    lfw = [r["face"]["lfw_accuracy"] for r in runs]
    tar = [t for t in (pooled_tar(r["domain"]) for r in runs) if t is not None]
    eps = [max(float(v) for v in r["site_epsilon"].values()) for r in runs]
    return {
        "runs": len(runs),
        "lfw_accuracy_median": statistics.median(lfw),
        "lfw_accuracy_all": lfw,
        "domain_tar_median": statistics.median(tar) if tar else None,
        "domain_tar_all": tar,
        "site_epsilon_max": max(eps),
        "wall_time_s_median": statistics.median(r["wall_time_s"] for r in runs),
    }


def markdown(report: dict[str, Any]) -> str:
    start = report.get("start", {})
    lines = [
        f"Person-level vs example-level DP, face model from dlib's pretrained start "
        f"(median of {report['repeats']} runs each; domain: pooled TAR at FAR 1e-3 on the held-out "
        "ORL and Extended Yale B people).",
        "",
        "| unit | target ε | final ε per site (max) | LFW acc (median) | LFW runs | domain TAR "
        "(median) | domain runs | wall time (median) |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    if pooled_tar(start) is not None:
        lines.append(
            f"| pretrained start | – | – | {report.get('start_lfw', '–')} | | "
            f"{pooled_tar(start):.3f} | | |"
        )
    for name, s in report["settings"].items():
        unit, eps = name.split("-eps-")
        tar = "–" if s["domain_tar_median"] is None else f"{s['domain_tar_median']:.3f}"
        lines.append(
            f"| {unit} | {eps} | {s['site_epsilon_max']:.2f} | {s['lfw_accuracy_median']:.4f} | "
            + ", ".join(f"{v:.4f}" for v in s["lfw_accuracy_all"])
            + f" | {tar} | "
            + ", ".join(f"{v:.3f}" for v in s["domain_tar_all"])
            + f" | {s['wall_time_s_median'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from simulations.runner import simulate  # heavy imports (flwr, ray) only when running

    epsilons = parse_epsilons(args.epsilons)
    out: Path = args.out
    base = resolve(load_scenario(SCENARIO), {"emotion-steps": 0})
    root = resolve_data_dir(base.data_dir or None)
    report: dict[str, Any] = {
        "benchmark": "utility of person-level DP (issue 16)",
        "command": shlex.join(["python", "-m", "bench.person_level", *argv]),
        "scenario": f"simulations/{SCENARIO}.toml",
        "config": base.to_flat(),
        "machine": machine(),
        "repeats": args.repeats,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {},
        "runs": {},
    }
    path = out / "person_level.json"

    def save() -> None:
        atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")

    report["start"] = domain_gain_entry(base, start_checkpoint(base, out / "start.ckpt"), root)
    save()
    for epsilon in epsilons:
        for unit in UNITS:
            name = f"{unit}-eps-{epsilon:g}"
            runs: list[dict[str, Any]] = []
            for repeat in range(args.repeats):
                values = overrides(
                    unit, epsilon, repeat, out / "runs" / f"{name}-{repeat}", args.rounds
                )
                cmd = simulate_command(values)
                logger.info("%s run %d: %s", name, repeat, cmd)
                started = time.monotonic()
                results = simulate(
                    resolve(load_scenario(SCENARIO), values),
                    num_cpus=args.num_cpus,
                    site_policies=load_site_policies(SCENARIO),
                )
                entry = summarise_federated(results, time.monotonic() - started)
                entry["command"] = cmd
                entry["domain"] = domain_gain_entry(base, entry["checkpoint"], root)
                runs.append(entry)
                report["runs"].setdefault(name, []).append(entry)
                save()
            report["settings"][name] = summarise(runs)
            save()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    table = markdown(report)
    atomic_write_text(out / "person_level.md", table + "\n")
    print(table)
    print(f"\nwrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.person_level", description=__doc__)
    p.add_argument("--epsilons", default="1,3,8", help="comma-separated (default 1,3,8)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting (default 3)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the bench scenario's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("--num-cpus", type=int, help="CPUs for Ray (default: all)")
    args = p.parse_args(argv)
    configure_logging(False)
    return report_errors("bench.person_level", lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
