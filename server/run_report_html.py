"""The research report of ``facefed report``: one self-contained HTML page for one or more runs.

In the style of the privacy audit report (:mod:`server.audit_report`): inline CSS, plots embedded as
PNG data URIs, nothing fetched when the page is opened. For each run: its resolved config, accuracy
per round for both models, each site's cumulative epsilon against its budget, each round's time
split, and the sites sampled, heard from, dropped and refused. With several runs, a privacy-utility
plot and table first. Every number is the run's own (:mod:`server.run_report`); each table has an
``id`` (``accuracy-N``, ``epsilon-N``, ``time-N``, ``sites-N``, ``privacy-utility``) so that tests
and scripts can read the page back.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from server.audit_report import CSS as AUDIT_CSS
from server.run_report import RoundSummary, RunSummary
from server.run_report_plots import (
    SPLIT_PARTS,
    plot_accuracy,
    plot_epsilon,
    plot_privacy_utility,
    plot_time,
)

NOT_RECORDED = "not recorded"

_CSS = (
    AUDIT_CSS
    + """
.warn{background:#fff5e0;color:#7a4b00;border:1px solid #f0c36d}
.config{columns:3 18rem;font-size:.8rem;margin:.5rem 0} .config div{break-inside:avoid}
.config b{font-weight:600} .missing{color:#8a8f98;font-style:italic}
section.run{margin-top:2.5rem}
"""
)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as the page shows it: fixed decimals, ``∞``, or "not recorded"."""
    if value is None:
        return f'<span class="missing">{NOT_RECORDED}</span>'
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _table(
    table_id: str, headers: Sequence[str], rows: list[list[str]], numeric: range | None = None
) -> str:
    """A table of already escaped cells; the columns in ``numeric`` (default: all but the first)
    are right-aligned."""
    numeric = numeric if numeric is not None else range(1, len(headers))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(alt: str, png: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _status(run: RunSummary) -> str:
    done = f"{len(run.rounds)} of {run.config.get('num-rounds', '?')} rounds"
    if run.status == "completed":
        return f'<div class="status ok">✔ completed: {done}</div>'
    reason = f": {html.escape(run.error)}" if run.error else ""
    kind = "warn" if run.status in ("stopped", "running") else "bad"
    return f'<div class="status {kind}">{html.escape(run.status)} after {done}{reason}</div>'


def _accuracy_table(i: int, run: RunSummary) -> str:
    rows = [
        [
            str(r.round),
            fmt(r.lfw_accuracy),
            fmt(r.lfw_std),
            fmt(r.fer_accuracy),
            fmt(r.fer_macro_f1),
        ]
        for r in run.rounds
    ]
    headers = ["round", "LFW accuracy", "LFW std", "FER2013 accuracy", "FER2013 macro-F1"]
    return _table(f"accuracy-{i}", headers, rows)


def _epsilon_table(i: int, run: RunSummary) -> str:
    sites = list(run.final_epsilons())
    rows = [
        [str(r.round)] + [fmt(r.sites[s].epsilon) if s in r.sites else "–" for s in sites]
        for r in run.rounds
    ]
    rows.append(["budget"] + [_budget(run, s) for s in sites])
    headers = ["round", *(f"{s} ε" for s in sites)]
    return _table(f"epsilon-{i}", headers, rows)


def _budget(run: RunSummary, site: str) -> str:
    return fmt(run.budgets()[site]) if run.dp else "none (no DP)"


def _time_table(i: int, run: RunSummary) -> str:
    rows = []
    for r in run.rounds:
        split = r.time_split or {}
        rows.append(
            [str(r.round), fmt(r.time_s, 2)] + [fmt(split.get(key), 2) for key, _, _ in SPLIT_PARTS]
        )
    headers = ["round", "round time (s)", "training (s)", "evaluation (s)", "overhead (s)"]
    return _table(f"time-{i}", headers, rows)


def _count(value: int | None) -> str:
    return str(value) if value is not None else f'<span class="missing">{NOT_RECORDED}</span>'


def _sites_table(i: int, run: RunSummary) -> str:
    rows = [
        [
            str(r.round),
            _count(r.sampled),
            _count(r.replied),
            str(len(r.sites)),
            str(len(r.dropouts)),
            str(r.egress_refused),
            _failures(r),
        ]
        for r in run.rounds
    ]
    headers = [
        "round",
        "sampled",
        "replied",
        "accepted",
        "dropouts",
        "egress refused",
        "refusals and failures",
    ]
    return _table(f"sites-{i}", headers, rows, numeric=range(1, len(headers) - 1))


def _failures(r: RoundSummary) -> str:
    if not r.failures:
        return "none"
    return "<br>".join(html.escape(f) for f in r.failures)


def _config(run: RunSummary) -> str:
    items = "".join(
        f"<div><b>{html.escape(str(k))}</b> = <code>{html.escape(json.dumps(v))}</code></div>"
        for k, v in run.config.items()
    )
    return f'<div class="config">{items}</div>'


def _epsilon_note(run: RunSummary) -> str:
    delta = html.escape(str(run.config.get("delta", "?")))
    return f"""<p>ε is each site's cumulative DP-SGD ε over this run after each round it trained in,
as the site reported it (δ = {delta}); the budget is the one its signed privacy record set (a run
that did not record it: the dotted line is the config's max-epsilon). The run's ledger holds the
signed records: check them with <code>facefed audit verify</code>.</p>"""


def _run_section(i: int, run: RunSummary) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in run.notes)
    notes_html = (
        f'<p class="note">Not in this run\'s results.json:</p><ul>{notes}</ul>' if notes else ""
    )
    accuracy = _img("accuracy per round", plot_accuracy(run)) if run.rounds else ""
    epsilon = (
        _img("cumulative epsilon per site", plot_epsilon(run)) if run.rounds and run.dp else ""
    )
    timing = (
        _img("round time split", plot_time(run))
        if any(r.time_split is not None for r in run.rounds)
        else ""
    )
    privacy = (
        f"{epsilon}{_epsilon_table(i, run)}{_epsilon_note(run)}"
        if run.dp
        else f"<p>Trained without differential privacy (dp = false): ε = ∞.</p>"
        f"{_epsilon_table(i, run)}"
    )
    return f"""<section class="run" id="run-{i}">
<h2>Run {i + 1}: {html.escape(run.name)}</h2>
{_status(run)}
<dl>
<dt>folder</dt><dd><code>{html.escape(run.path)}</code></dd>
<dt>wall time</dt><dd>{fmt(run.wall_time_s, 0)} s</dd>
<dt>resumed</dt><dd>{run.resumes} time(s)</dd>
<dt>sites / cohort</dt><dd>{run.config.get("num-sites", "?")} sites,
{run.config.get("cohort-size", "?")} sampled per round; strategy
{html.escape(str(run.config.get("strategy", "?")))}</dd>
</dl>
{notes_html}
<h3>Accuracy per round</h3>
{accuracy}
{_accuracy_table(i, run)}
<p>LFW: 10-fold verification accuracy on the held-out LFW sets; FER2013: emotion accuracy and
macro-F1 on its test split. Each is the global model after the round.</p>
<h3>Privacy spent</h3>
{privacy}
<h3>Round time</h3>
{timing}
{_time_table(i, run)}
<h3>Sites: replies, dropouts, refusals</h3>
{_sites_table(i, run)}
<h3>Resolved config</h3>
{_config(run)}
</section>"""


def _privacy_utility(runs: list[RunSummary]) -> str:
    rows = []
    for run in runs:
        last = run.rounds[-1] if run.rounds else None
        for site, epsilon in run.final_epsilons().items():
            rows.append(
                [
                    html.escape(run.name),
                    html.escape(site),
                    fmt(epsilon),
                    _budget(run, site),
                    fmt(last.lfw_accuracy if last else None),
                    fmt(last.fer_accuracy if last else None),
                    fmt(last.fer_macro_f1 if last else None),
                ]
            )
    headers = [
        "run",
        "site",
        "final ε",
        "budget",
        "LFW accuracy",
        "FER2013 accuracy",
        "FER2013 macro-F1",
    ]
    return f"""<h2>Privacy and utility across runs</h2>
{_img("final accuracy against epsilon", plot_privacy_utility(runs))}
<p>One point per run and site: the run's final accuracy against the site's cumulative ε after the
last round it trained in. A run without DP is the dotted line.</p>
{_table("privacy-utility", headers, rows, numeric=range(2, len(headers)))}"""


def render_html(runs: list[RunSummary]) -> str:
    """Return the complete, self-contained report page for ``runs``."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    names = ", ".join(html.escape(r.name) for r in runs)
    comparison = _privacy_utility(runs) if len(runs) > 1 else ""
    sections = "\n".join(_run_section(i, run) for i, run in enumerate(runs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>facefed run report: {names}</title>
<style>{_CSS}</style></head><body>
<h1>Run report</h1>
<p>{len(runs)} facefed run(s), read from their results.json on {generated}: {names}.</p>
{comparison}
{sections}
</body></html>
"""
