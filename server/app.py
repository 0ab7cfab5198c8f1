"""The facefed ServerApp: parse the run config once, hand over to server/run.py."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from server.run import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated training of both models."""
    run_federation(grid, parse_run_config(context.run_config))
