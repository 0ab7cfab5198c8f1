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


# ---------------------------------------------------------------------- the exit-code table
def site_env(tmp_path: Path) -> dict[str, str]:
    return {
        "FACEFED_SITE_DIR": str(tmp_path / "store"),
        "FACEFED_KEY_DIR": str(tmp_path / "keys"),
        "FACEFED_SITE_KEY": "",
        "FACEFED_SITE_KEY_COMMAND": "",
        "FACEFED_SITE_PASSPHRASE": "",
    }


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (("site", "identify", "--top-k", "-2", "x.jpg"), 2, "--top-k"),
        (("site", "init", "--dim", "0"), 2, "--dim"),
        (("site", "verify", "--id", "a", "--threshold", "nan", "x.jpg"), 2, "--threshold"),
        (("site", "list", "--no-such-flag"), 2, "--no-such-flag"),
        (("site", "list"), 3, "no template store"),
        (("site", "init", "--key-command", "/nonexistent/vault read k"), 4, "not found"),
    ],
)
def test_site_errors_are_one_line_with_the_documented_code(
    tmp_path: Path, argv: tuple[str, ...], code: int, needle: str
) -> None:
    proc = facefed(*argv, env=site_env(tmp_path))
    assert proc.returncode == code, proc.stderr
    assert_one_line_error(proc, needle)
    assert "usage:" not in proc.stderr


def test_site_init_in_a_shared_folder_is_refused_with_code_3_and_mode_kept(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    proc = facefed("site", "init", "--store", str(shared), env=site_env(tmp_path))
    assert proc.returncode == 3
    assert_one_line_error(proc, "shared", "never changes the mode")
    assert shared.stat().st_mode & 0o7777 == 0o1777


def test_a_passphrase_piped_to_init_is_refused_without_the_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "site", "init", "--passphrase"],
        input="a long passphrase\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **site_env(tmp_path)},
    )
    assert proc.returncode == 2
    assert_one_line_error(proc, "--passphrase-stdin")
    assert not (tmp_path / "store").exists() and not (tmp_path / "keys").exists()


def test_the_documented_table_matches_the_error_classes() -> None:
    from common import errors

    table = (Path(__file__).parent.parent / "docs" / "exit-codes.md").read_text()
    rows: dict[int, str] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = line
    assert set(rows) == {0, 1, 2, 3, 4, 130}
    named = {
        errors.PrivacyBudgetError: 3,
        errors.IntegrityError: 4,
        errors.KeyUnavailableError: 4,
    }
    for cls, code in named.items():
        assert cls.exit_code == code and cls.__name__ in rows[code]
    assert errors.DataError.exit_code == errors.ConfigError.exit_code == 2
    assert errors.NotFoundError.exit_code == errors.RefusedError.exit_code == 3
