"""Kits that work on the machine they are copied to: no path of the provisioning machine, the
facefed installation found on the target (``kit.env`` or PATH)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.training.site_policy import SitePolicy
from common.cli import main
from common.errors import ConfigError, IntegrityError
from common.paths import REPO_ROOT
from server import (
    deploy,
    deploy_kitsign,
    deploy_local,
    deploy_provision,
    deploy_publisher,
    deploy_units,
)

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


# --- signed kits ----------------------------------------------------------------------------------


def _pin(kits: Path) -> str:
    key = deploy_publisher.load_signing_key(deploy_kitsign.default_key_path(kits))
    return deploy_kitsign.key_fingerprint(key.public_key())


def _start_site(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pin: str | None,
) -> tuple[int, list[str], list[str]]:
    """``deploy site`` up to the point where it would exec the SuperNode: (code, stderr, exec'd)."""
    started: list[str] = []
    monkeypatch.setattr(os, "execvpe", lambda path, cmd, env: started.append(path))
    if pin is None:
        monkeypatch.delenv(deploy_kitsign.KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(deploy_kitsign.KEY_ENV, pin)
    site = kits / "sites" / "site-1"
    code = main(["deploy", "site", "--kit", str(site), "--data-dir", str(tmp_path)])
    return code, capsys.readouterr().err.strip().splitlines(), started


def test_a_valid_signed_kit_passes_its_pre_start_checks(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys, _pin(kits))

    assert code == 0 and len(started) == 1, err
    for kit in [kits / "coordinator", *(kits / "sites" / s for s in SITES)]:
        assert deploy_kitsign.verify_kit(kit, pinned=_pin(kits)) == _pin(kits)


def test_one_changed_byte_in_site_toml_is_refused_in_one_line(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    toml = kits / "sites" / "site-1" / "site.toml"
    data = bytearray(toml.read_bytes())
    data[data.index(b"max-epsilon = 8.0") + len("max-epsilon = ")] = ord("9")
    toml.write_bytes(bytes(data))

    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys, _pin(kits))

    assert code == 4 and len(err) == 1 and started == []
    assert f"{toml} was changed after the kit was signed" in err[0]


@pytest.mark.parametrize(
    ("change", "verb"),
    [
        (lambda kit: (kit / "keys" / "extra.key").write_text("x"), "added"),
        (lambda kit: (kit / "trusted-entities.yaml").unlink(), "removed"),
        (lambda kit: (kit / "start-site.sh").write_text("#!/bin/sh\nexec evil\n"), "changed"),
        (lambda kit: (kit / "kit.env").write_text("FACEFED_PYTHON=/tmp/evil\n"), "changed"),
    ],
)
def test_a_file_added_removed_or_changed_in_a_signed_kit_is_refused(
    kits: Path, change: Callable[[Path], object], verb: str
) -> None:
    change(kits / "sites" / "site-1")

    with pytest.raises(IntegrityError, match=f"was {verb} after the kit was signed"):
        deploy_kitsign.verify_kit(kits / "sites" / "site-1", pinned=_pin(kits))


def test_a_kit_signed_by_another_key_is_refused(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = kits / "sites" / "site-1"
    (site / "site.toml").write_text((site / "site.toml").read_text() + "# edited\n")
    rogue = deploy_kitsign.load_or_create_key(tmp_path / "rogue" / "k.key", create=True)
    deploy_kitsign.sign_kit(site, rogue, name="site-1")  # a complete, valid manifest, other key

    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys, _pin(kits))

    assert code == 4 and len(err) == 1 and started == []
    assert "not by the provisioning key" in err[0] and _pin(kits) in err[0]


def test_a_signature_by_another_key_under_the_provisioners_name_is_refused(
    kits: Path, tmp_path: Path
) -> None:
    site = kits / "sites" / "site-1"
    rogue = deploy_kitsign.load_or_create_key(tmp_path / "rogue" / "k.key", create=True)
    manifest = (site / deploy_kitsign.MANIFEST).read_bytes()
    (site / deploy_kitsign.SIGNATURE).write_bytes(base64.b64encode(rogue.sign(manifest)))

    for pinned in (_pin(kits), None):  # pinned or not: the manifest names the provisioner
        with pytest.raises(IntegrityError, match="does not match"):
            deploy_kitsign.verify_kit(site, pinned=pinned)


def test_an_unsigned_kit_is_refused(kits: Path) -> None:
    (kits / "sites" / "site-2" / deploy_kitsign.SIGNATURE).unlink()

    with pytest.raises(IntegrityError, match="not signed"):
        deploy_kitsign.verify_kit(kits / "sites" / "site-2", pinned=None)


def test_what_a_running_kit_writes_lies_outside_the_signed_set(kits: Path) -> None:
    coord, site = kits / "coordinator", kits / "sites" / "site-1"
    deploy.write_connection(coord, deploy.load_coordinator(coord))
    for path in [
        coord / "state" / "superlink.db", coord / "logs" / "superlink.log",
        coord / "runs" / "default" / "ledger.db", coord / "sites" / "site-1.node-id",
        coord / "sites" / "site-1.revoked", coord / "revoked.txt",
        coord / "sites" / ".site-2.node-id.k3j_x9.tmp", coord / ".revoked.txt.a8b2c.tmp",
        site / "state" / "history.json", site / "flwr-home" / "apps" / "x.fab",
    ]:  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("run-time\n")

    assert deploy_kitsign.verify_kit(coord, pinned=_pin(kits)) == _pin(kits)
    assert deploy_kitsign.verify_kit(site, pinned=_pin(kits)) == _pin(kits)


def test_add_site_and_rotate_cert_sign_what_they_change(kits: Path) -> None:
    deploy_provision.add_site(kits, "clinic-3", max_epsilon=2.0, data_dir="/d")
    deploy_provision.rotate_server_cert(kits)

    for kit in (kits / "coordinator", kits / "sites" / "clinic-3"):
        deploy_kitsign.verify_kit(kit, pinned=_pin(kits))


def test_reprovisioning_reuses_the_provisioning_key_and_init_can_take_one(tmp_path: Path) -> None:
    key = tmp_path / "hsm-export" / "prov.key"
    deploy_kitsign.load_or_create_key(key, create=True)
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "h", "--out", str(tmp_path / "k")]

    assert main([*argv, "--provisioning-key", str(key)]) == 0
    assert main([*argv, "--provisioning-key", str(key), "--force"]) == 0

    pin = deploy_kitsign.key_fingerprint(deploy_publisher.load_signing_key(key).public_key())
    assert deploy_kitsign.verify_kit(tmp_path / "k" / "sites" / "site-1", pinned=pin) == pin
    assert not (tmp_path / "k" / "provisioning").exists()  # a given key is never copied
    assert (
        f"FACEFED_KIT_KEY:-{pin}"
        in (tmp_path / "k" / "sites" / "site-1" / "start-site.sh").read_text()
    )


def test_the_coordinator_refuses_to_start_from_a_changed_kit(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = kits / "coordinator"
    toml = coord / "coordinator.toml"
    toml.write_text(toml.read_text().replace("bind = '0.0.0.0'", "bind = '127.0.0.2'"))

    code = main(["deploy", "coordinator", "--kit", str(coord), "--kit-key", _pin(kits)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and f"{toml} was changed" in err[0]


# --- systemd units --------------------------------------------------------------------------------

UNITS = {"coordinator": Path("coordinator"), "site": Path("sites") / "site-1"}


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values]}}`` of a unit file (repeated keys keep every value)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


@pytest.mark.parametrize("kind", ["coordinator", "site"])
def test_every_kit_carries_a_hardened_unit_that_pins_the_provisioning_key(
    kits: Path, kind: deploy_units.KitKind
) -> None:
    kit = kits / UNITS[kind]
    unit = _parse_unit((kit / "systemd" / deploy_units.unit_name(kind)).read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    install = deploy_units.DEFAULT_INSTALL[kind]

    for key, value in deploy_units.HARDENING:
        assert service[key] == value, key
    assert service["User"] == service["Group"] == "facefed"
    assert service["WorkingDirectory"] == install and service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith(f"deploy {kind} --kit {install}")
    assert "EnvironmentFile" not in service  # a file in the kit would override the pin below
    assert f"FACEFED_KIT_KEY={_pin(kits)}" in unit["Service"]["Environment"]
    writable = service["ReadWritePaths"].split()
    assert f"{install}/state" in writable and f"{install}/keys" not in writable
    for path in writable:  # systemd refuses to start when a ReadWritePaths folder is missing
        assert (kit / Path(path).relative_to(install)).is_dir()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("kind", ["coordinator", "site"])
def test_units_pass_systemd_analyze_verify(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: deploy_units.KitKind
) -> None:
    kit = kits / UNITS[kind]
    python = str(Path(sys.executable).absolute())
    try:
        deploy.check_python_path(python)
    except ConfigError:  # pragma: no cover - an unusual venv path
        pytest.skip("this interpreter's path has characters a unit cannot carry")
    argv = ["deploy", "unit", "--kit", str(kit), "--python", python, "--kit-key", _pin(kits)]
    assert main(argv) == 0
    unit = tmp_path / deploy_units.unit_name(kind)
    unit.write_text(capsys.readouterr().out)

    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=300
    )

    ours = [ln for ln in (result.stdout + result.stderr).splitlines() if unit.name in ln]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr
    assert f"WorkingDirectory={kit.resolve()}" in unit.read_text()


# --- the site's own settings: local.toml ----------------------------------------------------------


def test_local_toml_sets_this_machines_paths_and_tightens_the_policy(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    site = kits / "sites" / "site-1"
    (site / "local.toml").write_text(
        f"[site]\ndata-dir = '{tmp_path}'\nruntime-port = 9194\n\n"
        "[policy]\nmax-epsilon-run = 4.0\nmax-delta = 1e-06\nmin-noise-multiplier = 1.2\n"
    )
    started: list[list[str]] = []
    monkeypatch.setattr(os, "execvpe", lambda path, cmd, env: started.append(list(cmd)))

    code = main(["deploy", "site", "--kit", str(site), "--kit-key", _pin(kits)])  # no --data-dir

    assert code == 0, capsys.readouterr().err
    node = parse_config_args([started[0][started[0].index("--node-config") + 1]])
    assert node["data-dir"] == str(tmp_path) and started[0][-1] == "9194"
    policy = SitePolicy.from_node_config(node)
    assert (policy.max_epsilon_run, policy.max_delta, policy.min_noise_multiplier) == (
        4.0,
        1e-6,
        1.2,
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("max-epsilon-run = 9.0", "max-epsilon-run"),
        ("max-delta = 1e-4", "max-delta"),
        ("require-dp = false", "require-dp"),
        ("allow-seeded-noise = true", "allow-seeded-noise"),
        ("min-batch = 2", "min-batch"),
    ],
)
def test_local_toml_may_not_loosen_the_signed_policy(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, key: str
) -> None:
    site = kits / "sites" / "site-1"
    (site / "local.toml").write_text(f"[policy]\n{line}\n")

    code = main(["deploy", "site", "--kit", str(site), "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{key} = " in err[0] and "looser" in err[0]


def test_local_toml_cannot_change_what_the_provisioner_signed(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = kits / "sites" / "site-1"
    (site / "local.toml").write_text("[site]\nsuperlink = 'evil.example.org:9093'\n")

    code = main(["deploy", "site", "--kit", str(site), "--print-command"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot be set locally" in err[0]


def test_every_policy_key_has_a_tightening_rule() -> None:
    assert set(deploy_local.STRICTER) == set(SitePolicy().to_mapping())


def test_site_toml_no_longer_offers_the_unimplemented_face_and_emotion_dirs(kits: Path) -> None:
    site = kits / "sites" / "site-1"
    text = (site / "site.toml").read_text()
    assert "face-dir" not in text and "emotion-dir" not in text
    (site / "site.toml").write_text(text.replace("[site]\n", "[site]\nface-dir = '/x'\n"))

    with pytest.raises(ConfigError, match="face-dir"):
        deploy.load_site(site)


def test_sign_re_signs_kits_edited_on_the_provisioning_machine(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = kits / "coordinator" / "coordinator.toml"
    toml.write_text(toml.read_text().replace("out-dir = 'runs/default'", "out-dir = '/srv/runs'"))
    with pytest.raises(IntegrityError, match=r"coordinator\.toml was changed"):
        deploy_kitsign.verify_kit(kits / "coordinator", pinned=_pin(kits))

    assert main(["deploy", "sign", "--out", str(kits)]) == 0

    assert deploy_kitsign.verify_kit(kits / "coordinator", pinned=_pin(kits)) == _pin(kits)
    assert deploy.load_coordinator(kits / "coordinator").out_dir == "/srv/runs"
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(SITES)


def test_sign_gives_kits_made_before_signing_a_provisioning_key(kits: Path) -> None:
    for path in [deploy_kitsign.default_key_path(kits), *kits.rglob("kit-manifest.*")]:
        path.unlink()
    deploy_kitsign.default_key_path(kits).with_suffix(".pub").unlink()

    assert main(["deploy", "sign", "--out", str(kits)]) == 0

    assert deploy_kitsign.verify_kit(kits / "sites" / "site-2", pinned=_pin(kits)) == _pin(kits)
