"""Aggregation strategies: Flower's FedAvg / FedAdam plus facefed's cohort sampling and reply capture.

Three changes to Flower's behaviour:
* the cohort is always exactly ``cohort_size`` sites, drawn from the connected sites that are still
  within their privacy budget, waiting until all ``num_sites`` are connected. Flower's ``sample_nodes``
  uses the global ``random`` module; here the draw is secret under central DP (the OS CSPRNG, so the
  amplification by sampling that the ledger accounts holds) and otherwise seeded from the run seed,
  for reproducible research runs. Each round's draw (cohort size, population) is kept, because the
  true sampling rate is what central DP must record;
* every valid training reply's scalar metrics are kept per site and round (Flower only keeps the weighted
  average), because each site's epsilon must be reported on its own;
* the coordinator sets the aggregation weights itself: every accepted update weighs the same. A site's
  reply never decides its weight (a site-reported example count is un-noised private data, and a
  claimed weight would let one site dominate the mean and break central DP's sensitivity bound).
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg

from common.config import RunSettings
from common.errors import FacefedError
from common.privacy.site_record import PREVIOUS_PREFIX, RECORD_NAME
from common.serde import arrays_digest
from server.ledger_keeper import LedgerKeeper
from server.validation import validate_reply

logger = logging.getLogger(__name__)

# The metric that Flower's aggregation reads the weights from. Only the coordinator writes it (every
# accepted reply's content is replaced by the validated arrays and this weight); server.validation
# refuses it, like any key outside its whitelist, in a site's reply.
WEIGHT_KEY = "coordinator-weight"
# What sampling_state() stores for a secret sampler: a marker, no state (there is none to continue).
SECRET_SAMPLER_STATE: Mapping[str, str] = MappingProxyType({"sampler": "secret"})


def _previous_in_round_order(names: Iterable[str]) -> list[str]:
    """The ``privacy-previous-<round>`` records, oldest round first (the ledger appends in order)."""
    rounds = {
        int(suffix): name
        for name in names
        if name.startswith(PREVIOUS_PREFIX)
        and (suffix := name.removeprefix(PREVIOUS_PREFIX)).isdigit()
    }
    return [rounds[r] for r in sorted(rounds)]


class BudgetExhausted(FacefedError):
    """Too few sites can train within their budgets: the run stops cleanly after the last round."""

    exit_code = 0


class CohortMixin:
    """Fixed-size cohort sampling and per-site capture of training replies."""

    settings: RunSettings
    rng: np.random.Generator
    secret_rng: random.SystemRandom | None
    site_metrics: dict[int, dict[int, dict[str, Any]]]  # round -> node id -> metrics
    failures: dict[int, list[str]]

    def _init_cohort(self, settings: RunSettings) -> None:
        self.settings = settings
        self.central_dp = settings.privacy.central_dp
        self.keeper: LedgerKeeper | None = None
        self.model_hash = ""
        self.round_hashes: dict[int, str] = {}
        self.sent: dict[str, np.ndarray] = {}
        # Under central DP the cohort must be secret: a seeded draw is derivable from the run config.
        self.secret_rng = secrets.SystemRandom() if settings.privacy.central_dp else None
        self.rng = np.random.default_rng([settings.seed, 7919])  # used only without central DP
        self.cohort_draws: dict[int, tuple[int, int]] = {}  # round -> (cohort size, drawn from)
        self.site_metrics = {}
        self.failures = {}
        self._verdicts: dict[int, dict[int, tuple[Message, bool]]] = {}  # round -> id(reply) -> ok
        self.run_id = ""  # set by run_federation; sites key their stored replies on it
        self.wait_timeout_s = 600.0  # before round 1: every site must connect
        self.rejoin_grace_s = 30.0  # later rounds: how long to wait for a missing site to return
        self.rounds_started = 0

    def restore_sampling(self, state: dict[str, Any]) -> None:
        """Continue the cohort sampling stream of an interrupted run (see ``sampling_state``).

        A secret sampler has no stream to continue: it draws afresh from the OS CSPRNG, which is as
        good after a resume as before it (the draws stay secret and independent).
        """
        if self.secret_rng is not None:
            return
        if state == SECRET_SAMPLER_STATE:
            raise FacefedError(
                "the checkpoint was written by a run with a secret (central-DP) cohort sampler, "
                "but this run samples from the seed; resume with the run's own config"
            )
        self.rng.bit_generator.state = state  # the first round after it waits for every site again

    def sampling_state(self) -> dict[str, Any]:
        """The seeded sampler's state for the checkpoint; for a secret sampler only a marker.

        Nothing secret is stored: the OS CSPRNG has no state of ours, so a checkpoint (read by
        whoever can read the run directory) says nothing about past or future cohorts.
        """
        if self.secret_rng is not None:
            return dict(SECRET_SAMPLER_STATE)
        return dict(self.rng.bit_generator.state)

    def _draw(self, population: int, size: int) -> list[int]:
        """``size`` distinct positions out of ``population``, uniformly at random."""
        if self.secret_rng is not None:
            return self.secret_rng.sample(range(population), size)
        return [int(i) for i in self.rng.choice(population, size, replace=False)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        first, self.rounds_started = self.rounds_started == 0, self.rounds_started + 1
        nodes = self._wait_for_nodes(grid, first)
        eligible = [n for n in nodes if self.keeper is None or self.keeper.can_train(n)]
        size = self.settings.cohort_size
        if len(eligible) < size and len(eligible) < len(nodes):
            raise BudgetExhausted(
                f"stopped before round {server_round}: only {len(eligible)} of {len(nodes)} sites can "
                f"train another round within their privacy budget (cohort-size {size})"
            )
        if len(eligible) < size:  # sites dropped out of the federation and did not come back
            if self.central_dp or len(eligible) < self.settings.min_replies:
                raise FacefedError(
                    f"round {server_round}: only {len(eligible)} of {self.settings.num_sites} sites "
                    f"are connected; cohort-size {size} (central DP needs the full cohort) and "
                    f"min-replies {self.settings.min_replies} cannot be met"
                )
            self._refuse(
                server_round, -1, f"only {len(eligible)} sites connected; cohort shrunk to them"
            )
            size = len(eligible)
        # Sample positions, not ids: node ids are uint64 and would not survive a numpy array.
        cohort = sorted(eligible[i] for i in self._draw(len(eligible), size))
        self.cohort_draws[server_round] = (len(cohort), len(eligible))
        logger.info("round %d: training on %d of %d sites", server_round, len(cohort), len(nodes))
        config["server-round"] = server_round
        self.model_hash = arrays_digest(arrays)
        self.round_hashes[server_round] = self.model_hash
        self.sent = {k: a.numpy() for k, a in arrays.items()}
        config["run-id"] = self.run_id
        record = RecordDict({"arrays": arrays, "config": config})
        return self._construct_messages(record, cohort, MessageType.TRAIN)  # type: ignore[attr-defined]

    def _wait_for_nodes(self, grid: Grid, first: bool) -> list[int]:
        """Every site before the first round; later, whoever is back within ``rejoin_grace_s``."""
        deadline = time.monotonic() + (self.wait_timeout_s if first else self.rejoin_grace_s)
        while len(nodes := sorted(grid.get_node_ids())) < self.settings.num_sites:
            if time.monotonic() > deadline:
                if not first:
                    return nodes
                raise FacefedError(
                    f"only {len(nodes)} of {self.settings.num_sites} sites connected within "
                    f"{self.wait_timeout_s:.0f} s; start the missing SuperNodes or lower num-sites"
                )
            time.sleep(0.5)
        return nodes

    def accept(self, server_round: int, reply: Message) -> bool:
        """Check one training reply as it arrives: record its privacy spend, validate its update.

        Returns whether the update may be aggregated; a refusal is logged with its reason. The
        coordinator calls this while other sites are still training, so the ledger and validation
        work overlaps the round instead of following it; :meth:`aggregate_train` reuses the verdict
        (keyed by the reply object) and checks any reply that was not accepted beforehand.
        """
        verdicts = self._verdicts.setdefault(server_round, {})
        if id(reply) not in verdicts:
            verdicts[id(reply)] = (reply, self._check(server_round, reply))
        return verdicts[id(reply)][1]

    def _check(self, server_round: int, reply: Message) -> bool:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = (reply.error.reason or f"error code {reply.error.code}").strip()
            self._refuse(server_round, node, reason.splitlines()[-1] if reason else "error")
            return False
        if self.keeper is not None:
            try:
                for name in _previous_in_round_order(reply.content.config_records):
                    self.keeper.record_previous(
                        node, reply.content.config_records[name], self.round_hashes
                    )
                self.keeper.record(
                    node,
                    server_round,
                    self.model_hash,
                    reply.content.config_records.get(RECORD_NAME),
                )
            except FacefedError as exc:
                self._refuse(server_round, node, f"privacy record refused: {exc}")
                return False
        try:  # after the ledger: a released update spent privacy even if it is not aggregated
            arrays = validate_reply(reply.content, self.sent, self.settings.max_update_norm)
        except FacefedError as exc:
            self._refuse(server_round, node, f"update refused: {exc}")
            return False
        # validated: whitelisted finite scalars
        self.site_metrics.setdefault(server_round, {})[node] = dict(reply.content["metrics"])
        # From here on the reply holds only what aggregation may read: the validated arrays and the
        # weight the coordinator gives every accepted update. Its privacy records are in the ledger.
        reply.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT_KEY: 1})})
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.site_metrics.setdefault(server_round, {})
        accepted = [reply for reply in replies if self.accept(server_round, reply)]
        self._verdicts.pop(server_round, None)
        if len(accepted) < self.settings.min_replies:
            self._refuse(
                server_round,
                -1,
                f"{len(accepted)} valid replies, fewer than min-replies "
                f"{self.settings.min_replies}; round not aggregated",
            )
            return None, None
        if self.central_dp and len(accepted) != self.settings.cohort_size:
            # The central noise is calibrated for the full cohort; averaging fewer updates under it
            # would under-noise the release. Refuse the round instead (fail closed).
            self._refuse(
                server_round,
                -1,
                f"central DP: {len(accepted)} of "
                f"{self.settings.cohort_size} sampled sites replied; round not aggregated",
            )
            return None, None
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def _refuse(self, server_round: int, node: int, reason: str) -> None:
        self.failures.setdefault(server_round, []).append(f"node {node}: {reason[:300]}")
        logger.warning("round %d: update of node %s refused: %s", server_round, node, reason[:300])


def _common_kwargs(settings: RunSettings) -> dict[str, Any]:
    """Flower strategy arguments shared by all strategies: train the fixed cohort, no client eval."""
    return {
        # Uniform weights set by the coordinator (see CohortMixin._check): central DP's noise
        # (sigma * C / n) assumes a uniform average of the n clipped updates, and a site's own count
        # of examples is private data that never leaves it.
        "weighted_by_key": WEIGHT_KEY,
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": settings.cohort_size,
        "min_available_nodes": settings.num_sites,
        "min_evaluate_nodes": 0,
    }


class _NoSkippedEvaluationWarning(logging.Filter):
    """Drops Flower's "fraction_evaluate is set to 0.0 ... evaluation will be skipped" warning.

    facefed sets it on purpose: the coordinator evaluates the global model itself on held-out data
    (server/run.py), so the sites never evaluate and the warning misleads whoever reads the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "fraction_evaluate is set to 0.0" not in record.getMessage()


@contextlib.contextmanager
def _quiet_skipped_evaluation() -> Iterator[None]:
    flower = logging.getLogger("flwr")
    quiet = _NoSkippedEvaluationWarning()
    flower.addFilter(quiet)
    try:
        yield
    finally:
        flower.removeFilter(quiet)


class FacefedFedAvg(CohortMixin, FedAvg):
    def __init__(self, settings: RunSettings) -> None:
        with _quiet_skipped_evaluation():
            super().__init__(**_common_kwargs(settings))
        self._init_cohort(settings)


class FacefedFedAdam(CohortMixin, FedAdam):
    def __init__(self, settings: RunSettings) -> None:
        with _quiet_skipped_evaluation():
            super().__init__(**_common_kwargs(settings), eta=settings.server_lr)
        self._init_cohort(settings)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # FedOpt remembers the model it sends, to step from it; the cohort mixin replaces FedOpt's
        # configure_train, so keep that bookkeeping here.
        self.current_arrays = {k: array.numpy() for k, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)


class FacefedFedTrimmedAvg(CohortMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al., 2018): robust to a minority of poisoned updates."""

    def __init__(self, settings: RunSettings) -> None:
        with _quiet_skipped_evaluation():
            super().__init__(**_common_kwargs(settings), beta=settings.trim_fraction)
        self._init_cohort(settings)


class FacefedFedMedian(CohortMixin, FedMedian):
    """Coordinate-wise median (Yin et al., 2018): robust to up to half the updates being poisoned."""

    def __init__(self, settings: RunSettings) -> None:
        with _quiet_skipped_evaluation():
            super().__init__(**_common_kwargs(settings))
        self._init_cohort(settings)


FacefedStrategy = FacefedFedAvg | FacefedFedAdam | FacefedFedTrimmedAvg | FacefedFedMedian


def make_strategy(settings: RunSettings) -> FacefedStrategy:
    """The configured strategy: server optimiser (FedAvg / FedAdam) or a robust aggregate."""
    if settings.aggregation == "trimmed-mean":
        return FacefedFedTrimmedAvg(settings)
    if settings.aggregation == "median":
        return FacefedFedMedian(settings)
    return FacefedFedAdam(settings) if settings.strategy == "fedadam" else FacefedFedAvg(settings)
