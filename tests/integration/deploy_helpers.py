"""Helpers for deployment tests: real Flower processes on 127.0.0.1 that are all stopped.

Every process is started through :class:`Procs`, whose fixture stops the whole process tree (the
SuperLink / SuperNode, the SuperExec each one spawns in its own session, and the app processes those
spawn) in a ``finally`` block, so a failing or interrupted test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from server import deploy, deploy_flwr, deploy_provision

STARTUP_TIMEOUT_S = 120.0  # the CI box has 2 shared cores; a cold SuperLink can take ~15 s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(roots: Sequence[int]) -> list[int]:
    tree, seen, stack = _children(), [], list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.append(pid)
            stack.extend(tree.get(pid, []))
    return seen


class Procs:
    """Processes started by one test (or module); :meth:`stop_all` ends every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session with output to ``<log_dir>/<name>.log``."""
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The output so far of the process started as ``name``."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM every started process and its descendants, then SIGKILL what is left."""
        pids = _descendants([p.pid for p in self.procs])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid in _descendants([p.pid for p in self.procs]) + pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        self.procs.clear()


@dataclass(frozen=True)
class Federation:
    """A provisioned loopback federation: kits on disk, the SuperLink port, the ``flwr`` env."""

    out: Path
    port: int
    sites: tuple[str, ...]

    @property
    def coordinator(self) -> Path:
        return deploy_provision.coordinator_dir(self.out)

    def site(self, site_id: str) -> Path:
        return deploy_provision.site_dir(self.out, site_id)

    @property
    def env(self) -> dict[str, str]:
        return deploy.flwr_env(self.coordinator)


def provision_loopback(out: Path, sites: Sequence[str], **plan_kwargs: object) -> Federation:
    """Provision kits for a coordinator on 127.0.0.1 at a free port."""
    port = free_port()
    plan = deploy_provision.ProvisionPlan(
        out=out,
        coordinator_host="127.0.0.1",
        bind="127.0.0.1",
        port=port,
        sites=tuple(sites),
        data_dir=str(out / "data"),
        **plan_kwargs,  # type: ignore[arg-type]
    )
    deploy_provision.provision(plan)
    (out / "data").mkdir(exist_ok=True)
    return Federation(out=out, port=port, sites=tuple(sites))


def start_superlink(
    procs: Procs, fed: Federation, *, extra: Sequence[str] = (), verified_wait: bool = True
) -> subprocess.Popen[bytes]:
    """Start the SuperLink from the coordinator kit and wait until it serves.

    ``verified_wait`` waits for the Control API through ``flwr`` (TLS verified); without it, for the
    TCP port to accept (for servers whose certificate is deliberately bad).
    """
    cfg = deploy.load_coordinator(fed.coordinator)
    proc = procs.start(
        "superlink", [*deploy.superlink_command(fed.coordinator, cfg), *extra], fed.env
    )
    if verified_wait:
        deploy_flwr.wait_for_superlink(fed.env, timeout=STARTUP_TIMEOUT_S)
        return proc
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", fed.port), 1.0):
            return proc
        time.sleep(0.5)
    raise AssertionError(
        f"SuperLink did not listen on {fed.port}: {procs.log('superlink')[-2000:]}"
    )


def supernode_command(
    fed: Federation,
    site_id: str,
    *,
    data_dir: Path | None = None,
    superlink: str | None = None,
    bounded: bool = False,
) -> list[str]:
    """The site kit's ``flower-supernode`` command, on a free runtime port.

    ``bounded`` adds ``--max-retries 1 --max-wait-time 10`` so a refused SuperNode exits instead of
    retrying forever.
    """
    cfg = deploy.load_site(fed.site(site_id))
    cfg = replace(
        cfg,
        runtime_port=free_port(),
        data_dir=str(data_dir or cfg.data_dir),
        superlink=superlink or cfg.superlink,
    )
    cmd = deploy.supernode_command(fed.site(site_id), cfg)
    return [*cmd, "--max-retries", "1", "--max-wait-time", "10"] if bounded else cmd


def wait_online(env: dict[str, str], count: int, timeout: float = STARTUP_TIMEOUT_S) -> list[str]:
    """Wait until ``count`` SuperNodes are online; return their node ids."""
    deadline = time.monotonic() + timeout
    while True:
        online = [n["node-id"] for n in deploy_flwr.list_nodes(env) if n["status"] == "online"]
        if len(online) >= count or time.monotonic() > deadline:
            return online
        time.sleep(1.0)


def run_until_exit(
    procs: Procs, name: str, cmd: Sequence[str], env: dict[str, str], timeout: float = 90.0
) -> tuple[int | None, str]:
    """Start ``cmd`` and wait for it to exit; return (exit code or None on timeout, its log)."""
    proc = procs.start(name, cmd, env)
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, procs.log(name)
