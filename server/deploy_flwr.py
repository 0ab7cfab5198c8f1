"""The ``flwr`` CLI run with ``--format json``, judged by what it prints, never by its exit code.

Flower 1.41's ``flwr`` exits 0 even when a command failed (``{"success": false, ...}``) and even
when the run it started later fails; so every call here parses the JSON and raises on
``success: false``, and a run's outcome is read from ``flwr ls --run-id ID --format json``
(``finished:completed``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import FacefedError
from server import deploy, deploy_publisher

logger = logging.getLogger(__name__)

RUN_COMPLETED = "finished:completed"
ALREADY_REGISTERED = "Public key already in use"


class FlwrError(FacefedError):
    """A ``flwr`` CLI call reported failure."""


def call(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON document.

    Raises:
        FlwrError: if the command reports ``success: false``, prints no JSON, or times out.
    """
    cmd = [deploy._flwr_bin("flwr"), *args, "--format", "json"]
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FlwrError(
            f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s; check that the "
            "SuperLink is running and reachable"
        ) from exc
    start = proc.stdout.find("{")
    try:
        doc = json.loads(proc.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FlwrError(
            f"`flwr {' '.join(args)}` printed no JSON (exit {proc.returncode}): {tail[0]}"
        )
    if not doc.get("success", False):
        message = " ".join(str(doc.get("error-message", "unknown error")).split())
        raise FlwrError(f"`flwr {' '.join(args)}` failed: {message}")
    return doc


def list_nodes(env: Mapping[str, str], *, timeout: float = 60.0) -> list[dict[str, Any]]:
    """SuperNodes known to the SuperLink, each with ``node-id`` and ``status`` (online, ...)."""
    return list(call(["supernode", "list", deploy.CONNECTION], env, timeout=timeout)["nodes"])


def wait_for_superlink(env: Mapping[str, str], *, timeout: float = 60.0, poll: float = 0.5) -> None:
    """Block until the SuperLink's Control API answers over TLS.

    Raises:
        FlwrError: if it does not answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            list_nodes(env, timeout=max(5.0, deadline - time.monotonic()))
            return
        except FlwrError as exc:
            if time.monotonic() >= deadline:
                raise FlwrError(f"SuperLink did not come up within {timeout:.0f} s: {exc}") from exc
        time.sleep(poll)


def register(env: Mapping[str, str], public_key: Path, name: str) -> int | None:
    """Register a site's public key; return its node id, or None if it was registered before."""
    try:
        doc = call(
            ["supernode", "register", str(public_key), deploy.CONNECTION, "--name", name], env
        )
    except FlwrError as exc:
        if ALREADY_REGISTERED in str(exc):
            logger.info("site %s: key already registered", name)
            return None
        raise
    return int(doc["node-id"])


def unregister(env: Mapping[str, str], node_id: int) -> None:
    """Unregister (revoke) a SuperNode by node id."""
    call(["supernode", "unregister", str(node_id), deploy.CONNECTION], env)


def submit(
    env: Mapping[str, str],
    fab: deploy_publisher.SignedFab,
    *,
    hub_port: int,
    run_config: Sequence[str] = (),
    federation: str | None = None,
) -> int:
    """Start a run of a signed bundle; return the run id (the run is NOT finished).

    The bundle is served with its signature on facefed's loopback hub for as long as ``flwr run
    @publisher/app==x.y.z`` takes: that is how Flower's SuperLink attaches a signature that the
    sites verify (:mod:`server.deploy_publisher`).
    """
    args = ["run", fab.app_spec, deploy.CONNECTION]
    for item in run_config:
        args += ["--run-config", item]
    if federation:
        args += ["--federation", federation]
    with deploy_publisher.serve_hub(fab, hub_port):
        doc = call(args, env, timeout=300.0)
    return int(doc["run-id"])


def run_status(env: Mapping[str, str], run_id: int) -> dict[str, Any]:
    """The ``flwr ls --run-id`` record of one run (e.g. status ``finished:failed``)."""
    runs = call(["ls", deploy.CONNECTION, "--run-id", str(run_id)], env)["runs"]
    if not runs:
        raise FlwrError(f"run {run_id} is unknown to the SuperLink")
    return dict(runs[0])


def wait_for_run(
    env: Mapping[str, str],
    run_id: int,
    *,
    timeout: float,
    poll: float = 2.0,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll until the run reaches a ``finished:*`` status; return its last record.

    ``on_poll`` sees every record, the last one included (e.g. :class:`server.deploy_watch.RunWatch`).

    Raises:
        FlwrError: if it has not finished within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        record = run_status(env, run_id)
        if on_poll is not None:
            on_poll(record)
        if str(record.get("status", "")).startswith("finished"):
            return record
        if time.monotonic() >= deadline:
            raise FlwrError(
                f"run {run_id} still {record.get('status')} after {timeout:.0f} s; "
                f"follow it with `flwr log {run_id} {deploy.CONNECTION}`, stop it with `flwr stop`"
            )
        time.sleep(poll)
