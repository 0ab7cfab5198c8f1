"""``facefed deploy status``: what systemd, /proc, the ports and ``flwr`` say, on one screen."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from common.cli import main
from server import deploy, deploy_status
from server.deploy_status import Check, Probes

NOW = dt.datetime(2026, 12, 2, 21, 40, tzinfo=dt.UTC)


class FakeProbes(Probes):
    """A coordinator whose SuperLink and gateway answer, unless told otherwise."""

    def __init__(
        self,
        *,
        superlink: int | None = 200,
        gateway: OSError | None = None,
        unit: dict[str, str] | None = None,
        procs: list[list[str]] | None = None,
    ) -> None:
        self.superlink, self.gateway, self.unit, self.procs = superlink, gateway, unit, procs or []

    def systemd(self, unit: str) -> dict[str, str] | None:
        return self.unit

    def processes(self) -> list[list[str]]:
        return self.procs

    def https(self, host: str, port: int, path: str, ca: Path) -> tuple[int, bytes]:
        assert port == 9091 and path == "/health"
        if self.superlink is None:
            raise ConnectionRefusedError()
        return self.superlink, b""

    def tls(self, host: str, port: int, ca: Path) -> None:
        assert port == 9093
        if self.gateway is not None:
            raise self.gateway

    def tcp(self, host: str, port: int) -> bool:
        return False


CFG = deploy.CoordinatorConfig(host="fl.example.org", sites=("site-1", "site-2", "site-3"))
ROWS = [
    {"site": "site-1", "node-id": "11", "status": "online"},
    {"site": "site-2", "node-id": "12", "status": "offline", "offline-at": "2026-12-02T21:35:00"},
    {"site": "site-3", "node-id": None, "status": "revoked"},
]
RUNS = [
    {"run-id": "9", "status": "finished:completed", "elapsed": 300, "pending-at": "2026-12-01T10:00",
     "status-details": "N/A"},
    {"run-id": "4", "status": "finished:failed", "elapsed": 12, "pending-at": "2026-12-02T09:00",
     "status-details": "only 1 of 2 sites connected within 600 s"},
]  # fmt: skip


def _checks(
    probes: Probes, rows: list[dict[str, Any]] = ROWS, runs: list[Any] = RUNS
) -> list[Check]:
    return deploy_status.coordinator_checks(
        Path("/opt/facefed-coordinator"), CFG, probes, nodes=lambda: rows, runs=lambda: runs,
        results={"status": "failed", "config": {"num-rounds": 2}, "rounds": []}, now=NOW,
    )  # fmt: skip


def test_systemctl_show_is_parsed_and_a_unit_counts_only_for_its_own_kit(tmp_path: Path) -> None:
    show = deploy_status.parse_systemctl_show(
        f"LoadState=loaded\nActiveState=failed\nWorkingDirectory={tmp_path}\n"
    )

    assert show == {
        "LoadState": "loaded",
        "ActiveState": "failed",
        "WorkingDirectory": str(tmp_path),
    }
    assert deploy_status.unit_state(show, tmp_path) == "failed"
    assert deploy_status.unit_state(show, tmp_path / "another-kit") is None
    assert deploy_status.unit_state({"LoadState": "not-found"}, tmp_path) is None


def test_the_last_run_is_the_last_submitted_whatever_its_id() -> None:
    assert deploy_status.last_run(RUNS)["run-id"] == "4"  # type: ignore[index]
    assert deploy_status.run_check(RUNS[:1], None)[1].detail == "run 9: finished:completed, 300 s"
    assert deploy_status.last_run([]) is None
    assert deploy_status.in_flight([*RUNS, {"run-id": "5", "status": "running"}]) == [
        {"run-id": "5", "status": "running"}
    ]


def test_a_healthy_coordinator_with_an_offline_site_is_down_and_says_since_when() -> None:
    checks = _checks(FakeProbes())

    by_name = {c.name: c for c in checks}
    assert by_name["SuperLink"].state == "up" and "/health 200" in by_name["SuperLink"].detail
    assert (
        by_name["gateway"].state == "up"
        and "certificate from the kit's CA" in by_name["gateway"].detail
    )
    assert by_name["site site-1"].state == "up"
    assert by_name["site site-2"] == Check("site site-2", "down", "offline since 21:35 (node 12)")
    assert by_name["site site-3"].state == "info"  # revoked: never counts against health
    assert by_name["ServerApp"] == Check("ServerApp", "info", "idle: no run in flight")
    assert by_name["last run"].detail.startswith("run 4: finished:failed, 12 s (only 1 of 2 sites")
    assert "results.json: 0/2 rounds, failed" in by_name["last run"].detail
    assert not deploy_status.healthy(checks)


def test_every_site_online_and_a_run_in_flight_is_healthy() -> None:
    rows = [{**row, "status": "online"} for row in ROWS[:2]]

    checks = _checks(FakeProbes(), rows, [*RUNS, {"run-id": "5", "status": "running"}])

    assert deploy_status.healthy(checks)
    assert Check("ServerApp", "up", "run 5 (running) in flight") in checks
    assert deploy_status.render("t", checks, "h").endswith("\nhealthy")


def test_a_gateway_whose_certificate_is_not_from_the_kits_ca_is_down() -> None:
    wrong = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrong.verify_message = "unable to get local issuer certificate"

    checks = _checks(FakeProbes(gateway=wrong))

    gateway = next(c for c in checks if c.name == "gateway")
    assert gateway.state == "down"
    assert gateway.detail.startswith("127.0.0.1:9093: TLS: unable to get local issuer certificate")


def test_systemd_has_the_last_word_when_its_unit_runs_this_kit() -> None:
    unit = {
        "LoadState": "loaded",
        "ActiveState": "failed",
        "WorkingDirectory": "/opt/facefed-coordinator",
    }

    checks = _checks(FakeProbes(unit=unit))

    superlink = next(c for c in checks if c.name == "SuperLink")
    assert superlink.state == "down"
    assert superlink.detail.startswith("systemd facefed-coordinator.service: failed")


def test_a_superlink_that_is_down_asks_flwr_nothing() -> None:
    def never() -> list[Any]:
        raise AssertionError("flwr asked while the SuperLink is down")

    checks = deploy_status.coordinator_checks(
        Path("/k"), CFG, FakeProbes(superlink=None), nodes=never, runs=never, results=None, now=NOW
    )

    assert [c.state for c in checks][:2] == ["down", "up"]
    assert "connection refused" in checks[0].detail and "no process" in checks[0].detail
    assert {c.detail for c in checks[2:]} == {
        deploy_status.UNKNOWN_WHILE_DOWN,
        f"{deploy_status.UNKNOWN_WHILE_DOWN}; no results.json in the kit's out-dir",
    }


def test_a_kit_with_nothing_running_is_down_on_one_screen_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k"
    argv = ["deploy", "init", "--sites", "2", "--coordinator", "127.0.0.1", "--bind", "127.0.0.1"]
    assert main([*argv, "--out", str(out), "--control-port", "1", "--port", "2"]) == 0
    capsys.readouterr()

    with socket.socket() as sock:  # a closed runtime port, whatever else runs on this machine
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    (out / "sites" / "site-1" / "local.toml").write_text(f"[site]\nruntime-port = {closed}\n")

    coordinator = main(["deploy", "status", "--kit", str(out / "coordinator")])
    screen = capsys.readouterr().out
    site = main(["deploy", "status", "--kit", str(out / "sites" / "site-1")])
    site_screen = capsys.readouterr().out

    assert coordinator == 1 and site == 1
    assert "  SuperLink    DOWN  https://127.0.0.1:1: connection refused; no process" in screen
    assert "  gateway      DOWN  127.0.0.1:2: connection refused; no process" in screen
    assert screen.splitlines()[-1].startswith("down: SuperLink, gateway; start it:")
    assert f"  SuperNode    DOWN  runtime port 127.0.0.1:{closed} closed; no process" in site_screen
    assert site_screen.splitlines()[-1].startswith("down: SuperNode, coordinator; start it:")


def test_status_of_a_folder_that_is_no_kit_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["deploy", "status", "--kit", str(tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("facefed: error: ") and "pass a kit folder" in err[0]


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_coordinator_stopped_on_purpose_exits_cleanly_so_systemd_does_not_call_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: int, expected: int
) -> None:
    from server import deploy_cli

    out = tmp_path / "k"
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "127.0.0.1", "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0

    class Child:  # a SuperLink / gateway that dies of the signal forwarded to it
        def __init__(self, *_a: object, **_k: object) -> None:
            self.code: int | None = None

        def send_signal(self, signum: int) -> None:
            self.code = -signum

        def poll(self) -> int | None:
            return self.code

        terminate = kill = lambda self: None

        def wait(self, timeout: float) -> int | None:
            return self.code

    monkeypatch.setattr(deploy_cli.subprocess, "Popen", Child)
    threading.Timer(0.3, os.kill, (os.getpid(), sig)).start()

    code = main(["deploy", "coordinator", "--kit", str(out / "coordinator"), "--no-register"])

    assert code == expected
