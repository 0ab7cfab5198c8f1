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


def non_loopback_ipv4() -> str:
    """An IPv4 address of one of this machine's own interfaces that is not loopback.

    Read from the interfaces (``SIOCGIFADDR``), so no packet leaves the machine. Tests that play a
    remote party dial this address; the test is skipped on a machine without one.
    """
    import fcntl
    import struct

    import pytest

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name[:15].encode())
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue
            address = socket.inet_ntoa(packed[20:24])
            if not address.startswith("127."):
                return address
    pytest.skip("this machine has no non-loopback IPv4 address to play a remote party from")


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` is listening on (Linux ``/proc``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints the address as host-order 32-bit words
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


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
        """The operator's ``flwr`` environment on the coordinator host (Control API on loopback)."""
        return deploy.flwr_env(self.coordinator)

    @property
    def hub_port(self) -> int:
        return deploy.load_coordinator(self.coordinator).hub_port


def provision_loopback(out: Path, sites: Sequence[str], **plan_kwargs: object) -> Federation:
    """Provision kits for a coordinator on 127.0.0.1 at free ports."""
    port = free_port()
    plan = deploy_provision.ProvisionPlan(
        **{  # type: ignore[arg-type]
            "out": out,
            "coordinator_host": "127.0.0.1",
            "bind": "127.0.0.1",
            "port": port,
            "control_port": free_port(),
            "hub_port": free_port(),
            "sites": tuple(sites),
            "data_dir": str(out / "data"),
            **plan_kwargs,
        }
    )
    deploy_provision.provision(plan)
    coordinator = deploy_provision.coordinator_dir(out)
    deploy.write_connection(coordinator, deploy.load_coordinator(coordinator))
    (out / "data").mkdir(exist_ok=True)
    return Federation(out=out, port=port, sites=tuple(sites))


def _wait_listening(
    procs: Procs, proc: subprocess.Popen[bytes], name: str, host: str, port: int
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1.0):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} did not listen on {host}:{port}: {procs.log(name)[-2000:]}")


def start_superlink(
    procs: Procs, fed: Federation, *, extra: Sequence[str] = (), verified_wait: bool = True
) -> subprocess.Popen[bytes]:
    """Start the coordinator kit's SuperLink (loopback) and its Fleet gateway; wait until both serve.

    ``verified_wait`` waits for the Control API through ``flwr`` (TLS verified); without it, for the
    TCP ports to accept (for servers whose certificate is deliberately bad).
    """
    cfg = deploy.load_coordinator(fed.coordinator)
    proc = procs.start(
        "superlink",
        [*deploy.superlink_command(fed.coordinator, cfg), *extra],
        deploy.superlink_env(fed.coordinator, cfg),
    )
    gateway = procs.start("gateway", deploy.gateway_command(fed.coordinator), fed.env)
    if verified_wait:
        deploy_flwr.wait_for_superlink(fed.env, timeout=STARTUP_TIMEOUT_S)
    else:
        _wait_listening(procs, proc, "superlink", deploy.LOOPBACK, cfg.control_port)
    _wait_listening(procs, gateway, "gateway", cfg.bind, cfg.port)
    return proc


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
