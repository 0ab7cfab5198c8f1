"""Fault injection on real federated runs: crashes and resume, poisoned updates, a site killed mid-round.

    python -m bench.faults                      # all three experiments (~30 min on 2 CPU cores)
    python -m bench.faults --only resume        # or poison, dropout

* ``resume``: an uninterrupted run, then the same run (same seed) killed with SIGKILL five times (at
  random moments and at named failpoints: during a ledger commit, between a checkpoint's fsync and its
  rename, between a round's replies and its aggregation) and resumed with ``facefed simulate --resume``
  after each kill. Checks: the same final round, the ledger verifies, no ledger entry lost or doubled,
  and every site's epsilon equals the uninterrupted run's.
* ``poison``: one of four sites sends a NaN, an Inf, a wrong-shaped, a 1e6-times-scaled and a
  sign-flipped update (one per round; it bypasses its own egress guard). Checks: the malformed ones are
  refused with their reasons recorded, and the accuracy of the poisoned run (coordinate-wise median) is
  within noise of a clean run (plain mean).
* ``dropout``: a four-site run in which one site dies in the middle of round 2, twice: it stops
  answering (a host that lost power), and its process is killed with SIGKILL. Checks: the round goes on
  without it after ``round-timeout``, the dropout is recorded, and the run finishes (after a SIGKILL,
  Flower's simulation engine keeps routing messages to the dead Ray actor, so the next round fails
  closed and ``facefed simulate --resume`` finishes the run).

Results go to ``bench/results/faults.json``; every run directory is kept under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_text
from common.errors import FacefedError

logger = logging.getLogger("bench.faults")

RESULTS = Path("bench/results/faults.json")
SMALL = {  # real data and real DP-SGD, few steps: many launches must fit in a benchmark run
    "num-sites": 4,
    "cohort-size": 4,
    "num-rounds": 5,
    "face-steps": 4,
    "emotion-steps": 4,
    "emotion-eval-limit": 600,
    "seed": 11,
}
QUALITY = {  # the poisoned-vs-clean comparison needs a model that actually learns
    **SMALL,
    "dp": False,
    "face-steps": 12,
    "emotion-steps": 20,
    "emotion-eval-limit": 0,
}
FACEFED = [sys.executable, "-m", "common.cli"]
QUALITY_RUNS: dict[str, dict[str, Any]] = {  # what each quality run changes
    "clean": {},
    "clean-seed-12": {"seed": 12},  # run-to-run noise of a clean run
    "clean-median": {"aggregation": "median"},  # the robust aggregate's own cost, without an attack
    "poison": {"aggregation": "median"},
}
POISONS = {1: "nan", 2: "inf", 3: "shape", 4: "scale-1e6", 5: "sign-flip"}
POISONED_SITE = 3
DROPOUT_SITE, DROPOUT_ROUND, DROPOUT_AFTER_S, DROPOUT_TIMEOUT_S = 2, 2, 3.0, 100.0


# ---------------------------------------------------------------------------------------- launching
def simulate_cmd(out: Path, config: dict[str, Any]) -> list[str]:
    sets = [a for k, v in config.items() for a in ("--set", f"{k}={v}")]
    return [*FACEFED, "simulate", "--out", str(out), *sets]


def launch(cmd: list[str], log: Path, failpoint: str | None, kill_after: float | None) -> int:
    """Run ``cmd`` in its own session; SIGKILL its whole process group after ``kill_after`` s."""
    env = {**os.environ, "FACEFED_FAILPOINT": failpoint or ""}
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def ledger_summary(path: Path) -> dict[str, Any]:
    from common.privacy.verify import verify_ledger

    result = verify_ledger(path)
    bodies = [e.body for e in result.entries if e.body is not None]
    keys = [(b.site_id, b.round) for b in bodies]
    return {
        "verifies": result.ok,
        "errors": [str(e) for e in result.errors][:3],
        "entries": len(keys),
        "distinct_entries": len(set(keys)),
        "keys": sorted(set(keys)),
        "epsilon": {s.site_id: s.rounds[-1].epsilon_cumulative for s in result.sites if s.rounds},
    }


def completed_rounds(out: Path) -> int:
    try:
        return len(json.loads((out / "results.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


# ---------------------------------------------------------------------------------------- resume
def resume_experiment(root: Path, rng: random.Random) -> dict[str, Any]:
    baseline, faulted = root / "resume-baseline", root / "resume-faulted"
    for d in (baseline, faulted):
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)
    t0 = time.monotonic()
    rc = launch(simulate_cmd(baseline, SMALL), baseline / "log.txt", None, None)
    baseline_s = time.monotonic() - t0
    if rc != 0:
        raise FacefedError(f"the uninterrupted run failed (exit {rc}); see {baseline}/log.txt")
    plan: list[tuple[str, str | None, float | None]] = [
        ("random moment", None, rng.uniform(0.35, 0.6) * baseline_s),
        ("ledger commit", "ledger.before-commit:3", None),
        ("checkpoint write (fsync done, rename not)", "atomic.before-rename:1", None),
        ("replies in, not aggregated", "round.replied:1", None),
        ("random moment", None, rng.uniform(0.3, 0.5) * baseline_s),
    ]
    faults: list[dict[str, Any]] = []
    log = faulted / "log.txt"
    for i, (where, point, after) in enumerate(plan):
        cmd = (
            simulate_cmd(faulted, SMALL)
            if i == 0
            else [*FACEFED, "simulate", "--resume", str(faulted)]
        )
        before = completed_rounds(faulted)
        rc = launch(cmd, log, point, after)
        faults.append(
            {
                "fault": i + 1,
                "where": where,
                "failpoint": point,
                "kill_after_s": round(after, 1) if after else None,
                "killed": rc == -signal.SIGKILL,
                "rounds_before": before,
                "rounds_at_kill": completed_rounds(faulted),
            }
        )
        logger.info(
            "fault %d (%s): exit %s, rounds %s", i + 1, where, rc, faults[-1]["rounds_at_kill"]
        )
    rc = launch([*FACEFED, "simulate", "--resume", str(faulted)], log, None, None)
    results = json.loads((faulted / "results.json").read_text())
    clean, resumed = ledger_summary(baseline / "ledger.db"), ledger_summary(faulted / "ledger.db")
    lost = len(set(map(tuple, clean["keys"])) - set(map(tuple, resumed["keys"])))
    return {
        "config": SMALL,
        "faults": faults,
        "faults_injected": sum(f["killed"] for f in faults),
        "final_exit": rc,
        "final_status": results["status"],
        "final_round": len(results["rounds"]),
        "resumes": len(results.get("resumes", [])),
        "ledger_verifies": resumed["verifies"],
        "ledger_errors": resumed["errors"],
        "entries_expected": clean["entries"],
        "entries_found": resumed["entries"],
        "entries_lost": lost,
        "entries_doubled": resumed["entries"] - resumed["distinct_entries"],
        "epsilon_uninterrupted": clean["epsilon"],
        "epsilon_resumed": resumed["epsilon"],
        "epsilon_equal": clean["epsilon"] == resumed["epsilon"],
    }


# ---------------------------------------------------------------------------------------- poison
def poison_mod(site_index: int, plan: dict[int, str]) -> Callable[..., Any]:
    """A compromised site: after its honest round, it rewrites the update it sends."""
    from flwr.app import Array, ArrayRecord

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        reply = call_next(msg, context)
        if reply.has_error() or int(reply.content["metrics"]["site-index"]) != site_index:
            return reply
        kind = plan.get(int(msg.content["config"]["server-round"]))
        if kind is None:
            return reply
        sent, honest = msg.content["arrays"], reply.content["arrays"]
        poisoned = ArrayRecord()
        for i, key in enumerate(honest.keys()):
            a, s = honest[key].numpy(), sent[key].numpy()
            if kind == "nan":
                a = a.copy()
                a.flat[0] = np.nan
            elif kind == "inf":
                a = a.copy()
                a.flat[0] = np.inf
            elif kind == "shape" and i == 0:
                a = a.reshape(-1)[:-1]
            elif kind == "scale-1e6":
                a = s + (a - s) * np.float32(1e6)
            elif kind == "sign-flip":
                a = s - (a - s)
            poisoned[key] = Array(np.ascontiguousarray(a))
        reply.content["arrays"] = poisoned
        return reply

    return mod


def dropout_mod(site_index: int, server_round: int, how: str) -> Callable[..., Any]:
    """Site ``site_index`` dies in the middle of ``server_round``.

    ``how="kill"``: its process gets SIGKILL a few seconds into local training. ``how="hang"``: it trains
    (and so spends that round's budget) but answers only after the round timed out, like a host that
    lost its network mid-round and came back.
    """

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        rnd = int(msg.content["config"]["server-round"])
        site = int(context.node_config["partition-id"])  # simulation: the site is its partition
        if site == site_index and rnd == server_round:
            if how == "kill":
                threading.Timer(DROPOUT_AFTER_S, os.kill, (os.getpid(), signal.SIGKILL)).start()
            else:
                reply = call_next(msg, context)
                time.sleep(DROPOUT_TIMEOUT_S + 30.0)  # answers long after the coordinator moved on
                return reply
        return call_next(msg, context)

    return mod


def run_inprocess(kind: str, out: Path) -> None:
    """One simulation with a fault-injecting mod (called in a fresh process, see ``main``)."""
    from client.training.site_policy import SitePolicies, SitePolicy
    from common.config import parse_run_config
    from simulations.runner import simulate

    if kind in QUALITY_RUNS:
        config: dict[str, Any] = {**QUALITY, **QUALITY_RUNS[kind], "out-dir": str(out)}
        mods = [poison_mod(POISONED_SITE, POISONS)] if kind == "poison" else []
    else:
        config = {
            **SMALL,
            "out-dir": str(out),
            "round-timeout": DROPOUT_TIMEOUT_S,
            "min-replies": 3,
        }
        mods = [dropout_mod(DROPOUT_SITE, DROPOUT_ROUND, kind.removeprefix("dropout-"))]
    # the quality runs train without DP: their simulated sites' policy allows that
    policies = SitePolicies(SitePolicy(require_dp=False)) if kind in QUALITY_RUNS else None
    simulate(parse_run_config(config), outer_mods=mods, site_policies=policies)


def inprocess(kind: str, out: Path, reuse: bool = False) -> tuple[int, dict[str, Any]]:
    if reuse and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
        if results.get("status") == "completed":
            logger.info("reusing the completed run in %s", out)
            return 0, results
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "bench.faults", "--run", kind, "--out", str(out)]
    rc = launch(cmd, out / "log.txt", None, None)
    try:
        return rc, json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return rc, {}


def final_accuracy(results: dict[str, Any]) -> dict[str, float]:
    """The last round's accuracies, and their mean over the last three rounds (rounds fluctuate)."""
    last, tail = results["rounds"][-1], results["rounds"][-3:]
    return {
        "emotion_accuracy": last["emotion"]["accuracy"],
        "lfw_accuracy": last["face"]["lfw_accuracy"],
        "lfw_std": last["face"]["lfw_std"],
        "emotion_last3": float(np.mean([r["emotion"]["accuracy"] for r in tail])),
        "lfw_last3": float(np.mean([r["face"]["lfw_accuracy"] for r in tail])),
    }


def poison_experiment(root: Path, reuse: bool) -> dict[str, Any]:
    runs = {kind: inprocess(kind, root / f"poison-{kind}", reuse) for kind in QUALITY_RUNS}
    poisoned = runs["poison"][1]
    refused = {
        r["round"]: [f for f in r["failures"] if "update refused" in f]
        for r in poisoned.get("rounds", [])
    }
    accepted = {r["round"]: sorted(r["clients"]) for r in poisoned.get("rounds", [])}
    accuracy = {kind: final_accuracy(results) for kind, (_, results) in runs.items()}
    return {
        "config": {**QUALITY, "poisoned": f"site-{POISONED_SITE}", "plan": POISONS},
        "runs": {kind: QUALITY_RUNS[kind] for kind in runs},
        "exit": {kind: rc for kind, (rc, _) in runs.items()},
        "refused_per_round": refused,
        "aggregated_sites_per_round": accepted,
        "accuracy": accuracy,
        "seed_noise_lfw_last3": accuracy["clean-seed-12"]["lfw_last3"]
        - accuracy["clean"]["lfw_last3"],
        "seed_noise_emotion_last3": accuracy["clean-seed-12"]["emotion_last3"]
        - accuracy["clean"]["emotion_last3"],
        "attack_effect_lfw_last3": accuracy["poison"]["lfw_last3"]
        - accuracy["clean-median"]["lfw_last3"],
        "attack_effect_emotion_last3": accuracy["poison"]["emotion_last3"]
        - accuracy["clean-median"]["emotion_last3"],
    }


def dropout_experiment(root: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "config": {**SMALL, "round-timeout": DROPOUT_TIMEOUT_S, "min-replies": 3},
        "site": f"site-{DROPOUT_SITE}",
        "round": DROPOUT_ROUND,
    }
    for how in ("hang", "kill"):
        out = root / f"dropout-{how}"
        rc, results = inprocess(f"dropout-{how}", out)
        first = {
            "exit": rc,
            "status": results.get("status"),
            "rounds": len(results.get("rounds", [])),
        }
        resumed = None
        if results.get("status") != "completed":  # finish it the way an operator would
            rc = launch([*FACEFED, "simulate", "--resume", str(out)], out / "log.txt", None, None)
            results = json.loads((out / "results.json").read_text())
            resumed = {"exit": rc, "status": results["status"]}
        rounds = results.get("rounds", [])
        report[how] = {
            "first_launch": first,
            "after_resume": resumed,
            "final_round": len(rounds),
            "sites_per_round": {r["round"]: len(r["clients"]) for r in rounds},
            "dropouts_per_round": {r["round"]: r.get("dropouts", []) for r in rounds},
            "failures_per_round": {r["round"]: [f[:160] for f in r["failures"]] for r in rounds},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("resume", "poison", "dropout"), action="append")
    p.add_argument("--out", type=Path, default=Path("bench/results/runs/faults"))
    p.add_argument("--seed", type=int, default=0, help="seed for the random kill moments")
    p.add_argument("--reuse", action="store_true", help="poison: reuse completed runs under --out")
    p.add_argument(
        "--run", choices=(*QUALITY_RUNS, "dropout-hang", "dropout-kill"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.run:
        run_inprocess(args.run, args.out)
        return 0
    rng = random.Random(args.seed)
    report: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    experiments = {
        "resume": lambda: resume_experiment(args.out, rng),
        "poison": lambda: poison_experiment(args.out, args.reuse),
        "dropout": lambda: dropout_experiment(args.out),
    }
    for name in args.only or list(experiments):
        t0 = time.monotonic()
        report[name] = experiments[name]()
        report[name]["wall_s"] = round(time.monotonic() - t0, 1)
        report[name]["machine"] = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at end"
        atomic_write_text(RESULTS, json.dumps(report, indent=2, default=str))
        logger.info("%s: %s", name, json.dumps(report[name], default=str)[:2000])
    return 0


if __name__ == "__main__":
    from common.cli import report_errors

    sys.exit(report_errors("bench.faults", lambda: main()))
