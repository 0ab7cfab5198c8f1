"""The ledger's append path: what it accepts, what it refuses (fails closed), and resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ledger_fixtures import BUDGET, DELTA, Keys, lifetime, signed_round, site_mechanisms

from common.crypto.signing import canonical_bytes, generate_private_key, sign
from common.errors import ConfigError, IntegrityError, PrivacyBudgetError
from common.privacy.accounting import compute_epsilon
from common.privacy.entry import make_entry_body, make_round_body
from common.privacy.ledger import Ledger
from common.privacy.verify import verify_ledger


def round_body(ledger: Ledger, site_id: str, rnd: int, **overrides: Any) -> dict[str, Any]:
    history = ledger.history(site_id)
    fields: dict[str, Any] = {
        "run_id": ledger.run_id,
        "site_id": site_id,
        "round": rnd,
        "mechanisms": site_mechanisms(),
        "history": history,
        "delta": DELTA,
        "budget_epsilon": BUDGET,
        "model_hash": "sha256:abc",
        "secret_noise": True,
        "epsilon_lifetime": lifetime((), history, site_mechanisms()),
    }
    return make_round_body(**(fields | overrides))


@pytest.fixture
def ledger(tmp_path: Path, keys: Keys) -> Iterator[Ledger]:
    opened = Ledger.open(tmp_path / "ledger.db", run_id="run-t", coordinator_key=keys.coordinator)
    yield opened
    opened.close()


def test_append_records_one_entry_per_site_and_round(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]

    signed_round(ledger, key, "hospital-a", 1)
    signed_round(ledger, key, "hospital-a", 2)

    assert ledger.last_round("hospital-a") == 2
    assert ledger.last_round("clinic-b") is None
    assert len(ledger.history("hospital-a")) == 4  # two mechanisms per round
    assert ledger.cumulative_epsilon("hospital-a") == pytest.approx(
        compute_epsilon(site_mechanisms() * 2, DELTA)
    )
    assert ledger.budget("hospital-a") == BUDGET


def test_append_returns_a_receipt_signed_by_the_coordinator(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]
    body = round_body(ledger, "hospital-a", 1)

    receipt = ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))

    assert receipt.seq == 1 and len(receipt.entry_hash) == 64
    assert len(receipt.coordinator_signature) == 64


def test_append_refuses_a_bad_site_signature(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]
    body = round_body(ledger, "hospital-a", 1)
    signature = sign(key, canonical_bytes(body))

    with pytest.raises(IntegrityError, match="site signature is invalid"):
        ledger.append(body | {"model_hash": "sha256:other"}, key.public_key(), signature)


def test_append_refuses_a_site_switching_keys(ledger: Ledger, keys: Keys) -> None:
    signed_round(ledger, keys.sites["hospital-a"], "hospital-a", 1)
    impostor = generate_private_key()

    with pytest.raises(IntegrityError, match="not the site's registered key"):
        signed_round(ledger, impostor, "hospital-a", 2)


def test_append_refuses_another_runs_entry(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]
    body = round_body(ledger, "hospital-a", 1, run_id="run-other")

    with pytest.raises(IntegrityError, match="run 'run-other'"):
        ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))


def test_append_refuses_a_repeated_or_earlier_round(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]
    signed_round(ledger, key, "hospital-a", 2)

    with pytest.raises(IntegrityError, match="last recorded round 2"):
        signed_round(ledger, key, "hospital-a", 2)


def test_append_refuses_an_epsilon_that_does_not_match_the_mechanisms(
    ledger: Ledger, keys: Keys
) -> None:
    key = keys.sites["hospital-a"]
    honest = round_body(ledger, "hospital-a", 1)
    body = honest | {"epsilon_cumulative": honest["epsilon_cumulative"] * 0.9}

    with pytest.raises(IntegrityError, match="recorded epsilon_cumulative"):
        ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))
    assert ledger.entries() == []


def test_append_refuses_an_entry_over_budget_and_records_nothing(
    ledger: Ledger, keys: Keys
) -> None:
    key = keys.sites["hospital-a"]
    signed_round(ledger, key, "hospital-a", 1)
    budget = ledger.cumulative_epsilon("hospital-a") + 0.1  # too small for a second round
    body = round_body(ledger, "hospital-a", 2, budget_epsilon=budget)

    with pytest.raises(PrivacyBudgetError, match="discard this update"):
        ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))
    assert ledger.last_round("hospital-a") == 1


GOOD_FIELDS: dict[str, Any] = {
    "run_id": "run-1",
    "site_id": "site-a",
    "round": 1,
    "mechanisms": site_mechanisms(),
    "accountant": "prv",
    "epsilon_round": 1.0,
    "epsilon_cumulative": 1.0,
    "delta": 1e-5,
    "budget_epsilon": 8.0,
    "model_hash": "sha256:abc",
    "secret_noise": True,
    "epsilon_lifetime": 1.5,
}


def test_make_entry_body_states_the_privacy_unit() -> None:
    assert make_entry_body(**GOOD_FIELDS)["privacy_unit"] == "example"
    assert make_entry_body(**GOOD_FIELDS, guarantee="client-level")["privacy_unit"] == "site"


@pytest.mark.parametrize(
    "bad",
    [
        {"site_id": "a b"},
        {"round": -1},
        {"mechanisms": []},
        {"budget_epsilon": 0.0},
        {"delta": 1.0},
        {"epsilon_round": float("nan")},
        {"model_hash": ""},
        {"secret_noise": 1},
        {"secret_noise": "secret"},
        {"secret_noise": None},
        {"epsilon_lifetime": float("nan")},
        {"epsilon_lifetime": float("inf")},
        {"epsilon_lifetime": -1.0},
        {"epsilon_lifetime": "1.5"},
        {"epsilon_lifetime": 0.5},  # below epsilon_cumulative = 1.0
    ],
)
def test_make_entry_body_refuses_invalid_fields(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make_entry_body(**(GOOD_FIELDS | bad))


def test_reopening_resumes_the_same_run(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "ledger.db"
    key = keys.sites["hospital-a"]
    with Ledger.open(path, run_id="run-r", coordinator_key=keys.coordinator) as first:
        signed_round(first, key, "hospital-a", 1)

    with Ledger.open(path, run_id="run-r", coordinator_key=keys.coordinator) as second:
        signed_round(second, key, "hospital-a", 2)
        second.finish("done")

    assert verify_ledger(path, cross_check=False, require_closed=True).ok


def test_reopening_with_another_run_or_coordinator_key_is_refused(
    tmp_path: Path, keys: Keys
) -> None:
    path = tmp_path / "ledger.db"
    Ledger.open(path, run_id="run-r", coordinator_key=keys.coordinator).close()

    with pytest.raises(IntegrityError, match="use a fresh ledger path"):
        Ledger.open(path, run_id="run-s", coordinator_key=keys.coordinator)
    with pytest.raises(IntegrityError, match="not the pinned key"):
        Ledger.open(path, run_id="run-r", coordinator_key=generate_private_key())


def test_nothing_can_be_appended_after_finish(ledger: Ledger, keys: Keys) -> None:
    ledger.finish("budget exhausted")

    with pytest.raises(IntegrityError, match="closed"):
        signed_round(ledger, keys.sites["hospital-a"], "hospital-a", 1)


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from common.crypto.signing import canonical_bytes, generate_private_key, sign
    from common.privacy.entry import make_round_body
    from common.privacy.events import DpSgdEvent
    from common.privacy.ledger import Ledger

    coordinator = serialization.load_pem_private_key(Path(sys.argv[2]).read_bytes(), None)
    site = generate_private_key()
    mech = [DpSgdEvent(noise_multiplier=1.0, sample_rate=0.01, steps=10, clip_norm=1.0)]
    with Ledger.open(sys.argv[1], run_id="run-kill", coordinator_key=coordinator) as ledger:
        for rnd in range(1, 100000):
            body = make_round_body(run_id="run-kill", site_id="site", round=rnd, mechanisms=mech,
                                   history=ledger.history("site"), delta=1e-5,
                                   budget_epsilon=1e9, model_hash="h", accountant="rdp",
                                   secret_noise=True, epsilon_lifetime=1e6)
            ledger.append(body, site.public_key(), sign(site, canonical_bytes(body)))
            if rnd == 5:
                print("ready", flush=True)
    """
)


def test_sigkill_during_appends_leaves_a_ledger_that_verifies(tmp_path: Path, keys: Keys) -> None:
    from common.crypto.signing import save_private_key

    key_file = tmp_path / "coordinator.pem"
    save_private_key(keys.coordinator, key_file)
    path = tmp_path / "ledger.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(key_file)], stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"ready"

    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    result = verify_ledger(path, cross_check=False)

    assert child.returncode == -signal.SIGKILL
    assert len(result.entries) > 5
    assert result.ok, result.errors
