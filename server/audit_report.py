"""The privacy officer's report: a self-contained HTML page (and a JSON twin) from a ledger.

The page needs no network: CSS is inline and the plots are PNGs embedded as base64 data URIs, drawn
with matplotlib's Agg canvas (no pyplot, no global backend switch). Every number shown is the
auditor's recomputation from :func:`common.privacy.verify.verify_ledger`, not a value copied from
the ledger.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.privacy.accounting import accountant_version, available_accountants
from common.privacy.verify import SiteSummary, VerificationResult

UNIT_NOTE = (
    "Privacy unit, per model (the <i>unit</i> column): <b>example</b> means one face image; a "
    "person who contributed k images is protected at roughly k&times;&epsilon; (group privacy), "
    "not &epsilon;. <b>person</b> means all of one person's images: people were sampled and each "
    "person's total gradient clipped, so &epsilon; is per person. The emotion data (FER2013) has "
    "no person ids, so the emotion model is always example-level. A site's &epsilon; composes both "
    "models: it holds at once for one person's face images (or one face image) and one emotion "
    "image. Client-level entries (unit: <b>site</b>) bound what the released model reveals about a "
    "whole site's data. See docs/audit.md."
)
LIFETIME_NOTE = (
    "<b>Lifetime &epsilon;</b> is each site's own total over every run it took part in (a new run "
    "does not reset it), composed by its accountant at the same &delta;. This ledger holds one run "
    "only, so it cannot be recomputed here: the audit checks that it is at least the run's "
    "recomputed &epsilon; and never decreases. <b>Noise</b> <i>secret</i>: drawn from the OS CSPRNG, "
    "fresh per release; <i>seeded</i>: reproducible from a seed (research simulations only), so the "
    "guarantee holds only against someone who cannot learn the seed."
)


def _site_label(site: SiteSummary) -> str:
    return (
        site.site_id if site.guarantee == "example-level" else f"{site.site_id} ({site.guarantee})"
    )


def summary(result: VerificationResult) -> dict[str, Any]:
    """Return the report's content as JSON-able data (what ``--json`` writes)."""
    return {
        "ledger": result.path,
        "run_id": result.run_id,
        "verified": result.ok,
        "closed": result.closed,
        "coordinator_fingerprint": result.coordinator_fingerprint,
        "coordinator_pinned": result.coordinator_pinned,
        "errors": [str(f) for f in result.errors],
        "first_bad_entry": result.first_error.seq if result.first_error else None,
        "warnings": list(result.warnings),
        "secret_noise_required": result.secret_noise_required,
        "sites": [
            {
                "site_id": s.site_id,
                "guarantee": s.guarantee,
                "privacy_unit": s.privacy_unit,
                "units": s.units,
                "delta": s.delta,
                "budget_epsilon": s.budget,
                "cumulative_epsilon": s.cumulative,
                "remaining_epsilon": s.remaining,
                "lifetime_epsilon": s.lifetime,
                "noise": list(s.noise_kinds),
                "cross_check": dict(s.cross_check),
                "rounds": [
                    {
                        "seq": r.seq,
                        "round": r.body.round,
                        "accountant": r.body.accountant,
                        "accountant_version": r.body.accountant_version,
                        "epsilon_round": r.epsilon_round,
                        "epsilon_cumulative": r.epsilon_cumulative,
                        "recorded_epsilon_round": r.body.epsilon_round,
                        "recorded_epsilon_cumulative": r.body.epsilon_cumulative,
                        "epsilon_lifetime": r.body.epsilon_lifetime,
                        "noise": r.body.noise,
                        "budget_epsilon": r.body.budget_epsilon,
                        "model_hash": r.body.model_hash,
                        "started_at": r.body.started_at,
                        "finished_at": r.body.finished_at,
                        "mechanisms": [m.to_dict() for m in r.body.mechanisms],
                    }
                    for r in s.rounds
                ],
            }
            for s in result.sites
        ],
    }


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_cumulative(sites: list[SiteSummary]) -> str:
    """Return a base64 PNG: cumulative epsilon per site over rounds, each with its budget line.

    One panel per guarantee kind, so that a large client-level epsilon does not flatten the sites'.
    """
    kinds = sorted({s.guarantee for s in sites}, key=lambda k: k != "example-level") or ["-"]
    fig = Figure(figsize=(8, 3.6 * len(kinds)), dpi=110, layout="constrained")
    axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds, strict=True):
        group = [s for s in sites if s.guarantee == kind]
        for i, site in enumerate(group):
            color = f"C{i % 10}"
            rounds = [r.body.round for r in site.rounds]
            ax.plot(
                rounds,
                [r.epsilon_cumulative for r in site.rounds],
                "o-",
                color=color,
                label=site.site_id,
            )
            ax.plot(rounds, [r.body.budget_epsilon for r in site.rounds], "--", color=color)
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative ε (recomputed)")
        ax.set_title(f"{kind}: cumulative privacy spent (dashed: approved budget)")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_per_round(sites: list[SiteSummary]) -> str:
    """Return a base64 PNG: epsilon spent in each round, per site."""
    fig = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(sites), 1)
    for i, site in enumerate(sites):
        xs = [r.body.round + (i - (len(sites) - 1) / 2) * width for r in site.rounds]
        ax.bar(xs, [r.epsilon_round for r in site.rounds], width=width, label=_site_label(site))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ε of the round alone")
    ax.set_title("Privacy spent per round")
    ax.grid(alpha=0.3, axis="y")
    if sites:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _table(headers: list[str], rows: list[list[str]], numeric_from: int = 99) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if i >= numeric_from else ""}">{cell}</td>'
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sites_table(sites: list[SiteSummary]) -> str:
    accountants = list(available_accountants())
    rows = []
    for s in sites:
        state = "over budget" if s.remaining < 0 else f"{s.remaining / s.budget:.0%} left"
        rows.append(
            [
                html.escape(s.site_id),
                html.escape(s.guarantee),
                html.escape(s.privacy_unit),
                html.escape(", ".join(s.noise_kinds)),
                str(len(s.rounds)),
                f"{s.delta:g}",
                f"{s.cumulative:.4f}",
                f"{s.lifetime:.4f}",
                f"{s.budget:.4f}",
                f"{s.remaining:.4f} ({state})",
            ]
            + [f"{s.cross_check[a]:.4f}" if a in s.cross_check else "–" for a in accountants]
        )
    headers = [
        "site",
        "guarantee",
        "unit",
        "noise",
        "rounds",
        "δ",
        "ε spent (run)",
        "ε lifetime",
        "budget",
        "remaining",
    ]
    return _table(headers + [f"ε {a.upper()}" for a in accountants], rows, numeric_from=4)


def _mechanism_table(sites: list[SiteSummary]) -> str:
    rows = []
    for s in sites:
        for r in s.rounds:
            for i, m in enumerate(r.body.mechanisms):
                first = i == 0
                rows.append(
                    [
                        str(r.seq) if first else "",
                        html.escape(s.site_id) if first else "",
                        str(r.body.round) if first else "",
                        html.escape(m.name or "–"),
                        html.escape(m.unit),
                        f"{m.noise_multiplier:g}",
                        f"{m.sample_rate:g}",
                        str(m.steps),
                        f"{m.clip_norm:g}",
                        f"{r.body.delta:g}" if first else "",
                        f"{r.epsilon_round:.4f}" if first else "",
                        f"{r.epsilon_cumulative:.4f}" if first else "",
                        f"{r.body.epsilon_lifetime:.4f}" if first else "",
                        html.escape(r.body.noise) if first else "",
                        html.escape(r.body.accountant) if first else "",
                        f"<code>{html.escape(r.body.model_hash[:12])}</code>" if first else "",
                        html.escape(r.body.finished_at[:19]) if first else "",
                    ]
                )
    headers = [
        "entry",
        "site",
        "round",
        "model",
        "unit",
        "σ",
        "q",
        "steps",
        "C",
        "δ",
        "ε round",
        "ε cumulative",
        "ε lifetime",
        "noise",
        "accountant",
        "model hash",
        "finished (UTC)",
    ]
    return _table(headers, rows, numeric_from=5)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1150px;color:#1d232a;line-height:1.4;padding:0 1rem}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.status{padding:.8rem 1rem;border-radius:6px;font-weight:600;font-size:1.1rem}
.ok{background:#e3f6e8;color:#11602b;border:1px solid #8fd19e}
.bad{background:#fde8e8;color:#8a1c1c;border:1px solid #f1a1a1}
.note{background:#f4f6fa;border-left:4px solid #6b8cce;padding:.6rem 1rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0;width:100%}
th,td{border:1px solid #d7dbe0;padding:.25rem .45rem;text-align:left}
th{background:#eef1f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem} dt{font-weight:600}
img{max-width:100%} code{font-size:.8rem} li{margin:.2rem 0}
"""


def _empirical_section(empirical: Mapping[str, Any] | None) -> str:
    if empirical is None:
        return ""
    from server.audit_empirical import EXPLANATION, rows_table

    return (
        "<h2>Empirical audit: measured lower bound beside the claimed ε</h2>"
        f"<p>Scenario <code>{html.escape(str(empirical.get('scenario')))}</code>, site "
        f"{html.escape(str(empirical.get('site')))}, audited "
        f"{html.escape(str(empirical.get('generated')))}.</p>"
        f'<p class="note">{html.escape(EXPLANATION)}</p>{rows_table(empirical["rows"])}'
    )


def render_html(result: VerificationResult, empirical: Mapping[str, Any] | None = None) -> str:
    """Return the complete, self-contained report page (with an ``audit empirical`` result's
    lower bounds beside the claims, when given)."""
    if result.ok:
        status = (
            '<div class="status ok">✔ Ledger verified: chain, signatures, rounds and every ε</div>'
        )
    else:
        first = html.escape(str(result.first_error))
        status = (
            f'<div class="status bad">✘ Verification FAILED ({len(result.errors)} problem(s)); '
            f"first bad entry: {first}</div>"
        )
    pinned = (
        "pinned by the auditor" if result.coordinator_pinned else "NOT pinned: compare out of band"
    )
    errors = "".join(f"<li>{html.escape(str(f))}</li>" for f in result.errors) or "<li>none</li>"
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.warnings) or "<li>none</li>"
    versions = "".join(
        f"<li><b>{a}</b>: {html.escape(accountant_version(a))}</li>"
        for a in available_accountants()
    )
    plots = ""
    if result.sites:
        plots = (
            f'<img alt="cumulative epsilon per site" src="data:image/png;base64,'
            f'{plot_cumulative(result.sites)}">'
            f'<img alt="epsilon per round" src="data:image/png;base64,'
            f'{plot_per_round(result.sites)}">'
        )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>facefed privacy audit: {html.escape(result.run_id or "unknown run")}</title>
<style>{CSS}</style></head><body>
<h1>Privacy audit</h1>
<p>facefed privacy ledger, recomputed independently on {generated}.</p>
{status}
<dl>
<dt>run</dt><dd><code>{html.escape(result.run_id or "?")}</code></dd>
<dt>ledger</dt><dd><code>{html.escape(result.path)}</code></dd>
<dt>entries</dt><dd>{len(result.entries)} ({sum(len(s.rounds) for s in result.sites)} rounds,
{len(result.sites)} site guarantees); run closed: {"yes" if result.closed else "no"}</dd>
<dt>coordinator key</dt><dd><code>{html.escape(result.coordinator_fingerprint or "?")}</code>
({pinned})</dd>
</dl>
<p class="note">{UNIT_NOTE}</p>
<h2>Budgets</h2>
{_sites_table(result.sites)}
<p>ε spent is recomputed with the accountant each entry names (PRV is the accountant of record);
the last columns recompute each site's total with every available accountant as a cross-check.</p>
<p class="note">{LIFETIME_NOTE}</p>
<h2>Plots</h2>
{plots}
<h2>Mechanisms</h2>
<p>Each entry composes every Poisson-subsampled Gaussian mechanism the site ran that round
(σ: noise multiplier, q: sampling rate, C: clipping norm).</p>
{_mechanism_table(result.sites)}
{_empirical_section(empirical)}
<h2>Verification findings</h2>
<h3>Errors</h3><ul>{errors}</ul>
<h3>Warnings</h3><ul>{warnings}</ul>
<h2>Accountants</h2><ul>{versions}</ul>
</body></html>
"""
