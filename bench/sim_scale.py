"""Simulation scale: how many virtual sites one machine runs, and where a round's time goes.

    python -m bench.sim_scale                        # 10 and 100 sites, 3 rounds each (~15 min, 2 cores)
    python -m bench.sim_scale --sites 2,4 --rounds 1 # a quick look

Each scale is one ``facefed simulate`` run (a subprocess, its own process group) in which every site
takes part in every round (cohort = all sites), with real DP-SGD on small partitions and few local steps.
From its ``results.json`` each round's wall time is split into

* **evaluation**: the coordinator's evaluation of the global model (``eval_s``);
* **coordinator**: its sampling, validation, ledger, aggregation and checkpoint phases (``phases``);
* **sites**: the rest, i.e. the sites' rounds as the coordinator sees them: local training plus the
  site path (Ray scheduling and actor idle time, message serialisation, the ClientApp around the
  training, the site's privacy accounting and reply signing, loading the site's data), and in round 1
  also Ray and actor start-up.

Sites no longer report their training time: ``train-s`` was an un-noised measurement of private data
(it grows with the site's data), so a reply now carries only privacy accounting. The sites' share is
therefore no longer split into training and site path for current runs (those columns read "–");
results of older runs that carry ``train_s`` per site still get the split: training = the sites'
``train_s`` summed and divided by the number of concurrent Ray actors (one per CPU), overhead = wall -
evaluation - training, and site path = overhead - coordinator.

The facefed part of the site path is measured separately in this process (:func:`site_work`): one
site's round outside Flower (``client.training.round.run_round``: accounting, signing, model build) minus the
time of its ``train_round`` call (timed here, in-process), and loading a site's data with a warm and a
cold per-process cache. Round 1 includes start-up and is reported apart; the steady-state figure is the
median of rounds 2 and later.

Memory: the process tree of the run (coordinator, Ray's GCS and raylet, every actor) is polled from
``/proc`` twice a second; its peak summed RSS and PSS (PSS divides shared pages among the processes that
map them, so it does not double-count torch's libraries) and the largest single actor are reported.

Writes ``bench/results/sim_scale.json`` and ``bench/results/sim_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.timing import load_average, machine
from common.atomic import atomic_write_text

logger = logging.getLogger("bench.sim_scale")

RESULTS = Path("bench/results")
RUNS = RESULTS / "runs" / "sim_scale"
GOAL_OVERHEAD = 0.10
# Real DP-SGD on small partitions, few steps: a 100-site round must fit a few minutes on 2 cores.
SMALL: dict[str, Any] = {
    "face-train-limit": 64,
    "emotion-train-limit": 256,
    "face-batch": 16,
    "emotion-batch": 32,
    "face-steps": 3,
    "emotion-steps": 3,
    "emotion-eval-limit": 600,
    "max-epsilon": 8.0,
    # A fixed noise multiplier: calibrating it (seconds of PRV accounting per site, once per run) is
    # facefed's own start-up cost, timed apart in site_work() instead of in round 1 of 100 sites.
    "noise-multiplier": 1.0,
    "seed": 5,
}
FACEFED = [sys.executable, "-m", "common.cli"]
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------ time split
def _number(value: Any) -> Any:
    """Rounded for the report; nan (not measured) as None, so the JSON stays standard."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    return value


@dataclass(frozen=True)
class RoundSplit:
    """One round's wall time split into evaluation, the coordinator, the sites (and their training).

    nan is "not measured": the training split needs the sites' ``train_s`` (runs from before sites
    stopped reporting it), the coordinator split its phase timings.
    """

    round: int
    sites: int
    wall_s: float
    eval_s: float
    train_sum_s: float
    train_s: float  # train_sum_s / concurrent actors
    overhead_s: float
    overhead_frac: float
    # the overhead split, from the coordinator's phase timings (nan for runs without them)
    coordinator_s: float = math.nan  # sampling, validation, ledger, aggregation, checkpoint
    site_path_s: float = math.nan  # the rest: the ClientApp around training, Flower and Ray
    sites_s: float = math.nan  # wall - evaluation - coordinator: training plus site path

    def to_dict(self) -> dict[str, Any]:
        return {k: _number(v) for k, v in self.__dict__.items()}


def split_round(
    record: dict[str, Any], actors: int, previous: dict[str, Any] | None = None
) -> RoundSplit:
    """Split one ``results.json`` round record, for ``actors`` concurrent Ray actors.

    The coordinator's share of the overhead is its configure, accept (checking replies as they arrive,
    which overlaps the sites' training) and aggregate phases, plus the previous round's checkpoint
    (``previous``), which a round's ``time_s`` includes.

    Sites no longer report ``train_s``: when none does, the training, overhead and site-path
    figures are nan (not measured) and only ``sites_s`` (training plus site path) remains.

    Raises:
        ValueError: if ``actors < 1``, the round has no sites, or some sites reported ``train_s`` and
            others did not (a sum over part of the cohort would understate the training).
    """
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    clients = record.get("clients") or {}
    if not clients:
        raise ValueError(f"round {record.get('round')} has no site replies")
    times = [c.get("train_s") for c in clients.values()]
    measured = any(t is not None for t in times)
    if measured and any(isinstance(t, bool) or not isinstance(t, int | float) for t in times):
        raise ValueError(f"round {record.get('round')}: some sites reported train_s, others not")
    wall, evaluation = float(record["time_s"]), float(record["eval_s"])
    total = float(sum(times)) if measured else math.nan
    train = total / min(actors, len(times))
    overhead = wall - evaluation - train
    phases = record.get("phases") or {}
    coordinator = math.nan
    if "configure_s" in phases and "aggregate_s" in phases:
        saved = ((previous or {}).get("phases") or {}).get("save_s", 0.0)
        coordinator = (
            float(phases["configure_s"])
            + float(phases.get("accept_s", 0.0))
            + float(phases["aggregate_s"])
            + float(saved)
        )
    return RoundSplit(
        round=int(record["round"]),
        sites=len(times),
        wall_s=wall,
        eval_s=evaluation,
        train_sum_s=total,
        train_s=train,
        overhead_s=overhead,
        overhead_frac=overhead / wall if wall > 0 else 0.0,
        coordinator_s=coordinator,
        site_path_s=overhead - coordinator,
        sites_s=wall - evaluation - coordinator,
    )


def summarise(results: dict[str, Any], actors: int) -> dict[str, Any]:
    """Per-round splits, and the steady state: the median over rounds 2.. (round 1 if it is all)."""
    rounds = results["rounds"]
    splits = [split_round(r, actors, rounds[i - 1] if i else None) for i, r in enumerate(rounds)]
    steady = [s for s in splits if s.round > 1] or splits
    keys = (
        "wall_s",
        "eval_s",
        "train_s",
        "overhead_s",
        "overhead_frac",
        "coordinator_s",
        "site_path_s",
        "sites_s",
    )
    return {
        "rounds": [s.to_dict() for s in splits],
        "steady": {
            "rounds": [s.round for s in steady],
            **{k: _number(statistics.median(getattr(s, k) for s in steady)) for k in keys},
        },
        "all_sites_every_round": all(s.sites == results["config"]["num-sites"] for s in splits),
    }


# ---------------------------------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's workers are children of its raylet)."""
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int, str] | None:
    """(RSS bytes, PSS bytes, command) of a process, or None if it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        cmd = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (OSError, ValueError, IndexError):
        return None
    return rss, pss, cmd


@dataclass
class MemoryPoller:
    """Polls a process tree's memory in a thread; keeps the peaks and the actors it saw."""

    root: int
    interval_s: float = 0.5
    peak_rss: int = 0
    peak_pss: int = 0
    peak_actor_rss: int = 0
    peak_processes: int = 0
    actors: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> None:
        rss = pss = 0
        pids = process_tree(self.root)
        for pid in pids:
            found = _memory(pid)
            if found is None:
                continue
            rss += found[0]
            pss += found[1]
            if "ClientAppActor" in found[2]:
                self.actors.add(pid)
                self.peak_actor_rss = max(self.peak_actor_rss, found[0])
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def to_dict(self) -> dict[str, Any]:
        gib = 1024**3
        return {
            "peak_rss_gib": round(self.peak_rss / gib, 2),
            "peak_pss_gib": round(self.peak_pss / gib, 2),
            "peak_actor_rss_gib": round(self.peak_actor_rss / gib, 2),
            "peak_processes": self.peak_processes,
            "actor_processes_seen": len(self.actors),
        }


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return 0.0


# ----------------------------------------------------------------------------------- the runs
def simulate_cmd(
    out: Path, sites: int, rounds: int, cpus: int, config: dict[str, Any] | None = None
) -> list[str]:
    sets = [a for k, v in (config or SMALL).items() for a in ("--set", f"{k}={v}")]
    return [
        *FACEFED,
        "simulate",
        "--out",
        str(out),
        "--sites",
        str(sites),
        "--cohort",
        str(sites),
        "--rounds",
        str(rounds),
        "--num-cpus",
        str(cpus),
        *sets,
    ]


def run_scale(
    sites: int,
    rounds: int,
    cpus: int,
    out: Path,
    timeout_s: float,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one simulation; return its time split, memory peaks and load."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "simulate.log"
    cmd = simulate_cmd(out, sites, rounds, cpus, config)
    load_before = load_average()
    started = time.monotonic()
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        poller = MemoryPoller(proc.pid)
        poller.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
            proc.wait()
            code = -9
        finally:
            poller.stop()
    wall = time.monotonic() - started
    entry: dict[str, Any] = {
        "sites": sites,
        "cohort": sites,
        "rounds_requested": rounds,
        "ray_cpus": cpus,
        "actors": min(cpus, sites),
        "command": " ".join(cmd[2:]),
        "exit_code": code,
        "process_wall_s": round(wall, 1),
        "memory": poller.to_dict(),
        "load_before": load_before,
        "load_after": load_average(),
        "log": str(log),
    }
    results_path = out / "results.json"
    if not results_path.exists():
        entry["status"] = "no results.json"
        return entry
    results = json.loads(results_path.read_text())
    entry["status"] = results["status"]
    entry["run_wall_s"] = results["wall_time_s"]
    if results["rounds"]:
        entry.update(summarise(results, entry["actors"]))
        # Ray start, dataset checks and cache warm-up before round 1; actor shutdown after the last.
        entry["outside_rounds_s"] = round(wall - sum(r["time_s"] for r in results["rounds"]), 1)
    return entry


def site_work(sites: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Facefed's own per-site work outside ``train_round``, timed in this process for site 0.

    A round of one site outside Flower (``run_round``: the accountant's budget check and epsilon,
    model build, reply signing) minus its ``train_round`` call, timed here by wrapping it (the site
    no longer reports its training time); calibrating the noise multiplier to the budget
    (what every site does once per run when ``noise-multiplier = 0``, the default); and loading a
    site's data with a cold and a warm per-process cache.
    """
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.app import ConfigRecord, RecordDict

    from client.training import round as site_round
    from client.training import site_data
    from client.training.round import calibrated_noise, run_round
    from common.config import parse_run_config
    from common.models import EmotionNet, FaceEmbedder
    from common.serde import to_arrays

    torch.set_num_threads(1)
    settings = parse_run_config(
        {**(config or SMALL), "num-sites": sites, "cohort-size": sites, "num-rounds": 3}
    )
    site_data._gray_face_pool.cache_clear()
    site_data._fer_training.cache_clear()
    site_data._partitions.cache_clear()
    site_data.load_site_tensors.cache_clear()
    t0 = time.monotonic()
    data = site_data.load_site_tensors(settings, site_data.SiteSpec(0, sites))
    cold = time.monotonic() - t0
    t0 = time.monotonic()
    site_data.load_site_tensors(settings, site_data.SiteSpec(1, sites))
    warm = time.monotonic() - t0
    site = 0
    while data.num_identities < 2 and site + 1 < sites:  # a one-person site is refused training
        site += 1
        data = site_data.load_site_tensors(settings, site_data.SiteSpec(site, sites))
    arrays = to_arrays(FaceEmbedder(settings.face_width), EmotionNet(settings.emotion_width))
    state, key = RecordDict(), Ed25519PrivateKey.generate()
    rounds = []
    train_round = site_round.train_round
    trained: list[float] = []

    def timed_train_round(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return train_round(*args, **kwargs)
        finally:
            trained.append(time.monotonic() - started)

    site_round.train_round = timed_train_round
    try:
        for server_round in (1, 2):
            message_config = ConfigRecord({"server-round": server_round, "run-id": "bench"})
            trained.clear()
            t0 = time.monotonic()
            run_round(
                arrays,
                message_config,
                state,
                data,
                settings,
                settings.privacy.max_epsilon,
                site,
                key,
            )
            total = time.monotonic() - t0
            rounds.append(
                {
                    "round": server_round,
                    "run_round_s": round(total, 3),
                    "train_s": round(sum(trained), 3),
                }
            )
    finally:
        site_round.train_round = train_round
    calibrating = parse_run_config({**settings.to_flat(), "noise-multiplier": 0.0})
    t0 = time.monotonic()
    calibrated_noise(calibrating, data, calibrating.privacy.max_epsilon, site, 0.0)
    calibration = time.monotonic() - t0
    return {
        "site": site,
        "noise_calibration_s": round(calibration, 3),
        "data_load_cold_s": round(cold, 3),
        "data_load_warm_s": round(warm, 3),
        "rounds": rounds,
        "non_training_round1_s": round(rounds[0]["run_round_s"] - rounds[0]["train_s"], 3),
        "non_training_round2_s": round(rounds[1]["run_round_s"] - rounds[1]["train_s"], 3),
    }


# ---------------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _secs(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``sim_scale.md``."""
    lines = [
        "# Simulation scale",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus_usable']} usable cores, "
        f"{report['mem_total_gib']} GiB RAM. Load (1/5/15 min) at start {report['load_start']}, "
        f"at end {report['load_end']} (the cores are shared with other jobs).",
        "",
        "Workload (run-config keys): "
        + ", ".join(f"`{k}={v}`" for k, v in report.get("config", {}).items()),
        "",
        "Per-round split (s): coordinator = its sampling, validation, ledger, aggregation and "
        "checkpoint phases (validation and ledger run as each reply arrives, overlapping the wait); "
        "sites = wall - evaluation - coordinator: the sites' training plus the site path (the "
        "ClientApp around training, Flower's message path, Ray). Sites no longer report their "
        "training time (`train-s` was un-noised private data), so training, overhead and site path "
        "are – for current runs; for older runs training = sum of the sites' `train-s` / "
        "concurrent actors, overhead = wall - evaluation - training, site path = overhead - "
        "coordinator.",
        "",
        "| sites | actors | round | wall | evaluation | training (ideal parallel) | overhead | "
        "overhead share | of it coordinator | of it site path | sites (training + site path) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scale in report["scales"]:
        for r in scale.get("rounds", []):
            lines.append(
                f"| {scale['sites']} | {scale['actors']} | {r['round']} | {r['wall_s']:.1f} | "
                f"{r['eval_s']:.1f} | {_secs(r['train_s'])} | {_secs(r['overhead_s'])} | "
                f"{_pct(r['overhead_frac'])} | {_secs(r.get('coordinator_s'))} | "
                f"{_secs(r.get('site_path_s'))} | {_secs(r.get('sites_s'))} |"
            )
    lines += [
        "",
        "| sites | status | all sites every round | steady overhead share (median, rounds) | "
        "peak RSS / PSS of the run (GiB) | largest actor RSS (GiB) | actor processes | "
        "process wall (s), of it outside rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scale in report["scales"]:
        steady = scale.get("steady", {})
        mem = scale["memory"]
        share = f"{_pct(steady.get('overhead_frac'))} ({steady['rounds']})" if steady else "–"
        lines.append(
            f"| {scale['sites']} | {scale['status']} | {scale.get('all_sites_every_round', '–')} | "
            f"{share} | {mem['peak_rss_gib']} / {mem['peak_pss_gib']} | "
            f"{mem['peak_actor_rss_gib']} | {mem['actor_processes_seen']} | "
            f"{scale['process_wall_s']:.0f}, {scale.get('outside_rounds_s', '–')} |"
        )
    work = report.get("site_work")
    if work:
        lines += [
            "",
            f"Facefed's own per-site work besides training (site {work['site']}, in-process): "
            f"data load "
            f"{work['data_load_cold_s']:.2f} s cold / {work['data_load_warm_s']:.3f} s warm cache; "
            f"accounting, signing and model build {work['non_training_round1_s']:.2f} s (round 1) "
            f"and {work['non_training_round2_s']:.2f} s (round 2) per site and round; calibrating "
            f"the noise multiplier (default `noise-multiplier = 0`, once per site and run; the runs "
            f"above fix it) {work['noise_calibration_s']:.1f} s per site.",
        ]
    return "\n".join(lines) + "\n"


def _overrides(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"sim_scale: --set {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="10,100", help="comma-separated site counts")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per run (>= 2 for a steady state)"
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the run directories go")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--no-site-work", action="store_true", help="skip the in-process profile")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key of the small-partition workload (repeatable)",
    )
    args = parser.parse_args(argv)
    config = {**SMALL, **_overrides(args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict[str, Any] = {
        "config": config,
        "machine": machine(),
        "mem_total_gib": _mem_total_gib(),
        "load_start": load_average(),
        "scales": [],
    }
    for sites in (int(s) for s in args.sites.split(",")):
        logger.info("simulating %d sites x %d rounds on %d CPUs", sites, args.rounds, args.num_cpus)
        entry = run_scale(
            sites, args.rounds, args.num_cpus, args.runs / f"sites-{sites}", args.timeout, config
        )
        logger.info("%d sites: %s", sites, json.dumps(entry.get("steady", entry["status"])))
        report["scales"].append(entry)
        atomic_write_text(args.out / "sim_scale.json", json.dumps(report, indent=2))
    if not args.no_site_work:
        report["site_work"] = site_work(max(int(s) for s in args.sites.split(",")), config)
    report["load_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "sim_scale.json", json.dumps(report, indent=2))
    atomic_write_text(args.out / "sim_scale.md", markdown(report))
    return 0 if all(s["status"] == "completed" for s in report["scales"]) else 1


if __name__ == "__main__":
    sys.exit(main())
