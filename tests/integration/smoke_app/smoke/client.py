"""Deployment smoke ClientApp: echoes the facefed node_config keys after type checks.

Each time its code runs on a site it appends the run id to ``<state-dir>/smoke-runs.txt``, so a test
can tell that an app bundle was executed on the site (or, for a refused bundle, that it never was).
"""

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    state = Path(str(cfg["state-dir"]))
    state.mkdir(parents=True, exist_ok=True)
    with (state / "smoke-runs.txt").open("a") as marker:
        marker.write(f"{context.run_id}\n")
    if not isinstance(cfg["max-epsilon"], float) or not Path(str(cfg["data-dir"])).is_dir():
        raise ValueError(f"bad node_config {dict(cfg)}")
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()[0] + 1.0
    site = ConfigRecord({"site-id": str(cfg["site-id"]), "data-dir": str(cfg["data-dir"])})
    return Message(RecordDict({"arrays": ArrayRecord([arrays]), "site": site}), reply_to=msg)
