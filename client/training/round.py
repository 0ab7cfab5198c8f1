"""One federated round on a site: budget checks, DP-SGD on both models, the reply content.

Kept apart from ``client/training/app.py`` so that it can be called and tested without Flower's runtime.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.training.dp_random import aux_generator, release_randomness
from client.training.privacy_state import SitePrivacyState
from client.training.site_policy import PolicyRefusal, SitePolicy
from client.training.train import SiteTensors, planned_events, train_round
from common.config import RunSettings
from common.crypto.signing import canonical_bytes, sign
from common.errors import DataError, PrivacyBudgetError
from common.model_spec import ModelSpec
from common.models import CosineHead
from common.privacy.accounting import calibrate_noise, compute_epsilon
from common.privacy.events import DpSgdEvent
from common.privacy.site_record import RECORD_NAME, RoundReport
from common.serde import arrays_digest, decode, from_arrays, to_arrays

logger = logging.getLogger(__name__)

HEAD_KEY = "local-head"


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


def calibrated_noise(
    settings: RunSettings, data: SiteTensors, budget: float, site_index: int, floor: float
) -> float:
    """The site's noise multiplier: the configured one, or calibrated to spend ``budget`` over the run.

    Calibration assumes the site takes part in every planned round, and uses the exact event list it
    would accumulate, so the accountant later sees the same composition it was calibrated on. The
    site's policy floor (``min-noise-multiplier``) only ever raises it.
    """
    p = settings.privacy
    if p.noise_multiplier > 0:
        return max(p.noise_multiplier, floor)
    per_round = [(e.sample_rate, e.steps) for e in planned_events(settings, data, 1.0)]
    sigma = calibrate_noise(per_round * settings.num_rounds, budget, p.delta, p.accountant)
    logger.info(
        "site %d: noise multiplier %.4f for epsilon %.3g over %d rounds",
        site_index,
        sigma,
        budget,
        settings.num_rounds,
    )
    return max(sigma, floor)


def _check_units(
    site_index: int, planned: Sequence[DpSgdEvent], released: Sequence[DpSgdEvent]
) -> None:
    """Refuse a round whose models change privacy unit against what the site released before.

    Composing an example-level release into a person-level history (or back) would state a guarantee
    per person that the example-level rounds never gave (a person with k images has about k times
    their epsilon), so a site keeps one unit per model for its lifetime.
    """
    for event in planned:
        before = sorted({e.unit for e in released if e.name == event.name} - {event.unit})
        if before:
            raise PolicyRefusal(
                site_index,
                "dp-unit",
                f"this round trains the {event.name} model at the {event.unit} level, but the site "
                f"released it at the {before[0]} level before; one site's budget cannot mix units: "
                f'set dp-unit = "{before[0]}", or start the site afresh with a new state-dir and key',
            )


class RoundFailed(PrivacyBudgetError):
    """Training failed after the site's data was read. Its planned spend is charged (the failure
    itself may depend on the data) and the round is never trained again."""

    def __init__(
        self, site_index: int, server_round: int, events: tuple[DpSgdEvent, ...], secret: bool
    ) -> None:
        self.events, self.secret_noise = events, secret
        super().__init__(
            f"site {site_index}: round {server_round} failed after reading the site's data; its "
            "planned privacy spend is charged and the round is not trained again (see the log above)"
        )


@dataclass(frozen=True)
class RoundRelease:
    """What one round releases: the reply, and the DP events it spent (none without DP)."""

    content: RecordDict
    events: tuple[DpSgdEvent, ...]
    secret_noise: bool
    private: bool = True


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
    *,
    policy: SitePolicy | None = None,
    other_runs: Sequence[DpSgdEvent] = (),
    released_without_dp: bool = False,
) -> RoundRelease:
    """Train on the site for one round and build the reply.

    The reply holds the shared arrays, metrics that do not depend on the site's data, and, with DP
    on, the signed privacy record for the coordinator's ledger (``signing_key`` is then required).
    ``budget`` is the run's epsilon budget for this site, already checked against its ``policy``
    (:func:`client.training.site_policy.check_run`); ``other_runs`` holds the DP events of every release the
    site made in other runs: with this run's own history they make its lifetime epsilon, which the
    policy's lifetime cap bounds. ``released_without_dp`` says the site once released without DP
    (its policy allowed it): no finite lifetime guarantee remains, so no DP round is trained.
    ``model_hash`` is ``arrays_digest(arrays)`` when the caller has it already.

    Raises:
        PrivacyBudgetError: this round would take the site past ``budget`` or its lifetime cap, or
            repeats a round the site already released (nothing is trained).
    """
    policy = policy or SitePolicy()
    received = math.floor(time.time())  # when the request arrived: says nothing about the data
    server_round = round_from_config(train_config)
    p = settings.privacy
    privacy = SitePrivacyState.load(state, p.accountant)
    if privacy.rounds and server_round <= max(privacy.rounds):
        raise PolicyRefusal(
            site_index,
            "one-release-per-round",
            f"round {server_round} was already released (last: {max(privacy.rounds)}); a repeated "
            "request is never trained again",
        )
    if settings.face_steps and data.num_identities < 2:
        raise DataError(
            f"site {site_index} holds faces of {data.num_identities} person(s); the margin loss needs "
            "at least 2 identities: add people to the site's face data or set face-steps = 0"
        )
    if p.dp and released_without_dp:
        raise PolicyRefusal(
            site_index,
            "max-epsilon-lifetime",
            "this site released a model without DP before: its lifetime epsilon is unbounded",
        )
    if p.dp:
        if signing_key is None:
            raise PrivacyBudgetError("a DP round needs the site's signing key for the ledger")
        if privacy.noise_multiplier is None:
            privacy.noise_multiplier = calibrated_noise(
                settings, data, budget, site_index, policy.min_noise_multiplier
            )
        elif privacy.noise_multiplier < policy.min_noise_multiplier:
            raise PolicyRefusal(
                site_index,
                "min-noise-multiplier",
                f"this run releases at noise multiplier {privacy.noise_multiplier:.4g}, below the "
                f"policy's floor {policy.min_noise_multiplier:g}",
            )
        planned = planned_events(settings, data, privacy.noise_multiplier)
        _check_units(site_index, planned, [*other_runs, *privacy.history])
        projected = privacy.epsilon(p.delta, extra=planned)
        if projected > budget:
            spent = privacy.epsilon(p.delta)
            raise PrivacyBudgetError(
                f"site {site_index}: round {server_round} would raise epsilon from {spent:.3f} to "
                f"{projected:.3f}, above the site's budget {budget:g}; refusing to train"
            )
        lifetime_projected = compute_epsilon(
            [*other_runs, *privacy.history, *planned], p.delta, p.accountant
        )
        if lifetime_projected > policy.max_epsilon_lifetime:
            raise PolicyRefusal(
                site_index,
                "max-epsilon-lifetime",
                f"round {server_round} would raise the site's lifetime epsilon to "
                f"{lifetime_projected:.3f}, above its cap {policy.max_epsilon_lifetime:g}",
            )
    generator = aux_generator(p.noise_source, [settings.seed, site_index, server_round])
    randomness = release_randomness(p.noise_source, generator)
    face, emotion = ModelSpec.from_settings(settings).build()
    from_arrays(arrays, face, emotion)
    head = _load_head(state, data.num_identities, generator)

    try:
        outcome = train_round(face, head, emotion, data, settings, privacy, generator, randomness)
    except Exception as exc:
        if not p.dp:
            raise
        logger.exception("site %d: round %d failed during training", site_index, server_round)
        privacy.history.extend(planned)
        privacy.rounds.append(server_round)
        privacy.save(state)
        raise RoundFailed(site_index, server_round, tuple(planned), randomness.secret) from exc

    state.array_records[HEAD_KEY] = ArrayRecord(torch_state_dict={"weight": head.weight.detach()})
    privacy.rounds.append(server_round)
    privacy.save(state)
    epsilon = privacy.epsilon(p.delta) if p.dp else math.inf
    epsilon_lifetime = (
        compute_epsilon([*other_runs, *privacy.history], p.delta, p.accountant)
        if p.dp
        else math.inf
    )
    # Only values that do not depend on the site's data leave it (losses, example counts and
    # training time would, un-noised). Without DP, epsilon is sent as -1 with dp = 0.
    metrics = MetricRecord(
        {
            "site-index": site_index,
            "dp": int(p.dp),
            "epsilon": epsilon if p.dp else -1.0,
            "epsilon-lifetime": epsilon_lifetime if p.dp else -1.0,
            "delta": p.delta,
            "steps": sum(e.steps for e in privacy.history),
            "noise-multiplier": privacy.noise_multiplier or 0.0,
            "secret-noise": int(randomness.secret),
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
            epsilon_lifetime=epsilon_lifetime,
            secret_noise=randomness.secret,
            # the request's arrival, to the second, as both times: when training finished would
            # tell how long it took, which depends on the site's data
            started_at=received,
            finished_at=received,
        )
        body = report.entry_body(
            str(train_config.get("run-id", "")),
            model_hash or arrays_digest(arrays),
            p.accountant,
        )
        signature = sign(signing_key, canonical_bytes(body))
        public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        reply.config_records[RECORD_NAME] = report.to_record(signature, public)
    return RoundRelease(reply, tuple(outcome.events), randomness.secret, private=p.dp)


def round_from_config(config: ConfigRecord) -> int:
    return int(config.get("server-round", 0))  # type: ignore[arg-type]
