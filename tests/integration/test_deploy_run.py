"""End to end on loopback, the way docs/deploy.md tells an IT team to do it.

``facefed deploy init`` -> ``start-coordinator.sh`` (SuperLink on loopback with TLS + node auth, the
Fleet gateway, registers the sites) -> two ``start-site.sh`` (SuperNodes trusting only the provisioned
app publisher) -> ``facefed deploy submit`` (signs the bundle). Success is judged from
``flwr ls --format json``; the failing-run test shows why ``flwr run``'s exit code cannot be used, and
the publisher test that a bundle not signed by the trusted publisher never runs on a site.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_helpers import Federation, Procs, free_port, wait_online

from common.cli import main
from common.crypto import pki
from common.paths import REPO_ROOT
from server import deploy, deploy_flwr, deploy_provision, deploy_publisher

SMOKE_APP = Path(__file__).parent / "smoke_app"
# Run-config overrides for a tiny 2-round facefed run; FACEFED_DEPLOY_RUN_CONFIG overrides them.
FACEFED_TINY_RUN_CONFIG = os.environ.get(
    "FACEFED_DEPLOY_RUN_CONFIG",
    "num-rounds=2 num-sites=2 cohort-size=2 face-steps=3 emotion-steps=3 emotion-eval-limit=400 "
    'face-sources="orl,eyaleb" accountant="rdp"',
)
RUN_TIMEOUT_S = 600.0


def bring_up(procs: Procs, out: Path, data_dir: Path) -> Federation:
    """Provision with the CLI, start the coordinator and two sites with their start scripts.

    All under umask 000, the most careless operator's: the kit modes and the files the started
    processes create must not depend on it (:func:`assert_owner_only`).
    """
    old_umask = os.umask(0)
    try:
        return _bring_up(procs, out, data_dir)
    finally:
        os.umask(old_umask)


def assert_owner_only(fed: Federation) -> None:
    """Every kit directory 0700; the SuperLink's database (with -wal/-shm) and its log 0600."""
    files = [*(fed.coordinator / "state").iterdir(), *(fed.coordinator / "logs").iterdir()]
    names = {p.name for p in files}
    assert {"superlink.db", "superlink.log"} <= names, names
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files if p.is_file()}
    assert set(modes.values()) == {0o600}, modes
    dirs = [d for d in [fed.out, *fed.out.rglob("*")] if d.is_dir() and not d.is_symlink()]
    ours = [d for d in dirs if "flwr-home" not in d.parts]  # Flower's own app cache
    assert {stat.S_IMODE(d.stat().st_mode) for d in ours} == {0o700}


def _bring_up(procs: Procs, out: Path, data_dir: Path) -> Federation:
    port = free_port()
    argv = ["deploy", "init", "--sites", "2", "--coordinator", "127.0.0.1", "--bind", "127.0.0.1"]
    argv += [
        "--demo-partitions",
        "--control-port",
        str(free_port()),
        "--hub-port",
        str(free_port()),
    ]
    assert main([*argv, "--port", str(port), "--out", str(out), "--data-dir", str(data_dir)]) == 0
    fed = Federation(out=out, port=port, sites=("site-1", "site-2"))
    # No FACEFED_DATA: the ServerApp runs from its installed bundle under flwr-home, and finds its
    # evaluation data through the kit (coordinator.toml data-dir, from `init --data-dir`).
    env = {k: v for k, v in deploy.flwr_env().items() if k != "FACEFED_DATA"}
    procs.start("coordinator", [str(fed.coordinator / "start-coordinator.sh")], env)
    deadline = time.monotonic() + 180
    while not all((fed.coordinator / "sites" / f"{s}.node-id").exists() for s in fed.sites):
        assert time.monotonic() < deadline, procs.log("coordinator")[-3000:]
        time.sleep(1)
    for site in fed.sites:  # the signed kit stays as sent: a free runtime port on the command line
        script = [str(fed.site(site) / "start-site.sh"), "--runtime-port", str(free_port())]
        procs.start(site, script, env)
    online = wait_online(fed.env, 2)
    assert len(online) == 2, procs.log("site-1")[-3000:]
    return fed


def submit(fed: Federation, app: Path, run_config: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "common.cli", "deploy", "submit", "--kit", str(fed.coordinator)]
    cmd += ["--app", str(app), "--timeout", str(RUN_TIMEOUT_S)]
    cmd += ["--run-config", run_config] if run_config else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(  # from another folder: nothing may depend on the shell's cwd
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S + 120,
        cwd=fed.out.parent,
    )


@pytest.mark.slow  # the minimal-app rehearsal; the facefed run below runs by default
def test_two_round_run_over_tls_with_node_auth_finishes_and_failures_are_caught(
    procs: Procs, tmp_path: Path
) -> None:
    data = tmp_path / "site-data"
    data.mkdir()
    fed = bring_up(procs, tmp_path / "kits", data)

    ok = submit(fed, SMOKE_APP, 'num-server-rounds=2 expected-sites="site-1,site-2"')
    raw = subprocess.run(  # flwr's own exit code for a run that will fail
        [deploy._flwr_bin("flwr"), "run", str(SMOKE_APP), deploy.CONNECTION, "-c", "fail=true",
         "--format", "json"],
        env=fed.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    failed = submit(fed, SMOKE_APP, "fail=true")

    assert ok.returncode == 0 and deploy_flwr.RUN_COMPLETED in ok.stdout, ok.stdout + ok.stderr
    assert raw.returncode == 0  # although this run fails: hence success is read from `flwr ls`
    assert failed.returncode == 1 and "finished:failed" in failed.stdout, failed.stdout
    assert "smoke app asked to fail" in failed.stdout


def _runs_executed(fed: Federation, site: str) -> set[int]:
    """Run ids whose smoke ClientApp code ran on ``site`` (it records each in its state dir)."""
    marker = fed.site(site) / "state" / "smoke-runs.txt"
    return {int(line) for line in marker.read_text().split()} if marker.exists() else set()


def test_sites_run_only_app_bundles_signed_by_the_trusted_publisher(
    procs: Procs, tmp_path: Path
) -> None:
    data = tmp_path / "site-data"
    data.mkdir()
    fed = bring_up(procs, tmp_path / "kits", data)
    run_config = 'num-server-rounds=1 expected-sites="site-1,site-2"'
    rogue_key = tmp_path / "rogue.key"
    pki.write_secret(rogue_key, pki.create_publisher_keypair("rogue").private_openssh)

    # Attack 1: whoever reaches the Control API submits a bundle the plain Flower way, unsigned.
    unsigned = deploy_flwr.call(
        ["run", str(SMOKE_APP), deploy.CONNECTION, "--run-config", run_config], fed.env, timeout=300
    )
    unsigned_run = deploy_flwr.wait_for_run(fed.env, int(unsigned["run-id"]), timeout=RUN_TIMEOUT_S)
    # Attack 2: the bundle comes through facefed's hub with a valid signature, by another key.
    rogue = deploy_publisher.build_signed_fab(
        SMOKE_APP, deploy_publisher.load_signing_key(rogue_key)
    )
    rogue_id = deploy_flwr.submit(fed.env, rogue, hub_port=fed.hub_port, run_config=[run_config])
    rogue_run = deploy_flwr.wait_for_run(fed.env, rogue_id, timeout=RUN_TIMEOUT_S)
    # Control: the same bundle signed by the trusted publisher, through `facefed deploy submit`.
    trusted = submit(fed, SMOKE_APP, run_config)

    assert unsigned_run["status"] == "finished:failed", unsigned_run
    assert "could not be verified" in unsigned_run["status-details"]
    assert rogue_run["status"] == "finished:failed", rogue_run
    assert "could not be verified" in rogue_run["status-details"]
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    trusted_id = int(trusted.stdout.split()[1])
    for site in fed.sites:  # the refused bundles' code never ran on a site; the signed one did
        assert _runs_executed(fed, site) == {trusted_id}
        assert "FAB verification failed" in procs.log(site)
    assert_owner_only(fed)


def test_facefed_app_runs_two_rounds_on_deployed_sites(procs: Procs, tmp_path: Path) -> None:
    from common.paths import data_dir

    fed = bring_up(procs, tmp_path / "kits", data_dir())

    result = submit(fed, REPO_ROOT, FACEFED_TINY_RUN_CONFIG)  # no data-dir, no out-dir: the kit's
    out = fed.coordinator / "runs" / "default"

    assert result.returncode == 0, result.stdout + result.stderr
    run_id = int(result.stdout.split()[1])
    assert deploy_flwr.run_status(fed.env, run_id)["status"] == deploy_flwr.RUN_COMPLETED
    # The coordinator wrote results and a ledger whose entries the two sites signed.
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    from common.privacy.verify import verify_ledger

    ledger = verify_ledger(out / "ledger.db", require_closed=True)
    assert ledger.ok
    assert {s.site_id for s in ledger.sites} == {"site-1", "site-2"}
    assert deploy_provision.coordinator_dir(fed.out).is_dir()
