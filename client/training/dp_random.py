"""The randomness a site's DP guarantee depends on: Poisson sampling and Gaussian noise.

DP-SGD's guarantee holds only if whoever sees the released update cannot predict the sampling and the
noise. Seeding them from run-config values, site ids or round numbers (all known to the coordinator)
lets the coordinator re-derive the noise and subtract it: no privacy at all. So a release draws both
from :class:`SecretRandomness`, which reads the operating system's CSPRNG (``os.urandom``, i.e.
``getrandom(2)``) afresh for every draw; nothing about it can be derived from a seed, an id or a round.

:class:`SeededRandomness` reproduces a release from a seed. It exists for research simulations only,
by an explicit opt-in (run config ``noise-source = "seeded"``) that the site's policy must allow and
that a deployed site always refuses; the ledger records which of the two every release used.

The secret draws themselves, and their defence against floating-point attacks, are
:mod:`common.privacy.secret_noise`, which the coordinator's central DP uses too.
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import numpy as np
import torch

from common.privacy.secret_noise import secret_gaussian, secret_uniform

NoiseSource = Literal["secret", "seeded"]


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


class SecretRandomness:
    """Draws from the operating system's CSPRNG, fresh for every call; it has no state to leak."""

    secret = True

    def uniform(self, n: int) -> torch.Tensor:
        return torch.from_numpy(secret_uniform(n))

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(secret_gaussian(shape, std)).to(dtype)


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
