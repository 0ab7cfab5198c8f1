"""Local DP-SGD for both models (Abadi et al., 2016, "Deep Learning with Differential Privacy").

Each model is trained for a fixed number of steps: Poisson sampling at rate q = B/N, per-sample clipping
to C, and Gaussian noise of standard deviation sigma*C on the clipped sum. ``dp-path`` chooses who computes
the per-sample gradients: Opacus (``"opacus"``) or :class:`client.fast_dp.FastDpSgd` (``"fast"``), which
implements the same mechanism faster on a CPU. Either way one accountant records both models' steps, and
the recorded ``(sigma, q, steps)`` must equal the planned events before anything is reported.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.augment import augment
from client.fast_dp import FastDpSgd, poisson_indices
from client.privacy_state import SitePrivacyState
from common.config import RunSettings
from common.errors import DataError
from common.models import CosineHead, EmotionNet, FaceEmbedder, FaceTrainer, cosface_loss
from common.privacy.events import DpSgdEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteTensors:
    """A site's training data, already preprocessed: ``(N,1,H,W)`` float32 and int64 labels."""

    face_x: torch.Tensor
    face_y: torch.Tensor
    emotion_x: torch.Tensor
    emotion_y: torch.Tensor

    @property
    def num_identities(self) -> int:
        return int(self.face_y.max().item()) + 1 if len(self.face_y) else 0


@dataclass(frozen=True)
class RoundOutcome:
    """What one local round produced (besides the updated weights)."""

    face_loss: float
    emotion_loss: float
    events: list[DpSgdEvent]


def expected_batch(batch: int, n: int) -> int:
    """The expected Poisson batch size: the configured one, capped at half the local dataset."""
    if n < 2:
        raise DataError(f"a site needs at least 2 training examples per model, found {n}")
    return max(1, min(batch, n // 2))


def sample_rate(batch: int, n: int) -> float:
    """Poisson sampling rate exactly as Opacus derives it: 1 / (batches per epoch)."""
    return 1.0 / math.ceil(n / expected_batch(batch, n))


def planned_events(settings: RunSettings, data: SiteTensors, sigma: float) -> list[DpSgdEvent]:
    """The DP-SGD events this round will add to the history, known before any step is taken."""
    p = settings.privacy
    events: list[DpSgdEvent] = []
    for name, batch, n, steps, clip in (
        ("face", settings.face_batch, len(data.face_y), settings.face_steps, p.face_clip),
        (
            "emotion",
            settings.emotion_batch,
            len(data.emotion_y),
            settings.emotion_steps,
            p.emotion_clip,
        ),
    ):
        if steps > 0:
            events.append(
                DpSgdEvent(
                    noise_multiplier=sigma,
                    sample_rate=sample_rate(batch, n),
                    steps=steps,
                    clip_norm=clip,
                    name=name,
                )
            )
    return events


def make_optimizer(
    module: nn.Module, kind: str, lr: float, momentum: float
) -> torch.optim.Optimizer:
    """The local optimizer. With DP it only post-processes the noised gradient, so any choice keeps the
    guarantee; Adam copes best with few, noisy steps."""
    if kind == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr)
    return torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)


def _run_steps(
    module: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | object,
    steps: int,
    generator: torch.Generator,
    geometric: bool,
) -> float:
    """Take exactly ``steps`` optimizer steps (re-iterating the loader); return the mean loss."""
    module.train()
    losses: list[float] = []
    while len(losses) < steps:
        for x, y in loader:
            if len(losses) >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:  # Poisson sampling can draw an empty batch; it is still a DP step
                optimizer.step()
                losses.append(float("nan"))
                continue
            loss = loss_fn(module(augment(x, generator, geometric)), y)  # type: ignore[operator]
            if not torch.isfinite(loss):
                raise FloatingPointError("local training diverged (non-finite loss); lower the lr")
            with warnings.catch_warnings():
                # Opacus's hooks on the first layer fire although the input needs no gradient.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finite = [v for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _run_fast_steps(
    dp: FastDpSgd,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    geometric: bool,
) -> float:
    """Take exactly ``steps`` fast DP-SGD steps on Poisson batches of ``(x, y)``; return the mean loss.

    An empty Poisson batch is still a step: noise only, recorded like any other.
    """
    dp.module.train()
    losses: list[float] = []
    for _ in range(steps):
        idx = poisson_indices(len(y), dp.sample_rate, generator)
        losses.append(dp.step(augment(x[idx], generator, geometric), y[idx]))
    finite = [v for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _matches(recorded: list[tuple[float, float, int]], planned: list[DpSgdEvent]) -> bool:
    return len(recorded) == len(planned) and all(
        math.isclose(s, e.noise_multiplier) and math.isclose(q, e.sample_rate) and n == e.steps
        for (s, q, n), e in zip(recorded, planned, strict=True)
    )


def _train_with_loader(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: PrivacyEngine | None,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    clip: float,
    loss_fn: object,
    steps: int,
    privacy: SitePrivacyState,
    generator: torch.Generator,
    geometric: bool,
) -> float:
    """Non-private training, or DP-SGD through Opacus when ``engine`` is given."""
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=expected_batch(batch, len(y)),
        shuffle=engine is None,
        generator=generator,
    )
    if engine is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode off; recorded in docs
            module, optimizer, loader = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=clip,
                poisson_sampling=True,
                noise_generator=generator,
            )
    return _run_steps(module, loader, optimizer, loss_fn, steps, generator, geometric)


def train_round(
    face: FaceEmbedder,
    head: CosineHead,
    emotion: EmotionNet,
    data: SiteTensors,
    settings: RunSettings,
    privacy: SitePrivacyState,
    generator: torch.Generator,
) -> RoundOutcome:
    """Train both models in place for one round; append this round's events to ``privacy.history``.

    With ``settings.privacy.dp`` false, trains without clipping or noise and records nothing.
    """
    p = settings.privacy
    engine: PrivacyEngine | None = None
    accountant: IAccountant | None = None
    fast = p.dp and settings.dp_path == "fast"
    if p.dp:
        if privacy.noise_multiplier is None:
            raise ValueError("noise multiplier must be calibrated before training")
        # A fresh accountant records exactly this round's events; the site's cumulative history lives
        # in ``privacy`` and is appended below, after checking the events match the plan.
        if fast:
            accountant = create_accountant(privacy.accountant)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "secure RNG turned off": see docs/audit.md
                engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=False)
            accountant = engine.accountant

    face_loss = emotion_loss = float("nan")
    jobs = (
        (
            "face",
            FaceTrainer(face, head),
            data.face_x,
            data.face_y,
            settings.face_batch,
            settings.face_lr,
            settings.face_steps,
            p.face_clip,
            cosface_loss,
            settings.face_augment,
        ),
        (
            "emotion",
            emotion,
            data.emotion_x,
            data.emotion_y,
            settings.emotion_batch,
            settings.emotion_lr,
            settings.emotion_steps,
            p.emotion_clip,
            F.cross_entropy,
            False,
        ),
    )
    for name, module, x, y, batch, lr, steps, clip, loss_fn, geometric in jobs:
        if steps == 0:
            continue
        optimizer = make_optimizer(module, settings.local_optimizer, lr, settings.momentum)
        if fast and accountant is not None:
            q = sample_rate(batch, len(y))
            dp = FastDpSgd(
                module,
                optimizer,
                loss_fn,
                noise_multiplier=float(privacy.noise_multiplier),  # type: ignore[arg-type]
                max_grad_norm=clip,
                expected_batch_size=int(len(y) * q),  # as Opacus derives it from the loader
                sample_rate=q,
                accountant=accountant,
                generator=generator,
            )
            loss = _run_fast_steps(dp, x, y, steps, generator, geometric)
        else:
            loss = _train_with_loader(
                module,
                optimizer,
                engine,
                x,
                y,
                batch,
                clip,
                loss_fn,
                steps,
                privacy,
                generator,
                geometric,
            )
        if name == "face":
            face_loss = loss
        else:
            emotion_loss = loss
        logger.debug("%s: %d steps, loss %.4f", name, steps, loss)

    events: list[DpSgdEvent] = []
    if accountant is not None:
        recorded = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        events = planned_events(settings, data, float(privacy.noise_multiplier))  # type: ignore[arg-type]
        if not _matches(recorded, events):
            raise RuntimeError(
                f"the accountant recorded {recorded}, planned {events}; refusing to report"
            )
        privacy.history.extend(events)
    return RoundOutcome(face_loss=face_loss, emotion_loss=emotion_loss, events=events)
