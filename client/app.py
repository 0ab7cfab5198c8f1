"""The facefed ClientApp: unpack the message, run the local round, reply. Logic lives in client/round.py.

``app`` is the ClientApp a deployed SuperNode loads (its run config comes from ``flwr run``).
:func:`build_client_app` makes one with a run config injected, for the in-process simulation engine,
which gives ClientApps no run config of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.egress import EgressGuard, guard_stats, make_egress_guard
from client.round import run_round, site_budget
from client.site_data import SiteSpec, load_site_tensors
from client.site_keys import site_signing_key
from common.config import Scalar, parse_run_config
from common.models import EmotionNet, FaceEmbedder
from common.serde import manifest


@functools.lru_cache(maxsize=4)
def _guard_for(face_width: int, emotion_width: int) -> EgressGuard:
    return make_egress_guard(manifest(FaceEmbedder(face_width), EmotionNet(emotion_width)))


def build_client_app(injected_config: Mapping[str, Scalar] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``injected_config`` overlaid with the context's own.

    Every reply passes the egress guard: only the agreed model arrays, scalar metrics and the signed
    privacy record may leave the site.
    """
    injected = dict(injected_config or {})

    def egress(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        settings = parse_run_config({**injected, **context.run_config})
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

    client_app = ClientApp(mods=[egress, central_clip])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train both models locally with DP-SGD; return the shared weights and privacy metrics."""
        torch.set_num_threads(1)  # one CPU per site process; Ray sizes actors with num_cpus=1
        settings = parse_run_config({**injected, **context.run_config})
        node_config = dict(context.node_config)
        site = SiteSpec.from_node_config(node_config, settings)
        content = run_round(
            arrays=msg.content.array_records["arrays"],
            train_config=msg.content.config_records["config"],
            state=context.state,
            data=load_site_tensors(settings, site),
            settings=settings,
            budget=site_budget(settings, node_config, site.site_index),
            site_index=site.site_index,
            signing_key=site_signing_key(context.state, node_config),
        )
        return Message(content=content, reply_to=msg)

    return client_app


app = build_client_app()
