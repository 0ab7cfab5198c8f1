"""A run's output directory as the coordinator's durable state: what ``--resume`` continues from.

* ``run.json`` (written atomically when a run starts): the run id and the full flat config. A resumed
  run must ask for exactly that config; the run id keeps the ledger and the sites' stored rounds apart
  from any other run's.
* ``checkpoints/round_NNN.ckpt`` (checksummed, atomic; :mod:`common.checkpoint`): after each completed
  round, the global model plus the coordinator's state: the exact arrays sent next (so every site sees
  the same model hash again), the cohort sampler's generator state, the server optimiser's moments and
  the per-round results so far.
* ``ledger.db`` and ``sites/``: the privacy ledger, and each simulated site's own durable state.

Resuming picks the newest checkpoint that verifies; a corrupt one is named and the previous one used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.atomic import atomic_write_text
from common.checkpoint import read_checkpoint
from common.config import RunSettings
from common.errors import ConfigError, FacefedError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
_CKPT = re.compile(r"round_(\d{3,})\.ckpt")
PRODUCTS = ("run.json", "results.json", "ledger.db", "ledger.db-wal", "ledger.db-shm")
PRODUCT_DIRS = ("checkpoints", "sites", "keys")


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run continues: after ``round`` (0: before the first round)."""

    run_id: str
    round: int
    arrays: ArrayRecord | None  # None at round 0: rebuild the seeded initial model
    server: dict[str, Any]


def start_run(out: Path, settings: RunSettings) -> str:
    """Begin a fresh run in ``out``: archive any earlier run there, write ``run.json``; the run id."""
    _archive_previous(out)
    run_id = uuid.uuid4().hex
    config = {k: v for k, v in settings.to_flat().items() if k != "resume"}
    atomic_write_text(out / RUN_FILE, json.dumps({"run_id": run_id, "config": config}, indent=2))
    return run_id


def stored_config(out: Path) -> dict[str, Any]:
    """The flat config the run in ``out`` was started with."""
    return dict(_read_run_file(out)["config"])


def resume_point(out: Path, settings: RunSettings) -> ResumePoint:
    """The newest usable checkpoint of the run in ``out`` (or round 0 if none was written).

    Raises:
        ConfigError: nothing to resume, or ``settings`` differ from the run's own config.
    """
    run = _read_run_file(out)
    asked = {k: v for k, v in settings.to_flat().items() if k != "resume"}
    changed = sorted(k for k in asked if k != "out-dir" and asked[k] != run["config"].get(k))
    if changed:
        raise ConfigError(
            f"cannot resume {out} with a different config ({', '.join(changed[:5])} changed); "
            "a resumed run must be the same run: use `facefed simulate --resume OUT` alone"
        )
    for path in sorted(_checkpoints(out), reverse=True):
        try:
            payload = read_checkpoint(path)
            if "server" not in payload:
                raise FacefedError(f"{path.name} carries no coordinator state")
        except FacefedError as exc:
            logger.warning("checkpoint %s is unusable (%s); trying the one before it", path, exc)
            continue
        server = dict(payload["server"])
        arrays = ArrayRecord(
            {k: Array(np.ascontiguousarray(t.numpy())) for k, t in server.pop("arrays").items()}
        )
        logger.info("resuming run %s after round %d (%s)", run["run_id"], payload["round"], path)
        return ResumePoint(str(run["run_id"]), int(payload["round"]), arrays, server)
    logger.info("resuming run %s from its start (no usable checkpoint)", run["run_id"])
    return ResumePoint(str(run["run_id"]), 0, None, {})


def server_state(
    arrays: ArrayRecord, sampling: dict[str, Any], moments: dict[str, Any], history: dict[str, Any]
) -> dict[str, Any]:
    """The coordinator's state after a round, in the form checkpoints store (tensors and text)."""
    return {
        "arrays": {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()},
        "sampling": json.dumps(sampling),
        "moments": {
            name: {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
            for name, value in moments.items()
        },
        "history": json.dumps(history),
    }


def _read_run_file(out: Path) -> dict[str, Any]:
    path = out / RUN_FILE
    try:
        run = json.loads(path.read_text())
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ValueError("not a facefed run file")
        str(run["run_id"])
    except FileNotFoundError:
        raise ConfigError(
            f"nothing to resume in {out}: no {RUN_FILE}; start the run without --resume"
        ) from None
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); the run cannot be resumed") from None
    return run


def _checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return [p for p in folder.iterdir() if _CKPT.fullmatch(p.name)] if folder.is_dir() else []


def _archive_previous(out: Path) -> None:
    """Move an earlier run's products into ``out/archive/<time>/`` (nothing stored is ever lost)."""
    present = [out / n for n in (*PRODUCTS, *PRODUCT_DIRS) if (out / n).exists()]
    if not present:
        return
    target = out / "archive" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    for path in present:
        shutil.move(str(path), target / path.name)
    logger.warning("%s held an earlier run; moved it to %s", out, target)
