"""The facefed ClientApp: unpack the message, run the local round, reply. Logic lives in client/round.py.

``app`` is the ClientApp a deployed SuperNode loads (its run config comes from ``flwr run``).
:func:`build_client_app` makes one with a run config injected, for the in-process simulation engine,
which gives ClientApps no run config of their own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.round import round_from_config, run_round, site_budget
from client.site_data import SiteSpec, load_site_tensors
from common.config import Scalar, parse_run_config


def build_client_app(injected_config: Mapping[str, Scalar] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``injected_config`` overlaid with the context's own."""
    client_app = ClientApp()
    injected = dict(injected_config or {})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train both models locally with DP-SGD; return the shared weights and privacy metrics."""
        torch.set_num_threads(1)  # one CPU per site process; Ray sizes actors with num_cpus=1
        settings = parse_run_config({**injected, **context.run_config})
        node_config = dict(context.node_config)
        site = SiteSpec.from_node_config(node_config, settings)
        content = run_round(
            arrays=msg.content.array_records["arrays"],
            server_round=round_from_config(msg.content.config_records["config"]),
            state=context.state,
            data=load_site_tensors(settings, site),
            settings=settings,
            budget=site_budget(settings, node_config),
            site_index=site.partition_id,
        )
        return Message(content=content, reply_to=msg)

    return client_app


app = build_client_app()
