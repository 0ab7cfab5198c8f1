"""White-box gradient canaries for a one-run empirical privacy audit (never part of a site's release).

Steinke, Nasr and Jagielski ("Privacy auditing with one (1) training run", NeurIPS 2023) audit DP-SGD
with *Dirac* gradient canaries: canary ``i`` is a unit whose clipped gradient is ``C`` times the unit
vector of one coordinate of the released parameters, a coordinate no other canary uses. Each canary is
included in the run with probability 1/2, independently; an included canary is then sampled at every
step with the same Poisson rate as every real unit (image or person), so the claimed epsilon covers it
exactly as it covers a real unit. It is the strongest unit the mechanism admits: all of its norm, every
time it is sampled, on one coordinate.

The auditor scores canary ``i`` from the released parameters alone: how far its coordinate moved
*against* the canary's gradient, as gradient descent moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client.training.dp_random import DpRandomness


@dataclass(frozen=True)
class DiracCanaries:
    """``m`` canaries on distinct coordinates of the released parameters.

    Attributes:
        params: which of the training step's parameters (its ``FastDpSgd.params`` order) each
            canary sits in.
        offsets: the canary's flat index within that parameter.
        included: whether the canary is in the run (probability 1/2 each).
        clip: the clipping bound C: a canary's gradient has exactly this norm.
    """

    params: torch.Tensor
    offsets: torch.Tensor
    included: torch.Tensor
    clip: float

    @classmethod
    def draw(
        cls, sizes: list[int], released: list[int], m: int, clip: float, randomness: DpRandomness
    ) -> DiracCanaries:
        """``m`` canaries on distinct random coordinates of the parameters numbered ``released``
        (of sizes ``sizes``), each included with probability 1/2."""
        counts = torch.tensor([sizes[i] for i in released])
        total = int(counts.sum())
        if not 1 <= m <= total:
            raise ValueError(f"Expected 1 <= {m=} <= {total} released coordinates")
        flat = torch.argsort(randomness.uniform(total))[:m]
        ends = torch.cumsum(counts, 0)
        which = torch.searchsorted(ends, flat, right=True)
        offsets = flat - (ends - counts)[which]
        params = torch.tensor(released)[which]
        return cls(params, offsets, randomness.uniform(m) < 0.5, clip)

    def add(self, grads: list[torch.Tensor], sample_rate: float, randomness: DpRandomness) -> None:
        """Add ``C`` at the coordinate of every included canary this step samples at ``sample_rate``
        (replacing the list's tensors)."""
        sampled = self.included & (randomness.uniform(len(self.included)) < sample_rate)
        for index in torch.unique(self.params[sampled]).tolist():
            rows = sampled & (self.params == index)
            grad = grads[index]
            bump = torch.full((int(rows.sum()),), self.clip, dtype=grad.dtype)
            grads[index] = grad.reshape(-1).index_add(0, self.offsets[rows], bump).view(grad.shape)

    def scores(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
        """How far each canary's coordinate moved against its gradient (higher: more likely in)."""
        moved = torch.zeros(len(self.offsets), dtype=torch.float64)
        for index in torch.unique(self.params).tolist():
            rows = self.params == index
            delta = (after[index] - before[index]).reshape(-1).to(torch.float64)
            moved[rows] = -delta[self.offsets[rows]]
        return moved
