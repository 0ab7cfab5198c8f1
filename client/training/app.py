"""The facefed ClientApp: unpack the message, answer it, reply. Logic: client/training/release.py, client/training/round.py.

``app`` is the ClientApp a deployed SuperNode loads (its run config comes from ``flwr run``).
:func:`build_client_app` makes one with a run config injected, for the in-process simulation engine,
which gives ClientApps no run config of their own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.training.egress import EgressGuard, guard_stats, make_egress_guard
from client.training.refusal import (
    SITE_INTERNAL_ERROR_CODE,
    SITE_INTERNAL_ERROR_REASON,
    SiteRefusal,
)
from client.training.release import handle_train
from client.training.round import RoundFailed
from client.training.site_data import SiteSpec
from client.training.site_policy import PolicyRefusal, SitePolicies, SitePolicy
from client.training.site_store import ReplayRefused, SiteStore
from common.config import RunSettings, Scalar, parse_run_config
from common.errors import FacefedError, IntegrityError, PrivacyBudgetError
from common.model_spec import ModelSpec
from common.privacy.site_record import site_id
from common.serde import manifest

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _manifest_for(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return manifest(*spec.build())


@functools.lru_cache(maxsize=8)
def _parse(items: frozenset[tuple[str, Scalar]]) -> RunSettings:
    return parse_run_config(dict(items))


def _settings(injected: Mapping[str, Scalar], context: Context) -> RunSettings:
    """The run's settings, parsed once per process and config (each message carries the same)."""
    return _parse(frozenset({**injected, **context.run_config}.items()))


class _FacefedClientApp(ClientApp):
    """A ClientApp that pickles as the arguments it was built from.

    Flower's simulation engine sends the ClientApp to a Ray actor with every message; pickled by
    value, with its closures, that cost ~4 ms per message in the coordinator process while the actor
    waited. Rebuilding it in the actor from its (small) arguments gives the same app.
    """

    def __init__(self, build_args: tuple[object, ...], mods: list[Mod]) -> None:
        super().__init__(mods=mods)
        self._build_args = build_args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return build_client_app, self._build_args


def build_client_app(
    injected_config: Mapping[str, Scalar] | None = None,
    state_root: str | Path | None = None,
    outer_mods: Sequence[Mod] = (),
    site_policies: SitePolicies | None = None,
    research: bool = False,
) -> ClientApp:
    """A ClientApp whose run config is ``injected_config`` overlaid with the context's own.

    Every reply passes the egress guard: only the agreed model arrays, data-independent metrics and
    the signed privacy records may leave the site. A site keeps its durable state
    (:mod:`client.training.site_store`) in ``node_config["state-dir"]``, else in ``state_root/site-N`` when
    ``state_root`` is given (the simulation's ``OUT/sites``). Its privacy policy is the ``policy-*``
    node config of a deployed SuperNode, or ``site_policies`` in a simulation. ``research`` marks a
    simulation: only there may a site's policy allow seeded noise, or a site run without a state
    directory. ``outer_mods`` run outside the egress guard: only fault-injection runs
    (``bench/faults.py``) use them, to play a compromised site that bypasses its own guard.
    """
    injected = dict(injected_config or {})

    def stored_record(context: Context, msg: Message, server_round: int) -> ConfigRecord | None:
        settings = _settings(injected, context)
        site = SiteSpec.from_node_config(dict(context.node_config), settings)
        store = _site_store(context.node_config, state_root, site.site_index)
        if store is None:
            return None
        return store.stored_record(_run_id(msg), server_round)

    guards: dict[ModelSpec, EgressGuard] = {}

    def egress(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            settings = _settings(injected, context)
            spec = ModelSpec.from_settings(settings)
            if spec not in guards:
                guards[spec] = make_egress_guard(_manifest_for(spec), stored_record=stored_record)
        except Exception:  # never the exception's text: a fixed code leaves the site
            logger.exception("refusing the message before training")
            error = Error(code=SITE_INTERNAL_ERROR_CODE, reason=SITE_INTERNAL_ERROR_REASON)
            return Message(error=error, reply_to=msg)
        reply = guards[spec](msg, context, call_next)
        if not reply.has_error() and "metrics" in reply.content.metric_records:
            # Stamp the reply with the guard's running count (added after the check: a scalar), so the
            # coordinator can show that every message the site sent went through the guard.
            stats = guard_stats(context)
            metrics = reply.content.metric_records["metrics"]
            metrics["egress-checked"] = stats.get("messages_seen", 0)
            metrics["egress-refused"] = stats.get("messages_refused", 0)
        return reply

    def central_clip(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # Clip the model update only when the coordinator runs client-level central DP (it then
        # sends the clipping norm); the egress guard, outermost, checks the clipped reply.
        config = msg.content.config_records.get("config")
        if config is not None and KEY_CLIPPING_NORM in config:
            return fixedclipping_mod(msg, context, call_next)
        return call_next(msg, context)

    client_app = _FacefedClientApp(
        (injected, state_root, tuple(outer_mods), site_policies, research),
        mods=[*outer_mods, egress, central_clip],
    )

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train both models locally with DP-SGD; return the shared weights and the privacy record."""
        torch.set_num_threads(1)  # one CPU per site process; Ray sizes actors with num_cpus=1
        settings = _settings(injected, context)
        node_config = dict(context.node_config)
        site = SiteSpec.from_node_config(node_config, settings)
        try:
            policy = (
                site_policies.for_site(site.site_index)
                if site_policies is not None
                else SitePolicy.from_node_config(node_config)
            )
            content = handle_train(
                msg.content,
                context.state,
                settings,
                node_config,
                site,
                policy,
                _site_store(node_config, state_root, site.site_index),
                deployed=not research,
            )
        except FacefedError as exc:  # the full reason stays in the site's own log
            raise SiteRefusal(
                _refusal_code(exc), site.site_index, _setting(exc), detail=str(exc)
            ) from None
        return Message(content=content, reply_to=msg)

    return client_app


def _run_id(msg: Message) -> str:
    return str(msg.content.config_records["config"].get("run-id", ""))


def _refusal_code(exc: FacefedError) -> str:
    """The fixed refusal code the coordinator is told (the message itself stays on the site)."""
    if isinstance(exc, RoundFailed | IntegrityError):
        return "state"
    if isinstance(exc, PolicyRefusal):
        return {"one-release-per-round": "replay", "max-epsilon-lifetime": "budget"}.get(
            exc.setting, "policy"
        )
    if isinstance(exc, ReplayRefused):
        return "replay"
    if isinstance(exc, PrivacyBudgetError):
        return "budget"
    return "data"


def _setting(exc: FacefedError) -> str:
    if isinstance(exc, PolicyRefusal):
        return exc.setting
    if isinstance(exc, RoundFailed):
        return "training-failed"
    if isinstance(exc, ReplayRefused):
        return "one-release-per-round"
    return {IntegrityError: "site-state", PrivacyBudgetError: "max-epsilon-run"}.get(
        type(exc), "site-data"
    )


def _site_store(
    node_config: Mapping[str, object], state_root: str | Path | None, site_index: int
) -> SiteStore | None:
    if node_config.get("state-dir"):
        return SiteStore(str(node_config["state-dir"]))
    if state_root is not None:
        return SiteStore(Path(state_root) / site_id(site_index))
    return None


app = build_client_app()
