"""Kits that work on the machine they are copied to: no path of the provisioning machine, the
facefed installation found on the target (``kit.env`` or PATH)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from common.cli import main
from common.paths import REPO_ROOT
from server import deploy, deploy_provision

SITES = ("site-1", "site-2")


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    plan = deploy_provision.ProvisionPlan(
        out=tmp_path / "kits", coordinator_host="fl.example.org", sites=SITES
    )
    deploy_provision.provision(plan)
    return tmp_path / "kits"


def _kit_files(kits: Path) -> list[Path]:
    kit_dirs = [kits / "coordinator", *(kits / "sites" / s for s in SITES)]
    return [p for kit in kit_dirs for p in kit.rglob("*") if p.is_file()]


def test_a_kit_names_no_path_of_the_provisioning_checkout_or_folder(kits: Path) -> None:
    files = _kit_files(kits)

    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert str(REPO_ROOT).encode() not in data, path
        assert str(kits).encode() not in data, path  # a kit works wherever it is copied


def _fake_facefed(folder: Path, name: str) -> Path:
    """A stand-in for facefed that records how it was called."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / name
    fake.write_text('#!/bin/sh\necho "$0 $*" > "$CALLED"\n')
    fake.chmod(0o700)
    return fake


def test_start_script_runs_facefed_from_path_on_the_target_machine(
    kits: Path, tmp_path: Path
) -> None:
    fake = _fake_facefed(tmp_path / "bin", "facefed")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "CALLED": str(tmp_path / "called")}
    site = kits / "sites" / "site-1"

    subprocess.run(["sh", str(site / "start-site.sh"), "--print-command"], env=env, check=True)

    called = (tmp_path / "called").read_text().split()
    assert called == [str(fake), "deploy", "site", "--kit", str(site), "--print-command"]


def test_start_script_uses_the_python_that_init_python_named(tmp_path: Path) -> None:
    fake = _fake_facefed(tmp_path / "opt" / "bin", "python")
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "h", "--out", str(tmp_path / "k")]
    assert main([*argv, "--python", str(fake)]) == 0
    env = {"PATH": "/usr/bin:/bin", "CALLED": str(tmp_path / "called")}
    coord = tmp_path / "k" / "coordinator"

    subprocess.run(["sh", str(coord / "start-coordinator.sh")], env=env, check=True)

    called = (tmp_path / "called").read_text().split()
    assert called == [str(fake), "-m", "common.cli", "deploy", "coordinator", "--kit", str(coord)]
    assert deploy.read_kit_env(tmp_path / "k" / "sites" / "site-1")["FACEFED_PYTHON"] == str(fake)


def test_the_environment_wins_over_kit_env(kits: Path, tmp_path: Path) -> None:
    fake = _fake_facefed(tmp_path / "other", "python3")
    env = {**os.environ, "FACEFED_PYTHON": str(fake), "CALLED": str(tmp_path / "called")}

    subprocess.run(["sh", str(kits / "sites" / "site-2" / "start-site.sh")], env=env, check=True)

    assert (tmp_path / "called").read_text().split()[0] == str(fake)


@pytest.mark.parametrize("bad", ["python", "/opt/my venv/python", "/opt/$(reboot)/python"])
def test_init_python_must_be_a_plain_absolute_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "h", "--out", str(tmp_path / "k")]

    code = main([*argv, "--python", bad])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--python" in err[0]
    assert not (tmp_path / "k").exists()
