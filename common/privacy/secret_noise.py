"""Uniform and Gaussian samples from the operating system's CSPRNG, fresh for every call.

A DP release is private only if nobody else can predict its sampling and noise. These functions read
``os.urandom`` (``getrandom(2)``) for every draw and keep no state, so nothing about a draw can be
derived from a seed, an id or a round number. Sites use them for DP-SGD (:mod:`client.training.dp_random`), the
coordinator for central DP (:mod:`server.central_dp`).

Gaussian samples come from the Box-Muller transform in float64, and each returned sample is
``(z1 + z2 + z3 + z4) / 2`` of four independent standard normals: still exactly N(0, 1), and the
mitigation of floating-point attacks that Opacus's ``secure_mode`` uses (Holohan & Braghin 2021,
https://arxiv.org/abs/2107.10138, section 5.1; the attack: Jin et al. 2022,
https://arxiv.org/abs/2112.05307). That costs 32 random bytes per sample.
"""

from __future__ import annotations

import math
import os

import numpy as np

_SUMMED = 4  # normals summed per sample (Opacus secure_mode's 2n with n = 2)
_BITS = 53  # a float64 uniform in [0, 1) from 53 random bits


def _uniform53(data: bytes) -> np.ndarray:
    words = np.frombuffer(data, dtype=np.uint64) >> np.uint64(64 - _BITS)
    return words.astype(np.float64) * 2.0**-_BITS


def secret_uniform(n: int) -> np.ndarray:
    """``n`` independent uniforms in [0, 1), float64."""
    if n < 0:
        raise ValueError(f"Expected n >= 0, got {n=}")
    return _uniform53(os.urandom(8 * n))


def secret_gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Independent N(0, std^2) samples of ``shape``, float64."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"Expected a finite std >= 0, got {std=}")
    n = math.prod(shape)
    half = (n * _SUMMED + 1) // 2
    u = _uniform53(os.urandom(16 * half)).reshape(2, half)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: the log is finite
    angle = 2.0 * np.pi * u[1]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: n * _SUMMED]
    summed = z.reshape(_SUMMED, n).sum(axis=0) / math.sqrt(_SUMMED)
    return (summed * std).reshape(shape)
