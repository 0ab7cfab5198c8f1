"""One empirical privacy audit of a site's face-model training (docs/audit.md).

The audit runs the site's real DP-SGD code (:class:`client.training.fast_dp.FastDpSgd` and the same
step loops as :func:`client.training.train.train_round`) on the site's real faces, for every round of
the run, at the noise the site calibrates for its budget, with ``m`` Dirac gradient canaries
(:mod:`client.training.canaries`). It then reads the released face network alone, guesses which
canaries were in, and turns the right guesses into a lower bound on epsilon
(:mod:`common.privacy.audit_bound`). A correct implementation gives a bound at or below the claimed
epsilon; a bound above it is a bug.

The **control** switches the noise off. It is labelled as such everywhere and is never a site's
release: it shows that the audit detects a run without privacy, i.e. that it can fail.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from opacus.accountants import create_accountant

from client.training.canaries import DiracCanaries
from client.training.dp_random import DpRandomness
from client.training.fast_dp import FastDpSgd
from client.training.round import calibrated_noise
from client.training.train import (
    SiteTensors,
    face_units,
    make_optimizer,
    run_fast_steps,
    sample_rate,
)
from common.config import RunSettings
from common.errors import ConfigError
from common.model_spec import ModelSpec
from common.models import CosineHead, FaceTrainer, cosface_loss
from common.privacy.accounting import compute_epsilon
from common.privacy.audit_bound import check_design, epsilon_lower_bound
from common.privacy.events import DpSgdEvent


@dataclass(frozen=True, kw_only=True)
class AuditDesign:
    """How many canaries, how many of them the auditor guesses, at what confidence."""

    canaries: int = 1000
    guesses: int = 100
    confidence: float = 0.95


@dataclass(frozen=True, kw_only=True)
class AuditResult:
    """One audited run: the claim, the mechanism, and the measured lower bound."""

    unit: str
    control: bool
    claimed_epsilon: float  # inf for the control
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    canaries: int
    included: int
    guesses: int
    correct: int
    confidence: float
    bound: float
    seconds: float

    @property
    def within_claim(self) -> bool:
        """The measured bound does not refute the claim."""
        return self.bound <= self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["claimed_epsilon"] = (
            "inf" if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        )
        data["within_claim"] = self.within_claim
        return data


def audit_site(
    settings: RunSettings,
    data: SiteTensors,
    design: AuditDesign,
    randomness: DpRandomness,
    *,
    control: bool = False,
) -> AuditResult:
    """Audit the face model's training on ``data`` under ``settings`` (its unit, budget, rounds).

    Raises:
        ConfigError: a design too small for its confidence, or settings without DP.
    """
    p = settings.privacy
    if not p.dp:
        raise ConfigError("an audit tests a DP claim; the run sets dp = false")
    if settings.face_steps == 0:
        raise ConfigError("the audit tests the face model; the run sets face-steps = 0")
    check_design(design.canaries, design.guesses, p.delta, design.confidence)
    start = time.perf_counter()
    face, _ = ModelSpec.from_settings(settings).initial(settings.seed)
    trainer = FaceTrainer(face, CosineHead(data.num_identities))
    params = [q for q in trainer.parameters() if q.requires_grad]
    released = [i for i, q in enumerate(params) if any(q is f for f in face.parameters())]
    units = face_units(settings, data)
    q = sample_rate(settings.face_batch, units)
    sigma = 0.0 if control else calibrated_noise(settings, data, p.max_epsilon, 0, 0.0)
    coordinates = sum(params[i].numel() for i in released)
    if design.canaries > coordinates:
        raise ConfigError(
            f"{design.canaries} canaries need as many coordinates of the released network, which "
            f"has {coordinates}; use --canaries {coordinates} or fewer"
        )
    canaries = DiracCanaries.draw(
        [x.numel() for x in params], released, design.canaries, p.face_clip, randomness
    )
    accountant = create_accountant(p.accountant)
    generator = torch.Generator().manual_seed(int(randomness.uniform(1).item() * 2**31))
    before = [x.detach().clone() for x in params]
    for _ in range(settings.num_rounds):  # each round as a site trains it: a fresh optimizer
        optimizer = make_optimizer(
            trainer, settings.local_optimizer, settings.face_lr, settings.momentum
        )
        dp = FastDpSgd(
            trainer,
            optimizer,
            cosface_loss,
            noise_multiplier=sigma,
            max_grad_norm=p.face_clip,
            expected_batch_size=int(units * q),
            sample_rate=q,
            accountant=accountant,
            randomness=randomness,
            canaries=canaries,
        )
        cap = p.person_max_images if p.dp_unit == "person" else None
        run_fast_steps(dp, data.face_x, data.face_y, settings.face_steps, generator, None, cap)
    scores = canaries.scores(before, [x.detach() for x in params])
    correct = guesses_right(scores, canaries.included, design.guesses)
    steps = settings.face_steps * settings.num_rounds
    claimed = (
        math.inf
        if control
        else compute_epsilon(
            [
                DpSgdEvent(
                    noise_multiplier=sigma,
                    sample_rate=q,
                    steps=steps,
                    clip_norm=p.face_clip,
                    name="face",
                    unit=p.dp_unit,
                )
            ],
            p.delta,
            p.accountant,
        )
    )
    return AuditResult(
        unit=p.dp_unit,
        control=control,
        claimed_epsilon=claimed,
        delta=p.delta,
        accountant=p.accountant,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        canaries=design.canaries,
        included=int(canaries.included.sum()),
        guesses=design.guesses,
        correct=correct,
        confidence=design.confidence,
        bound=epsilon_lower_bound(
            design.canaries, design.guesses, correct, p.delta, design.confidence
        ),
        seconds=time.perf_counter() - start,
    )


def guesses_right(scores: torch.Tensor, included: torch.Tensor, guesses: int) -> int:
    """Guess "in" for the ``guesses // 2`` highest scores and "out" for the rest of ``guesses``
    lowest; abstain on the middle. Returns how many guesses are right."""
    order = torch.argsort(scores)
    high = guesses // 2
    top, bottom = order[len(order) - high :], order[: guesses - high]
    return int(included[top].sum()) + int((~included[bottom]).sum())
