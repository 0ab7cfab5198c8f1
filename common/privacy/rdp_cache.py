"""Memoised Renyi-DP orders inside Opacus's accountants.

Opacus's PRV accountant sizes its FFT domain with an RDP bound, evaluated at ~100 fractional orders by a
pure-Python series (``opacus.accountants.analysis.rdp._compute_rdp``): about 1.2 s on one CPU core, 25x
the PRV composition itself, and repeated for every epsilon a site computes (its budget check each
round, the noise calibration's bisection). The value depends only on ``(q, sigma, alpha)``, and a
site's ``(q, sigma)`` stay fixed for a whole run, so every round after the first, and every site with the
same ``(q, sigma)``, can reuse it. :func:`install` wraps that function in a cache once per process.

Only the call is memoised: the same Opacus code computes every value, so every epsilon is bit for bit
what Opacus returns without the cache (``tests/common/privacy/test_rdp_cache.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

CACHE_SIZE = 1 << 16  # (q, sigma, alpha) triples; ~150 orders per (q, sigma) pair


def install() -> None:
    """Memoise Opacus's per-order RDP function (idempotent; a no-op if Opacus no longer has it)."""
    from opacus.accountants.analysis import rdp

    original = getattr(rdp, "_compute_rdp", None)
    if original is None or getattr(original, "__facefed_cached__", False):
        return
    rdp._compute_rdp = _memoised(original)


def uninstall() -> None:
    """Restore Opacus's own function (tests)."""
    from opacus.accountants.analysis import rdp

    original = getattr(rdp._compute_rdp, "__wrapped__", None)
    if original is not None:
        rdp._compute_rdp = original


def _memoised(original: Callable[[float, float, float], float]) -> Callable[..., float]:
    cached = functools.lru_cache(maxsize=CACHE_SIZE)(original)

    @functools.wraps(original)
    def compute_rdp(q: Any, sigma: Any, alpha: Any) -> float:
        return cached(float(q), float(sigma), float(alpha))

    compute_rdp.__facefed_cached__ = True  # type: ignore[attr-defined]
    compute_rdp.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return compute_rdp
