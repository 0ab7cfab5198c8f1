"""A real federated simulation on real faces, small enough for CI: 2 sites, 1 round, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "--rounds",
    "1",
    "--sites",
    "2",
    "--cohort",
    "2",
    "--epsilon",
    "4",
    "--set",
    "face-steps=3",
    "--set",
    "emotion-steps=3",
    "--set",
    "emotion-eval-limit=400",
    "--set",
    'face-sources="orl,eyaleb"',
    "--set",
    'accountant="rdp"',
]


def facefed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("sim")
    return out, facefed("simulate", *TINY, "--out", str(out))


def test_two_site_one_round_simulation_completes(tiny_run) -> None:
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    (round1,) = results["rounds"]
    assert set(round1["clients"]) == {"site-0", "site-1"}
    for site in round1["clients"].values():
        assert 0 < site["epsilon"] <= 4.0
        assert site["delta"] == 1e-5 and site["steps"] == 6
        # The egress guard checked this site's reply and refused nothing.
        assert site["egress_checked"] == 1 and site["egress_refused"] == 0
    assert 0 <= round1["emotion"]["accuracy"] <= 1 and 0 <= round1["face"]["lfw_accuracy"] <= 1
    assert Path(results["checkpoint"]).is_file()
    assert results["config"]["num-sites"] == 2
    # where the round's time went, for the scale benchmark
    phases = round1["phases"]
    assert set(phases) == {"configure_s", "wait_s", "accept_s", "aggregate_s", "save_s"}
    assert all(v >= 0 for v in phases.values())
    assert phases["accept_s"] <= phases["wait_s"]  # replies are checked while the others train
    assert phases["wait_s"] + phases["configure_s"] + phases["aggregate_s"] <= round1["time_s"]


def test_the_run_ledger_verifies_and_has_one_entry_per_site(tiny_run) -> None:
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = facefed(
        "audit",
        "verify",
        str(out / "ledger.db"),
        "--coordinator-key",
        str(out / "keys" / "coordinator.pub"),
        "--require-closed",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    from common.privacy.verify import verify_ledger

    result = verify_ledger(out / "ledger.db", require_closed=True)
    assert result.ok and result.closed
    cumulative = {site.site_id: site.cumulative for site in result.sites}
    assert set(cumulative) == {"site-0", "site-1"}
    assert all(0 < eps <= 4.0 for eps in cumulative.values())


def test_checkpoint_scores_through_facefed_evaluate(tiny_run) -> None:
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = json.loads((out / "results.json").read_text())["checkpoint"]
    result = facefed("evaluate", "--checkpoint", ckpt, "--skip-face")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["emotion"]["images"] == 3589


def test_small_budget_stops_the_run_cleanly_and_no_site_exceeds_it(tmp_path: Path) -> None:
    # A fixed noise multiplier too small for 4 rounds at epsilon 2: sites run out of budget.
    # Example level, where one round fits the budget (at person level q is 1/3 for these sites'
    # few people and the very first round would already be refused).
    proc = facefed(
        "simulate",
        "--set",
        'dp-unit="example"',
        "--rounds",
        "4",
        "--sites",
        "2",
        "--cohort",
        "2",
        "--epsilon",
        "2",
        "--set",
        "noise-multiplier=1.0",
        "--set",
        "face-batch=64",  # the sampling rate this budget was sized for (the default samples less)
        "--set",
        "emotion-batch=256",  # likewise (the default's 2,048 takes a quarter of a site a step)
        "--set",
        "face-steps=3",
        "--set",
        "emotion-steps=3",
        "--set",
        "emotion-eval-limit=300",
        "--set",
        'face-sources="orl,eyaleb"',
        "--set",
        'accountant="rdp"',
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped early" in proc.stdout and "within their privacy budget" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "stopped"
    assert 1 <= len(results["rounds"]) < 4

    from common.privacy.verify import verify_ledger

    ledger = verify_ledger(tmp_path / "ledger.db", require_closed=True)
    assert ledger.ok
    for site in ledger.sites:
        assert all(r.epsilon_cumulative <= 2.0 for r in site.rounds)


@pytest.mark.parametrize(
    ("face_model", "expected"),
    [("pretrained", ["lfw", "orl", "eyaleb"]), ("scratch", [])],
)
def test_the_aligned_chips_of_every_face_source_are_built_before_any_site_starts(
    face_model: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # each simulation worker would otherwise build the same chips at once in round 1
    from simulations import runner
    from simulations.scenarios import load_scenario, resolve

    built: list[str] = []
    monkeypatch.setattr(runner, "dataset_chips", lambda source, data_dir: built.append(source))

    runner.warm_caches(resolve(load_scenario("default"), {"face-model": face_model}))

    assert built == expected
