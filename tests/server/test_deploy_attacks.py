"""Attack review of signed kits, local.toml, backup/restore: each test is one attack.

Tests that FAIL now demonstrate a claim the code does not deliver; the passing ones pin attacks that
were tried and held."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from flwr.app import RecordDict

from client.training.site_store import Release, SiteStore
from common.cli import main
from common.errors import ConfigError, IntegrityError, RefusedError
from server import deploy_backup, deploy_kitsign, deploy_provision, deploy_publisher, deploy_restore

SITES = ("site-1",)


@pytest.fixture(scope="module")
def _kits_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tpl") / "kits"
    deploy_provision.provision(
        deploy_provision.ProvisionPlan(out=out, coordinator_host="fl.example.org", sites=SITES)
    )
    return out


@pytest.fixture
def kits(_kits_template: Path, tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    subprocess.run(["cp", "-a", str(_kits_template), str(out)], check=True)
    return out


def _site(kits: Path) -> Path:
    return kits / "sites" / "site-1"


def _pin(kits: Path) -> str:
    key = deploy_publisher.load_signing_key(deploy_kitsign.default_key_path(kits))
    return deploy_kitsign.key_fingerprint(key.public_key())


def _start_site(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[tuple[list[str], dict[str, str]]]]:
    """``deploy site`` (pinned) up to the exec of the SuperNode: (code, stderr lines, exec'd)."""
    started: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execvpe", lambda path, cmd, env: started.append((cmd, env)))
    monkeypatch.setenv(deploy_kitsign.KEY_ENV, _pin(kits))
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    code = main(["deploy", "site", "--kit", str(_site(kits)), "--data-dir", str(data)])
    return code, capsys.readouterr().err.strip().splitlines(), started


# --- 1. signed kits: what Flower executes from the unsigned run-time folders ----------------------


def test_a_planted_flower_app_in_unsigned_flwr_home_reaches_the_supernode(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """BREAK: flwr-home/ is outside the signed set, but Flower's ClientApp runs the app installed at
    $FLWR_HOME/apps/<publisher>.<app>.<version>.<hash8> and, when that folder already exists,
    reuses it without checking it (flwr/cli/install.py: `if install_path.exists(): if skip_prompt:
    return install_path`). A kit shipped with a planted app folder passes every check and the
    SuperNode runs the planted code instead of the signed, verified FAB."""
    planted = _site(kits) / "flwr-home" / "apps" / "facefed.facefed.0.1.0.0123abcd"
    (planted / "client" / "training").mkdir(parents=True)
    (planted / "client" / "training" / "app.py").write_text("import os; os.system('id')\n")

    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys)

    assert code == 0 and len(started) == 1, err  # the kit was accepted
    flwr_home = Path(started[0][1]["FLWR_HOME"])
    # Fixed when the planted folder is refused or never reachable from the SuperNode's FLWR_HOME.
    assert not (flwr_home / "apps" / planted.name).exists(), (
        f"{planted} (unsigned) is where Flower looks for installed apps"
    )


def test_flower_reuses_an_existing_install_folder_without_verifying_it(tmp_path: Path) -> None:
    """The Flower behaviour the break above rests on (passes: it documents Flower 1.41)."""
    from flwr.cli.install import validate_and_install

    project = tmp_path / "fab"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        "[build-system]\nrequires = ['hatchling']\nbuild-backend = 'hatchling.build'\n"
        "[project]\nname = 'facefed'\nversion = '0.1.0'\ndependencies = []\n"
        "[tool.flwr.app]\npublisher = 'facefed'\n"
        "[tool.flwr.app.components]\nserverapp = 'a:b'\nclientapp = 'a:c'\n"
        "[tool.flwr.app.config]\nx = 1\n"
    )
    (project / "genuine.py").write_text("GENUINE = True\n")
    home = tmp_path / "flwr-home"
    fab_hash = "0123abcd" + "0" * 56
    planted = home / "apps" / "facefed.facefed.0.1.0.0123abcd"
    planted.mkdir(parents=True)
    (planted / "evil.py").write_text("EVIL = True\n")

    path = validate_and_install(project, fab_hash, None, home, skip_prompt=True)

    assert path == planted
    assert (path / "evil.py").exists() and not (path / "genuine.py").exists()


@pytest.mark.xfail(
    strict=True,
    reason="known limit, documented in docs/deploy.md (signed kits): a start script lives in the kit "
    "it starts, so whoever can change kit.env can change the script too; only the systemd unit "
    "installed outside the kit, with its pinned key, is a trust anchor",
)
def test_kit_env_is_obeyed_before_the_kit_is_verified(kits: Path, tmp_path: Path) -> None:
    """BREAK (start script path only; the systemd unit is not affected): kit.env is a signed file,
    but start-site.sh reads FACEFED_PYTHON from it and execs that program, which is then the one
    expected to verify the kit. A changed kit.env therefore runs any program, never refused."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o700)
    kit_env = _site(kits) / "kit.env"
    kit_env.write_text(kit_env.read_text() + f"FACEFED_PYTHON={evil}\n")
    with pytest.raises(IntegrityError, match=r"kit\.env was changed"):
        deploy_kitsign.verify_kit(_site(kits), pinned=_pin(kits))

    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", str(_site(kits) / "start-site.sh")], env=env, check=False, timeout=30)

    assert not marker.exists(), "the start script ran kit.env's program from a kit that fails"


# --- 1. signed kits: attacks that held (regression tests) ----------------------------------------


def test_a_signed_file_replaced_by_a_symlink_is_refused(kits: Path, tmp_path: Path) -> None:
    site = _site(kits)
    outside = tmp_path / "site.toml"
    outside.write_bytes((site / "site.toml").read_bytes())
    (site / "site.toml").unlink()
    (site / "site.toml").symlink_to(outside)
    with pytest.raises(IntegrityError, match="symbolic link"):
        deploy_kitsign.verify_kit(site, pinned=_pin(kits))


def test_a_signed_folder_replaced_by_a_symlink_is_refused(kits: Path, tmp_path: Path) -> None:
    site = _site(kits)
    (site / "certs").rename(tmp_path / "certs")
    (site / "certs").symlink_to(tmp_path / "certs")
    with pytest.raises(IntegrityError):
        deploy_kitsign.verify_kit(site, pinned=_pin(kits))


@pytest.mark.parametrize("name", [".hidden", "certs/.x.crt", "Site.toml", "sites/x.node-id.sh"])
def test_an_added_file_is_refused_hidden_or_case_variant(kits: Path, name: str) -> None:
    path = _site(kits) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x\n")
    with pytest.raises(IntegrityError, match="added"):
        deploy_kitsign.verify_kit(_site(kits), pinned=_pin(kits))


def test_manifest_entries_outside_the_kit_cannot_be_signed_in_by_another_key(
    kits: Path, tmp_path: Path
) -> None:
    """Re-signing with another key (manifest listing ../ paths) is refused under a pin; without a
    pin it is accepted by design (documented)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    site = _site(kits)
    (site / "site.toml").write_text((site / "site.toml").read_text().replace("8.0", "80.0"))
    other = ed25519.Ed25519PrivateKey.generate()
    deploy_kitsign.sign_kit(site, other, name="site-1")
    with pytest.raises(IntegrityError, match="not by the provisioning key"):
        deploy_kitsign.verify_kit(site, pinned=_pin(kits))
    doc = json.loads((site / deploy_kitsign.MANIFEST).read_text())
    doc["files"]["../../../etc/passwd"] = "0" * 64
    data = (json.dumps(doc) + "\n").encode()
    (site / deploy_kitsign.MANIFEST).write_bytes(data)
    (site / deploy_kitsign.SIGNATURE).write_bytes(base64.b64encode(other.sign(data)) + b"\n")
    with pytest.raises(IntegrityError, match="removed"):
        deploy_kitsign.verify_kit(site, pinned=None)


def test_a_damaged_manifest_is_one_line_exit_4_not_a_traceback(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (_site(kits) / deploy_kitsign.MANIFEST).write_text('{"files": [1, 2], "signer": 5}')
    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys)
    assert code == 4 and len(err) == 1 and err[0].startswith("facefed: error:") and not started


# --- 2. local.toml -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "max-epsilon-run = 9.0",
        "max-epsilon-run = 'inf'",
        "max-epsilon-run = nan",
        "max-epsilon-run = '9'",
        "max-epsilon-lifetime = 1e9",
        "max-delta = 0.5",
        "max-delta = '1e-3'",
        "require-dp = false",
        "require-dp = 'false'",
        "allow-seeded-noise = true",
        "allow-seeded-noise = 'TRUE'",
        "min-batch = 1",
        "min-batch = 1.0",
        "min-noise-multiplier = -1.0",
        "max-epsilon = 100.0",
        "Max-Epsilon-Run = 100.0",
    ],
)
def test_local_toml_cannot_loosen_any_policy_key(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    line: str,
) -> None:
    (_site(kits) / "local.toml").write_text(f"[policy]\n{line}\n")
    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys)
    assert code != 0 and not started
    assert len(err) == 1 and err[0].startswith("facefed: error:"), err


@pytest.mark.parametrize(
    "text",
    [
        "[site]\npython = '/tmp/evil'\n",
        "[site]\nsuperlink = 'evil:9092'\n",
        "[site]\nsite-id = 'site-2'\n",
        "[site]\nruntime-port = 'x'\n",
        "[site]\nruntime-port = 0\n",
        "[site]\ndata-dir = 5\n",
        "[policy]\nunknown = 1\n",
        "policy = 3\n",
        "[site\n",
        "[tool]\nx = 1\n",
    ],
)
def test_local_toml_other_keys_and_bad_types_are_one_line(
    kits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
) -> None:
    (_site(kits) / "local.toml").write_text(text)
    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys)
    assert code != 0 and not started
    assert len(err) == 1 and err[0].startswith("facefed: error:"), err


def test_a_tighter_local_policy_reaches_the_supernode(
    kits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (_site(kits) / "local.toml").write_text("[policy]\nmax-epsilon-run = 2.0\nmin-batch = 64\n")
    code, err, started = _start_site(kits, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    cmd = " ".join(started[0][0])
    assert "policy-max-epsilon-run=2.0" in cmd and "policy-min-batch=64" in cmd


# --- 5. backup / restore -------------------------------------------------------------------------


def _commit(root: Path, round_: int) -> None:
    store = SiteStore(root)
    with store.locked():
        store.newest()
        store.commit(
            Release("run-a", round_, (), True), f"model-{round_}", RecordDict(), RecordDict()
        )


def test_restore_force_of_a_backup_without_site_state_erases_spent_privacy(
    kits: Path, tmp_path: Path
) -> None:
    """BREAK: the rollback refusal compares only store.json files the BACKUP lists. A backup made
    before the site's first release (or any backup without state/) restored with --force over a
    site that has since released replaces its privacy history with none, no refusal."""
    site = _site(kits)
    deploy_backup.backup(site, tmp_path / "b-before-any-run")
    _commit(site / "state", 1)  # the site trains and spends budget
    assert (site / "state" / "store.json").exists()

    with pytest.raises(RefusedError, match="forget privacy"):
        deploy_restore.restore(tmp_path / "b-before-any-run", site, force=True)


def test_restore_over_newer_state_with_force_is_refused(kits: Path, tmp_path: Path) -> None:
    site = _site(kits)
    _commit(site / "state", 1)
    deploy_backup.backup(site, tmp_path / "b1")
    _commit(site / "state", 2)
    with pytest.raises(RefusedError, match="forget privacy"):
        deploy_restore.restore(tmp_path / "b1", site, force=True)


def test_backup_to_a_dotdot_path_inside_the_kit_is_refused(kits: Path, tmp_path: Path) -> None:
    """BREAK: backup() resolves the kit but only absolutises --to, so `OTHER/../KIT/x` (or a
    symlink into the kit) passes the 'inside the kit' check; the backup, private keys and all,
    lands in the kit, which then no longer verifies."""
    site = _site(kits)
    (tmp_path / "other").mkdir()
    sneaky = tmp_path / "other" / ".." / site.relative_to(tmp_path) / "backup"
    try:
        deploy_backup.backup(site, sneaky)
    except ConfigError:
        return
    assert not (site / "backup").exists(), "the backup was written inside the kit"


def test_backup_via_a_symlink_into_the_kit_is_refused(kits: Path, tmp_path: Path) -> None:
    site = _site(kits)
    (tmp_path / "link").symlink_to(site)
    try:
        deploy_backup.backup(site, tmp_path / "link" / "backup")
    except ConfigError:
        return
    assert not (site / "backup").exists(), "the backup was written inside the kit"


def test_a_backup_whose_files_folder_symlinks_out_is_refused(kits: Path, tmp_path: Path) -> None:
    site = _site(kits)
    deploy_backup.backup(site, tmp_path / "b")
    files = tmp_path / "b" / "files"
    (files / "certs").rename(tmp_path / "real-certs")
    (files / "certs").symlink_to(tmp_path / "real-certs")  # a folder link, not a file link
    with pytest.raises(IntegrityError):
        deploy_restore.verify_backup(tmp_path / "b")


@pytest.mark.parametrize("bad", ["/etc/passwd", "a/../../x", "./x", "", "a//b"])
def test_restore_refuses_manifest_paths_leaving_the_kit(
    kits: Path, tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_backup.backup(_site(kits), tmp_path / "b")
    path = tmp_path / "b" / deploy_backup.MANIFEST
    doc = json.loads(path.read_text())
    doc["files"][0]["path"] = bad
    path.write_text(json.dumps(doc))
    code = main(["deploy", "restore", "--from", str(tmp_path / "b"), "--kit", str(tmp_path / "k")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and err[0].startswith("facefed: error:"), err
    assert not (tmp_path / "k").exists()


def test_restored_private_keys_are_owner_only_even_if_the_manifest_says_0644(
    kits: Path, tmp_path: Path
) -> None:
    deploy_backup.backup(_site(kits), tmp_path / "b")
    path = tmp_path / "b" / deploy_backup.MANIFEST
    doc = json.loads(path.read_text())
    for item in doc["files"]:
        item["mode"] = "0777"
    path.write_text(json.dumps(doc))
    deploy_restore.restore(tmp_path / "b", tmp_path / "k")
    key = tmp_path / "k" / "keys" / "supernode.key"
    assert key.stat().st_mode & 0o077 == 0


# --- every bad input: one line, non-zero, and no side effect ------------------------------------


def test_deploy_sign_on_a_folder_without_kits_creates_no_provisioning_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BREAK (low): `deploy sign --out WRONG` makes a new provisioning key (and folders) before it
    finds that WRONG holds no kits; on a real OUT whose key was moved it silently signs every kit
    with a NEW key (sites pinned to the old one then refuse to start)."""
    out = tmp_path / "typo"
    code = main(["deploy", "sign", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("facefed: error:"), err
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "status", "--kit", "{tmp}/none"],
        ["deploy", "backup", "--kit", "{tmp}/none", "--to", "{tmp}/b"],
        ["deploy", "restore", "--from", "{tmp}/none", "--kit", "{tmp}/k"],
        ["deploy", "site", "--kit", "{tmp}/none"],
        ["deploy", "unit", "--kit", "{tmp}/none"],
        ["deploy", "coordinator", "--kit", "{tmp}/none"],
    ],
)
def test_a_missing_kit_or_backup_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("facefed: error:"), err


def test_status_with_a_bad_local_toml_is_one_line(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (_site(kits) / "local.toml").write_text("[policy]\nmax-epsilon-run = 99.0\n")
    code = main(["deploy", "status", "--kit", str(_site(kits))])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert code != 0 and len(err) == 1 and err[0].startswith("facefed: error:"), err
