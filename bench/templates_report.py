"""Markdown tables and JSON form of the issue 4 benchmark results (see :mod:`bench.templates_bench`)."""

from __future__ import annotations

from typing import Any

from bench.timing import Timing


def jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _ms(t: Timing) -> str:
    return f"{t.median_s * 1e3:.2f}"


def _rate(n: int, t: Timing) -> str:
    return f"{n / t.median_s:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (ratios are encrypted time / baseline time)."""
    lines = [
        "| operation | templates | encrypted store (templates/s) | null-cipher store (templates/s)"
        " | ratio | plaintext .npz (templates/s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["store"]:
        n, enc, null, plain = row["n"], row["aes-gcm"], row["null"], row["numpy"]
        for op in ("encrypt", "decrypt", "rotate"):
            base = plain.get(op)
            lines.append(
                f"| {op} | {n:,} | {_rate(n, enc[op])} | {_rate(n, null[op])} "
                f"| {enc[op].median_s / null[op].median_s:.2f} "
                f"| {_rate(n, base) if base else 'n/a'} "
                f"| {f'{enc[op].median_s / base.median_s:.1f}' if base else 'n/a'} |"
            )
    lines += [
        "",
        "| identify, top-5 | encrypted store (ms) | null-cipher store (ms) | plaintext .npz load +"
        " search (ms) | search in memory (ms) | ratio vs .npz | ratio vs in memory |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["store"]:
        enc, null = row["aes-gcm"]["identify"], row["null"]["identify"]
        plain, mem = row["numpy"]["identify"], row["in_memory"]["identify"]
        lines.append(
            f"| {row['n']:,} | {_ms(enc)} | {_ms(null)} | {_ms(plain)} | {_ms(mem)} "
            f"| {enc.median_s / plain.median_s:.1f} | {enc.median_s / mem.median_s:.0f} |"
        )
    stages = ("decode", "detection", "alignment", "embedding", "match")
    lines += [
        "",
        "| verify, one image (ms) | " + " | ".join(stages) + " | sum | embed() end to end |",
        "|---|" + "---:|" * (len(stages) + 2),
    ]
    for row in results["verify"]:
        total = sum(row["stages"][s].median_s for s in stages)
        cells = [
            f"{_ms(row['stages'][s])} ({100 * row['stages'][s].median_s / total:.0f}%)"
            for s in stages
        ]
        label = f"{row['detector']} (align: {row['align_method']})"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {total * 1e3:.2f} "
            f"| {_ms(row['end_to_end_embed'])} |"
        )
    return "\n".join(lines)
