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
