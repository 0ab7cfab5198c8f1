"""End to end on loopback, the way docs/deploy.md tells an IT team to do it.

``facefed deploy init`` -> ``start-coordinator.sh`` (SuperLink with TLS + node auth, registers the
sites) -> two ``start-site.sh`` -> ``facefed deploy submit``. Success is judged from
``flwr ls --format json``; the failing-run test shows why ``flwr run``'s exit code cannot be used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_helpers import Federation, Procs, free_port, wait_online

from common.cli import main
from common.paths import REPO_ROOT
from server import deploy, deploy_flwr, deploy_provision

SMOKE_APP = Path(__file__).parent / "smoke_app"
# Run-config overrides for a tiny 2-round facefed run; FACEFED_DEPLOY_RUN_CONFIG overrides them.
FACEFED_TINY_RUN_CONFIG = os.environ.get(
    "FACEFED_DEPLOY_RUN_CONFIG",
    "num-rounds=2 num-sites=2 cohort-size=2 face-steps=3 emotion-steps=3 emotion-eval-limit=400 "
    'face-sources="orl,eyaleb" accountant="rdp"',
)
RUN_TIMEOUT_S = 600.0


def bring_up(procs: Procs, out: Path, data_dir: Path) -> Federation:
    """Provision with the CLI, start the coordinator and two sites with their start scripts."""
    port = free_port()
    argv = ["deploy", "init", "--sites", "2", "--coordinator", "127.0.0.1", "--bind", "127.0.0.1"]
    argv += ["--demo-partitions"]
    assert main([*argv, "--port", str(port), "--out", str(out), "--data-dir", str(data_dir)]) == 0
    fed = Federation(out=out, port=port, sites=("site-1", "site-2"))
    for site in fed.sites:  # what an IT person edits: a free loopback port for the runtime API
        toml = fed.site(site) / "site.toml"
        text = toml.read_text().replace("runtime-port = 909", f"runtime-port = {free_port()} # ")
        toml.write_text(text)
    # The app runs from its installed bundle under flwr-home, not from this checkout, so the
    # ServerApp finds evaluation data through FACEFED_DATA, never through a repo-relative default.
    env = {**deploy.flwr_env(), "FACEFED_DATA": str(data_dir)}
    procs.start("coordinator", [str(fed.coordinator / "start-coordinator.sh")], env)
    deadline = time.monotonic() + 180
    while not all((fed.coordinator / "sites" / f"{s}.node-id").exists() for s in fed.sites):
        assert time.monotonic() < deadline, procs.log("coordinator")[-3000:]
        time.sleep(1)
    for site in fed.sites:
        procs.start(site, [str(fed.site(site) / "start-site.sh")], env)
    online = wait_online(fed.env, 2)
    assert len(online) == 2, procs.log("site-1")[-3000:]
    return fed


def submit(fed: Federation, app: Path, run_config: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "common.cli", "deploy", "submit", "--kit", str(fed.coordinator)]
    cmd += ["--app", str(app), "--timeout", str(RUN_TIMEOUT_S)]
    cmd += ["--run-config", run_config] if run_config else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 120)


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


def test_facefed_app_runs_two_rounds_on_deployed_sites(procs: Procs, tmp_path: Path) -> None:
    from common.paths import data_dir

    fed = bring_up(procs, tmp_path / "kits", data_dir())

    out = tmp_path / "run"
    result = submit(fed, REPO_ROOT, f'{FACEFED_TINY_RUN_CONFIG} out-dir="{out}"')

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
