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
from common.privacy.accounting import compute_epsilon
from common.privacy.entry import make_round_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger

SITES = ("hospital-a", "clinic-b", "lab-c")
CHROMIUM = Path("/usr/bin/chromium")


def write_ledger(out: Path, *, seeded: tuple[str, int] | None = None) -> Path:
    """A closed 2-round ledger of three sites (synthetic but typical DP-SGD settings).

    Site ``i`` took part in ``i`` rounds of earlier runs, so its lifetime epsilon exceeds this run's;
    ``seeded`` names the one (site, round) whose noise was seeded rather than secret.
    """
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
                history = ledger.history(site_id)
                earlier_runs = mechanisms * i
                body = make_round_body(
                    run_id="run-cli",
                    site_id=site_id,
                    round=rnd,
                    mechanisms=mechanisms,
                    history=history,
                    delta=1e-5,
                    budget_epsilon=6.0 + i,
                    model_hash=f"sha256:{rnd:064x}",
                    secret_noise=(site_id, rnd) != seeded,
                    epsilon_lifetime=compute_epsilon([*earlier_runs, *history, *mechanisms], 1e-5),
                )
                ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))
        ledger.finish("2 rounds complete")
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every release's noise secret."""
    return write_ledger(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def seeded_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clinic-b's round-2 release (entry #5) had seeded noise."""
    return write_ledger(tmp_path_factory.mktemp("seeded"), seeded=("clinic-b", 2))


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


def test_verify_shows_noise_and_lifetime_and_says_lifetime_is_not_recomputed(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "verify", str(run_dir / "ledger.db"), "--no-cross-check"])

    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^lab-c .* secret +\d+\.\d+ +\d+\.\d+ ", out, re.MULTILINE)
    assert "cannot recompute" in out


def test_require_secret_noise_passes_a_ledger_of_secret_noise_only(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "audit",
            "verify",
            str(run_dir / "ledger.db"),
            "--no-cross-check",
            "--require-secret-noise",
        ]
    )

    assert code == 0
    assert "every release's noise secret" in capsys.readouterr().out


def test_require_secret_noise_fails_on_one_seeded_entry_in_one_line(
    seeded_run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = str(seeded_run_dir / "ledger.db")

    lenient = main(["audit", "verify", ledger, "--no-cross-check"])
    lenient_out = capsys.readouterr().out
    code = main(["audit", "verify", ledger, "--no-cross-check", "--require-secret-noise"])
    captured = capsys.readouterr()

    assert lenient == 0 and "seeded" in lenient_out  # recorded and shown, allowed by default
    assert code == 4
    fail = [line for line in captured.out.splitlines() if line.startswith("FAIL")]
    assert fail == [
        "FAIL: first bad entry: entry #5 (site clinic-b, round 2): noise was seeded "
        "(reproducible from a seed), not secret (seeded entries in all: 1); "
        "--require-secret-noise accepts only noise from the OS CSPRNG"
    ]
    assert captured.err == "" and "Traceback" not in captured.out


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


def test_report_shows_noise_kinds_and_lifetime_beside_run_epsilon(
    report: tuple[Path, Path],
) -> None:
    data = json.loads(report[1].read_text())
    page = report[0].read_text()

    sites = {s["site_id"]: s for s in data["sites"]}
    assert all(s["noise"] == ["secret"] for s in sites.values())
    assert all(r["noise"] == "secret" for s in sites.values() for r in s["rounds"])
    a, c = sites["hospital-a"], sites["lab-c"]
    assert a["lifetime_epsilon"] == pytest.approx(a["cumulative_epsilon"], rel=0.01)  # no past
    assert c["lifetime_epsilon"] > c["cumulative_epsilon"] + 0.5  # two earlier rounds
    assert c["rounds"][-1]["epsilon_lifetime"] == c["lifetime_epsilon"]
    assert "ε lifetime" in page and "ε spent (run)" in page
    assert f"{c['lifetime_epsilon']:.4f}" in page
    assert '">secret</td>' in page


def test_report_json_lists_both_noise_kinds_of_a_site(seeded_run_dir: Path, tmp_path: Path) -> None:
    html_path, json_path = tmp_path / "r.html", tmp_path / "r.json"

    code = main(
        [
            "audit",
            "report",
            str(seeded_run_dir / "ledger.db"),
            "--html",
            str(html_path),
            "--json",
            str(json_path),
            "--require-secret-noise",
        ]
    )

    data = json.loads(json_path.read_text())
    assert code == 4 and data["verified"] is False and data["secret_noise_required"] is True
    assert {s["site_id"]: s["noise"] for s in data["sites"]}["clinic-b"] == ["secret", "seeded"]
    assert data["first_bad_entry"] == 5
    assert "secret, seeded" in html_path.read_text()


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
