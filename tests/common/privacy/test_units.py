"""The ledger states each model's privacy unit, and a stream that changes unit does not verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main
from common.crypto.signing import canonical_bytes, generate_private_key, save_public_key, sign
from common.errors import ConfigError
from common.privacy.accounting import compute_epsilon
from common.privacy.entry import make_round_body, parse_entry_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger


def event(name: str, unit: str) -> DpSgdEvent:
    q = 0.05 if unit == "person" else 0.02
    return DpSgdEvent(
        noise_multiplier=1.2, sample_rate=q, steps=20, clip_norm=1.0, name=name, unit=unit
    )


def write(out: Path, face_units: tuple[str, str]) -> Path:
    """A 2-round ledger of one site whose face model ran at ``face_units`` in rounds 1 and 2."""
    coordinator, site = generate_private_key(), generate_private_key()
    save_public_key(coordinator.public_key(), out / "coordinator.pub")
    with Ledger.open(out / "ledger.db", run_id="run-u", coordinator_key=coordinator) as ledger:
        for rnd, unit in enumerate(face_units, start=1):
            mechanisms = [event("face", unit), event("emotion", "example")]
            history = ledger.history("hospital-a")
            body = make_round_body(
                run_id="run-u",
                site_id="hospital-a",
                round=rnd,
                mechanisms=mechanisms,
                history=history,
                delta=1e-5,
                budget_epsilon=8.0,
                model_hash=f"sha256:{rnd:064x}",
                secret_noise=True,
                epsilon_lifetime=compute_epsilon([*history, *mechanisms], 1e-5),
            )
            ledger.append(body, site.public_key(), sign(site, canonical_bytes(body)))
        ledger.finish("done")
    return out / "ledger.db"


def test_the_report_states_each_models_unit(tmp_path: Path, capsys) -> None:
    ledger = write(tmp_path, ("person", "person"))
    key = str(tmp_path / "coordinator.pub")
    assert main(["audit", "verify", str(ledger), "--coordinator-key", key]) == 0
    assert "person (face), example (emotion)" in capsys.readouterr().out
    html, data = tmp_path / "r.html", tmp_path / "r.json"
    args = ["audit", "report", str(ledger), "--coordinator-key", key, "--html", str(html)]
    code = main([*args, "--json", str(data)])
    assert code == 0
    (site,) = json.loads(data.read_text())["sites"]
    assert site["units"] == {"face": "person", "emotion": "example"}
    assert [m["unit"] for m in site["rounds"][0]["mechanisms"]] == ["person", "example"]
    page = html.read_text()
    assert ">person</td>" in page and ">example</td>" in page
    assert "all of one person&#x27;s images" in page or "all of one person's images" in page


def test_a_stream_whose_face_model_changes_unit_fails_verification(tmp_path: Path, capsys) -> None:
    ledger = write(tmp_path, ("example", "person"))
    key = str(tmp_path / "coordinator.pub")
    assert main(["audit", "verify", str(ledger), "--coordinator-key", key]) != 0
    assert "changes privacy unit from example to person" in capsys.readouterr().out


def test_a_ledger_entry_written_before_units_reads_as_example_level() -> None:
    body = make_round_body(
        run_id="run-old",
        site_id="site-0",
        round=1,
        mechanisms=[event("face", "example")],
        history=[],
        delta=1e-5,
        budget_epsilon=8.0,
        model_hash="sha256:" + "0" * 64,
        secret_noise=True,
        epsilon_lifetime=compute_epsilon([event("face", "example")], 1e-5),
    )
    for m in body["mechanisms"]:
        del m["unit"]  # as version 1 wrote them
    assert parse_entry_body(body).mechanisms[0].unit == "example"
    assert body["privacy_unit"] == "example"


def test_an_unknown_unit_is_refused() -> None:
    with pytest.raises(ConfigError, match="privacy unit 'household'"):
        event("face", "household")
