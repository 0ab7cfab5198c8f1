"""Local DP-SGD for both models (Abadi et al., 2016, "Deep Learning with Differential Privacy").

Each model is trained for a fixed number of steps: Poisson sampling at rate q = B/N, per-sample clipping
to C, and Gaussian noise of standard deviation sigma*C on the clipped sum. With ``dp-unit = "person"`` the
face model samples and clips people instead of images (q = B/P over the site's P people, at most
``person-max-images`` images of a sampled person a step, each person's summed gradient clipped to C). ``dp-path`` chooses who computes
the per-sample gradients: Opacus (``"opacus"``) or :class:`client.training.fast_dp.FastDpSgd` (``"fast"``), which
implements the same mechanism faster on a CPU. Either way one accountant records both models' steps, and
the recorded ``(sigma, q, steps)`` must equal the planned events before anything is reported.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers.optimizer import DPOptimizer, _mark_as_processed
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from client.training.augment import augment
from client.training.dp_random import DpRandomness
from client.training.fast_dp import FastDpSgd, person_batch, poisson_indices
from client.training.privacy_state import SitePrivacyState
from common.config import RunSettings
from common.errors import DataError
from common.models import CosineHead, FaceTrainer, cosface_loss
from common.privacy.events import DpSgdEvent, compose

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteTensors:
    """A site's training data, already preprocessed: ``(N,1,H,W)`` float32 (or frozen features:
    :class:`common.features.ModelInputs`) and int64 labels."""

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


def face_units(settings: RunSettings, data: SiteTensors) -> int:
    """How many units the face model samples from: images, or with ``dp-unit = "person"`` people."""
    person = settings.privacy.dp_unit == "person"
    return data.num_identities if person else len(data.face_y)


def planned_events(settings: RunSettings, data: SiteTensors, sigma: float) -> list[DpSgdEvent]:
    """The DP-SGD events this round will add to the history, known before any step is taken."""
    p = settings.privacy
    events: list[DpSgdEvent] = []
    for name, batch, n, steps, clip, unit in (
        (
            "face",
            settings.face_batch,
            face_units(settings, data),
            settings.face_steps,
            p.face_clip,
            p.dp_unit,
        ),
        (
            "emotion",
            settings.emotion_batch,
            len(data.emotion_y),
            settings.emotion_steps,
            p.emotion_clip,
            "example",  # FER2013 has no person ids
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
                    unit=unit,
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
    geometric: bool | None,
) -> float:
    """Take exactly ``steps`` optimizer steps (re-iterating the loader); return the mean loss.

    ``geometric`` None: the inputs are frozen features, not images, and are not augmented.
    """
    module.train()
    losses: list[float] = []
    batches = iter(loader)
    while len(losses) < steps:
        try:  # a batch is drawn only for a step that will be taken
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:  # Poisson sampling can draw an empty batch; it is still a DP step
            if isinstance(optimizer, DPOptimizer):  # noise only: an empty per-sample gradient
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
            losses.append(float("nan"))
            continue
        loss = loss_fn(module(_augmented(x, generator, geometric)), y)  # type: ignore[operator]
        private = isinstance(optimizer, DPOptimizer)
        if not private and not torch.isfinite(loss):
            raise FloatingPointError("local training diverged (non-finite loss); lower the lr")
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer fire although the input needs no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if private:
            _drop_non_finite_examples(optimizer)
        optimizer.step()
        losses.append(float(loss.detach()))
    finite = [v for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _drop_non_finite_examples(optimizer: DPOptimizer) -> None:
    """Zero the per-sample gradients of examples whose gradient is not finite.

    Such an example (a model that overflows on it) then contributes nothing. Raising instead, as
    non-private training does, would tell whoever sent the model whether the Poisson batch held
    such an example: a yes/no answer about the data outside DP (the fast path does the same).
    """
    samples = [p.grad_sample for p in optimizer.params if p.grad_sample is not None]
    if not samples:
        return
    broken = torch.zeros(samples[0].shape[0], dtype=torch.bool)
    for sample in samples:
        broken |= ~torch.isfinite(sample.flatten(1)).all(dim=1)
    if bool(broken.any()):
        for p in optimizer.params:
            if p.grad_sample is not None:
                rows = broken.view(-1, *([1] * (p.grad_sample.dim() - 1)))
                p.grad_sample = torch.where(rows, torch.zeros((), dtype=p.dtype), p.grad_sample)


def run_fast_steps(
    dp: FastDpSgd,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    geometric: bool | None,
    person_cap: int | None = None,
) -> float:
    """Take exactly ``steps`` fast DP-SGD steps on Poisson batches of ``(x, y)``; return the mean loss.

    With ``person_cap`` the unit is a person (``y``): people are drawn at ``dp.sample_rate``, at most
    ``person_cap`` images each, and each person's gradient is clipped as one. An empty Poisson batch
    is still a step: noise only, recorded like any other.
    """
    dp.module.train()
    num_people = int(y.max()) + 1
    losses: list[float] = []
    for _ in range(steps):
        if person_cap is None:
            idx, units = poisson_indices(len(y), dp.sample_rate, dp.randomness), None
        else:
            idx, units = person_batch(y, num_people, dp.sample_rate, person_cap, dp.randomness)
        losses.append(dp.step(_augmented(x[idx], generator, geometric), y[idx], units))
    finite = [v for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _augmented(x: torch.Tensor, generator: torch.Generator, geometric: bool | None) -> torch.Tensor:
    """Images mirrored (and with ``geometric``, jittered) at random; frozen features (None) as they are.

    A ``(N, 2, C, H, W)`` batch holds each example's map and its mirror image's
    (:meth:`common.features.ModelInputs.emotion_training`): one of the two, at random.
    """
    if x.ndim == 5:
        mirror = torch.rand(x.shape[0], generator=generator) < 0.5
        return torch.where(mirror[:, None, None, None], x[:, 1], x[:, 0])
    return x if geometric is None else augment(x, generator, geometric)


def _matches(recorded: list[tuple[float, float, int]], planned: list[DpSgdEvent]) -> bool:
    """Whether the accountant recorded exactly the planned composition.

    Compared as compositions: Opacus's accountants merge consecutive steps of equal ``(sigma, q)``,
    so the face and emotion models at the same noise and sampling rate arrive as one entry.
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in recorded:
        merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    want = compose(planned)
    return len(merged) == len(want) and all(
        any(math.isclose(s, ws) and math.isclose(q, wq) and n == wn for (s, q), n in merged.items())
        for ws, wq, wn in want
    )


class PoissonBatches(Sampler[list[int]]):
    """Opacus's Poisson sampler, drawing from the release's randomness (secret by default).

    ``len()`` is the number of batches per epoch, from which Opacus derives ``q = 1 / len()``.
    """

    def __init__(self, n: int, sample_rate: float, randomness: DpRandomness) -> None:
        self.n, self.sample_rate, self.randomness = n, sample_rate, randomness
        self.num_batches = round(1 / sample_rate)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            yield poisson_indices(self.n, self.sample_rate, self.randomness).tolist()


def _with_secret_noise(optimizer: DPOptimizer, randomness: DpRandomness) -> None:
    """Make Opacus's optimizer draw its noise from ``randomness`` (its own draws are seeded torch
    generators; ``secure_mode`` needs torchcsprng, which no longer builds with current torch)."""

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            summed = p.summed_grad
            noise = randomness.normal(tuple(summed.shape), std, summed.dtype).to(summed.device)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(summed)

    optimizer.add_noise = add_noise


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
    randomness: DpRandomness,
    geometric: bool | None,
) -> float:
    """Non-private training, or DP-SGD through Opacus when ``engine`` is given."""
    dataset = TensorDataset(x, y)
    if engine is None:
        loader = DataLoader(
            dataset, batch_size=expected_batch(batch, len(y)), shuffle=True, generator=generator
        )
        return _run_steps(module, loader, optimizer, loss_fn, steps, generator, geometric)
    sampler = PoissonBatches(len(y), sample_rate(batch, len(y)), randomness)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=lambda rows: (
            (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
            if rows
            else (x[:0], y[:0])
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode off: the noise is ours
        module, optimizer, loader = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=clip,
            poisson_sampling=False,  # the loader above samples (Poisson, from ``randomness``)
        )
    _with_secret_noise(optimizer, randomness)
    return _run_steps(module, loader, optimizer, loss_fn, steps, generator, geometric)


def train_round(
    face: nn.Module,
    head: CosineHead,
    emotion: nn.Module,
    data: SiteTensors,
    settings: RunSettings,
    privacy: SitePrivacyState,
    generator: torch.Generator,
    randomness: DpRandomness,
) -> RoundOutcome:
    """Train both models in place for one round; append this round's events to ``privacy.history``.

    ``randomness`` draws the Poisson batches and the noise (:mod:`client.training.dp_random`); ``generator``
    only what the guarantee does not depend on (augmentation, non-private shuffling). With
    ``settings.privacy.dp`` false, trains without clipping or noise and records nothing.
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
                warnings.simplefilter("ignore")  # "secure RNG off": the noise is drawn by facefed
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
            None if settings.face_model == "pretrained" else settings.face_augment,
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
            # faces mirrored at random (vgg's also rotated, zoomed and shifted); for a conv head,
            # its feature maps instead (the trunk is close to mirror-symmetric); a linear head's
            # pooled maps not at all
            None
            if settings.emotion_model == "transfer" and not settings.emotion_head_width
            else settings.emotion_model == "vgg",
        ),
    )
    for name, module, x, y, batch, lr, steps, clip, loss_fn, geometric in jobs:
        if steps == 0:
            continue
        optimizer = make_optimizer(module, settings.local_optimizer, lr, settings.momentum)
        if fast and accountant is not None:
            person = name == "face" and p.dp_unit == "person"
            units = face_units(settings, data) if name == "face" else len(y)
            q = sample_rate(batch, units)
            dp = FastDpSgd(
                module,
                optimizer,
                loss_fn,
                noise_multiplier=float(privacy.noise_multiplier),  # type: ignore[arg-type]
                max_grad_norm=clip,
                expected_batch_size=int(units * q),  # as Opacus derives it from the loader
                sample_rate=q,
                accountant=accountant,
                randomness=randomness,
            )
            cap = p.person_max_images if person else None
            loss = run_fast_steps(dp, x, y, steps, generator, geometric, cap)
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
                randomness,
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
