"""One federated round on a site: budget check, DP-SGD on both models, the reply content.

Kept apart from ``client/app.py`` so that it can be called and tested without Flower's runtime.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.privacy_state import SitePrivacyState
from client.train import SiteTensors, planned_events, train_round
from common.config import RunSettings
from common.crypto.signing import canonical_bytes, sign
from common.errors import DataError, PrivacyBudgetError
from common.models import CosineHead, EmotionNet, FaceEmbedder
from common.privacy.accounting import calibrate_noise, compute_epsilon
from common.privacy.site_record import RECORD_NAME, RoundReport
from common.serde import arrays_digest, decode, from_arrays, to_arrays

logger = logging.getLogger(__name__)

HEAD_KEY = "local-head"


def site_budget(settings: RunSettings, node_config: Mapping[str, object], site_index: int) -> float:
    """The site's epsilon budget: the run's (or its per-site entry), or the node's own ``max-epsilon``
    if that is stricter."""
    budget = settings.privacy.budget_for(site_index)
    if "max-epsilon" in node_config:
        node_budget = float(node_config["max-epsilon"])  # type: ignore[arg-type]
        if not node_budget > 0:
            raise PrivacyBudgetError(f"node max-epsilon must be > 0, got {node_budget}")
        budget = min(budget, node_budget)
    return budget


def _load_head(state: RecordDict, num_classes: int, generator: torch.Generator) -> CosineHead:
    head = CosineHead(num_classes)
    if HEAD_KEY in state.array_records:
        weight = torch.from_numpy(decode(state.array_records[HEAD_KEY]["weight"]).copy())
        if tuple(weight.shape) == tuple(head.weight.shape):
            head.weight.data.copy_(weight)
            return head
        logger.warning("local identity count changed; re-initialising the local head")
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
    return head


def _calibrated_noise(
    settings: RunSettings, data: SiteTensors, budget: float, site_index: int
) -> float:
    """The site's noise multiplier: the configured one, or calibrated to spend ``budget`` over the run.

    Calibration assumes the site takes part in every planned round, and uses the exact event list it
    would accumulate, so the accountant later sees the same composition it was calibrated on.
    """
    p = settings.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    per_round = [(e.sample_rate, e.steps) for e in planned_events(settings, data, 1.0)]
    sigma = calibrate_noise(per_round * settings.num_rounds, budget, p.delta, p.accountant)
    logger.info(
        "site %d: noise multiplier %.4f for epsilon %.3g over %d rounds",
        site_index,
        sigma,
        budget,
        settings.num_rounds,
    )
    return sigma


def run_round(
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    state: RecordDict,
    data: SiteTensors,
    settings: RunSettings,
    budget: float,
    site_index: int,
    signing_key: Ed25519PrivateKey | None = None,
    model_hash: str | None = None,
) -> RecordDict:
    """Train on the site for one round and build the reply.

    The reply holds the shared arrays, scalar metrics and, with DP on, the signed privacy record for
    the coordinator's ledger (``signing_key`` is then required). ``model_hash`` is
    ``arrays_digest(arrays)`` when the caller has it already.

    Raises:
        PrivacyBudgetError: if this round would take the site past ``budget`` (nothing is trained).
    """
    server_round = round_from_config(train_config)
    if settings.face_steps and data.num_identities < 2:
        raise DataError(
            f"site {site_index} holds faces of {data.num_identities} person(s); the margin loss needs "
            "at least 2 identities: add people to the site's face data or set face-steps = 0"
        )
    p = settings.privacy
    privacy = SitePrivacyState.load(state, p.accountant)
    if p.dp:
        if signing_key is None:
            raise PrivacyBudgetError("a DP round needs the site's signing key for the ledger")
        if privacy.noise_multiplier is None:
            privacy.noise_multiplier = _calibrated_noise(settings, data, budget, site_index)
        planned = planned_events(settings, data, privacy.noise_multiplier)
        projected = privacy.epsilon(p.delta, extra=planned)
        if projected > budget:
            spent = privacy.epsilon(p.delta)
            raise PrivacyBudgetError(
                f"site {site_index}: round {server_round} would raise epsilon from {spent:.3f} to "
                f"{projected:.3f}, above the site's budget {budget:g}; refusing to train"
            )
    started = time.time()
    seed = np.random.SeedSequence([settings.seed, site_index, server_round]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    face = FaceEmbedder(width=settings.face_width)
    emotion = EmotionNet(width=settings.emotion_width)
    from_arrays(arrays, face, emotion)
    head = _load_head(state, data.num_identities, generator)

    train_started = time.monotonic()
    outcome = train_round(face, head, emotion, data, settings, privacy, generator)
    train_s = time.monotonic() - train_started

    state.array_records[HEAD_KEY] = ArrayRecord(torch_state_dict={"weight": head.weight.detach()})
    privacy.rounds.append(server_round)
    privacy.save(state)
    epsilon = privacy.epsilon(p.delta) if p.dp else math.inf
    # Only finite scalars leave the site (the egress guard refuses inf/NaN): without DP epsilon is
    # sent as -1 with dp = 0, and a model trained for 0 steps reports loss -1.
    metrics = MetricRecord(
        {
            "num-examples": len(data.face_y) + len(data.emotion_y),
            "dp-weight": 1,
            "site-index": site_index,
            "dp": int(p.dp),
            "epsilon": epsilon if p.dp else -1.0,
            "delta": p.delta,
            "steps": sum(e.steps for e in privacy.history),
            "noise-multiplier": privacy.noise_multiplier or 0.0,
            "face-loss": _finite_or(outcome.face_loss, -1.0),
            "emotion-loss": _finite_or(outcome.emotion_loss, -1.0),
            "train-s": train_s,
        }
    )
    reply = RecordDict({"arrays": to_arrays(face, emotion), "metrics": metrics})
    if p.dp and signing_key is not None:
        report = RoundReport(
            site_index=site_index,
            round=server_round,
            mechanisms=tuple(outcome.events),
            delta=p.delta,
            budget_epsilon=budget,
            epsilon_round=compute_epsilon(outcome.events, p.delta, p.accountant),
            epsilon_cumulative=epsilon,
            started_at=started,
            finished_at=time.time(),
        )
        body = report.entry_body(
            str(train_config.get("run-id", "")),
            model_hash or arrays_digest(arrays),
            p.accountant,
        )
        signature = sign(signing_key, canonical_bytes(body))
        public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        reply.config_records[RECORD_NAME] = report.to_record(signature, public)
    return reply


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def round_from_config(config: ConfigRecord) -> int:
    return int(config.get("server-round", 0))  # type: ignore[arg-type]
