"""Bad input stops the command with one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def facefed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("facefed: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_dataset_directory(tmp_path: Path) -> None:
    proc = facefed(
        "simulate", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "does not exist", "--data-dir")


def test_data_directory_without_the_archives(tmp_path: Path) -> None:
    proc = facefed("simulate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "fer2013")


def test_corrupt_dataset_archive(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "fer2013_train_publictest.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 100)
    proc = facefed(
        "simulate",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "o"),
        env={"FACEFED_CACHE": str(tmp_path / "cache")},
    )
    assert_one_line_error(proc)


def test_unknown_config_key(tmp_path: Path) -> None:
    proc = facefed("simulate", "--set", "num-round=2", "--out", str(tmp_path))
    assert_one_line_error(proc, "unknown config key 'num-round'", "num-rounds")


@pytest.mark.parametrize("epsilon", ["0", "-1"])
def test_zero_or_negative_epsilon(tmp_path: Path, epsilon: str) -> None:
    proc = facefed("simulate", "--epsilon", epsilon, "--out", str(tmp_path))
    assert_one_line_error(proc, "max-epsilon must be a positive number")


def test_broken_scenario_file(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text("num-rounds = = 3\n")
    proc = facefed("simulate", "--scenario", str(scenario))
    assert_one_line_error(proc, "not valid TOML")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "round_001.ckpt"
    ckpt.write_bytes(b"FFCKPT01" + bytes(32) + b"junk")
    proc = facefed("evaluate", "--checkpoint", str(ckpt))
    assert_one_line_error(proc, "corrupt")
