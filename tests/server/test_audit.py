"""`facefed audit verify | report | keygen`, end to end through the CLI entry point."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from common.cli import main
from common.crypto.signing import (
    canonical_bytes,
    generate_private_key,
    load_private_key,
    save_public_key,
    sign,
)
from common.privacy.entry import make_round_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger

SITES = ("hospital-a", "clinic-b", "lab-c")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed 2-round ledger of three sites (synthetic but typical DP-SGD settings)."""
    out = tmp_path_factory.mktemp("run")
    coordinator = generate_private_key()
    save_public_key(coordinator.public_key(), out / "coordinator.pub")
    site_keys = {s: generate_private_key() for s in SITES}
    with Ledger.open(out / "ledger.db", run_id="run-cli", coordinator_key=coordinator) as ledger:
        for rnd in (1, 2):
            for i, (site_id, key) in enumerate(site_keys.items()):
                mechanisms = [
                    DpSgdEvent(
                        noise_multiplier=1.1,
                        sample_rate=0.02 * (i + 1),
                        steps=50,
                        clip_norm=1.0,
                        name="face",
                    ),
                    DpSgdEvent(
                        noise_multiplier=1.1,
                        sample_rate=0.04,
                        steps=25,
                        clip_norm=1.0,
                        name="emotion",
                    ),
                ]
                body = make_round_body(
                    run_id="run-cli",
                    site_id=site_id,
                    round=rnd,
                    mechanisms=mechanisms,
                    history=ledger.history(site_id),
                    delta=1e-5,
                    budget_epsilon=6.0 + i,
                    model_hash=f"sha256:{rnd:064x}",
                )
                ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))
        ledger.finish("2 rounds complete")
    return out


def test_verify_passes_a_valid_ledger_and_prints_every_site(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "audit",
            "verify",
            str(run_dir / "ledger.db"),
            "--coordinator-key",
            str(run_dir / "coordinator.pub"),
            "--require-closed",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "OK: chain, signatures" in out
    assert all(site in out for site in SITES)
    assert re.search(r"PRV \d+\.\d+\s+RDP \d+\.\d+", out)


def test_verify_fails_naming_the_first_bad_entry(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "ledger.db"
    shutil.copy(run_dir / "ledger.db", ledger)
    conn = sqlite3.connect(ledger)
    conn.execute("DROP TRIGGER entries_append_only_d")
    conn.execute("DELETE FROM entries WHERE seq = 3")
    conn.commit()
    conn.close()

    code = main(["audit", "verify", str(ledger), "--no-cross-check"])

    assert code == 4
    assert "FAIL: first bad entry: entry #4 (site hospital-a, round 2)" in capsys.readouterr().out


def test_verify_of_a_missing_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "verify", str(tmp_path / "nope.db")])

    err = capsys.readouterr().err
    assert code == 4
    assert err.count("\n") == 1 and "no ledger at" in err


def test_keygen_writes_an_owner_only_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = tmp_path / "site.pem", tmp_path / "site.pub"

    assert main(["audit", "keygen", str(private), str(public)]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_private_key(private)
    assert main(["audit", "keygen", str(private), str(public)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err


@pytest.fixture(scope="module")
def report(run_dir: Path) -> tuple[Path, Path]:
    html_path, json_path = run_dir / "report.html", run_dir / "report.json"
    code = main(
        [
            "audit",
            "report",
            str(run_dir / "ledger.db"),
            "--html",
            str(html_path),
            "--json",
            str(json_path),
            "--coordinator-key",
            str(run_dir / "coordinator.pub"),
        ]
    )
    assert code == 0
    return html_path, json_path


def test_report_is_self_contained_and_shows_every_site(report: tuple[Path, Path]) -> None:
    page = report[0].read_text()

    assert "Ledger verified" in page
    assert all(site in page for site in SITES)
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page


def test_report_json_holds_budgets_and_recomputed_epsilons(report: tuple[Path, Path]) -> None:
    data = json.loads(report[1].read_text())

    assert data["verified"] is True and data["closed"] is True
    sites = {s["site_id"]: s for s in data["sites"]}
    assert set(sites) == set(SITES)
    for site in sites.values():
        last = site["rounds"][-1]
        assert site["remaining_epsilon"] == pytest.approx(
            site["budget_epsilon"] - last["epsilon_cumulative"]
        )
        assert last["epsilon_cumulative"] == pytest.approx(
            last["recorded_epsilon_cumulative"], rel=0.01
        )
        assert site["cross_check"]["prv"] < site["cross_check"]["rdp"]
        assert site["privacy_unit"] == "example"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    shot = tmp_path / "report.png"

    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1800",
            f"--screenshot={shot}",
            report[0].as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )

    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 0.05  # not a blank page
