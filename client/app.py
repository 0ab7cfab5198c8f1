"""The facefed ClientApp: unpack the message, run the local round, reply. Logic lives in client/round.py.

``app`` is the ClientApp a deployed SuperNode loads (its run config comes from ``flwr run``).
:func:`build_client_app` makes one with a run config injected, for the in-process simulation engine,
which gives ClientApps no run config of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.egress import EgressGuard, guard_stats, make_egress_guard
from client.round import round_from_config, run_round, site_budget
from client.site_data import SiteSpec, load_site_tensors
from client.site_keys import site_signing_key
from client.site_store import SiteStore
from common.config import RunSettings, Scalar, parse_run_config
from common.models import EmotionNet, FaceEmbedder
from common.privacy.site_record import PREVIOUS_PREFIX, site_id
from common.serde import arrays_digest, manifest


@functools.lru_cache(maxsize=4)
def _guard_for(face_width: int, emotion_width: int) -> EgressGuard:
    return make_egress_guard(manifest(FaceEmbedder(face_width), EmotionNet(emotion_width)))


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
) -> ClientApp:
    """A ClientApp whose run config is ``injected_config`` overlaid with the context's own.

    Every reply passes the egress guard: only the agreed model arrays, scalar metrics and the signed
    privacy record may leave the site. A site keeps its durable state (:mod:`client.site_store`) in
    ``node_config["state-dir"]``, else in ``state_root/site-N`` when ``state_root`` is given (the
    simulation's ``OUT/sites``), else only in memory for the life of the process. ``outer_mods`` run
    outside the egress guard: only fault-injection runs (``bench/faults.py``) use them, to play a
    compromised site that bypasses its own guard.
    """
    injected = dict(injected_config or {})

    def egress(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = _settings(injected, context)
        guard = _guard_for(settings.face_width, settings.emotion_width)
        reply = guard(msg, context, call_next)
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
        (injected, state_root, tuple(outer_mods)), mods=[*outer_mods, egress, central_clip]
    )

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train both models locally with DP-SGD; return the shared weights and privacy metrics."""
        torch.set_num_threads(1)  # one CPU per site process; Ray sizes actors with num_cpus=1
        settings = _settings(injected, context)
        node_config = dict(context.node_config)
        site = SiteSpec.from_node_config(node_config, settings)
        arrays = msg.content.array_records["arrays"]
        train_config = msg.content.config_records["config"]
        model_hash = arrays_digest(arrays)
        store = _site_store(node_config, state_root, site.site_index)
        if store is None:
            signing_key = site_signing_key(context.state, node_config)
        else:
            run_id, server_round = (
                str(train_config.get("run-id", "")),
                round_from_config(train_config),
            )
            store.restore(context.state, run_id)
            stored = store.replay(run_id, server_round, model_hash)
            if stored is not None:
                return Message(content=stored, reply_to=msg)
            signing_key = (
                site_signing_key(context.state, node_config)
                if "site-key" in node_config
                else store.signing_key()
            )
        content = run_round(
            arrays=arrays,
            train_config=train_config,
            state=context.state,
            data=load_site_tensors(settings, site),
            settings=settings,
            budget=site_budget(settings, node_config, site.site_index),
            site_index=site.site_index,
            signing_key=signing_key,
            model_hash=model_hash,
        )
        if store is not None:
            for i, record in enumerate(store.previous_records(run_id, server_round)):
                content.config_records[f"{PREVIOUS_PREFIX}{i}"] = record
            # Durable before the reply can leave: a crash after this point is answered by a replay.
            store.commit(run_id, server_round, model_hash, context.state, content)
        return Message(content=content, reply_to=msg)

    return client_app


def _site_store(
    node_config: Mapping[str, object], state_root: str | Path | None, site_index: int
) -> SiteStore | None:
    if node_config.get("state-dir"):
        return SiteStore(str(node_config["state-dir"]))
    if state_root is not None:
        return SiteStore(Path(state_root) / site_id(site_index))
    return None


app = build_client_app()
