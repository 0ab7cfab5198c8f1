"""Deployment smoke ServerApp: rounds of add-one, checks every site's node_config came through."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["fail"]:
        raise RuntimeError("smoke app asked to fail")
    expected = set(str(cfg["expected-sites"]).split(","))
    deadline = time.monotonic() + 120
    while len(nodes := list(grid.get_node_ids())) < len(expected):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} nodes connected")
        time.sleep(1)
    weights = np.zeros(3)
    for server_round in range(1, int(cfg["num-server-rounds"]) + 1):
        out = [
            Message(
                RecordDict({"arrays": ArrayRecord([weights])}), dst_node_id=n, message_type="train"
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(out, timeout=120))
        if len(replies) != len(nodes) or any(r.has_error() for r in replies):
            raise RuntimeError(
                f"round {server_round}: bad replies {[r.error for r in replies if r.has_error()]}"
            )
        sites = {str(r.content["site"]["site-id"]) for r in replies}
        if sites != expected:
            raise RuntimeError(f"round {server_round}: sites {sites} != {expected}")
        weights = np.mean(
            [r.content.array_records["arrays"].to_numpy_ndarrays()[0] for r in replies], axis=0
        )
    if not np.allclose(weights, float(cfg["num-server-rounds"])):
        raise RuntimeError(f"final weights {weights}")
