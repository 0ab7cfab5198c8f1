"""What ``facefed report`` shows of a run, read from its ``results.json`` (no plotting here).

Every number is the run's own, as :mod:`server.run` wrote it: accuracy per round, each site's
cumulative epsilon and budget, the round's time split, the sites sampled and heard from, dropouts and
refusals. Nothing is recomputed, with one exception kept in one place: :func:`split_round_time`,
which the coordinator itself uses to write a round's ``time_split``; a run written before that key
existed gets the same split from the same recorded phases. A value a run did not record (an older
run, a run without DP) is ``None`` here and "not recorded" on the page.

This module is light on purpose (json and dataclasses only): :mod:`server.run` imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError

RESULTS = "results.json"


def split_round_time(record: Mapping[str, Any]) -> dict[str, float] | None:
    """Where a round's ``time_s`` went: training, evaluation and overhead (seconds, 2 decimals).

    * training: the wait for the sites' replies (their local DP training and the transport), less
      the time the coordinator spent checking replies that had arrived (``wait_s - accept_s``);
    * evaluation: the global models' evaluation on the held-out sets (``eval_s``);
    * overhead: the rest of ``time_s``: sampling, checking replies, aggregation, the previous
      round's checkpoint and the bookkeeping.

    Returns None if the round did not record its phases (a run older than them).
    """
    phases = record.get("phases")
    try:
        time_s, eval_s = float(record["time_s"]), float(record["eval_s"])
        wait_s, accept_s = float(phases["wait_s"]), float(phases["accept_s"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    training = max(0.0, wait_s - accept_s)
    return {
        "training_s": round(training, 2),
        "evaluation_s": round(eval_s, 2),
        "overhead_s": round(max(0.0, time_s - training - eval_s), 2),
    }


@dataclass(frozen=True, kw_only=True)
class SiteRound:
    """One site's privacy state after a round it trained in."""

    epsilon: float  # cumulative over the run so far; math.inf for a site without DP
    budget: float | None  # the budget its signed record set; None: not recorded


@dataclass(frozen=True, kw_only=True)
class RoundSummary:
    """One round of a run, as ``results.json`` recorded it."""

    round: int
    lfw_accuracy: float | None
    lfw_std: float | None
    fer_accuracy: float | None
    fer_macro_f1: float | None
    sites: dict[str, SiteRound]
    time_s: float | None
    time_split: dict[str, float] | None
    sampled: int | None
    replied: int | None
    dropouts: list[int]
    failures: list[str]
    egress_refused: int


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """A run's report content: its config and its rounds."""

    name: str
    path: str
    status: str
    error: str | None
    config: dict[str, Any]
    rounds: list[RoundSummary]
    wall_time_s: float | None
    resumes: int
    notes: list[str] = field(default_factory=list)

    @property
    def dp(self) -> bool:
        return bool(self.config.get("dp", True))

    def final_epsilons(self) -> dict[str, float]:
        """Each site's cumulative epsilon after the last round it trained in."""
        last: dict[str, float] = {}
        for r in self.rounds:
            last |= {site: s.epsilon for site, s in r.sites.items()}
        return dict(sorted(last.items(), key=lambda item: site_order(item[0])))

    def budgets(self) -> dict[str, float | None]:
        """Each site's budget as last recorded (None: not recorded)."""
        last: dict[str, float | None] = {}
        for r in self.rounds:
            last |= {site: s.budget for site, s in r.sites.items()}
        return dict(sorted(last.items(), key=lambda item: site_order(item[0])))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able content (infinite epsilon written ``"inf"``, as results.json writes it)."""
        return {
            "name": self.name,
            "path": self.path,
            "status": self.status,
            "error": self.error,
            "wall_time_s": self.wall_time_s,
            "resumes": self.resumes,
            "notes": self.notes,
            "config": self.config,
            "final": {
                "round": self.rounds[-1].round if self.rounds else None,
                "lfw_accuracy": self.rounds[-1].lfw_accuracy if self.rounds else None,
                "fer_accuracy": self.rounds[-1].fer_accuracy if self.rounds else None,
                "fer_macro_f1": self.rounds[-1].fer_macro_f1 if self.rounds else None,
                "epsilon": {k: _json_eps(v) for k, v in self.final_epsilons().items()},
                "budget": self.budgets(),
            },
            "rounds": [
                {
                    "round": r.round,
                    "lfw_accuracy": r.lfw_accuracy,
                    "lfw_std": r.lfw_std,
                    "fer_accuracy": r.fer_accuracy,
                    "fer_macro_f1": r.fer_macro_f1,
                    "sites": {
                        k: {"epsilon": _json_eps(s.epsilon), "budget": s.budget}
                        for k, s in r.sites.items()
                    },
                    "time_s": r.time_s,
                    "time_split": r.time_split,
                    "sampled": r.sampled,
                    "replied": r.replied,
                    "dropouts": r.dropouts,
                    "failures": r.failures,
                    "egress_refused": r.egress_refused,
                }
                for r in self.rounds
            ],
        }


class _Malformed(ValueError):
    """A value in results.json has the wrong shape (reported as a corrupt file)."""


def load_run(path: str | Path, name: str | None = None) -> RunSummary:
    """Read the run in ``path`` (a run folder, or its ``results.json``).

    Raises:
        DataError: no results.json there, or it is not a facefed run's results.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; name a run's output folder or its {RESULTS}")
    results_path = path / RESULTS if path.is_dir() else path
    try:
        text = results_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path} holds no {RESULTS}; name a run's output folder (the --out of facefed "
            "simulate), or wait until its first round has finished"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {results_path} ({exc}); check the path") from None
    try:
        return _summary(json.loads(text), results_path, name)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and _Malformed are ValueErrors
        reason = " ".join(str(exc).split())[:200]
        raise DataError(
            f"{results_path} is not a readable facefed results file ({reason}); "
            "re-run or restore it from a backup"
        ) from None


def load_runs(paths: list[str | Path]) -> list[RunSummary]:
    """Read every run; each is named by its folder (with its parent's name where two clash)."""
    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    plain = [f.resolve().name or str(f) for f in folders]
    names = [
        f"{f.resolve().parent.name}/{name}" if plain.count(name) > 1 else name
        for f, name in zip(folders, plain, strict=True)
    ]
    for i in range(len(names)):
        if names.count(names[i]) > 1:
            names[i] = f"{names[i]} #{i + 1}"
    return [load_run(p, name) for p, name in zip(paths, names, strict=True)]


def _summary(data: object, results_path: Path, name: str | None) -> RunSummary:
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise _Malformed("no list of rounds")
    config = data.get("config")
    if not isinstance(config, dict):
        raise _Malformed("no config")
    rounds = [_round(r) for r in data["rounds"]]
    notes = []  # what the page shows as "not recorded", said once per run
    if rounds and all(r.time_split is None for r in rounds):
        notes.append("each round's time split (a run older than the round phases)")
    dp = bool(config.get("dp", True))
    if dp and rounds and all(s.budget is None for r in rounds for s in r.sites.values()):
        notes.append("each site's budget")
    if rounds and all(r.sampled is None for r in rounds):
        notes.append("the sites sampled and the replies received in each round")
    error = data.get("error")
    return RunSummary(
        name=name or results_path.resolve().parent.name,
        path=str(results_path.parent),
        status=str(data.get("status", "unknown")),
        error=str(error) if error is not None else None,
        config=config,
        rounds=rounds,
        wall_time_s=_number(data.get("wall_time_s")),
        resumes=len(_list(data.get("resumes"))),
        notes=notes,
    )


def _round(record: object) -> RoundSummary:
    number = record.get("round") if isinstance(record, dict) else None
    if not isinstance(record, dict) or isinstance(number, bool) or not isinstance(number, int):
        raise _Malformed("a round is not an object with a round number")
    face, emotion = _mapping(record.get("face")), _mapping(record.get("emotion"))
    clients = _mapping(record.get("clients"))
    cohort = _mapping(record.get("cohort"))
    split = record.get("time_split")
    if split is not None and not (
        isinstance(split, dict) and all(_number(v) is not None for v in split.values())
    ):
        raise _Malformed(f"round {record['round']}: time_split is not a set of numbers")
    return RoundSummary(
        round=record["round"],
        lfw_accuracy=_number(face.get("lfw_accuracy")),
        lfw_std=_number(face.get("lfw_std")),
        fer_accuracy=_number(emotion.get("accuracy")),
        fer_macro_f1=_number(emotion.get("macro_f1")),
        sites={
            str(site): _site(c)
            for site, c in sorted(clients.items(), key=lambda item: site_order(item[0]))
        },
        time_s=_number(record.get("time_s")),
        time_split=dict(split) if split is not None else split_round_time(record),
        sampled=_count(cohort.get("sampled")),
        replied=_count(cohort.get("replied")),
        dropouts=[_count(n) or 0 for n in _list(record.get("dropouts"))],
        failures=[str(f) for f in _list(record.get("failures"))],
        egress_refused=sum(
            _count(_mapping(c).get("egress_refused")) or 0 for c in clients.values()
        ),
    )


def _site(client: object) -> SiteRound:
    c = _mapping(client)
    epsilon = c.get("epsilon")
    if epsilon == "inf":
        return SiteRound(epsilon=math.inf, budget=None)
    value = _number(epsilon)
    if value is None:
        raise _Malformed("a site's epsilon is not a number")
    return SiteRound(epsilon=value, budget=_number(c.get("budget_epsilon")))


def _number(value: object) -> float | None:
    """A recorded number, None if absent; anything else is malformed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"expected a number, found {type(value).__name__}")
    return float(value)


def _count(value: object) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _mapping(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Malformed(f"expected an object, found {type(value).__name__}")
    return value


def _list(value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"expected a list, found {type(value).__name__}")
    return value


def site_order(site: str) -> tuple[int, str]:
    """Sort key: ``site-2`` before ``site-10``."""
    _, _, number = site.rpartition("-")
    return (int(number), site) if number.isdigit() else (1 << 30, site)


def _json_eps(epsilon: float) -> float | str:
    return "inf" if math.isinf(epsilon) else epsilon
