"""The plots of ``facefed report``: base64 PNGs drawn with matplotlib's Agg canvas (no pyplot).

The same way as the audit report (:mod:`server.audit_report`): no global backend switch, nothing
fetched at run time, the page embeds the images as data URIs. Each function plots values of
:class:`server.run_report.RunSummary` as they are; a value that was not recorded is left out.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.audit_report import _png
from server.run_report import RunSummary, site_order

SPLIT_PARTS = (
    ("training_s", "training (waiting for the sites)", "C0"),
    ("evaluation_s", "evaluation", "C2"),
    ("overhead_s", "overhead", "C7"),
)


def plot_accuracy(run: RunSummary) -> str:
    """Accuracy per round: LFW verification (with its fold std) and FER2013 accuracy and macro-F1."""
    fig = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    lfw = [
        (r.round, r.lfw_accuracy, r.lfw_std or 0.0)
        for r in run.rounds
        if r.lfw_accuracy is not None
    ]
    if lfw:
        ax.errorbar(
            [n for n, _, _ in lfw],
            [acc for _, acc, _ in lfw],
            yerr=[std for _, _, std in lfw],
            fmt="o-",
            capsize=3,
            label="LFW verification accuracy (± std over folds)",
        )
    for attr, label, style in (
        ("fer_accuracy", "FER2013 accuracy", "s-"),
        ("fer_macro_f1", "FER2013 macro-F1", "^--"),
    ):
        points = [(r.round, getattr(r, attr)) for r in run.rounds if getattr(r, attr) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.set_title("Global models after each round (held-out sets)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    return _png(fig)


def plot_epsilon(run: RunSummary) -> str:
    """Each site's cumulative epsilon over the rounds it trained in, dashed: its recorded budget."""
    fig = Figure(figsize=(8, 3.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for i, site in enumerate(run.final_epsilons()):
        color = f"C{i % 10}"
        points = [(r.round, r.sites[site]) for r in run.rounds if site in r.sites]
        finite = [(n, s.epsilon) for n, s in points if math.isfinite(s.epsilon)]
        if finite:
            ax.plot(*zip(*finite, strict=True), "o-", color=color, label=site)
        budgets = [(n, s.budget) for n, s in points if s.budget is not None]
        if budgets:
            ax.plot(*zip(*budgets, strict=True), "--", color=color)
    configured = run.config.get("max-epsilon")
    recorded = [s.budget for r in run.rounds for s in r.sites.values() if s.budget is not None]
    if not recorded and isinstance(configured, int | float) and run.rounds:
        ax.axhline(configured, linestyle=":", color="0.4", label="max-epsilon (config)")
        recorded = [float(configured)]
    spent = [s.epsilon for r in run.rounds for s in r.sites.values() if math.isfinite(s.epsilon)]
    if recorded or spent:
        ax.set_ylim(0, 1.08 * max(recorded + spent))  # the budget line inside the frame
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (run)")
    ax.set_title("Privacy spent per site (dashed: each site's recorded budget)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if run.final_epsilons():
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_time(run: RunSummary) -> str:
    """Each round's time, stacked: training, evaluation, overhead."""
    fig = Figure(figsize=(8, 3.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    rounds = [r for r in run.rounds if r.time_split is not None]
    bottom = [0.0] * len(rounds)
    for key, label, color in SPLIT_PARTS:
        values = [r.time_split.get(key, 0.0) for r in rounds if r.time_split is not None]
        ax.bar([r.round for r in rounds], values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title("Where each round's time went")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_privacy_utility(runs: list[RunSummary]) -> str:
    """Final accuracy against each site's final epsilon: one point per run and site, labelled.

    Two panels (LFW verification accuracy, FER2013 accuracy). A run without DP has no finite
    epsilon; it is drawn as a dotted horizontal line, its accuracy at epsilon = infinity.
    """
    fig = Figure(figsize=(9, 3.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    sites = sorted({s for run in runs for s in run.final_epsilons()}, key=site_order)
    markers = "os^Dv<>ph*"
    for ax, attr, title in (
        (axes[0], "lfw_accuracy", "LFW verification accuracy"),
        (axes[1], "fer_accuracy", "FER2013 accuracy"),
    ):
        labels: dict[tuple[float, float], list[str]] = {}  # one label per spot, naming every run
        for j, run in enumerate(runs):
            final = getattr(run.rounds[-1], attr) if run.rounds else None
            if final is None:
                continue
            epsilons = run.final_epsilons()
            if epsilons and all(math.isinf(e) for e in epsilons.values()):
                ax.axhline(final, linestyle=":", color="0.4")
                ax.annotate(
                    f"{run.name} (no DP)",
                    (0.01, final),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    va="bottom",
                )
                continue
            for site, epsilon in epsilons.items():
                if not math.isfinite(epsilon):
                    continue
                k = sites.index(site)
                ax.plot(epsilon, final, markers[k % len(markers)], color=f"C{j % 10}")
                names = labels.setdefault((round(epsilon, 2), round(final, 4)), [])
                if run.name not in names:
                    names.append(run.name)
        for (epsilon, final), names in labels.items():
            ax.annotate(
                ", ".join(names),
                (epsilon, final),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        for k, site in enumerate(sites):  # legend: the marker of each site (colour: the run)
            ax.plot([], [], markers[k % len(markers)], color="0.35", label=site)
        ax.set_xlabel("site's final ε (run)")
        ax.set_ylabel("final accuracy")
        ax.set_title(title)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    if sites:
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="site")
    return _png(fig)
