"""Every entry records whether its noise was secret and the site's lifetime epsilon (all runs).

The lifetime cannot be recomputed from one run's ledger (other runs' events are elsewhere); what one
ledger can show is checked: it is at least the run's cumulative epsilon and it never decreases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord
from ledger_fixtures import DELTA, Keys, lifetime, signed_round, site_mechanisms

from common.crypto.signing import canonical_bytes, sign
from common.errors import ConfigError, IntegrityError
from common.privacy.entry import BODY_FORMAT, make_entry_body, parse_entry_body
from common.privacy.ledger import Ledger
from common.privacy.site_record import RoundReport
from common.privacy.verify import verify_ledger

EARLIER_RUN = site_mechanisms() * 3  # what a site released in a previous run, before this ledger

FIELDS: dict[str, Any] = {
    "run_id": "run-1",
    "site_id": "site-a",
    "round": 1,
    "mechanisms": site_mechanisms(),
    "accountant": "prv",
    "epsilon_round": 1.0,
    "epsilon_cumulative": 1.0,
    "delta": DELTA,
    "budget_epsilon": 8.0,
    "model_hash": "sha256:abc",
    "secret_noise": True,
    "epsilon_lifetime": 2.5,
}


@pytest.fixture
def ledger(tmp_path: Path, keys: Keys) -> Iterator[Ledger]:
    opened = Ledger.open(tmp_path / "ledger.db", run_id="run-n", coordinator_key=keys.coordinator)
    yield opened
    opened.close()


# ------------------------------------------------------------------ the body


@pytest.mark.parametrize(("secret", "noise"), [(True, "secret"), (False, "seeded")])
def test_body_round_trips_both_noise_kinds_and_the_lifetime(secret: bool, noise: str) -> None:
    body = make_entry_body(**(FIELDS | {"secret_noise": secret}))

    parsed = parse_entry_body(body)

    assert body["format"] == BODY_FORMAT == "facefed-ledger-entry/2"
    assert body["noise"] == noise and parsed.noise == noise
    assert body["epsilon_lifetime"] == parsed.epsilon_lifetime == 2.5


@pytest.mark.parametrize("name", ["secret_noise", "epsilon_lifetime"])
def test_make_entry_body_has_no_default_for_noise_or_lifetime(name: str) -> None:
    fields = {k: v for k, v in FIELDS.items() if k != name}

    with pytest.raises(TypeError, match=name):
        make_entry_body(**fields)


def test_lifetime_below_the_runs_cumulative_epsilon_is_refused() -> None:
    with pytest.raises(ConfigError, match="below epsilon_cumulative"):
        make_entry_body(**(FIELDS | {"epsilon_lifetime": 0.99}))
    # Equal is fine (a site's first run), and so is float rounding within 1e-9.
    assert make_entry_body(**(FIELDS | {"epsilon_lifetime": 1.0}))["epsilon_lifetime"] == 1.0
    assert make_entry_body(**(FIELDS | {"epsilon_lifetime": 1.0 - 1e-12}))


@pytest.mark.parametrize(
    "change",
    [
        {"noise": "SECRET"},
        {"noise": True},
        {"noise": None},
        {"noise": 1},
        {"noise": ["secret"]},
        {"epsilon_lifetime": float("nan")},
        {"epsilon_lifetime": float("inf")},
        {"epsilon_lifetime": -1.0},
        {"epsilon_lifetime": "2.5"},
        {"epsilon_lifetime": True},
        {"epsilon_lifetime": None},
        {"epsilon_lifetime": 0.5},  # below epsilon_cumulative
        {"extra": 1},
        {"format": "facefed-ledger-entry/1"},  # a body without the two facts
    ],
)
def test_parse_refuses_an_invalid_or_extra_noise_or_lifetime(change: dict[str, Any]) -> None:
    body = make_entry_body(**FIELDS) | change

    with pytest.raises(IntegrityError):
        parse_entry_body(body)


@pytest.mark.parametrize("name", ["noise", "epsilon_lifetime"])
def test_parse_refuses_a_body_missing_noise_or_lifetime(name: str) -> None:
    body = {k: v for k, v in make_entry_body(**FIELDS).items() if k != name}

    with pytest.raises(IntegrityError, match=f"missing \\['{name}'\\]"):
        parse_entry_body(body)


# ------------------------------------------------------------------ the site's record


def report(**overrides: Any) -> RoundReport:
    fields: dict[str, Any] = {
        "site_index": 3,
        "round": 2,
        "mechanisms": tuple(site_mechanisms()),
        "delta": DELTA,
        "budget_epsilon": 8.0,
        "epsilon_round": 1.0,
        "epsilon_cumulative": 1.5,
        "epsilon_lifetime": 4.0,
        "secret_noise": True,
        "started_at": 1.7e9,
        "finished_at": 1.7e9 + 60,
    }
    return RoundReport(**(fields | overrides))


def record_of(sent: RoundReport) -> ConfigRecord:
    return sent.to_record(b"s" * 64, b"k" * 32)


@pytest.mark.parametrize(("secret", "wire"), [(True, 1), (False, 0)])
def test_site_record_round_trips_noise_and_lifetime_into_the_body(secret: bool, wire: int) -> None:
    sent = report(secret_noise=secret)

    record = record_of(sent)
    received, _, _ = RoundReport.from_record(record)
    body = received.entry_body("run-1", "sha256:abc", "prv")

    assert record["secret-noise"] == wire and record["epsilon-lifetime"] == 4.0
    assert received == sent
    assert body["noise"] == ("secret" if secret else "seeded") and body["epsilon_lifetime"] == 4.0


@pytest.mark.parametrize("value", [2, -1, 0.5, 1.0, True, float("nan"), "1", b"\x01"])
def test_site_record_secret_noise_must_be_the_integer_0_or_1(value: object) -> None:
    record = dict(record_of(report()))
    record["secret-noise"] = value

    with pytest.raises(IntegrityError, match="secret-noise"):
        RoundReport.from_record(record)


@pytest.mark.parametrize("name", ["secret-noise", "epsilon-lifetime"])
def test_site_record_without_noise_or_lifetime_is_refused(name: str) -> None:
    record = {k: v for k, v in dict(record_of(report())).items() if k != name}

    with pytest.raises(IntegrityError, match=name):
        RoundReport.from_record(record)


def test_site_record_with_a_lifetime_below_the_runs_epsilon_builds_no_body() -> None:
    received, _, _ = RoundReport.from_record(record_of(report(epsilon_lifetime=1.0)))

    with pytest.raises(ConfigError, match="below epsilon_cumulative"):
        received.entry_body("run-1", "sha256:abc", "prv")


# ------------------------------------------------------------------ the ledger and verify


def test_a_site_with_earlier_runs_records_a_lifetime_above_the_runs_epsilon(
    ledger: Ledger, keys: Keys
) -> None:
    key = keys.sites["hospital-a"]
    for rnd in (1, 2):
        signed_round(ledger, key, "hospital-a", rnd, earlier_runs=EARLIER_RUN)
    ledger.finish("done")

    result = verify_ledger(ledger.path, cross_check=False, require_closed=True)

    assert result.ok, result.errors
    (site,) = result.sites
    assert site.lifetime == pytest.approx(
        lifetime(EARLIER_RUN, site_mechanisms(), site_mechanisms())
    )
    assert site.lifetime > site.cumulative + 0.5  # 5 rounds in all vs 2 in this run
    assert site.noise_kinds == ("secret",)


def test_append_refuses_a_lifetime_that_decreases(ledger: Ledger, keys: Keys) -> None:
    key = keys.sites["hospital-a"]
    signed_round(ledger, key, "hospital-a", 1, earlier_runs=EARLIER_RUN)
    history = ledger.history("hospital-a")
    cumulative = lifetime((), history, site_mechanisms())
    fields = FIELDS | {
        "run_id": ledger.run_id,
        "site_id": "hospital-a",
        "round": 2,
        "epsilon_round": lifetime((), (), site_mechanisms()),
        "epsilon_cumulative": cumulative,
        "epsilon_lifetime": cumulative,  # the earlier run forgotten: below round 1's lifetime
    }
    body = make_entry_body(**fields)

    with pytest.raises(IntegrityError, match=r"lifetime epsilon .* dropped below"):
        ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))
    assert ledger.last_round("hospital-a") == 1


def test_verify_names_the_entry_whose_lifetime_decreases(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A site and a coordinator that skip the append checks: verify must still catch the drop.
    path = tmp_path / "dropping.db"
    key = keys.sites["hospital-a"]
    with Ledger.open(path, run_id="run-d", coordinator_key=keys.coordinator) as ledger:
        signed_round(ledger, key, "hospital-a", 1, earlier_runs=EARLIER_RUN)
        monkeypatch.setattr(Ledger, "_check_accounting", lambda self, body, where: None)
        signed_round(ledger, key, "hospital-a", 2)  # lifetime now forgets the earlier run
        signed_round(ledger, key, "hospital-a", 3)  # grows again from the lower value: no 2nd error
        ledger.finish("done")

    result = verify_ledger(path, cross_check=False)

    assert [(f.seq, f.round) for f in result.errors] == [(2, 2)]
    assert "dropped below" in result.errors[0].message


def test_a_seeded_entry_is_recorded_and_accepted_unless_secret_noise_is_required(
    ledger: Ledger, keys: Keys
) -> None:
    signed_round(ledger, keys.sites["hospital-a"], "hospital-a", 1)
    signed_round(ledger, keys.sites["clinic-b"], "clinic-b", 1, secret_noise=False)
    signed_round(ledger, keys.sites["clinic-b"], "clinic-b", 2, secret_noise=False)

    lenient = verify_ledger(ledger.path, cross_check=False)
    strict = verify_ledger(ledger.path, cross_check=False, require_secret_noise=True)

    assert lenient.ok
    assert {s.site_id: s.noise_kinds for s in lenient.sites}["clinic-b"] == ("seeded",)
    assert len(strict.errors) == 1 and strict.first_error is not None
    assert (strict.first_error.seq, strict.first_error.site_id) == (2, "clinic-b")
    assert "seeded" in strict.first_error.message and "in all: 2" in strict.first_error.message


def test_a_secret_only_ledger_passes_when_secret_noise_is_required(golden_ledger: Path) -> None:
    result = verify_ledger(golden_ledger, cross_check=False, require_secret_noise=True)

    assert result.ok, result.errors
    assert all(s.noise_kinds == ("secret",) for s in result.sites)
