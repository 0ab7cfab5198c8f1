"""Local DP-SGD for both models (Abadi et al., 2016, "Deep Learning with Differential Privacy").

Each model is trained for a fixed number of steps with Opacus: Poisson sampling at rate q = B/N,
per-sample clipping to C, and Gaussian noise of standard deviation sigma*C on the clipped sum. One
PrivacyEngine, restored from the site's history, records both models' steps, so the site's epsilon is the
composition of everything it has ever released.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy_state import Event, SitePrivacyState
from common.config import RunSettings
from common.errors import DataError
from common.models import CosineHead, EmotionNet, FaceEmbedder, FaceTrainer, cosface_loss

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
    events: list[Event]


def expected_batch(batch: int, n: int) -> int:
    """The expected Poisson batch size: the configured one, capped at half the local dataset."""
    if n < 2:
        raise DataError(f"a site needs at least 2 training examples per model, found {n}")
    return max(1, min(batch, n // 2))


def sample_rate(batch: int, n: int) -> float:
    """Poisson sampling rate exactly as Opacus derives it: 1 / (batches per epoch)."""
    return 1.0 / math.ceil(n / expected_batch(batch, n))


def planned_events(settings: RunSettings, data: SiteTensors, sigma: float) -> list[Event]:
    """The (sigma, q, steps) this round will add to the history, before any step is taken."""
    events: list[Event] = []
    for batch, n, steps in (
        (settings.face_batch, len(data.face_y), settings.face_steps),
        (settings.emotion_batch, len(data.emotion_y), settings.emotion_steps),
    ):
        if steps > 0:
            events.append((sigma, sample_rate(batch, n), steps))
    return events


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def _run_steps(
    module: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | object,
    steps: int,
    generator: torch.Generator,
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
            loss = loss_fn(module(_flip(x, generator)), y)  # type: ignore[operator]
            if not torch.isfinite(loss):
                raise FloatingPointError("local training diverged (non-finite loss); lower the lr")
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finite = [v for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _same_events(a: list[Event], b: list[Event]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x[0], y[0]) and math.isclose(x[1], y[1]) and x[2] == y[2]
        for x, y in zip(a, b, strict=True)
    )


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
    if p.dp:
        if privacy.noise_multiplier is None:
            raise ValueError("noise multiplier must be calibrated before training")
        # A fresh accountant records exactly this round's events; the site's cumulative history lives
        # in ``privacy`` and is appended below, after checking the events match the plan.
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=False)

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
        ),
    )
    for name, module, x, y, batch, lr, steps, clip, loss_fn in jobs:
        if steps == 0:
            continue
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=expected_batch(batch, len(y)),
            shuffle=not p.dp,
            generator=generator,
        )
        optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=settings.momentum)
        if engine is not None:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # Opacus warns about secure_mode off; recorded in docs
                module, optimizer, loader = engine.make_private(
                    module=module,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=privacy.noise_multiplier,
                    max_grad_norm=clip,
                    poisson_sampling=True,
                    noise_generator=generator,
                )
        loss = _run_steps(module, loader, optimizer, loss_fn, steps, generator)
        if name == "face":
            face_loss = loss
        else:
            emotion_loss = loss
        logger.debug("%s: %d steps, loss %.4f", name, steps, loss)

    events: list[Event] = []
    if engine is not None:
        events = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
        planned = planned_events(settings, data, float(privacy.noise_multiplier))  # type: ignore[arg-type]
        if not _same_events(events, planned):
            raise RuntimeError(
                f"accountant recorded {events}, planned {planned}; refusing to report"
            )
        privacy.history.extend(events)
    return RoundOutcome(face_loss=face_loss, emotion_loss=emotion_loss, events=events)
