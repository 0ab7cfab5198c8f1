"""``facefed audit empirical``: test a site's claimed epsilon with a one-run audit (docs/audit.md).

For each claimed epsilon (and, with ``--control``, once with the noise off), the site's face-model
training runs on the site's real faces with Dirac gradient canaries
(:mod:`client.training.audit_run`), and the measured lower bound is shown beside the claim. Exit 0 when
every DP row's bound is at or below its claim; exit 4 when one is above, which means the
implementation adds less privacy than it claims (a bug to find, not a number to report).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from common.config import Scalar
from common.errors import ConfigError, IntegrityError

logger = logging.getLogger(__name__)

FORMAT = "facefed-empirical-audit/1"
CONTROL_NOTE = (
    "control: noise switched off. It is not a site and never a release: it shows that the audit "
    "detects a run without privacy."
)


def register(sub: Any) -> None:
    """Add ``audit empirical`` to the ``audit`` subcommands."""
    from common.cli import bounded_float, positive_int

    p = sub.add_parser(
        "empirical",
        help="measure a lower bound on a site's epsilon with a one-run canary audit",
        description=(
            "Run a site's face-model DP-SGD on its real faces with gradient canaries and turn "
            "the auditor's correct guesses into a lower bound on epsilon (Steinke, Nasr and "
            "Jagielski 2023). The bound must stay at or below the claimed epsilon."
        ),
    )
    p.add_argument("--scenario", default="default", help="scenario name or TOML (default: default)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key"
    )
    p.add_argument("--site", type=int, default=0, help="which simulated site to audit (default 0)")
    p.add_argument(
        "--unit",
        choices=("example", "person"),
        action="append",
        help="privacy unit(s) to audit (repeatable; default: the scenario's dp-unit)",
    )
    p.add_argument(
        "--epsilon",
        default="1,4,8",
        help="claimed epsilons to audit, comma-separated (default 1,4,8)",
    )
    p.add_argument("--control", action="store_true", help="add the no-noise control run")
    p.add_argument("--canaries", type=positive_int, default=5000, help="canaries m (default 5000)")
    p.add_argument(
        "--guesses", type=positive_int, default=1000, help="guesses r of the m (default 1000)"
    )
    p.add_argument(
        "--confidence",
        type=bounded_float(0.5, 0.9999),
        default=0.95,
        help="confidence of the lower bound (default 0.95)",
    )
    p.add_argument("--repeats", type=positive_int, default=1, help="audits per row (default 1)")
    p.add_argument("--data-dir", help="folder with the datasets (default: $FACEFED_DATA)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    p.set_defaults(func=run)


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--epsilon must list positive numbers, e.g. 1,4,8; got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    import torch

    from client.training.audit_run import AuditDesign, audit_site
    from client.training.dp_random import SecretRandomness
    from client.training.site_data import SiteSpec, load_site_tensors
    from simulations.scenarios import load_scenario, parse_assignment, resolve

    epsilons = _epsilons(args.epsilon)
    overrides: dict[str, Scalar] = dict(parse_assignment(a) for a in args.set)
    if args.data_dir:
        overrides["data-dir"] = args.data_dir
    base = load_scenario(args.scenario)
    units = args.unit or [str(resolve(base, overrides).privacy.dp_unit)]
    design = AuditDesign(canaries=args.canaries, guesses=args.guesses, confidence=args.confidence)
    torch.set_num_threads(1)
    # Whether any audit refutes its claim is decided at the stated confidence for the whole command
    # (Bonferroni over every DP audit it runs), so that more rows or repeats do not make a correct
    # implementation more likely to be accused; each row's bounds are still per audit.
    family = 1 - (1 - args.confidence) / (len(units) * len(epsilons) * args.repeats)
    rows: list[dict[str, Any]] = []
    for unit in units:
        plan: list[tuple[float, bool]] = [(e, False) for e in epsilons]
        if args.control:
            plan.append((max(epsilons), True))
        for epsilon, control in plan:
            # the face model alone: the emotion model has no person ids and is not audited here
            settings = resolve(
                base,
                {**overrides, "dp-unit": unit, "max-epsilon": epsilon, "emotion-steps": 0},
            )
            if not 0 <= args.site < settings.num_sites:
                raise ConfigError(f"--site {args.site} is outside 0..{settings.num_sites - 1}")
            data = load_site_tensors(
                settings,
                SiteSpec(
                    partition_id=args.site,
                    num_partitions=settings.num_sites,
                    data_dir=settings.data_dir,
                    site_index=args.site,
                ),
            )
            results = [
                audit_site(settings, data, design, SecretRandomness(), control=control)
                for _ in range(args.repeats)
            ]
            row = summarise(results, target=epsilon, family_confidence=family)
            rows.append(row)
            print(format_row(row), flush=True)
    report = {
        "format": FORMAT,
        "scenario": args.scenario,
        "overrides": {k: v for k, v in overrides.items()},
        "site": args.site,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if args.html:
        atomic_write_text(args.html, render_page(report))
    refuted = [r for r in rows if r["refutes_claim"]]
    if refuted:
        worst = refuted[0]
        raise IntegrityError(
            f"the audit refutes the claim: {worst['unit']}-level epsilon {worst['claimed_epsilon']:.3g} "
            f"but the measured lower bound is {worst['family_bound_max']:.3g} at "
            f"{args.confidence:.0%} confidence over all {len(units) * len(epsilons) * args.repeats} "
            "audits; the implementation adds less privacy than it claims"
        )
    return 0


def summarise(results: Sequence[Any], target: float, family_confidence: float) -> dict[str, Any]:
    """One table row from the repeated audits of one setting: the median and largest bound per
    audit, and whether any audit refutes the claim at the command's family-wise confidence."""
    from common.privacy.audit_bound import epsilon_lower_bound

    first = results[0]
    bounds = [r.bound for r in results]
    control = bool(first.control)
    family = max(
        epsilon_lower_bound(r.canaries, r.guesses, r.correct, r.delta, family_confidence)
        for r in results
    )
    return {
        "unit": first.unit,
        "control": control,
        "target_epsilon": target,
        "claimed_epsilon": "inf" if control else first.claimed_epsilon,
        "delta": first.delta,
        "accountant": first.accountant,
        "noise_multiplier": first.noise_multiplier,
        "sample_rate": first.sample_rate,
        "steps": first.steps,
        "canaries": first.canaries,
        "guesses": first.guesses,
        "confidence": first.confidence,
        "correct": [r.correct for r in results],
        "bounds": bounds,
        "bound_median": statistics.median(bounds),
        "bound_max": max(bounds),
        "within_claim": all(r.within_claim for r in results),
        "family_confidence": family_confidence,
        "family_bound_max": family,
        "refutes_claim": not control and family > first.claimed_epsilon,
        "seconds_median": statistics.median(r.seconds for r in results),
    }


def _claim(row: Mapping[str, Any]) -> str:
    return "∞ (no noise)" if row["control"] else f"{row['claimed_epsilon']:.3f}"


def format_row(row: Mapping[str, Any]) -> str:
    label = "CONTROL (no noise)" if row["control"] else "ok" if row["within_claim"] else "REFUTED"
    return (
        f"{row['unit']:<8} claimed eps {_claim(row):>14}  sigma {row['noise_multiplier']:.3f}  "
        f"q {row['sample_rate']:.4f}  steps {row['steps']}  right {row['correct']} of "
        f"{row['guesses']}  lower bound {row['bound_median']:.3f} (max {row['bound_max']:.3f})  "
        f"{label}"
    )


def rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The HTML table of audit rows (also used by ``audit report --empirical``)."""
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "unit",
            "claimed ε",
            "measured lower bound (median, max)",
            "bound ≤ claim",
            "σ",
            "q",
            "steps",
            "canaries m",
            "guesses r",
            "right",
            "confidence",
        )
    )
    body = []
    for r in rows:
        verdict = "control" if r["control"] else "yes" if r["within_claim"] else "<b>NO</b>"
        body.append(
            "<tr>"
            + "".join(
                f"<td>{cell}</td>"
                for cell in (
                    html.escape(str(r["unit"])) + (" (control)" if r["control"] else ""),
                    html.escape(_claim(r)),
                    f"{r['bound_median']:.3f}, {r['bound_max']:.3f}",
                    verdict,
                    f"{r['noise_multiplier']:.3f}",
                    f"{r['sample_rate']:.4f}",
                    str(r["steps"]),
                    str(r["canaries"]),
                    str(r["guesses"]),
                    html.escape(", ".join(str(c) for c in r["correct"])),
                    f"{r['confidence']:.0%}",
                )
            )
            + "</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


EXPLANATION = (
    "Each row ran the site's face-model DP-SGD on its real faces with m Dirac gradient canaries, "
    "each in the run with probability 1/2 and then sampled like any unit. The auditor saw only the "
    "released face network and guessed r of them. The lower bound is the largest ε those guesses "
    "refute at the stated confidence (Steinke, Nasr and Jagielski 2023): the run cannot be more "
    "private than that. It is not an estimate of the true ε, and a bound below the claim does not "
    "prove the claim. " + CONTROL_NOTE
)


def render_page(report: Mapping[str, Any]) -> str:
    from server.audit_report import CSS

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>facefed empirical privacy audit</title><style>{CSS}</style></head><body>
<h1>Empirical privacy audit</h1>
<p>Scenario <code>{html.escape(str(report["scenario"]))}</code>, site {report["site"]},
generated {html.escape(str(report["generated"]))}.</p>
<p class="note">{html.escape(EXPLANATION)}</p>
{rows_table(report["rows"])}
</body></html>
"""


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an ``audit empirical --json`` file for ``audit report --empirical``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the empirical audit {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an `audit empirical --json` file ({FORMAT})")
    try:  # every field the page reads, read once here: a missing or mistyped one is one line
        rows_table(data["rows"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{path} is not a complete `audit empirical --json` file ({type(exc).__name__}: {exc})"
        ) from None
    return data
