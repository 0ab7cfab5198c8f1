"""The coordinator records every site's signed round in the ledger and refuses what does not verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from common.config import parse_run_config
from common.crypto.signing import (
    canonical_bytes,
    generate_private_key,
    public_key_to_bytes,
    sign,
)
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.accounting import compute_epsilon
from common.privacy.events import DpSgdEvent
from common.privacy.site_record import RoundReport
from common.privacy.verify import verify_ledger
from common.serde import arrays_digest
from server.ledger_keeper import LedgerKeeper
from tests.client.training.test_round import SMALL, initial_arrays, run


def site_reply(state: RecordDict, server_round: int, run_id: str, **overrides) -> RecordDict:
    return run(state, server_round, run_id, **overrides)


@pytest.fixture
def keeper(tmp_path: Path) -> LedgerKeeper:
    return LedgerKeeper(tmp_path / "ledger.db", accountant="rdp", delta=1e-5)


def model_hash() -> str:
    return arrays_digest(initial_arrays(parse_run_config(SMALL)))


def test_signed_rounds_are_recorded_and_the_ledger_verifies(keeper: LedgerKeeper) -> None:
    state = RecordDict()
    for r in (1, 2):
        reply = site_reply(state, r, keeper.run_id)
        keeper.record(7, r, model_hash(), reply.config_records["privacy"])
    assert keeper.ledger.last_round("site-0") == 2
    assert keeper.ledger.cumulative_epsilon("site-0") == pytest.approx(
        reply["metrics"]["epsilon"], rel=1e-6
    )
    path = keeper.ledger.path
    keeper.finish("test done")
    assert verify_ledger(path).ok


def test_record_for_another_model_version_is_refused(keeper: LedgerKeeper) -> None:
    reply = site_reply(RecordDict(), 1, keeper.run_id)
    with pytest.raises(IntegrityError, match="signature"):
        keeper.record(7, 1, "sha256:not-the-model-we-sent", reply.config_records["privacy"])


def test_tampered_epsilon_is_refused(keeper: LedgerKeeper) -> None:
    record = site_reply(RecordDict(), 1, keeper.run_id).config_records["privacy"]
    record["epsilon-cumulative"] = record["epsilon-cumulative"] / 2  # under-report
    with pytest.raises(IntegrityError):
        keeper.record(7, 1, model_hash(), record)


def test_reply_without_a_privacy_record_is_refused(keeper: LedgerKeeper) -> None:
    with pytest.raises(IntegrityError, match="no privacy record"):
        keeper.record(7, 1, model_hash(), None)


def test_site_out_of_budget_is_not_eligible(keeper: LedgerKeeper) -> None:
    state = RecordDict()
    for r in (1, 2, 3):  # calibrated to spend exactly the budget in num-rounds=3 rounds
        keeper.record(
            7, r, model_hash(), site_reply(state, r, keeper.run_id).config_records["privacy"]
        )
    assert not keeper.can_train(7)
    assert keeper.can_train(8)  # a site never seen yet may train


def test_over_budget_record_is_refused_by_the_ledger(keeper: LedgerKeeper) -> None:
    state = RecordDict()
    # A site that claims a budget of 8 but whose noise would exceed it is refused on append.
    # (sigma 0.8 spends about 6.9 in one round: within the site's default lifetime cap of 16)
    reply = site_reply(state, 1, keeper.run_id, **{"noise-multiplier": 0.8, "max-epsilon": 100.0})
    record = reply.config_records["privacy"]
    record["budget-epsilon"] = 1.0
    with pytest.raises((PrivacyBudgetError, IntegrityError)):
        keeper.record(7, 1, model_hash(), record)


def test_a_round_resent_after_a_resume_is_recorded_once(tmp_path: Path) -> None:
    keeper = LedgerKeeper(tmp_path / "ledger.db", accountant="rdp", delta=1e-5)
    reply = site_reply(RecordDict(), 1, keeper.run_id)
    keeper.record(7, 1, model_hash(), reply.config_records["privacy"])
    keeper.ledger.close()  # the coordinator is killed and resumed: a new keeper on the same ledger
    resumed = LedgerKeeper(
        tmp_path / "ledger.db", accountant="rdp", delta=1e-5, run_id=keeper.run_id
    )
    resumed.record(9, 1, model_hash(), reply.config_records["privacy"])  # the stored reply, again
    assert [(e.site_id, e.round) for e in resumed.ledger.entries()] == [("site-0", 1)]
    assert resumed.last_mechanisms["site-0"]  # budget checks know what the site ran last
    # A second, different release of round 1 (more steps: its body differs whatever the clock says,
    # since sites state times to the second only).
    forged = site_reply(RecordDict(), 1, keeper.run_id, **{"face-steps": 3})
    with pytest.raises(IntegrityError):
        resumed.record(9, 1, model_hash(), forged.config_records["privacy"])
    resumed.finish("test done")
    assert verify_ledger(tmp_path / "ledger.db").ok


def test_a_round_whose_reply_was_lost_is_recorded_from_the_sites_next_reply(tmp_path: Path) -> None:
    from client.training.site_store import SiteStore
    from tests.client.training.test_site_store import released

    keeper = LedgerKeeper(tmp_path / "ledger.db", accountant="rdp", delta=1e-5)
    store = SiteStore(tmp_path / "site")
    first = released(store, 1, keeper.run_id)
    keeper.record(7, 1, model_hash(), first.config_records["privacy"])
    released(store, 2, keeper.run_id)  # trained and charged on the site; the reply never arrived
    third = released(store, 3, keeper.run_id)
    with pytest.raises(IntegrityError, match="history gives"):  # without round 2 the books differ
        keeper.record(7, 3, model_hash(), third.config_records["privacy"])
    hashes = {1: model_hash(), 2: model_hash(), 3: model_hash()}
    for record in store.previous_records(keeper.run_id, 3).values():  # as the ClientApp
        keeper.record_previous(7, record, hashes)
    keeper.record(7, 3, model_hash(), third.config_records["privacy"])
    assert [e.round for e in keeper.ledger.entries()] == [1, 2, 3]
    assert keeper.ledger.cumulative_epsilon("site-0") == pytest.approx(
        third["metrics"]["epsilon"], rel=1e-6
    )


def signed_record(
    keeper: LedgerKeeper, *, secret_noise: bool, lifetime_extra: float
) -> ConfigRecord:
    """A site's signed privacy record built by hand (no training): one face-model epoch."""
    key = generate_private_key()
    event = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=50, clip_norm=1.0, name="face")
    epsilon = compute_epsilon([event], 1e-5, "rdp")
    report = RoundReport(
        site_index=4,
        round=1,
        mechanisms=(event,),
        delta=1e-5,
        budget_epsilon=8.0,
        epsilon_round=epsilon,
        epsilon_cumulative=epsilon,
        epsilon_lifetime=epsilon + lifetime_extra,
        secret_noise=secret_noise,
        started_at=1.7e9,
        finished_at=1.7e9 + 60,
    )
    body = report.entry_body(keeper.run_id, "sha256:m", "rdp")
    signature = sign(key, canonical_bytes(body))
    return report.to_record(signature, public_key_to_bytes(key.public_key()))


@pytest.mark.parametrize(("secret", "noise"), [(True, "secret"), (False, "seeded")])
def test_record_carries_the_noise_kind_and_lifetime_into_the_ledger(
    keeper: LedgerKeeper, secret: bool, noise: str
) -> None:
    record = signed_record(keeper, secret_noise=secret, lifetime_extra=2.0)

    keeper.record(7, 1, "sha256:m", record)

    (entry,) = keeper.ledger.entries()
    assert entry.noise == noise
    assert entry.epsilon_lifetime == pytest.approx(entry.epsilon_cumulative + 2.0)


def test_record_with_an_invalid_secret_noise_flag_is_refused(keeper: LedgerKeeper) -> None:
    record = signed_record(keeper, secret_noise=True, lifetime_extra=0.0)
    record["secret-noise"] = 2

    with pytest.raises(IntegrityError, match="secret-noise"):
        keeper.record(7, 1, "sha256:m", record)
    assert keeper.ledger.entries() == []


def test_central_releases_record_their_cumulative_epsilon_as_lifetime(
    keeper: LedgerKeeper,
) -> None:
    event = DpSgdEvent(
        noise_multiplier=2.0, sample_rate=0.5, steps=1, clip_norm=0.5, name="client-level"
    )

    keeper.record_central(1, event, 20.0)  # the positional call server/central_dp.py makes
    keeper.record_central(2, event, 20.0, secret_noise=False)

    entries = keeper.ledger.entries()
    assert [(e.guarantee, e.noise) for e in entries] == [
        ("client-level", "secret"),
        ("client-level", "seeded"),
    ]
    assert all(e.epsilon_lifetime == e.epsilon_cumulative for e in entries)
    assert entries[1].epsilon_lifetime > entries[0].epsilon_lifetime
    path = keeper.ledger.path
    keeper.finish("test done")
    assert verify_ledger(path).ok
