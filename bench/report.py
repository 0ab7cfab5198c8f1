"""The Markdown table of ``bench/results/accuracy.json`` (one row per setting)."""

from __future__ import annotations

from typing import Any

HEADER = (
    "| setting | target ε | final ε per site (δ) | FER2013 acc | FER2013 acc, single view | "
    "FER2013 macro-F1 | LFW acc ± std | FER acc / central | LFW acc / central | wall time |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|"


def _ratio(value: float, baseline: float | None) -> str:
    if baseline is None or baseline <= 0:
        return "–"
    return f"{value / baseline:.2f}"


def _epsilons(entry: dict[str, Any], delta: float) -> str:
    site_eps = entry.get("site_epsilon")
    if not site_eps:
        return "–"
    values = list(site_eps.values())
    if all(isinstance(v, float | int) for v in values):
        return f"{min(values):.2f}–{max(values):.2f} ({delta:g})"
    return "∞ (no DP)" if all(v == "inf" for v in values) else ", ".join(map(str, values))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def markdown_table(report: dict[str, Any]) -> str:
    """Render the benchmark report as a Markdown table plus a one-line footnote on the compute match."""
    settings: dict[str, dict[str, Any]] = report["settings"]
    delta = float(report["config"]["delta"])
    central = settings.get("centralised", {})
    base_fer = central.get("emotion", {}).get("accuracy")
    base_lfw = central.get("face", {}).get("lfw_accuracy")
    rows = [HEADER, RULE]
    ordered = [k for k in settings if k != "centralised"]
    if "centralised" in settings:
        ordered.append("centralised")
    for name in ordered:
        entry = settings[name]
        target = "∞" if entry["epsilon"] == "inf" else entry["epsilon"]
        if "error" in entry:
            error = entry["error"] if len(entry["error"]) <= 100 else entry["error"][:99] + "…"
            rows.append(
                f"| {name} | {target} | failed: {error} | | | | | | | "
                f"{_minutes(entry['wall_time_s'])} |"
            )
            continue
        fer, face = entry["emotion"], entry["face"]
        eps = "– (no DP)" if entry["kind"] == "centralised" else _epsilons(entry, delta)
        single = fer.get("single_view_accuracy")  # absent before flip test-time augmentation
        one_view = "–" if single is None else f"{single:.3f}"
        rows.append(
            f"| {name} | {target} | {eps} | {fer['accuracy']:.3f} | {one_view} | "
            f"{fer['macro_f1']:.3f} | "
            f"{face['lfw_accuracy']:.3f} ± {face['lfw_std']:.3f} | "
            f"{_ratio(fer['accuracy'], base_fer)} | {_ratio(face['lfw_accuracy'], base_lfw)} | "
            f"{_minutes(entry['wall_time_s'])} |"
        )
    if "compute" in central:
        c = central["compute"]
        rows.append("")
        rows.append(
            "Centralised baseline compute, matched to the non-private federated run: "
            f"face {c['face']['steps']} steps x batch {c['face']['batch']} "
            f"(federated: {c['face']['federated_examples']} examples), "
            f"emotion {c['emotion']['steps']} steps x batch {c['emotion']['batch']} "
            f"(federated: {c['emotion']['federated_examples']} examples)."
        )
    return "\n".join(rows)
