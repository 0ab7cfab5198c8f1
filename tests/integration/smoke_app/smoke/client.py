"""Deployment smoke ClientApp: echoes the facefed node_config keys after type checks."""

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    if not isinstance(cfg["max-epsilon"], float) or not Path(str(cfg["data-dir"])).is_dir():
        raise ValueError(f"bad node_config {dict(cfg)}")
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()[0] + 1.0
    site = ConfigRecord({"site-id": str(cfg["site-id"]), "data-dir": str(cfg["data-dir"])})
    return Message(RecordDict({"arrays": ArrayRecord([arrays]), "site": site}), reply_to=msg)
