"""A site's durable state: a restarted site keeps its budget, resends a released round unchanged, and
refuses to release a round twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.training.privacy_state import STATE_KEY, SitePrivacyState
from client.training.site_store import Release, SiteStore, events_of
from common.config import parse_run_config
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.site_record import RECORD_NAME
from common.serde import arrays_digest
from tests.client.training.test_round import SMALL, config, initial_arrays, release
from tests.messages import train_message

HASH = arrays_digest(initial_arrays(parse_run_config(SMALL)))


def released(
    store: SiteStore,
    server_round: int,
    run_id: str = "test-run",
    model_hash: str = HASH,
    **overrides: object,
) -> RecordDict:
    """Train a round on the state restored from ``store`` and commit it, as the ClientApp does."""
    state = RecordDict()
    store.restore(state, run_id)
    other_runs = events_of([r for r in store.lifetime() if r.run_id != run_id])
    done = release(state, server_round, run_id, other_runs, **overrides)
    store.commit(
        Release(run_id, server_round, done.events, done.secret_noise),
        model_hash,
        state,
        done.content,
    )
    return done.content


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


def test_a_new_run_starts_a_fresh_run_history_but_not_a_fresh_lifetime(tmp_path: Path) -> None:
    store = SiteStore(tmp_path)
    first = released(store, 1, run_id="run-a")
    state = RecordDict()
    SiteStore(tmp_path).restore(state, "run-b")
    assert STATE_KEY not in state  # run b's own history starts empty...
    second = released(SiteStore(tmp_path), 1, run_id="run-b")
    # ...but the site's lifetime epsilon composes both runs: a new run id does not reset it
    assert second["metrics"]["epsilon"] == pytest.approx(first["metrics"]["epsilon"])
    assert second["metrics"]["epsilon-lifetime"] > 1.2 * second["metrics"]["epsilon"]
    lifetime = SiteStore(tmp_path).lifetime()
    assert [(r.run_id, r.round) for r in lifetime] == [("run-a", 1), ("run-b", 1)]
    assert all(r.secret_noise and len(r.events) == 2 for r in lifetime)


def test_a_restart_restores_the_run_asked_for_whatever_other_runs_the_store_holds(
    tmp_path: Path,
) -> None:
    for server_round in (8, 9, 10):
        released(SiteStore(tmp_path), server_round, run_id="run-a")
    for server_round in (1, 2):
        released(SiteStore(tmp_path), server_round, run_id="run-b")
    store = SiteStore(tmp_path)  # a restarted site process
    state = RecordDict()
    store.restore(state, "run-b")
    assert SitePrivacyState.load(state, "rdp").rounds == [1, 2]
    assert store.replay("run-b", 3, HASH) is None  # run b goes on at round 3
    assert store.replay("run-b", 2, HASH) is not None  # its round 2 is resent as stored
    with pytest.raises(PrivacyBudgetError, match="charged twice"):
        store.replay("run-b", 2, "another-model-hash")  # never trained again on another model
    state_a = RecordDict()
    store.restore(state_a, "run-a")
    assert SitePrivacyState.load(state_a, "rdp").rounds == [8, 9, 10]


def test_a_missing_newest_release_stops_the_site(tmp_path: Path) -> None:
    released(SiteStore(tmp_path), 1)
    released(SiteStore(tmp_path), 2)
    (tmp_path / "release-00000002.state").unlink()  # the newest spend, lost or rolled back
    with pytest.raises(IntegrityError, match="release 2 is missing"):
        SiteStore(tmp_path).restore(RecordDict(), "test-run")


def test_an_unreadable_marker_stops_the_site(tmp_path: Path) -> None:
    released(SiteStore(tmp_path), 1)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"store\.json is unreadable"):
        SiteStore(tmp_path).lifetime()


def test_a_missing_marker_beside_release_files_stops_the_site(tmp_path: Path) -> None:
    # Found by the attack review: deleting the newest release *and* store.json made the store
    # look like one whose marker was never written, and round 2's spend was forgotten
    released(SiteStore(tmp_path), 1)
    released(SiteStore(tmp_path), 2)
    (tmp_path / "release-00000002.state").unlink()
    (tmp_path / "store.json").unlink()
    with pytest.raises(IntegrityError, match=r"store\.json is missing"):
        SiteStore(tmp_path).lifetime()


def test_a_missing_marker_beside_the_site_key_stops_the_site(tmp_path: Path) -> None:
    # Found by the second review: the marker and every release deleted, the key kept: the store
    # looked new, and the site trained on a fresh lifetime while signing with its old ledger key
    store = SiteStore(tmp_path)
    store.signing_key()  # as the ClientApp does: the key is written with release 1
    released(store, 1)
    released(SiteStore(tmp_path), 2)
    (tmp_path / "store.json").unlink()
    for path in tmp_path.glob("release-*.state"):
        path.unlink()
    assert (tmp_path / "site.key").exists()
    with pytest.raises(IntegrityError, match=r"store\.json is missing"):
        SiteStore(tmp_path).lifetime()


def test_the_marker_is_written_before_the_first_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that a crash between release 1 and its marker is not mistaken for the attack above."""
    import client.training.site_store as site_store

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process dies right after writing release 1

    real = site_store.atomic_write_text
    calls: list[str] = []

    def marker_write(path: Path, text: str, **kwargs: object) -> None:
        calls.append(text)
        if len(calls) == 2:  # the marker naming release 1
            crash()
        real(path, text, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(site_store, "atomic_write_text", marker_write)
    with pytest.raises(KeyboardInterrupt):
        released(SiteStore(tmp_path), 1)
    monkeypatch.undo()
    assert [e.round for e in SiteStore(tmp_path).lifetime()] == [1]  # the spend is kept


def test_reading_a_store_creates_nothing(tmp_path: Path) -> None:
    store = SiteStore(tmp_path / "state")
    store.restore(RecordDict(), "run")
    assert store.replay("run", 1, HASH) is None and store.lifetime() == ()
    assert not (tmp_path / "state").exists()


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
        "release-00000002.state",
        "release-00000003.state",
        "release-00000004.state",
    ]
    with pytest.raises(PrivacyBudgetError, match="no stored reply for round 1"):
        store.replay("test-run", 1, HASH)


@pytest.mark.parametrize("offset", [10, 200, -5])
def test_a_corrupt_state_file_stops_the_site(tmp_path: Path, offset: int) -> None:
    store = SiteStore(tmp_path)
    released(store, 1)
    path = tmp_path / "release-00000001.state"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        SiteStore(tmp_path).restore(RecordDict(), "test-run")  # the site process restarts


def test_the_signing_key_is_kept_with_the_first_release_survives_a_restart_and_is_private(
    tmp_path: Path,
) -> None:
    store = SiteStore(tmp_path)
    key = store.signing_key()
    assert not (tmp_path / "site.key").exists()  # nothing is written before a release
    released(store, 1)
    assert (tmp_path / "site.key").stat().st_mode & 0o077 == 0
    again = SiteStore(tmp_path).signing_key()
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_the_client_app_resends_a_round_after_a_restart_without_charging_it(
    tmp_path: Path,
) -> None:
    from client.training.app import build_client_app

    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    node_config = {"partition-id": 0, "num-partitions": 8, "state-dir": str(tmp_path)}

    def fresh_site_process() -> tuple[object, Context]:
        app = build_client_app(settings.to_flat())  # a deployed site: policy from node config
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

    from client.training.app import build_client_app

    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    app = build_client_app(settings.to_flat(), state_root=tmp_path, research=True)
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


def test_two_processes_racing_for_the_same_release_cannot_both_record_it(tmp_path: Path) -> None:
    released(SiteStore(tmp_path), 1, run_id="warm")
    first, second = SiteStore(tmp_path), SiteStore(tmp_path)
    first.newest(), second.newest()  # both read the spend before either records
    released(first, 1, run_id="run-p")
    with pytest.raises(IntegrityError, match="another process recorded release 2"):
        released(second, 1, run_id="run-q")
    assert [r.run_id for r in SiteStore(tmp_path).lifetime()] == ["warm", "run-p"]
