"""Client-level central DP on top of the sites' local DP-SGD (McMahan et al., 2018, DP-FedAvg).

Flower's :class:`DifferentialPrivacyClientSideFixedClipping` wraps the facefed strategy: each sampled
site clips its model update to ``central-clip`` (Flower's ``fixedclipping_mod``), and the coordinator adds
Gaussian noise of std ``sigma * C / n`` to the uniform average of the ``n`` updates. Changes to Flower:

* only a plain mean may be wrapped (``strategy = "fedavg"``, ``aggregation = "mean"``): the noise is
  sized for the sensitivity ``C / n`` of that mean; FedAdam would rescale the noised mean with its
  adaptive step, and a robust aggregate has another sensitivity. ``common.config`` refuses these
  combinations too; this class refuses them again in case it is built from other settings;
* the noise comes from the OS CSPRNG, fresh per release (:func:`common.privacy.secret_noise.secret_gaussian`); Flower's
  ``add_gaussian_noise_inplace`` draws from NumPy's global Mersenne Twister, which anyone can seed
  or, from enough outputs, predict (the cohort is drawn secretly too: see ``CohortMixin``);
* every noised release is recorded in the ledger as the coordinator's own ``client-level`` guarantee,
  with the round's TRUE sampling rate: cohort size / number of sites the cohort was drawn from (the
  connected sites still within budget), not cohort / num-sites;
* a round with fewer replies than sampled is refused before aggregation (see ``CohortMixin``): Flower's
  wrapper would only warn and add noise calibrated for the full cohort to a smaller average.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv

from common.config import RunSettings
from common.errors import ConfigError, FacefedError
from common.privacy.accounting import would_exceed
from common.privacy.events import DpSgdEvent
from common.privacy.secret_noise import secret_gaussian
from server.ledger_keeper import COORDINATOR
from server.strategy import BudgetExhausted, FacefedFedAvg, FacefedStrategy

logger = logging.getLogger(__name__)

_TWO_POW_MINUS_53 = 2.0**-53


def _require_plain_mean(inner: FacefedStrategy, settings: RunSettings) -> None:
    """Fail closed unless the wrapped strategy is the plain (uniform) FedAvg mean."""
    if settings.aggregation != "mean":
        raise ConfigError(
            f"central-dp cannot be combined with aggregation = {settings.aggregation!r}: its noise "
            'is sized for the sensitivity of a plain mean; use aggregation = "mean"'
        )
    if settings.strategy != "fedavg":
        raise ConfigError(
            f"central-dp cannot be combined with strategy = {settings.strategy!r}: its noise is "
            'sized for the plain mean of the clipped updates; use strategy = "fedavg"'
        )
    if not isinstance(inner, FacefedFedAvg):
        raise ConfigError(
            f"central-dp can only wrap the plain FedAvg mean, not {type(inner).__name__}; use "
            'strategy = "fedavg" with aggregation = "mean"'
        )


class CentralDp(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with secret noise, recording each release."""

    def __init__(self, inner: FacefedStrategy, settings: RunSettings) -> None:
        _require_plain_mean(inner, settings)
        p = settings.privacy
        super().__init__(
            inner,
            noise_multiplier=p.central_noise_multiplier,
            clipping_norm=p.central_clip,
            num_sampled_clients=settings.cohort_size,
        )
        self.inner = inner
        self.budget = p.central_max_epsilon
        self.events: dict[int, DpSgdEvent] = {}  # round -> its release, once the cohort is drawn

    def event_for(self, server_round: int) -> DpSgdEvent:
        """The release of ``server_round``, at the sampling rate of the cohort actually drawn."""
        cohort, population = self.inner.cohort_draws[server_round]
        return DpSgdEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=cohort / population,
            steps=1,
            clip_norm=self.clipping_norm,
            name="client-level",
            unit="site",
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The inner strategy draws the cohort (it only builds the messages: nothing is sent yet), so
        # the budget is checked with the true sampling rate of this round.
        messages = list(super().configure_train(server_round, arrays, config, grid))
        event = self.event_for(server_round)
        keeper = self.inner.keeper
        if keeper is not None:
            history = keeper.ledger.history(COORDINATOR, guarantee="client-level")
            if would_exceed(history, [event], self.budget, keeper.delta, "rdp"):
                raise BudgetExhausted(
                    f"stopped before round {server_round}: another client-level release would exceed "
                    f"the coordinator's central-max-epsilon {self.budget:g}"
                )
        self.events[server_round] = event
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        event = self.events.pop(server_round, None)
        if event is None:
            raise FacefedError(f"round {server_round} was not configured; nothing to aggregate")
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.inner.keeper is not None:
            self.inner.keeper.model_hash = self.inner.model_hash
            self.inner.keeper.record_central(server_round, event, self.budget)
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """The mean plus N(0, (sigma * C / n)^2) noise per coordinate, from the OS CSPRNG."""
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noised = ArrayRecord()
        for key, array in aggregated_arrays.items():
            value = array.numpy()
            noise = secret_gaussian(value.shape, std)
            noised[key] = Array(np.asarray(value + noise, dtype=value.dtype))
        logger.info("central DP: Gaussian noise of std %.4g added (OS CSPRNG)", std)
        return noised
