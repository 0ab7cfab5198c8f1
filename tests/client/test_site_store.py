"""A site's durable state: a restarted site keeps its budget, resends a released round unchanged, and
refuses to release a round twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.privacy_state import STATE_KEY, SitePrivacyState
from client.site_store import SiteStore
from common.config import parse_run_config
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.site_record import RECORD_NAME
from common.serde import arrays_digest
from tests.client.test_round import SMALL, config, initial_arrays, run
from tests.messages import train_message

HASH = arrays_digest(initial_arrays(parse_run_config(SMALL)))


def released(
    store: SiteStore, server_round: int, run_id: str = "test-run", **overrides: object
) -> RecordDict:
    """Train a round on the state restored from ``store`` and commit it, as the ClientApp does."""
    state = RecordDict()
    store.restore(state, run_id)
    reply = run(state, server_round, run_id, **overrides)
    store.commit(run_id, server_round, HASH, state, reply)
    return reply


def wire(record: RecordDict) -> bytes:
    return recorddict_to_proto(record).SerializeToString()


def test_a_restarted_site_restores_its_spent_budget(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    released(store, 1)
    state = RecordDict()  # a new process: Flower's in-memory state is empty
    SiteStore(tmp_path).restore(state, "test-run")
    history = SitePrivacyState.load(state, "rdp").history
    assert len(history) == 2 and history[0].name == "face"  # both models' round-1 events
    assert SitePrivacyState.load(state, "rdp").rounds == [1]


def test_a_new_run_starts_from_a_fresh_history(tmp_path: Path) -> None:
    released(SiteStore(tmp_path), 1, run_id="run-a")
    state = RecordDict()
    SiteStore(tmp_path).restore(state, "run-b")
    assert STATE_KEY not in state


def test_a_released_round_asked_again_is_resent_byte_for_byte(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    reply = released(store, 1)
    again = store.replay("test-run", 1, HASH)
    assert again is not None
    assert wire(again) == wire(reply)  # same arrays, metrics and signed ledger record
    assert RECORD_NAME in again.config_records
    assert store.replay("test-run", 2, HASH) is None  # the next round is new


def test_the_same_round_on_another_model_is_refused(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    released(store, 1)
    with pytest.raises(PrivacyBudgetError, match="charged twice"):
        store.replay("test-run", 1, "another-model-hash")


def test_only_the_newest_rounds_are_kept_and_older_ones_cannot_be_redone(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    for server_round in range(1, 5):
        released(store, server_round, **{"num-rounds": 4})
    assert sorted(p.name for p in tmp_path.glob("*.state")) == [
        "round-000002.state",
        "round-000003.state",
        "round-000004.state",
    ]
    with pytest.raises(PrivacyBudgetError, match="no stored reply for round 1"):
        store.replay("test-run", 1, HASH)


@pytest.mark.parametrize("offset", [10, 200, -5])
def test_a_corrupt_state_file_stops_the_site(tmp_path: Path, offset: int) -> None:
    store = SiteStore(tmp_path)
    released(store, 1)
    path = tmp_path / "round-000001.state"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        store.restore(RecordDict(), "test-run")


def test_the_signing_key_survives_a_restart_and_is_private(tmp_path: Path) -> None:
    key = SiteStore(tmp_path).signing_key()
    assert (tmp_path / "site.key").stat().st_mode & 0o077 == 0
    again = SiteStore(tmp_path).signing_key()
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_the_client_app_resends_a_round_after_a_restart_without_charging_it(
    tmp_path: Path,
) -> None:
    from client.app import build_client_app

    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    node_config = {"partition-id": 0, "num-partitions": 8, "state-dir": str(tmp_path)}

    def fresh_site_process() -> tuple[object, Context]:
        app = build_client_app(settings.to_flat())
        return app, Context(
            run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node_config
        )

    app, context = fresh_site_process()
    first = app(train_message(content), context)  # type: ignore[operator]
    app, context = fresh_site_process()  # the site restarts; the coordinator asks round 1 again
    second = app(train_message(content), context)  # type: ignore[operator]
    assert not first.has_error() and not second.has_error()
    arrays = [m.content.array_records["arrays"] for m in (first, second)]
    assert arrays_digest(arrays[0]) == arrays_digest(arrays[1])
    assert second.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    assert SitePrivacyState.load(context.state, "rdp").rounds == [1]  # charged once


def test_the_client_app_travels_to_a_simulation_actor_as_its_arguments(tmp_path: Path) -> None:
    """Flower's simulation engine pickles the ClientApp with every message: it must be small, and the
    app rebuilt from it must be the same app (same run config, same site state directory)."""
    import pickle

    from ray import cloudpickle

    from client.app import build_client_app

    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    app = build_client_app(settings.to_flat(), state_root=tmp_path)
    blob = cloudpickle.dumps(app)
    assert len(blob) < 2048  # by value, with its closures, it was ~7 KB

    def context() -> Context:
        node_config = {"partition-id": 0, "num-partitions": 8}
        return Context(
            run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node_config
        )

    first = pickle.loads(blob)(train_message(content), context())
    again = app(
        train_message(content), context()
    )  # the original app finds the round already stored
    assert not first.has_error() and not again.has_error()
    assert wire(again.content) == wire(first.content)
