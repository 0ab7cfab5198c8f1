"""``facefed deploy status``: one screen on a kit's health, and whether anything is down.

For a **coordinator kit**: the SuperLink (Flower 1.41's ``GET /health`` on the loopback control port,
over TLS verified against the kit's CA), the public Fleet gateway (a TLS handshake with a certificate
from the kit's CA, and no request, which the gateway would log as refused), the ServerApp (a run in
flight or idle), every site of the kit with its last-seen time, and the last run. For a **site kit**: the SuperNode and whether
the coordinator's public port answers with a certificate from the kit's CA.

Each service's state comes from systemd (``systemctl is-active``) when a unit for *this* kit is
installed (its ``WorkingDirectory`` is the kit), else from a process probe (``/proc``: the Flower
process started from this kit) and a port probe. Every probe is a :class:`Probes` method, so the
unit tests replace them. The kit is healthy when no check is ``DOWN``; informational lines (the last
run, a revoked site) never make it unhealthy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.errors import FacefedError

State = Literal["up", "down", "info"]
UNKNOWN_WHILE_DOWN = "unknown while the SuperLink is down"


@dataclass(frozen=True)
class Check:
    """One line of the screen: a service or fact, its state and what was seen."""

    name: str
    state: State
    detail: str


def healthy(checks: Sequence[Check]) -> bool:
    """True when nothing is down."""
    return all(c.state != "down" for c in checks)


def render(title: str, checks: Sequence[Check], hint: str) -> str:
    """The screen: a title, one aligned line per check, and a verdict (with ``hint`` if down)."""
    width = max((len(c.name) for c in checks), default=0)
    label = {"up": "up", "down": "DOWN", "info": "-"}
    lines = [title, *(f"  {c.name:<{width}}  {label[c.state]:<4}  {c.detail}" for c in checks)]
    down = [c.name for c in checks if c.state == "down"]
    lines.append(f"down: {', '.join(down)}; {hint}" if down else "healthy")
    return "\n".join(lines)


def parse_systemctl_show(text: str) -> dict[str, str]:
    """``systemctl show -p A -p B UNIT`` output (``A=value`` lines) as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def unit_state(show: Mapping[str, str], kit: Path) -> str | None:
    """The unit's ``ActiveState`` if it is installed for ``kit``; None if it is not (or elsewhere)."""
    if show.get("LoadState") != "loaded":
        return None
    if Path(show.get("WorkingDirectory", "") or "/").resolve() != kit.resolve():
        return None
    return show.get("ActiveState") or "unknown"


def last_run(runs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recently submitted run of ``flwr ls --format json`` (run ids are not ordered)."""
    return max(runs, key=lambda r: str(r.get("pending-at") or ""), default=None)


def in_flight(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Runs that are pending, starting or running."""
    return [r for r in runs if not str(r.get("status", "")).startswith("finished")]


class Probes:
    """The outside world: systemd, /proc, TCP/TLS ports. Tests replace these methods."""

    def systemd(self, unit: str) -> dict[str, str] | None:
        """``LoadState``, ``ActiveState``, ``WorkingDirectory`` of ``unit``; None without systemd."""
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            return None
        props = ["-p", "LoadState", "-p", "ActiveState", "-p", "WorkingDirectory"]
        try:
            proc = subprocess.run(
                [systemctl, "show", *props, unit], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return parse_systemctl_show(proc.stdout) if proc.returncode == 0 else None

    def processes(self) -> list[list[str]]:
        """The command line of every process this user can see (``/proc/*/cmdline``)."""
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                raw = (entry / "cmdline").read_bytes()
                if raw:
                    found.append(raw.decode(errors="replace").rstrip("\0").split("\0"))
        return found

    def https(self, host: str, port: int, path: str, ca: Path) -> tuple[int, bytes]:
        """``GET path`` over TLS verified against ``ca`` (for the name ``host``): (status, body).

        Raises:
            OSError: refused, timed out, or the TLS check failed (``ssl.SSLError`` is an OSError).
        """
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(host, port, timeout=5.0, context=context)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read(4096)
        except http.client.HTTPException as exc:
            raise OSError(f"not an HTTP server ({type(exc).__name__})") from exc
        finally:
            conn.close()

    def tls(self, host: str, port: int, ca: Path) -> None:
        """A TLS handshake with ``host:port``, its certificate verified against ``ca`` for ``host``.

        No request is sent: the gateway logs every non-Fleet request it refuses, and a status probe
        must not fill that log.

        Raises:
            OSError: refused, timed out, or the TLS check failed (``ssl.SSLError`` is an OSError).
        """
        context = ssl.create_default_context(cafile=str(ca))
        with (
            socket.create_connection((host, port), timeout=5.0) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return

    def tcp(self, host: str, port: int) -> bool:
        """Whether ``host:port`` accepts a TCP connection."""
        try:
            with socket.create_connection((host, port), timeout=3.0):
                return True
        except OSError:
            return False


def why(exc: BaseException) -> str:
    """An OSError in a few words: ``connection refused``, ``certificate verify failed``, ..."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message or 'certificate verify failed'}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "no answer (timeout)"
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def service(
    name: str,
    *,
    unit: str,
    kit: Path,
    probes: Probes,
    process: Callable[[list[str]], bool],
    probe: Callable[[], tuple[bool, str]],
) -> Check:
    """A service's state: systemd's word if a unit runs this kit, the process and the probe."""
    show = probes.systemd(unit)
    active = unit_state(show, kit) if show is not None else None
    running = any(process(cmd) for cmd in probes.processes())
    answers, seen = probe()
    source = (
        f"systemd {unit}: {active}"
        if active is not None
        else ("process running" if running else "no process")
    )
    if active is not None and active != "active":
        return Check(name, "down", f"{source}; {seen}")
    return Check(name, "up" if answers else "down", f"{seen}; {source}")


def format_last_seen(row: Mapping[str, Any], now: dt.datetime) -> str:
    """``online``, ``offline since 21:35``, ``never connected``, ``revoked``, ``not registered``."""
    from server.deploy_watch import site_absence

    return "online" if row.get("status") == "online" else site_absence(row, now)


def site_checks(rows: Sequence[Mapping[str, Any]], now: dt.datetime) -> list[Check]:
    """One check per kit site (``deploy nodes`` rows with a site name); revoked or unregistered
    sites are information, never down."""
    checks = []
    for row in rows:
        site = row.get("site")
        if not site:
            continue
        status = row.get("status")
        gone = status in {"revoked", "unregistered", "deleted"}  # not part of the federation
        state: State = "up" if status == "online" else "info" if gone else "down"
        node = f" (node {row['node-id']})" if row.get("node-id") else ""
        checks.append(Check(f"site {site}", state, format_last_seen(row, now) + node))
    return checks


def run_check(
    runs: Sequence[Mapping[str, Any]], results: Mapping[str, Any] | None
) -> tuple[Check, Check]:
    """(ServerApp, last run) from ``flwr ls`` and the kit's ``results.json`` (parsed, or None)."""
    flying = in_flight(runs)
    if flying:
        ids = ", ".join(f"{r.get('run-id')} ({r.get('status')})" for r in flying)
        serverapp = Check("ServerApp", "up", f"run {ids} in flight")
    else:
        serverapp = Check("ServerApp", "info", "idle: no run in flight")
    last = last_run(runs)
    if last is None:
        return serverapp, Check("last run", "info", "none yet")
    detail = f"run {last.get('run-id')}: {last.get('status')}"
    if last.get("elapsed") is not None:
        detail += f", {last.get('elapsed')} s"
    if (details := last.get("status-details")) and details != "N/A":  # flwr: N/A for none
        detail += f" ({' '.join(str(details).split())[:100]})"
    if results is not None:
        rounds = results.get("rounds") or []
        wanted = (results.get("config") or {}).get("num-rounds", "?")
        detail += f"; results.json: {len(rounds)}/{wanted} rounds, {results.get('status')}"
    return serverapp, Check("last run", "info", detail)


def _probe_https(
    probes: Probes, host: str, port: int, ca: Path, judge: Callable[[int, bytes], tuple[bool, str]]
) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        where = f"https://{host}:{port}"
        try:
            status, body = probes.https(host, port, "/health", ca)
        except OSError as exc:
            return False, f"{where}: {why(exc)}"
        ok, seen = judge(status, body)
        return ok, f"{where}: {seen}"

    return probe


def _superlink_health(status: int, _body: bytes) -> tuple[bool, str]:
    return status == 200, f"/health {status}" + ("" if status == 200 else " (expected 200)")


def _probe_tls(probes: Probes, host: str, port: int, ca: Path) -> Callable[[], tuple[bool, str]]:
    def probe() -> tuple[bool, str]:
        where = f"{host}:{port}"
        try:
            probes.tls(host, port, ca)
        except OSError as exc:
            return False, f"{where}: {why(exc)}"
        return True, f"{where}: TLS handshake, certificate from the kit's CA"

    return probe


def _cmd_has(*parts: str) -> Callable[[list[str]], bool]:
    """A process whose command line holds every one of ``parts`` (as words)."""
    return lambda cmd: (
        any(parts[0] in word for word in cmd[:3]) and all(p in cmd for p in parts[1:])
    )


def coordinator_checks(
    kit: Path,
    cfg: Any,
    probes: Probes,
    *,
    nodes: Callable[[], Sequence[Mapping[str, Any]]],
    runs: Callable[[], Sequence[Mapping[str, Any]]],
    results: Mapping[str, Any] | None,
    now: dt.datetime,
) -> list[Check]:
    """The coordinator kit's checks (``cfg``: its :class:`server.deploy.CoordinatorConfig`)."""
    kit = kit.resolve()
    ca = kit / "certs" / "ca.crt"
    unit = "facefed-coordinator.service"
    superlink = service(
        "SuperLink", unit=unit, kit=kit, probes=probes,
        process=_cmd_has("flower-superlink", "--database", str(kit / "state" / "superlink.db")),
        probe=_probe_https(probes, "127.0.0.1", cfg.control_port, ca, _superlink_health),
    )  # fmt: skip
    public = "127.0.0.1" if cfg.bind in {"0.0.0.0", "::", ""} else cfg.bind
    gateway = service(
        "gateway", unit=unit, kit=kit, probes=probes,
        process=_cmd_has("python", "gateway", str(kit)),
        probe=_probe_tls(probes, public, cfg.port, ca),
    )  # fmt: skip
    checks = [superlink, gateway]
    if superlink.state != "up":
        checks.append(Check("ServerApp", "info", UNKNOWN_WHILE_DOWN))
        checks += [Check(f"site {s}", "info", UNKNOWN_WHILE_DOWN) for s in cfg.sites]
        checks.append(Check("last run", "info", _results_only(results)))
        return checks
    try:
        checks += site_checks(nodes(), now)
        checks += run_check(runs(), results)
    except FacefedError as exc:
        checks.append(Check("flwr", "down", f"the Control API does not answer: {exc}"))
    return checks


def _results_only(results: Mapping[str, Any] | None) -> str:
    if results is None:
        return f"{UNKNOWN_WHILE_DOWN}; no results.json in the kit's out-dir"
    rounds = results.get("rounds") or []
    wanted = (results.get("config") or {}).get("num-rounds", "?")
    return f"results.json: {len(rounds)}/{wanted} rounds, {results.get('status')}"


def site_kit_checks(kit: Path, cfg: Any, probes: Probes) -> list[Check]:
    """The site kit's checks (``cfg``: its :class:`server.deploy.SiteConfig`, local.toml applied)."""
    kit = kit.resolve()
    key = str(kit / "keys" / "supernode.key")
    supernode = service(
        "SuperNode", unit="facefed-site.service", kit=kit, probes=probes,
        process=_cmd_has("flower-supernode", "--auth-supernode-private-key", key),
        probe=lambda: (
            probes.tcp("127.0.0.1", cfg.runtime_port),
            f"runtime port 127.0.0.1:{cfg.runtime_port} "
            + ("listening" if probes.tcp("127.0.0.1", cfg.runtime_port) else "closed"),
        ),
    )  # fmt: skip
    if supernode.state == "down" and "process running" in supernode.detail:
        # started with --runtime-port N: the process is the better witness
        supernode = Check("SuperNode", "up", supernode.detail)
    host, _, port = cfg.superlink.rpartition(":")
    link = _probe_tls(probes, host.strip("[]"), int(port), kit / "certs" / "ca.crt")()
    return [supernode, Check("coordinator", "up" if link[0] else "down", link[1])]
