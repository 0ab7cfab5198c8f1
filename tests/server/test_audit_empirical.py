"""The one-run empirical audit on real faces: it stays at or below a true claim, it detects a run
without noise, and it catches an implementation that adds less noise than it claims.

The site: 40 ORL people through dlib's pretrained face network (frozen trunk features, the embedding
layer trained under DP-SGD), 2 rounds of 20 steps, as ``facefed audit empirical`` runs it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import client.training.fast_dp as fast_dp
from client.training.audit_run import AuditDesign, audit_site, guesses_right
from client.training.dp_random import SeededRandomness
from client.training.site_data import SiteSpec, load_site_tensors
from client.training.train import SiteTensors
from common.cli import main
from common.config import RunSettings, parse_run_config
from tests.common.privacy.test_units import write as write_ledger

SCENARIO = """
num-rounds = 2
num-sites = 1
cohort-size = 1
face-sources = "orl"
face-model = "pretrained"
face-steps = 20
face-batch = 100
face-lr = 0.001
emotion-steps = 0
emotion-train-limit = 64
accountant = "rdp"
"""
DESIGN = AuditDesign(canaries=2000, guesses=200)


def settings(**overrides: object) -> RunSettings:
    import tomllib

    return parse_run_config({**tomllib.loads(SCENARIO), **overrides})


@functools.lru_cache(maxsize=2)
def site(unit: str) -> SiteTensors:
    s = settings(**{"dp-unit": unit})
    return load_site_tensors(s, SiteSpec(partition_id=0, num_partitions=1))


def randomness(seed: int) -> SeededRandomness:
    return SeededRandomness(torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("unit", ["example", "person"])
def test_a_correct_dp_run_stays_at_or_below_its_claim(unit: str) -> None:
    s = settings(**{"dp-unit": unit, "max-epsilon": 2.0})
    result = audit_site(s, site(unit), DESIGN, randomness(1))
    assert result.claimed_epsilon <= 2.0
    assert result.bound <= result.claimed_epsilon
    assert result.within_claim


@pytest.mark.parametrize("unit", ["example", "person"])
def test_the_no_noise_control_is_detected(unit: str) -> None:
    s = settings(**{"dp-unit": unit})
    result = audit_site(s, site(unit), DESIGN, randomness(2), control=True)
    assert result.noise_multiplier == 0.0
    assert result.bound > 2.0  # far above what any correct run at epsilon 1 could show


def test_an_implementation_that_adds_a_tenth_of_the_noise_is_caught(monkeypatch) -> None:
    honest = fast_dp.FastDpSgd.noise

    def tenth(self):  # the bug an audit exists for: the noise is not what the ledger claims
        return [n / 10 for n in honest(self)]

    monkeypatch.setattr(fast_dp.FastDpSgd, "noise", tenth)
    s = settings(**{"max-epsilon": 1.0})
    result = audit_site(s, site("example"), DESIGN, randomness(3))
    assert result.bound > result.claimed_epsilon
    assert not result.within_claim


def test_guesses_take_the_highest_scores_as_in_and_the_lowest_as_out() -> None:
    scores = torch.tensor([0.9, -0.5, 0.1, 0.8, -0.9, 0.0])
    included = torch.tensor([True, False, True, False, False, True])
    # in: 0.9 (right), 0.8 (wrong); out: -0.9 (right), -0.5 (right)
    assert guesses_right(scores, included, 4) == 3


def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SCENARIO)
    return path


def test_the_cli_writes_the_bound_beside_the_claim_and_refutes_a_buggy_run(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    args = ["audit", "empirical", "--scenario", str(scenario_file(tmp_path))]
    args += ["--epsilon", "1", "--canaries", "2000", "--guesses", "200"]
    out = tmp_path / "audit.json"
    assert main([*args, "--control", "--json", str(out), "--html", str(tmp_path / "a.html")]) == 0
    rows = json.loads(out.read_text())["rows"]
    dp, control = rows
    assert not dp["control"] and dp["bound_max"] <= dp["claimed_epsilon"] <= 1.0
    assert control["control"] and control["claimed_epsilon"] == "inf"
    page = (tmp_path / "a.html").read_text()
    assert f"{dp['bound_median']:.3f}" in page and "control" in page

    # the ledger's audit report shows the same bound beside the claim
    ledger = write_ledger(tmp_path, ("person", "person"))
    report = ["audit", "report", str(ledger), "--html", str(tmp_path / "r.html")]
    assert main([*report, "--json", str(tmp_path / "r.json"), "--empirical", str(out)]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["empirical_audit"]["rows"] == rows
    assert f"{dp['bound_median']:.3f}, {dp['bound_max']:.3f}" in (tmp_path / "r.html").read_text()
    (tmp_path / "junk.json").write_text("{}")
    capsys.readouterr()
    assert main([*report, "--empirical", str(tmp_path / "junk.json")]) == 2
    assert "is not an `audit empirical --json` file" in capsys.readouterr().err

    honest = fast_dp.FastDpSgd.noise
    monkeypatch.setattr(fast_dp.FastDpSgd, "noise", lambda self: [n / 10 for n in honest(self)])
    capsys.readouterr()
    assert main(args) == 4
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("facefed: error:")]
    assert "refutes the claim" in line and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--canaries", "100", "--guesses", "4"], "use at least 5 guesses"),
        (["--epsilon", "one"], "--epsilon must list positive numbers"),
        (["--guesses", "0"], "must be a whole number >= 1"),
    ],
)
def test_an_audit_that_cannot_work_is_one_line_and_exit_2(
    tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    args = ["audit", "empirical", "--scenario", str(scenario_file(tmp_path)), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("facefed: error:")]
    assert message in line and "Traceback" not in err


@pytest.mark.parametrize(
    "content",
    [
        {},
        {"rows": [{"unit": "person"}]},
        {"rows": "not a list of rows"},
    ],
    ids=["no-rows", "a-row-without-its-fields", "rows-not-a-list"],
)
def test_an_incomplete_empirical_file_is_one_line_and_exit_2_not_a_traceback(
    tmp_path: Path, capsys, content: dict
) -> None:
    # Found by the attack review: a file with the right format tag and no rows raised KeyError
    ledger = write_ledger(tmp_path, ("person", "person"))
    path = tmp_path / "emp.json"
    path.write_text(json.dumps({"format": "facefed-empirical-audit/1", **content}))
    report = ["audit", "report", str(ledger), "--html", str(tmp_path / "r.html")]
    assert main([*report, "--empirical", str(path)]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("facefed: error:")]
    assert "is not a complete `audit empirical --json` file" in line and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()
