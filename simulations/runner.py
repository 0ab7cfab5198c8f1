"""Run a federated simulation in-process on Flower's Simulation Engine (Ray).

Everything a run needs is checked in this process first (settings, datasets, caches), so a missing dataset
is one clear error before any Ray worker starts, and each virtual site then loads decoded arrays from the
cache instead of decoding 30k JPEGs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp.typing import Mod

from client.training.app import build_client_app
from client.training.site_policy import SitePolicies
from common.atomic import atomic_write_text
from common.config import RunSettings
from common.data.chips import dataset_chips
from common.data.fer2013 import load_fer2013
from common.data.lfw import load_lfw
from common.data.npz_sets import load_extended_yale_b
from common.data.orl import load_orl
from common.errors import ConfigError, FacefedError
from common.paths import data_dir as resolve_data_dir
from server.app import app as server_app

logger = logging.getLogger(__name__)

POLICY_FILE = "site-policies.json"


def warm_caches(settings: RunSettings) -> Path:
    """Check every dataset the run needs and build its decoded cache (with the pretrained face
    model, the sources' aligned chips too); return the data directory."""
    root = resolve_data_dir(settings.data_dir or None)
    load_fer2013("Training", data_dir=root)
    load_fer2013("PublicTest", data_dir=root)
    load_lfw(data_dir=root)
    if "orl" in settings.face_source_list:
        load_orl(data_dir=root)
    if "eyaleb" in settings.face_source_list:
        load_extended_yale_b(data_dir=root)
    if settings.face_model == "pretrained":
        # Every site trains on aligned chips of these faces. Built here once, with both cores,
        # rather than by each simulation worker at once in round 1.
        for source in settings.face_source_list:
            dataset_chips(source, data_dir=root)
    return root


def _site_policies(out: Path, settings: RunSettings, given: SitePolicies | None) -> SitePolicies:
    """The sites' policies: ``given`` (or the defaults) for a new run, the stored ones on resume."""
    path = out / POLICY_FILE
    if settings.resume and path.exists():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path} is unreadable ({exc}); restore it to resume the run"
            ) from None
        return SitePolicies.from_table(table, str(path))
    policies = given or SitePolicies()
    atomic_write_text(path, json.dumps(policies.to_table(), indent=2))
    return policies


def backend_config(num_cpus: int | None) -> dict[str, Any]:
    """One CPU per virtual site; Ray gets the machine's CPUs (or ``num_cpus``), or with ``RAY_ADDRESS``
    set, the existing Ray cluster's (docs/ray-cluster.md)."""
    cpus = _local_cpus(num_cpus)
    if address := os.environ.get("RAY_ADDRESS"):  # Ray refuses num_cpus when attaching to a cluster
        return {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": address},
        }
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }


def _local_cpus(num_cpus: int | None) -> int:
    return num_cpus or os.cpu_count() or 1


def dispatch_window(settings: RunSettings, num_cpus: int | None) -> int:
    """The run's ``dispatch-window``, or 4 messages per local Ray CPU (one site per CPU at a time).

    Flower's simulation engine rescans every undelivered message for each site on every poll; with
    a whole 100-site cohort queued that held the coordinator process's GIL ~30% of the round. A few
    messages per actor keep every actor busy. Unknown on a Ray cluster: there it stays as set.
    """
    if settings.dispatch_window or os.environ.get("RAY_ADDRESS"):
        return settings.dispatch_window
    return 4 * _local_cpus(num_cpus)


def simulate(
    settings: RunSettings,
    num_cpus: int | None = None,
    outer_mods: Sequence[Mod] = (),
    site_policies: SitePolicies | None = None,
) -> dict[str, Any]:
    """Run the simulation; return the parsed ``results.json``. Raises FacefedError if the run failed.

    ``site_policies`` are the simulated sites' own privacy policies (default: :class:`SitePolicy`'s
    defaults for every site). They are kept in ``OUT/site-policies.json`` for a resumed run.
    """
    # Imported here: the private entry point is the only one that accepts the ServerApp's context (the
    # public run_simulation() gives every app an empty run config); ClientApps get theirs injected.
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    root = warm_caches(settings)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    if not settings.resume:
        results_path.unlink(missing_ok=True)
    policies = _site_policies(out, settings, site_policies)
    flat = {
        **settings.to_flat(),
        "data-dir": str(root),
        "out-dir": str(out.resolve()),
        "dispatch-window": dispatch_window(settings, num_cpus),
    }

    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(flat)
    )
    _run_simulation(
        num_supernodes=settings.num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=build_client_app(
            flat,
            state_root=out.resolve() / "sites",
            outer_mods=outer_mods,
            site_policies=policies,
            research=True,
        ),
        server_app=server_app,
        backend_config=backend_config(num_cpus),
        server_app_context=context,
    )
    if not results_path.exists():
        raise FacefedError(
            f"the simulation ended without writing {results_path}; see the log above"
        )
    results: dict[str, Any] = json.loads(results_path.read_text())
    if results.get("status") == "stopped":  # budgets exhausted: a clean, designed stop
        logger.warning("%s", results.get("error"))
    elif results.get("status") != "completed":
        raise FacefedError(
            f"the simulation failed: {results.get('error') or 'unknown error'} "
            f"(details in {results_path})"
        )
    return results
