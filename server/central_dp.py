"""Client-level central DP on top of the sites' local DP-SGD (McMahan et al., 2018, DP-FedAvg).

Flower's :class:`DifferentialPrivacyClientSideFixedClipping` wraps the facefed strategy: each sampled
site clips its model update to ``central-clip`` (Flower's ``fixedclipping_mod``), and the coordinator adds
Gaussian noise of std ``sigma * C / n`` to the average of the ``n`` updates. Two things are added here:

* every noised release is recorded in the ledger as the coordinator's own ``client-level`` guarantee;
* a round with fewer replies than sampled is refused before aggregation (see ``CohortMixin``): Flower's
  wrapper would only warn and add noise calibrated for the full cohort to a smaller average.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from common.config import RunSettings
from common.privacy.accounting import would_exceed
from common.privacy.events import DpSgdEvent
from server.ledger_keeper import COORDINATOR
from server.strategy import BudgetExhausted, FacefedStrategy


class CentralDp(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, recording each release in the ledger."""

    def __init__(self, inner: FacefedStrategy, settings: RunSettings) -> None:
        p = settings.privacy
        super().__init__(
            inner,
            noise_multiplier=p.central_noise_multiplier,
            clipping_norm=p.central_clip,
            num_sampled_clients=settings.cohort_size,
        )
        self.inner = inner
        self.event = DpSgdEvent(
            noise_multiplier=p.central_noise_multiplier,
            sample_rate=settings.cohort_size / settings.num_sites,
            steps=1,
            clip_norm=p.central_clip,
            name="client-level",
        )
        self.budget = p.central_max_epsilon

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        keeper = self.inner.keeper
        if keeper is not None:
            history = keeper.ledger.history(COORDINATOR, guarantee="client-level")
            if would_exceed(history, [self.event], self.budget, keeper.delta, "rdp"):
                raise BudgetExhausted(
                    f"stopped before round {server_round}: another client-level release would exceed "
                    f"the coordinator's central-max-epsilon {self.budget:g}"
                )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.inner.keeper is not None:
            self.inner.keeper.model_hash = self.inner.model_hash
            self.inner.keeper.record_central(server_round, self.event, self.budget)
        return arrays, metrics
