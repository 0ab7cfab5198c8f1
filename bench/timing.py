"""Small timing helpers shared by the benchmarks: medians after warm-up, and a machine description.

Every number a benchmark reports is the median of ``reps`` timed repetitions, taken after ``warmup``
untimed ones. A repetition may need untimed preparation (a fresh empty store, say): :func:`measure`
takes a ``prepare`` callable that does that work and returns the closure to time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of ``reps`` repetitions: median, fastest and slowest."""

    median_s: float
    min_s: float
    max_s: float
    reps: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-safe form."""
        return asdict(self)


def measure(prepare: Callable[[], Callable[[], object]], *, reps: int, warmup: int = 1) -> Timing:
    """Time ``prepare()()`` ``reps`` times after ``warmup`` untimed runs; ``prepare`` is untimed.

    Raises:
        ValueError: if ``reps < 1`` or ``warmup < 0``.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"Expected reps >= 1 and warmup >= 0, got {reps=} {warmup=}")
    for _ in range(warmup):
        prepare()()
    samples = []
    for _ in range(reps):
        run = prepare()
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return Timing(
        median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples), reps=reps
    )


def measure_call(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> Timing:
    """Time ``fn()`` itself (no per-repetition preparation)."""
    return measure(lambda: fn, reps=reps, warmup=warmup)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (as ``uptime`` shows), or ``None`` where unknown."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return None
    return round(one, 2), round(five, 2), round(fifteen, 2)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, core count, Python and platform."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
