"""The randomness a site's DP guarantee depends on: Poisson sampling and Gaussian noise.

DP-SGD's guarantee holds only if whoever sees the released update cannot predict the sampling and the
noise. Seeding them from run-config values, site ids or round numbers (all known to the coordinator)
lets the coordinator re-derive the noise and subtract it: no privacy at all. So a release draws both
from :class:`SecretRandomness`, which reads the operating system's CSPRNG (``os.urandom``, i.e.
``getrandom(2)``) afresh for every draw; nothing about it can be derived from a seed, an id or a round.

:class:`SeededRandomness` reproduces a release from a seed. It exists for research simulations only,
by an explicit opt-in (run config ``noise-source = "seeded"``) that the site's policy must allow and
that a deployed site always refuses; the ledger records which of the two every release used.

Gaussian samples are made from CSPRNG bits by the Box-Muller transform in float64, and each returned
sample is ``(z1 + z2 + z3 + z4) / 2`` of four independent standard normals. That is still exactly
N(0, 1), and it is the mitigation of floating-point attacks on Gaussian noise that Opacus's
``secure_mode`` uses (Holohan & Braghin 2021, https://arxiv.org/abs/2107.10138, section 5.1; the
attack: Jin et al. 2022, https://arxiv.org/abs/2112.05307).
"""

from __future__ import annotations

import math
import os
from typing import Literal, Protocol

import numpy as np
import torch

NoiseSource = Literal["secret", "seeded"]
_SUMMED = 4  # normals summed per sample (Opacus secure_mode's 2n with n = 2)
_BITS = 53  # a float64 uniform in [0, 1) from 53 random bits


class DpRandomness(Protocol):
    """Where one release's Poisson sampling and Gaussian noise come from."""

    @property
    def secret(self) -> bool:
        """True if the draws come from the OS CSPRNG (unpredictable to anyone else)."""
        ...

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` independent uniforms in [0, 1), float64."""
        ...

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        """Independent N(0, std^2) draws of ``shape``."""
        ...


def _uniform53(data: bytes) -> np.ndarray:
    words = np.frombuffer(data, dtype=np.uint64) >> np.uint64(64 - _BITS)
    return words.astype(np.float64) * 2.0**-_BITS


class SecretRandomness:
    """Draws from the operating system's CSPRNG, fresh for every call; it has no state to leak."""

    secret = True

    def uniform(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"Expected n >= 0, got {n=}")
        return torch.from_numpy(_uniform53(os.urandom(8 * n)))

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"Expected a finite std >= 0, got {std=}")
        n = math.prod(shape)
        half = (n * _SUMMED + 1) // 2
        u = _uniform53(os.urandom(16 * half)).reshape(2, half)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # 1 - u in (0, 1]: the log is finite
        angle = 2.0 * np.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: n * _SUMMED]
        summed = z.reshape(_SUMMED, n).sum(axis=0) / math.sqrt(_SUMMED)
        return torch.from_numpy(summed * std).to(dtype).reshape(shape)


class SeededRandomness:
    """Reproducible draws from a seeded ``torch.Generator``: research simulations only."""

    secret = False

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.normal(0.0, std, size=shape, generator=self.generator, dtype=dtype)


def aux_generator(source: NoiseSource, seed_words: list[int]) -> torch.Generator:
    """The generator of everything the guarantee does not depend on (head init, augmentation).

    With secret noise it is seeded from the OS CSPRNG too, so that no part of a release can be
    replayed from run-config values; with seeded noise, from ``seed_words`` (seed, site, round).
    """
    if source == "secret":
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    else:
        seed = int(np.random.SeedSequence(seed_words).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def release_randomness(source: NoiseSource, generator: torch.Generator) -> DpRandomness:
    """The randomness of one release: the OS CSPRNG, or (research opt-in) ``generator``."""
    return SecretRandomness() if source == "secret" else SeededRandomness(generator)
