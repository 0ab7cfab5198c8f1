"""Encrypted template store: round trip, wrong key, tampering, swapping, rotation, revocation.

Also a scan of the files on disk for plaintext, and the attacks on what decides a match (issue 14):
an edited threshold, a record put back after a delete, an edited version, a removed tombstone, a MAC
moved between rows, a delete racing a reader, and damaged stores that must be refused untouched.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.recogniser.calibration import Calibration
from client.recogniser.templates import DB_NAME, TemplateStore, mac_key
from common.crypto import envelope, keys
from common.errors import ConfigError, DataError, IntegrityError

TAG = "model-a"


def unit(seed: int, dim: int = 128) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def store(tmp_path: Path, key_file: keys.MasterKey) -> TemplateStore:
    s = TemplateStore.create(tmp_path / "store", key_file, dim=128)
    s.enroll("alice", unit(1), model_tag=TAG, n_images=2)
    s.enroll("bob", unit(2), model_tag=TAG, n_images=1)
    return s


def raw_rows(store: TemplateStore) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(store.path)
    conn.row_factory = sqlite3.Row
    rows = {r["identity"]: dict(r) for r in conn.execute("SELECT * FROM templates")}
    conn.close()
    return rows


def poke(store: TemplateStore, sql: str, *params: object) -> None:
    conn = sqlite3.connect(store.path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def files(directory: Path) -> dict[str, bytes]:
    """Every file of the store folder, by name (take it with no connection open)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def open_and_get(directory: Path, key: keys.MasterKey, identity: str = "alice") -> None:
    """What `facefed site verify` does with the store: open, unlock, read the calibration and one
    template; the store is closed again whatever happens."""
    with TemplateStore.open(directory) as reopened:
        reopened.unlock(key)
        reopened.get_meta(f"calibration:{TAG}")
        reopened.get(identity)


CALIBRATION = {
    "threshold": 0.42,
    "far": 0.001,
    "tar": 0.9,
    "heldout_tar": 0.88,
    "heldout_far": 0.0012,
    "n_genuine": 1500,
    "n_impostor": 150000,
    "n_folds": 2,
    "model_tag": TAG,
    "source": "LFW people sets 4,5 (all pairs)",
}


# ---------------------------------------------------------------------- envelope primitives
def test_envelope_round_trip_and_aad_binding() -> None:
    wrapping = bytes(range(32))
    env = envelope.seal(wrapping, b"template bytes", b"alice|1")
    assert envelope.open_envelope(wrapping, env, b"alice|1") == b"template bytes"
    with pytest.raises(IntegrityError):
        envelope.open_envelope(wrapping, env, b"bob|1")
    with pytest.raises(IntegrityError):
        envelope.open_envelope(bytes(32), env, b"alice|1")


def test_rewrap_keeps_ciphertext_and_old_key_stops_working() -> None:
    old, new = bytes(range(32)), bytes(range(32, 64))
    env = envelope.seal(old, b"x" * 512, b"aad")
    fresh = envelope.rewrap(old, new, env, b"aad")
    assert fresh.ciphertext == env.ciphertext and fresh.nonce == env.nonce
    assert envelope.open_envelope(new, fresh, b"aad") == b"x" * 512
    with pytest.raises(IntegrityError):
        envelope.open_envelope(old, fresh, b"aad")


# ---------------------------------------------------------------------- store round trip
def test_enrolled_template_decrypts_to_the_same_float32_vector(store: TemplateStore) -> None:
    got = store.get("alice")
    np.testing.assert_array_equal(got.embedding, unit(1))
    assert (got.version, got.model_tag, got.n_images) == (1, TAG, 2)
    assert store.identities() == ["alice", "bob"]


def test_store_files_are_private(store: TemplateStore) -> None:
    assert store.directory.stat().st_mode & 0o777 == 0o700
    for path in store.directory.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


def test_unknown_identity_is_a_data_error(store: TemplateStore) -> None:
    with pytest.raises(DataError, match="unknown identity 'carol'"):
        store.get("carol")


@pytest.mark.parametrize("bad", ["", "../etc", "a" * 129, "name with space", "-x"])
def test_invalid_identity_ids_are_refused(store: TemplateStore, bad: str) -> None:
    with pytest.raises(DataError, match="invalid identity"):
        store.enroll(bad, unit(3), model_tag=TAG, n_images=1)


def test_non_normalised_or_wrong_size_template_is_refused(store: TemplateStore) -> None:
    with pytest.raises(DataError, match="L2-normalised"):
        store.enroll("carol", unit(3) * 2, model_tag=TAG, n_images=1)
    with pytest.raises(DataError, match="128 finite floats"):
        store.enroll("carol", unit(3, dim=64), model_tag=TAG, n_images=1)


# ---------------------------------------------------------------------- wrong keys
def test_wrong_master_key_fails(store: TemplateStore, tmp_path: Path) -> None:
    other = keys.new_key_file(tmp_path / "other.key")
    reopened = TemplateStore.open(store.directory)
    with pytest.raises(IntegrityError, match="does not open"):
        reopened.unlock(other)
    with pytest.raises(IntegrityError):
        keys.load_key_file(tmp_path / "other.key", reopened.key_info)


def test_wrong_key_cannot_unwrap_any_record_even_bypassing_the_verifier(
    store: TemplateStore, tmp_path: Path
) -> None:
    other = keys.new_key_file(tmp_path / "other.key")
    store._wrapping_key = other.wrapping_key  # skip unlock(): the crypto itself must refuse
    with pytest.raises(IntegrityError, match="failed authentication"):
        store.get("alice")


def test_wrong_passphrase_fails_and_stored_params_hold_no_key(tmp_path: Path) -> None:
    master = keys.new_passphrase_key("correct horse battery", n=2**14)
    store = TemplateStore.create(tmp_path / "s", master, dim=128)
    store.enroll("alice", unit(1), model_tag=TAG, n_images=1)
    info = TemplateStore.open(tmp_path / "s").key_info
    with pytest.raises(IntegrityError, match="wrong passphrase"):
        keys.passphrase_key("correct horse battery!", info)
    assert keys.passphrase_key("correct horse battery", info).secret == master.secret
    db = (tmp_path / "s" / DB_NAME).read_bytes()
    for secret in (master.secret, master.wrapping_key):
        assert secret not in db and secret.hex().encode() not in db
    assert info.verifier != master.secret


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    master = keys.new_key_file(tmp_path / "k.key")
    (tmp_path / "k.key").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.load_key_file(tmp_path / "k.key", master.info)


def test_missing_key_file_names_the_fix(tmp_path: Path) -> None:
    master = keys.new_key_file(tmp_path / "k.key")
    with pytest.raises(ConfigError, match="--key-file"):
        keys.load_key_file(tmp_path / "missing.key", master.info)


def test_key_file_is_created_0600(tmp_path: Path) -> None:
    keys.new_key_file(tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------- tampering
@pytest.mark.parametrize("column", ["ciphertext", "nonce", "wrapped_key", "wrap_nonce"])
def test_flipped_byte_fails_authentication(store: TemplateStore, column: str) -> None:
    blob = bytearray(raw_rows(store)["alice"][column])
    blob[len(blob) // 2] ^= 0x01
    poke(store, f"UPDATE templates SET {column} = ? WHERE identity = 'alice'", bytes(blob))
    with pytest.raises(IntegrityError):
        store.get("alice")
    assert store.get("bob").identity == "bob"


def test_record_swapped_between_identities_fails(store: TemplateStore) -> None:
    rows = raw_rows(store)
    cols = ["nonce", "ciphertext", "wrap_nonce", "wrapped_key"]
    for who, other in (("alice", "bob"), ("bob", "alice")):
        poke(
            store,
            "UPDATE templates SET nonce=?, ciphertext=?, wrap_nonce=?, wrapped_key=? "
            "WHERE identity=?",
            *[rows[other][c] for c in cols],
            who,
        )
    for who in ("alice", "bob"):
        with pytest.raises(IntegrityError):
            store.get(who)


def test_changed_version_or_model_tag_fails(store: TemplateStore) -> None:
    poke(store, "UPDATE templates SET version = 7 WHERE identity = 'alice'")
    poke(store, "UPDATE versions SET version = 7 WHERE identity = 'alice'")
    with pytest.raises(IntegrityError):
        store.get("alice")
    poke(store, "UPDATE templates SET model_tag = 'model-b' WHERE identity = 'bob'")
    with pytest.raises(IntegrityError):
        store.get("bob")


# ---------------------------------------------------------------------- rotation
def test_after_rotation_old_key_opens_nothing_and_new_key_opens_everything(
    store: TemplateStore, key_file: keys.MasterKey, tmp_path: Path
) -> None:
    before = raw_rows(store)
    new = keys.new_key_file(tmp_path / "new.key")
    assert store.rotate(new) == 2
    after = raw_rows(store)
    for who in ("alice", "bob"):  # ciphertexts untouched, wrapped keys replaced
        assert after[who]["ciphertext"] == before[who]["ciphertext"]
        assert after[who]["wrapped_key"] != before[who]["wrapped_key"]
    reopened = TemplateStore.open(store.directory)
    with pytest.raises(IntegrityError):
        reopened.unlock(key_file)
    reopened._wrapping_key = key_file.wrapping_key  # bypass the verifier: every row must refuse
    reopened._mac_key = mac_key(key_file, store.store_id)
    for who in ("alice", "bob"):
        with pytest.raises(IntegrityError, match="fails authentication"):  # every row re-MACed
            reopened.get(who)
    reopened._mac_key = mac_key(new, store.store_id)
    with pytest.raises(IntegrityError, match="wrapped data key failed authentication"):
        reopened.get("alice")
    reopened.unlock(new)
    assert {t.identity for t in reopened.iter_templates()} == {"alice", "bob"}
    np.testing.assert_array_equal(reopened.get("alice").embedding, unit(1))


def test_interrupted_rotation_leaves_the_store_under_the_old_key(
    store: TemplateStore, key_file: keys.MasterKey, tmp_path: Path
) -> None:
    before = raw_rows(store)
    new = keys.new_key_file(tmp_path / "new.key")

    def crash(done: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.rotate(new, after_row=crash)
    assert raw_rows(store) == before
    reopened = TemplateStore.open(store.directory)
    with pytest.raises(IntegrityError):
        reopened.unlock(new)
    reopened.unlock(key_file)
    assert len(list(reopened.iter_templates())) == 2


def test_rotation_killed_mid_transaction_is_rolled_back(
    store: TemplateStore, key_file: keys.MasterKey, tmp_path: Path
) -> None:
    key_path = tmp_path / "keys" / "site.key"
    script = f"""
import os
from pathlib import Path
from client.recogniser.templates import TemplateStore
from common.crypto import keys
store = TemplateStore.open(Path({str(store.directory)!r}))
store.unlock(keys.load_key_file(Path({str(key_path)!r}), store.key_info))
new = keys.stage_key_file(Path({str(key_path)!r}))
store.rotate(new, after_row=lambda n: os._exit(9) if n == 1 else None)
"""
    store.close()
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[3])
    assert proc.returncode == 9
    reopened = TemplateStore.open(store.directory)
    reopened.unlock(keys.load_key_file(key_path, reopened.key_info))  # discards the staged key
    assert not keys.pending_key_path(key_path).exists()
    assert len(list(reopened.iter_templates())) == 2


def test_key_file_rotation_interrupted_after_commit_recovers_the_new_key(
    store: TemplateStore, tmp_path: Path
) -> None:
    key_path = tmp_path / "keys" / "site.key"
    new = keys.stage_key_file(key_path)
    store.rotate(new)  # the store committed; the process "dies" before commit_key_file()
    reopened = TemplateStore.open(store.directory)
    loaded = keys.load_key_file(key_path, reopened.key_info)
    assert loaded.secret == new.secret
    assert not keys.pending_key_path(key_path).exists()
    reopened.unlock(loaded)
    assert len(list(reopened.iter_templates())) == 2


# ---------------------------------------------------------------------- revocation and disk
def scan(directory: Path, needle: bytes) -> list[str]:
    return [p.name for p in directory.iterdir() if p.is_file() and needle in p.read_bytes()]


def test_delete_revokes_and_zeroes_the_old_record(store: TemplateStore) -> None:
    old = raw_rows(store)["alice"]
    store.delete("alice")
    with pytest.raises(DataError, match="unknown identity"):
        store.get("alice")
    for column in ("ciphertext", "wrapped_key"):
        assert scan(store.directory, old[column]) == []
    assert store.enroll("alice", unit(5), model_tag=TAG, n_images=1) == 3  # 2 is the tombstone


def test_renewal_makes_the_old_record_useless(store: TemplateStore) -> None:
    old = raw_rows(store)["alice"]
    assert store.enroll("alice", unit(9), model_tag=TAG, n_images=1) == 2
    assert scan(store.directory, old["ciphertext"]) == []
    cols = ["version", "nonce", "ciphertext", "wrap_nonce", "wrapped_key"]
    poke(  # an attacker puts the old record back
        store,
        "UPDATE templates SET version=?, nonce=?, ciphertext=?, wrap_nonce=?, wrapped_key=? "
        "WHERE identity='alice'",
        *[old[c] for c in cols],
    )
    with pytest.raises(IntegrityError, match="revoked record"):
        store.get("alice")


def test_delete_of_unknown_identity_changes_nothing(store: TemplateStore) -> None:
    with pytest.raises(DataError, match="nothing was deleted"):
        store.delete("carol")
    assert store.identities() == ["alice", "bob"]


def test_no_plaintext_embedding_anywhere_in_the_store_files(store: TemplateStore) -> None:
    vectors = [unit(1), unit(2)]
    for v in vectors:
        raw = v.astype("<f4").tobytes()
        for needle in (raw, raw[:16], raw[200:216], v.astype(">f4").tobytes()[:16]):
            assert scan(store.directory, needle) == []
    assert {p.name for p in store.directory.iterdir()} <= {
        DB_NAME,
        f"{DB_NAME}-wal",
        f"{DB_NAME}-shm",
    }


# ---------------------------------------------------------------------- what decides a match
def test_set_calibration_reads_back_authenticated(store: TemplateStore) -> None:
    store.set_meta(f"calibration:{TAG}", CALIBRATION)

    got = store.get_meta(f"calibration:{TAG}")

    assert got == CALIBRATION
    assert store.get_meta("calibration:model-b") is None


def test_a_calibration_with_its_gray_probe_threshold_reads_back(store: TemplateStore) -> None:
    gray = CALIBRATION | {"threshold": 0.45, "source": "LFW people sets 4,5 (all pairs), in gray"}
    store.set_meta(f"calibration:{TAG}", CALIBRATION | {"gray": gray})

    got = store.get_meta(f"calibration:{TAG}")

    assert got == CALIBRATION | {"gray": gray}
    assert Calibration.from_dict(got).for_probe(gray=True).threshold == 0.45


@pytest.mark.parametrize(
    "gray",
    [CALIBRATION | {"threshold": 1.5}, CALIBRATION | {"gray": CALIBRATION}, [0.4], "0.4"],
    ids=["out-of-range", "nested", "list", "text"],
)
def test_a_malformed_gray_calibration_is_not_stored(store: TemplateStore, gray: object) -> None:
    with pytest.raises(ConfigError, match="gray calibration"):
        store.set_meta(f"calibration:{TAG}", CALIBRATION | {"gray": gray})
    assert store.get_meta(f"calibration:{TAG}") is None


@pytest.mark.parametrize("threshold", [-1.0, 1.0, float("nan"), 7.5])
def test_out_of_range_calibration_is_not_stored(store: TemplateStore, threshold: float) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        store.set_meta(f"calibration:{TAG}", CALIBRATION | {"threshold": threshold})
    assert store.get_meta(f"calibration:{TAG}") is None


def test_edited_threshold_is_refused_and_files_unchanged(
    store: TemplateStore, key_file: keys.MasterKey
) -> None:
    # Arrange: a calibrated store whose in-range threshold is lowered outside facefed
    store.set_meta(f"calibration:{TAG}", CALIBRATION)
    store.close()
    edited = json.dumps(CALIBRATION | {"threshold": 0.05}, sort_keys=True)
    poke(store, "UPDATE meta SET value = ? WHERE name = ?", edited, f"calibration:{TAG}")
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match=f"'calibration:{TAG}' fails authentication"):
        open_and_get(store.directory, key_file)
    assert files(store.directory) == before


def test_issue_threshold_minus_one_is_refused_at_open(store: TemplateStore) -> None:
    # Arrange: the reproduced attack, an INSERT OR REPLACE of a -1.0 threshold (every pair MATCHes)
    store.close()
    forged = json.dumps(CALIBRATION | {"threshold": -1.0})
    poke(store, "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)", f"calibration:{TAG}", forged, b"")
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match=r"threshold -1.0 is not a finite number in \(-1, 1\)"):
        TemplateStore.open(store.directory)
    assert files(store.directory) == before


@pytest.mark.parametrize("with_versions_row", [False, True], ids=["template-row", "both-rows"])
def test_record_put_back_after_delete_is_refused(
    store: TemplateStore, key_file: keys.MasterKey, with_versions_row: bool
) -> None:
    # Arrange: copies of alice's rows taken before the delete, put back afterwards
    conn = sqlite3.connect(store.path)
    template_row = conn.execute("SELECT * FROM templates WHERE identity = 'alice'").fetchone()
    version_row = conn.execute("SELECT * FROM versions WHERE identity = 'alice'").fetchone()
    conn.close()
    store.delete("alice")
    store.close()
    if with_versions_row:  # its own MAC is genuine: only the store's state MAC can tell
        poke(store, "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)", *version_row)
    poke(store, "INSERT INTO templates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", *template_row)
    before = files(store.directory)

    # Act / Assert
    expected = "state fails authentication" if with_versions_row else "was deleted.*put back"
    with pytest.raises(IntegrityError, match=expected):
        open_and_get(store.directory, key_file)
    assert files(store.directory) == before


def test_edited_version_is_refused(store: TemplateStore, key_file: keys.MasterKey) -> None:
    # Arrange: alice renewed to version 2; her superseded version-1 record and version put back
    conn = sqlite3.connect(store.path)
    old = conn.execute("SELECT * FROM templates WHERE identity = 'alice'").fetchone()
    conn.close()
    assert store.enroll("alice", unit(9), model_tag=TAG, n_images=1) == 2
    store.close()
    poke(store, "INSERT OR REPLACE INTO templates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", *old)
    poke(store, "UPDATE versions SET version = 1 WHERE identity = 'alice'")
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match="version record of 'alice' fails authentication"):
        open_and_get(store.directory, key_file)
    assert files(store.directory) == before


@pytest.mark.parametrize("deleted_first", [True, False], ids=["tombstone", "live-version"])
def test_removed_version_or_tombstone_is_refused(
    store: TemplateStore, key_file: keys.MasterKey, deleted_first: bool
) -> None:
    # Arrange: the versions row of alice removed (after a delete: her tombstone)
    if deleted_first:
        store.delete("alice")
    store.close()
    poke(store, "DELETE FROM versions WHERE identity = 'alice'")
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match="2 version/tombstone rows recorded, 1 found"):
        open_and_get(store.directory, key_file, "bob")
    assert files(store.directory) == before


def test_a_removed_template_row_of_a_live_identity_is_refused(
    store: TemplateStore, key_file: keys.MasterKey
) -> None:
    """Found by the attack review: with write access to the folder and no key, deleting alice's
    template row (her live, authenticated version row left in place) made her silently vanish from
    ``site list`` and ``site identify``: whether a person exists decided by an unauthenticated
    deletion."""
    store.close()
    poke(store, "DELETE FROM templates WHERE identity = 'alice'")
    before = files(store.directory)

    # Act / Assert: refused at unlock, before anything is listed, identified or written
    with (
        TemplateStore.open(store.directory) as reopened,
        pytest.raises(IntegrityError, match="template of 'alice' is missing"),
    ):
        reopened.unlock(key_file)
    assert files(store.directory) == before


@pytest.mark.parametrize("table", ["versions", "meta"])
def test_mac_moved_between_rows_is_refused(
    store: TemplateStore, key_file: keys.MasterKey, table: str
) -> None:
    # Arrange: a genuine MAC copied from one row onto another
    store.set_meta(f"calibration:{TAG}", CALIBRATION)
    store.set_meta("calibration:model-b", CALIBRATION | {"model_tag": "model-b", "threshold": 0.1})
    store.close()
    if table == "versions":  # alice and bob both at version 1, live: only the identity differs
        poke(
            store,
            "UPDATE versions SET mac = (SELECT mac FROM versions WHERE identity = 'bob') "
            "WHERE identity = 'alice'",
        )
        expected = "version record of 'alice' fails authentication"
    else:  # model-b's low threshold (and its MAC) moved under model-a's name
        poke(store, "DELETE FROM meta WHERE name = ?", f"calibration:{TAG}")
        poke(
            store,
            "UPDATE meta SET name = ?, value = replace(value, 'model-b', ?) WHERE name = ?",
            f"calibration:{TAG}",
            TAG,
            "calibration:model-b",
        )
        expected = f"'calibration:{TAG}' fails authentication"
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match=expected):
        open_and_get(store.directory, key_file, "bob")
    assert files(store.directory) == before


def test_rotation_re_macs_everything(store: TemplateStore, tmp_path: Path) -> None:
    # Arrange
    store.set_meta(f"calibration:{TAG}", CALIBRATION)
    store.delete("bob")
    new = keys.new_key_file(tmp_path / "new.key")

    # Act
    store.rotate(new)
    store.close()

    # Assert: the calibration, the tombstone and alice's version all verify under the new key
    with TemplateStore.open(store.directory) as reopened:
        reopened.unlock(new)
        assert reopened.get_meta(f"calibration:{TAG}") == CALIBRATION
        assert reopened.identities() == ["alice"]
        assert reopened.enroll("bob", unit(4), model_tag=TAG, n_images=1) == 3


# ---------------------------------------------------------------------- delete vs. a reader
def test_delete_with_a_concurrent_reader_is_reported_pending_then_finished(
    store: TemplateStore,
) -> None:
    # Arrange: another connection holds a read snapshot that still sees alice's record
    old = raw_rows(store)["alice"]
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM templates").fetchone()

    # Act / Assert: revoked, but not reported as done while a copy is on disk
    with pytest.raises(IntegrityError, match=r"revoked .* checkpoint is pending"):
        store.delete("alice")
    assert scan(store.directory, old["ciphertext"]) != []
    with pytest.raises(DataError, match="unknown identity"):
        store.get("alice")

    # Act / Assert: the reader gone, the same delete finishes the purge
    reader.close()
    store.delete("alice")
    assert scan(store.directory, old["ciphertext"]) == []
    assert scan(store.directory, old["wrapped_key"]) == []


# ---------------------------------------------------------------------- damaged stores
@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "[1, 2]",
        '{"threshold": 0.5}',
        json.dumps(CALIBRATION | {"far": 0}),
        json.dumps(CALIBRATION | {"n_folds": "5"}),
        '{"threshold": NaN}',
        "[" * 100_000,
        b"\x00\x01",
    ],
    ids=["text", "list", "partial", "far-0", "count-str", "nan", "deep", "blob"],
)
def test_malformed_calibration_is_refused_at_open_untouched(
    store: TemplateStore, value: str | bytes
) -> None:
    store.set_meta(f"calibration:{TAG}", CALIBRATION)
    store.close()
    poke(store, "UPDATE meta SET value = ? WHERE name = ?", value, f"calibration:{TAG}")
    before = files(store.directory)

    with pytest.raises(IntegrityError, match=r"calibration|wrong types|JSON object"):
        TemplateStore.open(store.directory)

    assert files(store.directory) == before


@pytest.mark.parametrize("table", ["meta", "versions", "templates"])
def test_dropped_table_is_refused_untouched(store: TemplateStore, table: str) -> None:
    store.close()
    poke(store, f"DROP TABLE {table}")
    before = files(store.directory)

    with pytest.raises(IntegrityError, match=f"table '{table}' is missing"):
        TemplateStore.open(store.directory)

    assert files(store.directory) == before


def test_huge_scrypt_cost_is_refused_before_deriving(tmp_path: Path) -> None:
    # Arrange: a passphrase store whose scrypt n is raised to 2**40 (a MemoryError before)
    master = keys.new_passphrase_key("correct horse battery", n=2**14)
    TemplateStore.create(tmp_path / "s", master, dim=128).close()
    info = master.info.to_dict()
    info["scrypt"]["n"] = 2**40
    conn = sqlite3.connect(tmp_path / "s" / DB_NAME)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'key_info'", (json.dumps(info),))
    conn.commit()
    conn.close()
    before = files(tmp_path / "s")

    # Act / Assert
    with pytest.raises(IntegrityError, match="scrypt n=1099511627776"):
        TemplateStore.open(tmp_path / "s")
    assert files(tmp_path / "s") == before


def test_empty_database_file_is_refused_and_left_empty(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / DB_NAME).write_bytes(b"")

    with pytest.raises(IntegrityError, match="not a template database"):
        TemplateStore.open(tmp_path / "s")

    assert files(tmp_path / "s") == {DB_NAME: b""}


def test_schema_1_store_is_refused_with_the_way_forward(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    conn = sqlite3.connect(tmp_path / "s" / DB_NAME)
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    conn.close()
    before = files(tmp_path / "s")

    with pytest.raises(ConfigError, match=r"schema '1'.*facefed site init --store NEW"):
        TemplateStore.open(tmp_path / "s")

    assert files(tmp_path / "s") == before


# --- found by the attack review of the hardened store --------------------------------------------

PLANTED = {
    # F1: rewrites the calibration when rotate-key updates key_info; rotate then re-MACed it
    "trigger-calibration": (
        "CREATE TRIGGER t AFTER UPDATE ON meta WHEN new.name = 'key_info' BEGIN "
        f"INSERT OR REPLACE INTO meta VALUES ('calibration:{TAG}', "
        "'{\"threshold\": -0.99}', zeroblob(32)); END"
    ),
    # F2: puts a deleted person's rows back when the operator enrols someone else
    "trigger-comeback": (
        "CREATE TRIGGER t AFTER INSERT ON templates WHEN new.identity <> 'alice' BEGIN "
        "UPDATE versions SET deleted = 0 WHERE identity = 'alice'; END"
    ),
    # F3: keeps a hex copy of every deleted ciphertext, which a byte scan does not find
    "shadow-table": "CREATE TABLE shadow (copy TEXT)",
    "view": "CREATE VIEW v AS SELECT * FROM templates",
    "index": "CREATE INDEX i ON templates (model_tag)",
}


@pytest.mark.parametrize("sql", PLANTED.values(), ids=PLANTED.keys())
def test_a_planted_schema_object_is_refused_at_open_and_nothing_is_written(
    store: TemplateStore, key_file: keys.MasterKey, sql: str
) -> None:
    # Arrange: someone with write access to the folder (not the key) adds a schema object
    store.close()
    poke(store, sql)
    before = files(store.directory)

    # Act / Assert
    with pytest.raises(IntegrityError, match="that facefed did not create"):
        open_and_get(store.directory, key_file, "bob")
    assert files(store.directory) == before


@pytest.mark.parametrize("operation", ["rotate", "enroll", "delete", "set-meta"])
def test_a_trigger_planted_while_the_store_is_open_stops_the_next_write(
    store: TemplateStore, key_file: keys.MasterKey, tmp_path: Path, operation: str
) -> None:
    # Arrange: the store is open and unlocked; then the trigger appears (a race with the attacker)
    poke(store, PLANTED["trigger-calibration"])

    # Act / Assert: every write checks the schema under its own lock, before writing anything
    with pytest.raises(IntegrityError, match="that facefed did not create"):
        if operation == "rotate":
            store.rotate(keys.new_key_file(tmp_path / "new.key"))
        elif operation == "enroll":
            store.enroll("carol", unit(3), model_tag=TAG, n_images=1)
        elif operation == "delete":
            store.delete("bob")
        else:
            store.set_meta(f"calibration:{TAG}", CALIBRATION)
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT name FROM meta WHERE name LIKE 'calibration:%'").fetchall()
    conn.close()
    assert rows == []  # the trigger never fired
