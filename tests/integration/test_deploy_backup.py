"""A backup taken while a deployed run trains, restored into fresh folders, resumes that run.

The loopback federation of docs/deploy.md section 10 (coordinator, two sites, the facefed app)
starts a three-round run. As soon as round 1 is checkpointed, and while round 2 trains, the
coordinator kit and then both site kits are backed up (`deploy backup`). Every process is then
killed, as a lost machine would be; the three kits are restored into new folders
(`deploy restore`), started from there, and the run is submitted again with ``resume=true``. It
finishes; `facefed audit verify` accepts its ledger; each site is charged exactly once per round,
in the ledger and in its own lifetime history, and its lifetime epsilon is that one run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_helpers import Federation, Procs, free_port, wait_online
from test_deploy_run import RUN_TIMEOUT_S, bring_up

from client.training.site_store import SiteStore
from common.cli import main
from common.paths import REPO_ROOT, data_dir
from common.privacy.verify import verify_ledger
from server import deploy, deploy_backup, deploy_flwr, deploy_restore

RUN_CONFIG = (
    "num-rounds=3 num-sites=2 cohort-size=2 face-steps=3 emotion-steps=3 emotion-eval-limit=400 "
    'face-sources="orl,eyaleb" accountant="rdp"'
)


def _submit_command(coordinator: Path, publisher_key: Path, run_config: str) -> list[str]:
    return [
        sys.executable, "-m", "common.cli", "deploy", "submit", "--kit", str(coordinator),
        "--app", str(REPO_ROOT), "--publisher-key", str(publisher_key),
        "--timeout", str(RUN_TIMEOUT_S), "--run-config", run_config,
    ]  # fmt: skip


def _wait_for(path: Path, procs: Procs, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, procs.log("submit")[-3000:]
        time.sleep(0.2)


def _wait_until(condition: Callable[[], bool], procs: Procs, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, procs.log("coordinator-restored")[-3000:]
        time.sleep(2.0)


def _online(coordinator: Path) -> list[str]:
    nodes = deploy_flwr.list_nodes(deploy.flwr_env(coordinator))
    return [str(n["node-id"]) for n in nodes if n["status"] == "online"]


@pytest.mark.slow  # a deployment, a kill and a resumed deployment: several minutes on 2 cores
def test_a_run_backed_up_while_training_resumes_from_the_restored_kits(
    procs: Procs, tmp_path: Path
) -> None:
    fed = bring_up(procs, tmp_path / "kits", data_dir())
    publisher_key = tmp_path / "kits" / "publisher" / "publisher.key"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = procs.start("submit", _submit_command(fed.coordinator, publisher_key, RUN_CONFIG), env)
    out = fed.coordinator / "runs" / "default"

    # Back up while the run trains round 2: the coordinator first, then the sites.
    _wait_for(out / "checkpoints" / "round_001.ckpt", procs)
    backups = tmp_path / "backups"
    deploy_backup.backup(fed.coordinator, backups / "coordinator")
    for site in fed.sites:
        deploy_backup.backup(fed.site(site), backups / site)
    alive = run.poll() is None
    procs.stop_all()  # the machines are lost

    backed_up = verify_ledger(backups / "coordinator/files/runs/default/ledger.db")
    assert alive and backed_up.ok and not backed_up.closed  # taken mid-run, and consistent
    checkpoints = {
        p.name for p in (backups / "coordinator/files/runs/default/checkpoints").iterdir()
    }
    assert "round_001.ckpt" in checkpoints and "round_003.ckpt" not in checkpoints

    restored = tmp_path / "restored"
    new = Federation(out=restored, port=fed.port, sites=fed.sites)  # the same signed ports
    coordinator = new.coordinator
    assert deploy_restore.restore(backups / "coordinator", coordinator) is None
    for site in fed.sites:
        assert deploy_restore.restore(backups / site, new.site(site)) is None
    deploy.write_connection(coordinator, deploy.load_coordinator(coordinator))
    flwr_env = {k: v for k, v in deploy.flwr_env().items() if k != "FACEFED_DATA"}
    procs.start("coordinator-restored", [str(coordinator / "start-coordinator.sh")], flwr_env)
    for site in fed.sites:  # the restored database knows both sites: nothing is registered anew
        _wait_until(
            lambda s=site: f"site {s}: key already registered" in procs.log("coordinator-restored"),
            procs,
        )
    # The copy shows both sites online (their last heartbeat before the backup); the SuperLink
    # accepts them again once that has expired (at most 2 x 30 s, Flower's heartbeat patience).
    _wait_until(lambda: not _online(coordinator), procs)
    for site in fed.sites:
        script = [str(new.site(site) / "start-site.sh"), "--runtime-port", str(free_port())]
        procs.start(f"{site}-restored", script, flwr_env)
    assert len(wait_online(deploy.flwr_env(coordinator), 2)) == 2, procs.log("site-1-restored")

    resumed = subprocess.run(
        _submit_command(coordinator, publisher_key, f"{RUN_CONFIG} resume=true"),
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 120, cwd=tmp_path,
    )  # fmt: skip

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_out = coordinator / "runs" / "default"
    results = json.loads((new_out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["resumes"][0]["after_round"] >= 1
    ledger_path, coordinator_pub = new_out / "ledger.db", new_out / "keys" / "coordinator.pub"
    audit = ["audit", "verify", str(ledger_path), "--coordinator-key", str(coordinator_pub)]
    assert main([*audit, "--require-closed"]) == 0
    ledger = verify_ledger(ledger_path, require_closed=True)
    charged = [(e.body.site_id, e.body.round, e.body.guarantee) for e in ledger.entries if e.body]
    assert len(charged) == len(set(charged))  # nothing charged twice in the ledger
    assert {(s, r) for s, r, _ in charged} == {(s, r) for s in fed.sites for r in (1, 2, 3)}
    for summary in ledger.sites:  # one run: the lifetime is this run's spend, not twice it
        last = summary.rounds[-1].body
        assert last.epsilon_lifetime == pytest.approx(last.epsilon_cumulative, rel=0.01)
    for site in new.sites:  # each site's own history: every round of the run once
        releases = SiteStore(new.site(site) / "state").lifetime()
        rounds = [(r.run_id, r.round) for r in releases]
        assert len(rounds) == len(set(rounds)) and sorted(r for _, r in rounds) == [1, 2, 3]
