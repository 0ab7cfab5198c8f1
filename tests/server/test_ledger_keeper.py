"""The coordinator records every site's signed round in the ledger and refuses what does not verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import RecordDict

from common.config import parse_run_config
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.verify import verify_ledger
from common.serde import arrays_digest
from server.ledger_keeper import LedgerKeeper
from tests.client.test_round import SMALL, initial_arrays, run


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
    reply = site_reply(state, 1, keeper.run_id, **{"noise-multiplier": 0.3, "max-epsilon": 100.0})
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
    forged = site_reply(RecordDict(), 1, keeper.run_id)  # a second, different release of round 1
    with pytest.raises(IntegrityError):
        resumed.record(9, 1, model_hash(), forged.config_records["privacy"])
    resumed.finish("test done")
    assert verify_ledger(tmp_path / "ledger.db").ok


def test_a_round_whose_reply_was_lost_is_recorded_from_the_sites_next_reply(tmp_path: Path) -> None:
    from client.site_store import SiteStore
    from tests.client.test_site_store import released

    keeper = LedgerKeeper(tmp_path / "ledger.db", accountant="rdp", delta=1e-5)
    store = SiteStore(tmp_path / "site")
    first = released(store, 1, keeper.run_id)
    keeper.record(7, 1, model_hash(), first.config_records["privacy"])
    released(store, 2, keeper.run_id)  # trained and charged on the site; the reply never arrived
    third = released(store, 3, keeper.run_id)
    with pytest.raises(IntegrityError, match="history gives"):  # without round 2 the books differ
        keeper.record(7, 3, model_hash(), third.config_records["privacy"])
    hashes = {1: model_hash(), 2: model_hash(), 3: model_hash()}
    for record in store.previous_records(keeper.run_id, 3):  # what the ClientApp attaches
        keeper.record_previous(7, record, hashes)
    keeper.record(7, 3, model_hash(), third.config_records["privacy"])
    assert [e.round for e in keeper.ledger.entries()] == [1, 2, 3]
    assert keeper.ledger.cumulative_epsilon("site-0") == pytest.approx(
        third["metrics"]["epsilon"], rel=1e-6
    )
