"""Build Flower messages with explicit metadata, as the runtime would, for tests that call apps and
strategies directly (a Message without metadata needs a running Flower task identity)."""

from __future__ import annotations

import time

from flwr.app import Message, MessageType, Metadata, RecordDict


def train_message(
    content: RecordDict,
    *,
    src_node_id: int = 0,
    dst_node_id: int = 1,
    message_id: str = "m1",
    reply_to: str = "",
) -> Message:
    """A TRAIN message from ``src_node_id`` to ``dst_node_id`` carrying ``content``."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def site_metrics(site_index: int = 0, **overrides: float | None) -> dict[str, float]:
    """The metrics of a site's training reply, as an honest DP site sends them (all of them).

    ``overrides`` replace or add keys (a key mapped to ``None`` is dropped), e.g.
    ``site_metrics(**{"num-examples": 10**9})`` for a reply that claims a weight.
    """
    metrics: dict[str, float] = {
        "site-index": site_index,
        "dp": 1,
        "epsilon": 1.0,
        "epsilon-lifetime": 1.5,
        "delta": 1e-5,
        "steps": 4,
        "noise-multiplier": 1.1,
        "secret-noise": 1,
        "egress-checked": 1,
        "egress-refused": 0,
    }
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}
