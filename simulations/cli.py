"""``facefed simulate``: a federated simulation of N sites on this machine (or a Ray cluster)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from common.config import RunSettings, Scalar, parse_run_config
from common.errors import ConfigError
from simulations.scenarios import load_scenario, load_site_policies, parse_assignment, resolve

logger = logging.getLogger(__name__)

# flag -> run-config key
FLAG_KEYS = {
    "rounds": "num-rounds",
    "sites": "num-sites",
    "cohort": "cohort-size",
    "epsilon": "max-epsilon",
    "delta": "delta",
    "partition": "partition",
    "alpha": "dirichlet-alpha",
    "seed": "seed",
    "out": "out-dir",
    "data_dir": "data-dir",
    "strategy": "strategy",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated simulation",
        description="Run a federated DP simulation of both face models.",
    )
    p.add_argument(
        "--scenario",
        default="default",
        help="scenario name under simulations/ or a TOML path (default: default)",
    )
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--sites", type=int, help="number of virtual sites")
    p.add_argument("--cohort", type=int, help="sites sampled per round")
    p.add_argument("--epsilon", type=float, help="per-site epsilon budget (max-epsilon)")
    p.add_argument("--delta", type=float, help="DP delta")
    p.add_argument("--partition", choices=("iid", "dirichlet"), help="emotion data split")
    p.add_argument("--alpha", type=float, help="Dirichlet alpha for --partition dirichlet")
    p.add_argument("--strategy", choices=("fedavg", "fedadam"), help="server aggregation")
    p.add_argument("--seed", type=int, help="seed for partitions, sampling, init and noise")
    p.add_argument("--out", help="output directory (results.json, checkpoints/)")
    p.add_argument(
        "--data-dir", help="folder with the datasets (default: $FACEFED_DATA or ../shared/data)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any run-config key, e.g. --set face-steps=40 (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="OUT",
        help="continue the interrupted run in OUT from its last completed round (same config)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simulations.runner import simulate  # heavy imports (torch, flwr, ray) only when running

    overrides: dict[str, Scalar] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    for assignment in args.set:
        key, value = parse_assignment(assignment)
        overrides[key] = value
    if args.resume:
        if overrides or args.scenario != "default":
            raise ConfigError(
                "--resume continues a run with its own config; drop the other settings "
                f"({', '.join(sorted(overrides)) or '--scenario'})"
            )
        settings = resume_settings(Path(args.resume))
        policies = None  # the run's own, from OUT/site-policies.json
    else:
        settings = resolve(load_scenario(args.scenario), overrides)
        policies = load_site_policies(args.scenario)
    logger.info(
        "simulating %d sites x %d rounds (cohort %d), epsilon <= %g, out %s",
        settings.num_sites,
        settings.num_rounds,
        settings.cohort_size,
        settings.privacy.max_epsilon,
        settings.out_dir,
    )
    results = simulate(settings, num_cpus=args.num_cpus, site_policies=policies)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(summary(results))
    return 0


def resume_settings(out: Path) -> RunSettings:
    """The settings of the run in ``out``, marked for resuming."""
    from server.run_dir import stored_config

    return parse_run_config({**stored_config(out), "resume": True, "out-dir": str(out)})


def _units(config: dict[str, Any]) -> str:
    """Each model's privacy unit, as the ledger states it."""
    face = config.get("dp-unit", "example")
    return f"unit: face {face}, emotion example"


def summary(results: dict[str, Any]) -> str:
    if not results["rounds"]:
        return f"facefed simulate: no round completed: {results.get('error')}"
    last = results["rounds"][-1]
    eps = {k: v["epsilon"] for k, v in last["clients"].items()}
    lines = [
        f"facefed simulate: {len(results['rounds'])} rounds completed in "
        f"{results['wall_time_s']:.0f} s",
        f"  emotion (FER2013 PublicTest): accuracy {last['emotion']['accuracy']:.3f}, "
        f"macro-F1 {last['emotion']['macro_f1']:.3f}",
        f"  face (LFW held-out sets, k-fold): accuracy {last['face']['lfw_accuracy']:.3f} "
        f"+/- {last['face']['lfw_std']:.3f}",
        f"  epsilon per site ({_units(results['config'])}; delta "
        f"{results['config']['delta']}): "
        + ", ".join(
            f"{k} {v}" if not isinstance(v, float) else f"{k} {v:.2f}" for k, v in eps.items()
        ),
        f"  checkpoint: {results['checkpoint']}",
        f"  privacy ledger: {results.get('ledger')} (check it with: facefed audit verify LEDGER)",
    ]
    if results.get("status") == "stopped":
        lines.insert(1, f"  stopped early: {results.get('error')}")
    return "\n".join(lines)
