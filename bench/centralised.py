"""The centralised, non-private baseline: the federated models trained on the union of all sites' data.

The baseline reuses the federated pieces so that the only differences are "one place" and "no DP":

* **data** -- the union of every site's training tensors, built by the same
  :func:`client.training.site_data.load_site_tensors` the sites use (the ``face_pool`` split by identity, the
  FER2013 Training split, the same preprocessing and limits); each site's local identity labels are
  offset so that identities stay distinct (no person is at two sites, so none is merged);
* **models** -- the run's networks, built from :meth:`common.model_spec.ModelSpec.from_settings` and started
  from :meth:`~common.model_spec.ModelSpec.initial` with the run's seed, as the coordinator does (for the
  pretrained family: the tail of dlib's public ResNet on its frozen trunk features);
* **training** -- :func:`client.training.train.train_round` with ``dp = false`` (same loss, optimizer,
  learning rate, batch size and augmentation); the identity head spans all identities; batches are drawn
  from a :class:`~client.training.dp_random.SeededRandomness` (no privacy is claimed, so the baseline is
  reproducible from the seed);
* **compute** -- the same number of training examples processed (optimizer steps x batch) as the
  federated non-private run: :func:`matched_steps`;
* **evaluation** -- the same held-out LFW people sets and FER2013 PublicTest images, made into the
  modules' inputs by :class:`common.features.ModelInputs` and scored by the same :mod:`common.evaluation`
  functions as the coordinator's ``RunRecorder`` scores each round.

With ``domain-holdout = N`` the last N people of ORL and of Extended Yale B are missing from every site's
data, so from the union too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.training.dp_random import SeededRandomness
from client.training.privacy_state import SitePrivacyState
from client.training.site_data import SiteSpec, load_site_tensors
from client.training.train import SiteTensors, expected_batch, train_round
from common.checkpoint import save_checkpoint
from common.config import RunSettings
from common.evaluation import evaluate_emotion, evaluate_face, held_out_sets
from common.features import ModelInputs
from common.model_spec import ModelSpec
from common.models import CosineHead
from common.paths import data_dir as resolve_data_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchedCompute:
    """How the baseline's optimizer steps were matched to the federated run, for one model."""

    model: str
    federated_examples: int  # sum over rounds and sampled sites of local steps x expected batch
    batch: int  # the baseline's batch size (the configured one, capped like the sites' batches)
    steps: int  # ceil(federated_examples / batch)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def union_tensors(site_data: list[SiteTensors]) -> SiteTensors:
    """Concatenate sites' training data; each site's local identity labels are shifted to be unique."""
    face_y: list[torch.Tensor] = []
    offset = 0
    for data in site_data:
        face_y.append(data.face_y + offset)
        offset += data.num_identities
    return SiteTensors(
        face_x=torch.cat([d.face_x for d in site_data]),
        face_y=torch.cat(face_y),
        emotion_x=torch.cat([d.emotion_x for d in site_data]),
        emotion_y=torch.cat([d.emotion_y for d in site_data]),
    )


def matched_steps(
    settings: RunSettings, site_data: list[SiteTensors], union: SiteTensors
) -> tuple[MatchedCompute, MatchedCompute]:
    """Baseline steps that process as many examples as the federated run's local training did.

    Per round the coordinator samples ``cohort-size`` of ``num-sites`` sites; each sampled site takes
    ``steps`` local steps at its expected batch ``min(batch, n_site // 2)``. Averaged over which sites
    are sampled, the federated run processes ``rounds * cohort/sites * sum_sites(steps * batch_site)``
    examples per model (exact when every site is in every round). The baseline takes that many
    examples in steps of its own expected batch, rounded up.
    """
    share = settings.cohort_size / settings.num_sites
    plans = []
    for model, steps, batch, n_sites, n_union in (
        (
            "face",
            settings.face_steps,
            settings.face_batch,
            [len(d.face_y) for d in site_data],
            len(union.face_y),
        ),
        (
            "emotion",
            settings.emotion_steps,
            settings.emotion_batch,
            [len(d.emotion_y) for d in site_data],
            len(union.emotion_y),
        ),
    ):
        per_round = sum(steps * expected_batch(batch, n) for n in n_sites)
        examples = round(settings.num_rounds * share * per_round)
        central_batch = expected_batch(batch, n_union)
        plans.append(
            MatchedCompute(
                model=model,
                federated_examples=examples,
                batch=central_batch,
                steps=math.ceil(examples / central_batch),
            )
        )
    return plans[0], plans[1]


def initial_models(spec: ModelSpec, seed: int) -> tuple[nn.Module, nn.Module]:
    """The federated run's initial global models, as the coordinator builds them (server/run.py).

    :meth:`ModelSpec.initial` seeds torch's global RNG; the caller's RNG state is restored after.
    """
    with torch.random.fork_rng(devices=[]):
        return spec.initial(seed)


def run_centralised(settings: RunSettings, out_dir: Path, num_threads: int) -> dict[str, Any]:
    """Train and score the centralised non-private baseline; return its metrics and bookkeeping.

    Args:
        settings: the federated run's settings (the privacy block is ignored: the baseline is
            non-private).
        out_dir: where the baseline's checkpoint goes.
        num_threads: torch CPU threads for training (the federated run uses one per site process).
    """
    root = resolve_data_dir(settings.data_dir or None)
    started = time.monotonic()
    sites = [
        load_site_tensors(
            settings,
            SiteSpec(
                partition_id=i, num_partitions=settings.num_sites, data_dir=str(root), site_index=i
            ),
        )
        for i in range(settings.num_sites)
    ]
    union = union_tensors(sites)
    face_plan, emotion_plan = matched_steps(settings, sites, union)
    central = dataclasses.replace(
        settings,
        face_steps=face_plan.steps,
        emotion_steps=emotion_plan.steps,
        privacy=dataclasses.replace(settings.privacy, dp=False),
    )
    logger.info(
        "centralised baseline: %d face images of %d people, %d emotion images; "
        "%d face steps x %d, %d emotion steps x %d",
        len(union.face_y),
        union.num_identities,
        len(union.emotion_y),
        face_plan.steps,
        face_plan.batch,
        emotion_plan.steps,
        emotion_plan.batch,
    )
    inputs = ModelInputs(ModelSpec.from_settings(settings))
    spec = inputs.spec  # with the SHA-256 of the pretrained weights actually loaded
    face, emotion = initial_models(spec, settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    head = CosineHead(union.num_identities)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        train_started = time.monotonic()
        outcome = train_round(
            face,
            head,
            emotion,
            union,
            central,
            SitePrivacyState(accountant=settings.privacy.accountant),
            generator,
            SeededRandomness(torch.Generator().manual_seed(settings.seed + 1)),
        )
        train_s = time.monotonic() - train_started
        lfw, fer = held_out_sets(settings, root, inputs)
        face_metrics = evaluate_face(face, lfw)
        emotion_metrics = evaluate_emotion(emotion, fer)
    finally:
        torch.set_num_threads(previous_threads)
    checkpoint = save_checkpoint(
        out_dir / "centralised.ckpt",
        face,
        emotion,
        spec,
        settings.num_rounds,
        meta={"kind": "centralised-baseline"},
    )
    return {
        "emotion": emotion_metrics,
        "face": face_metrics,
        "mean_train_loss": {"face": outcome.face_loss, "emotion": outcome.emotion_loss},
        "compute": {
            "face": face_plan.to_json(),
            "emotion": emotion_plan.to_json(),
            "torch_threads": num_threads,
        },
        "data": {
            "face_images": len(union.face_y),
            "identities": union.num_identities,
            "emotion_images": len(union.emotion_y),
            "lfw_pairs": len(lfw.same),
            "fer_test_images": len(fer.labels),
        },
        "train_s": round(train_s, 2),
        "wall_time_s": round(time.monotonic() - started, 2),
        "checkpoint": str(checkpoint),
    }
