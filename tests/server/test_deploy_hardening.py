"""Deployment files against tampering and careless operators: modes whatever the umask, names,
all-or-nothing provisioning, no clear old keys, the deny list, and the encrypted CA key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.cli import main
from common.crypto import pki
from common.errors import ConfigError
from server import (
    deploy,
    deploy_cli,
    deploy_flwr,
    deploy_kitsign,
    deploy_provision,
    deploy_publisher,
)

SITES = ("site-1", "site-2")


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _plan(out: Path, **kw: Any) -> deploy_provision.ProvisionPlan:
    return deploy_provision.ProvisionPlan(
        out=out, coordinator_host="fl.example.org", sites=SITES, **kw
    )


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and (for files) bytes."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted([root, *root.rglob("*")])
    }


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_000_provisioning_gives_0700_dirs_and_0600_keys(
    tmp_path: Path, umask_000: None
) -> None:
    out = tmp_path / "kits"

    deploy_provision.provision(_plan(out))

    dirs = [p for p in [out, *out.rglob("*")] if p.is_dir()]
    assert {_mode(d) for d in dirs} == {0o700}
    assert {"ca", "keys", "certs", "state", "logs"} <= {d.name for d in dirs}
    assert {_mode(k) for k in out.rglob("*.key")} == {0o600}
    assert not [p for p in out.rglob("*") if _mode(p) & 0o022]  # nothing group/world-writable
    assert {_mode(p) for p in out.rglob("start-*.sh")} == {0o700}


def test_started_superlink_and_gateway_create_files_0600_under_umask_000(
    tmp_path: Path, umask_000: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy_provision.provision(_plan(tmp_path / "kits"))
    coord = tmp_path / "kits" / "coordinator"
    (coord / "state").chmod(0o777)
    (coord / "state" / "superlink.db").write_bytes(b"old")  # left 0666 by an older start
    created = ["state/superlink.db-wal", "state/superlink.db-shm", "logs/superlink.log"]
    real_popen = subprocess.Popen

    def fake_superlink(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # stands in for flower-superlink / the gateway: creates its files, then exits
        script = "import sys\nfor p in sys.argv[1:]: open(p, 'a').close()"
        files = [str(coord / c) for c in created]
        return real_popen([sys.executable, "-c", script, *files], **kw)

    monkeypatch.setattr(deploy_cli.subprocess, "Popen", fake_superlink)

    assert main(["deploy", "coordinator", "--kit", str(coord), "--no-register"]) == 0

    assert _mode(coord / "state") == 0o700 and _mode(coord / "logs") == 0o700
    for name in ["state/superlink.db", *created]:
        assert _mode(coord / name) == 0o600, name


def test_start_script_sets_umask_077_for_what_it_starts(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\n: > "$CREATED"\n')
    fake_python.chmod(0o700)
    script = tmp_path / "start-site.sh"
    script.write_text(deploy.start_script("site"))
    env = {**os.environ, "FACEFED_PYTHON": str(fake_python), "CREATED": str(tmp_path / "db")}

    subprocess.run(["sh", str(script)], env=env, check=True, umask=0)

    assert _mode(tmp_path / "db") == 0o600


@pytest.mark.parametrize(
    "bad", ["alpha,beta\n", "alpha\n,beta", "alpha,Beta", "alpha,../x", "alpha, beta"]
)
def test_bad_site_name_is_refused_in_one_line_and_the_out_dir_is_byte_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    out = tmp_path / "kits"
    out.mkdir()
    (out / "notes.txt").write_text("operator notes\n")
    before = _tree(tmp_path)
    argv = ["deploy", "init", "--site-names", bad, "--coordinator", "fl.example.org"]

    code = main([*argv, "--out", str(out)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "site id" in err[0]
    assert _tree(tmp_path) == before


def test_trailing_newline_site_id_is_refused_by_every_name_check() -> None:
    with pytest.raises(ConfigError, match="site id"):
        deploy.check_site_id("alpha\n")
    with pytest.raises(ConfigError, match="site id"):
        deploy.CoordinatorConfig(host="fl.example.org", sites=("beta\n",))


def test_failure_midway_leaves_no_out_dir_and_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = deploy_provision._write_site_kit
    calls = []

    def fail_on_second_site(*args: Any, **kw: Any) -> Path:
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(deploy_provision, "_write_site_kit", fail_on_second_site)

    with pytest.raises(OSError, match="injected"):
        deploy_provision.provision(_plan(tmp_path / "kits"))

    assert len(calls) == 2  # the failure did come midway
    assert list(tmp_path.iterdir()) == []


def test_forced_reprovision_failing_midway_leaves_the_old_kits_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy_provision.provision(_plan(tmp_path / "kits"))
    before = _tree(tmp_path)

    def fail(*args: Any, **kw: Any) -> Path:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(deploy_provision, "_write_site_kit", fail)

    with pytest.raises(OSError, match="injected"):
        deploy_provision.provision(_plan(tmp_path / "kits", force=True))
    assert _tree(tmp_path) == before


def test_rotation_leaves_no_clear_old_server_key_anywhere(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    deploy_provision.provision(_plan(out))
    old_key = (out / "coordinator" / "certs" / "server.key").read_bytes()

    deploy_provision.rotate_server_cert(out)

    assert (out / "coordinator" / "certs" / "server.key").read_bytes() != old_key
    assert not any(old_key in data for _, data in _tree(tmp_path).values() if data)


def test_rotated_server_certificate_is_refused_by_coordinator_and_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    deploy_provision.provision(_plan(out))
    certs = out / "coordinator" / "certs"
    stolen = {n: (certs / n).read_bytes() for n in ("server.crt", "server.key")}
    deploy_provision.rotate_server_cert(out)
    for name, data in stolen.items():  # someone puts the old pair back
        (certs / name).write_bytes(data)
    key = deploy_publisher.load_signing_key(deploy_kitsign.default_key_path(out))
    deploy_kitsign.sign_kit(out / "coordinator", key, name="coordinator")  # signed, yet denied

    for command in ("gateway", "coordinator"):
        code = main(["deploy", command, "--kit", str(out / "coordinator")])

        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "deny list" in err[0], command


def test_revoked_site_key_is_never_registered_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kits"
    coord = out / "coordinator"
    deploy_provision.provision(_plan(out))
    registered: list[str] = []
    unregistered: list[int] = []

    def fake_register(env: object, pub: Path, name: str) -> int:
        registered.append(name)
        return 100 + len(registered)

    monkeypatch.setattr(deploy_flwr, "register", fake_register)
    monkeypatch.setattr(deploy_flwr, "unregister", lambda env, node: unregistered.append(node))
    assert main(["deploy", "register", "--kit", str(coord)]) == 0
    assert main(["deploy", "revoke", "--kit", str(coord), "--site", "site-1"]) == 0
    (coord / "sites" / "site-1.revoked").unlink()  # the marker alone is not what protects
    registered.clear()

    assert main(["deploy", "register", "--kit", str(coord)]) == 0
    assert registered == ["site-2"] and unregistered == [101]
    capsys.readouterr()
    assert main(["deploy", "register", "--kit", str(coord), "--site", "site-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "revoked" in err[0]
    assert registered == ["site-2"]


def test_registered_site_cannot_be_rekeyed_before_it_is_revoked(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    deploy_provision.provision(_plan(out))
    (out / "coordinator" / "sites" / "site-1.node-id").write_text("7\n")
    before = _tree(tmp_path)

    with pytest.raises(ConfigError, match="deploy revoke"):
        deploy_provision.add_site(out, "site-1", max_epsilon=8.0, data_dir="/d", force=True)
    assert _tree(tmp_path) == before


def test_rekeyed_site_denies_its_old_key_and_registers_the_new_one(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    coord = out / "coordinator"
    deploy_provision.provision(_plan(out))
    old_key = (out / "sites" / "site-1" / "keys" / "supernode.key").read_bytes()

    deploy_provision.add_site(out, "site-1", max_epsilon=8.0, data_dir="/d", force=True)

    assert not deploy_provision.site_key_revoked(coord, "site-1")  # the new key
    assert len(deploy_provision.deny_list(coord)) == 1  # the old one
    assert not any(old_key in data for _, data in _tree(tmp_path).values() if data)


def _init_encrypted(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(deploy_cli.CA_PASSPHRASE_ENV, "correct horse")
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "fl.example.org"]
    assert main([*argv, "--out", str(out)]) == 0
    monkeypatch.delenv(deploy_cli.CA_PASSPHRASE_ENV)


def test_cli_encrypted_ca_round_trip_through_rotate_cert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "kits"
    _init_encrypted(out, monkeypatch)
    read_end, write_end = os.pipe()
    os.write(write_end, b"correct horse\n")
    os.close(write_end)

    code = main(["deploy", "rotate-cert", "--out", str(out), "--ca-passphrase-fd", str(read_end)])

    os.close(read_end)
    assert code == 0
    assert pki.ca_key_is_encrypted(out / "ca" / "ca.key")


@pytest.mark.parametrize("passphrase", ["battery staple", None])
def test_cli_encrypted_ca_refuses_a_wrong_or_missing_passphrase_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    passphrase: str | None,
) -> None:
    out = tmp_path / "kits"
    _init_encrypted(out, monkeypatch)
    if passphrase is not None:
        monkeypatch.setenv(deploy_cli.CA_PASSPHRASE_ENV, passphrase)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 - no terminal to prompt on
    capsys.readouterr()
    before = _tree(tmp_path)

    code = main(["deploy", "add-site", "--out", str(out), "--site", "clinic-3"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert ("wrong passphrase" if passphrase else "FACEFED_CA_PASSPHRASE") in err[0]
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["init", "add-site", "rotate-cert"])
def test_ca_passphrase_is_never_a_command_line_argument(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    required = {
        "init": ["--sites", "1", "--coordinator", "h"],
        "add-site": ["--out", "x", "--site", "s"],
        "rotate-cert": ["--out", "x"],
    }[command]

    code = main(["deploy", command, *required, "--ca-passphrase", "secret"])

    assert code == 2 and "unrecognized arguments: --ca-passphrase" in capsys.readouterr().err


def test_revoked_then_rekeyed_site_registers_its_new_key_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "kits"
    coord = out / "coordinator"
    deploy_provision.provision(_plan(out))
    keys: list[str] = []

    def fake_register(env: object, pub: Path, name: str) -> int:
        keys.append(pki.key_fingerprint(pub.read_bytes()))
        return len(keys)

    monkeypatch.setattr(deploy_flwr, "register", fake_register)
    monkeypatch.setattr(deploy_flwr, "unregister", lambda env, node: None)
    assert main(["deploy", "register", "--kit", str(coord), "--site", "site-1"]) == 0
    assert main(["deploy", "revoke", "--kit", str(coord), "--site", "site-1"]) == 0

    deploy_provision.add_site(out, "site-1", max_epsilon=8.0, data_dir="/d", force=True)
    assert main(["deploy", "register", "--kit", str(coord), "--site", "site-1"]) == 0

    assert len(keys) == 2 and keys[0] != keys[1]
    assert keys[0] in deploy_provision.deny_list(coord)
    assert keys[1] not in deploy_provision.deny_list(coord)


def test_provisioning_into_an_existing_empty_dir_gives_the_same_tree(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()

    deploy_provision.provision(_plan(tmp_path / "a"))
    deploy_provision.provision(_plan(tmp_path / "b"))

    def layout(root: Path) -> set[tuple[str, int]]:
        return {(str(p.relative_to(root)), _mode(p)) for p in root.rglob("*")}

    assert layout(tmp_path / "a") == layout(tmp_path / "b")
    assert (tmp_path / "b" / "coordinator" / "state").is_dir()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--valid-days", "-5"),
        ("--valid-days", "99999999"),  # overflowed the certificate's date: a traceback
        ("--max-epsilon", "nan"),
        ("--max-epsilon", "0"),
        ("--sites", "0"),
        ("--port", "-1"),
    ],
)
def test_every_numeric_deploy_flag_is_validated_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    out = tmp_path / "fed"
    argv = ["deploy", "init", "--sites", "2", "--coordinator", "fl.example.org", "--out", str(out)]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"facefed: error: argument {flag}:") and "\n" not in err
    assert not out.exists()
