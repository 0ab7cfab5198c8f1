"""A simulation killed with SIGKILL after a round was charged but before it was checkpointed is resumed:
it finishes, and no site is charged twice for the round it re-runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.privacy.verify import verify_ledger

TINY_TWO_ROUNDS = [
    *("--rounds", "2", "--sites", "2", "--cohort", "2", "--epsilon", "4"),
    *("--set", "face-steps=3", "--set", "emotion-steps=3", "--set", "emotion-eval-limit=400"),
    *("--set", 'face-sources="orl,eyaleb"', "--set", 'accountant="rdp"'),
]


@pytest.mark.parametrize(
    "failpoint",
    [
        "round.replied:2",  # every reply recorded (as it arrived), none aggregated
        "round.aggregated:2",  # aggregated, not checkpointed
    ],
)
def test_a_run_killed_between_ledger_and_checkpoint_resumes_without_double_charging(
    tmp_path: Path, failpoint: str
) -> None:
    cmd = [sys.executable, "-m", "common.cli", "simulate", *TINY_TWO_ROUNDS, "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FACEFED_FAILPOINT": failpoint}
    killed = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=600, start_new_session=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    charged = verify_ledger(tmp_path / "ledger.db")
    assert {(e.body.site_id, e.body.round) for e in charged.entries if e.body} == {
        ("site-0", 1),
        ("site-1", 1),
        ("site-0", 2),
        ("site-1", 2),
    }  # round 2 was charged, but round_002.ckpt was never written
    assert not (tmp_path / "checkpoints" / "round_002.ckpt").exists()

    env.pop("FACEFED_FAILPOINT")
    resumed = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "--resume", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["resumes"][0]["after_round"] == 1
    ledger = verify_ledger(tmp_path / "ledger.db")
    assert ledger.ok, ledger.errors
    rounds = [(e.body.site_id, e.body.round) for e in ledger.entries if e.body]
    assert sorted(rounds) == sorted(set(rounds)) and len(rounds) == 4  # round 2 recorded once
    epsilon = {s.site_id: s.rounds[-1].epsilon_cumulative for s in ledger.sites}
    assert epsilon == {s: results["rounds"][-1]["clients"][s]["epsilon"] for s in epsilon}
    assert all(
        e <= 4.0 for e in epsilon.values()
    )  # the budget of the run, not exceeded by a re-run
