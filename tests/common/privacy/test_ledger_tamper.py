"""`audit verify` detects every way of rewriting history: edits, deletions, reordering, replays.

Each attack is done at the SQLite level, as someone with write access to the file would: drop the
append-only triggers, then change the stored rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from ledger_fixtures import Keys, build_ledger, signed_round

from common.cli import main
from common.crypto.signing import canonical_bytes, generate_private_key, sign
from common.privacy.accounting import compute_epsilon
from common.privacy.chain import check_chain
from common.privacy.entry import make_entry_body, record_hash
from common.privacy.ledger import Ledger, read_rows
from common.privacy.verify import verify_ledger


def tamper(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Run SQL against the ledger after dropping its append-only triggers."""
    conn = sqlite3.connect(path)
    for trigger in ("entries_append_only_u", "entries_append_only_d", "keys_append_only_u"):
        conn.execute(f"DROP TRIGGER {trigger}")
    for sql, params in statements:
        conn.execute(sql, params)
    conn.commit()
    conn.close()


def record_of(path: Path, seq: int) -> bytes:
    rows, _ = read_rows(path)
    return rows[seq].record


def test_valid_ledger_passes(golden_ledger: Path, keys: Keys) -> None:
    result = verify_ledger(golden_ledger, coordinator_key=keys.coordinator.public_key())

    assert result.ok, result.errors
    assert result.closed
    assert {s.site_id for s in result.sites} == {"hospital-a", "clinic-b", "coordinator"}
    assert all(len(s.rounds) == 3 for s in result.sites)


def test_append_only_triggers_refuse_update_and_delete(ledger_copy: Path) -> None:
    conn = sqlite3.connect(ledger_copy)

    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE entries SET round = 9 WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM entries WHERE seq = 1")
    conn.close()


def test_editing_one_byte_in_sqlite_is_detected(ledger_copy: Path) -> None:
    record = bytearray(record_of(ledger_copy, 4))
    position = record.index(b'"epsilon_cumulative":') + len(b'"epsilon_cumulative":')
    record[position] = ord("1") if record[position] != ord("1") else ord("2")

    tamper(ledger_copy, ("UPDATE entries SET record = ? WHERE seq = 4", (bytes(record),)))
    result = verify_ledger(ledger_copy, cross_check=False)

    assert not result.ok
    assert result.first_error is not None and result.first_error.seq == 4


def test_editing_any_byte_of_an_entry_is_detected(golden_ledger: Path) -> None:
    rows, key_rows = read_rows(golden_ledger)
    target = rows[5].record

    undetected = []
    for position in range(len(target)):
        edited = bytearray(target)
        edited[position] ^= 0x01
        mutated = [*rows[:5], replace(rows[5], record=bytes(edited)), rows[6]]
        check = check_chain(mutated, key_rows)
        if check.ok or min(e.seq for e in check.errors) != 5:
            undetected.append(position)

    assert undetected == []


@pytest.mark.parametrize("column", ["entry_hash", "coordinator_sig", "site_id", "round", "kind"])
def test_editing_a_stored_column_is_detected(ledger_copy: Path, column: str) -> None:
    new_value = {
        "entry_hash": "f" * 64,
        "coordinator_sig": b"\x00" * 64,
        "site_id": "clinic-b",
        "round": 7,
        "kind": "close",
    }[column]

    tamper(ledger_copy, (f"UPDATE entries SET {column} = ? WHERE seq = 4", (new_value,)))
    result = verify_ledger(ledger_copy, cross_check=False)

    assert result.first_error is not None and result.first_error.seq == 4


def test_rewriting_an_entry_with_the_coordinator_key_fails_the_site_signature(
    ledger_copy: Path, keys: Keys
) -> None:
    # The coordinator (or anyone holding its key) lowers a site's recorded epsilon and re-signs.
    import json

    record = json.loads(record_of(ledger_copy, 4))
    record["body"]["epsilon_cumulative"] = 0.5
    data = canonical_bytes(record)
    tamper(
        ledger_copy,
        (
            "UPDATE entries SET record = ?, entry_hash = ?, coordinator_sig = ? WHERE seq = 4",
            (data, record_hash(data), sign(keys.coordinator, data)),
        ),
    )

    result = verify_ledger(ledger_copy, cross_check=False)

    assert result.first_error is not None and result.first_error.seq == 4
    assert "site signature is invalid" in result.first_error.message


def test_deleting_an_entry_is_detected(ledger_copy: Path) -> None:
    tamper(ledger_copy, ("DELETE FROM entries WHERE seq = 5", ()))

    result = verify_ledger(ledger_copy, cross_check=False)

    assert not result.ok
    assert result.first_error is not None and result.first_error.seq == 6


def test_deleting_and_renumbering_is_detected(ledger_copy: Path) -> None:
    # Close the gap as well: every later row moves down by one.
    tamper(
        ledger_copy,
        ("DELETE FROM entries WHERE seq = 5", ()),
        ("UPDATE entries SET seq = seq - 1 WHERE seq > 5", ()),
    )

    result = verify_ledger(ledger_copy, cross_check=False)

    assert result.first_error is not None and result.first_error.seq == 5


def test_cutting_off_the_last_entries_is_detected_for_a_finished_run(ledger_copy: Path) -> None:
    tamper(ledger_copy, ("DELETE FROM entries WHERE seq >= 9", ()))

    lenient = verify_ledger(ledger_copy, cross_check=False)
    strict = verify_ledger(ledger_copy, cross_check=False, require_closed=True)

    assert lenient.ok and any("no closing entry" in w for w in lenient.warnings)
    assert not strict.ok and "no closing entry" in strict.errors[0].message


def test_reordering_entries_is_detected(ledger_copy: Path) -> None:
    rows, _ = read_rows(ledger_copy)
    four, five = rows[4], rows[5]
    swap = (
        "UPDATE entries SET record = ?, entry_hash = ?, coordinator_sig = ?, site_id = ? "
        "WHERE seq = ?"
    )

    tamper(
        ledger_copy,
        (swap, (five.record, five.entry_hash, five.coordinator_sig, five.site_id, 4)),
        (swap, (four.record, four.entry_hash, four.coordinator_sig, four.site_id, 5)),
    )
    result = verify_ledger(ledger_copy, cross_check=False)

    assert result.first_error is not None and result.first_error.seq == 4


def test_replaying_an_entry_from_another_run_is_detected(
    ledger_copy: Path, keys: Keys, tmp_path: Path
) -> None:
    # Same coordinator and site keys, different run: its signatures are all genuine.
    other = build_ledger(tmp_path / "other.db", "run-b", keys, rounds=4, close=False)
    replayed = read_rows(other)[0][10]  # hospital-a, round 4 of run-b
    columns = (replayed.kind, replayed.site_id, replayed.round, replayed.record)
    values = (*columns, replayed.entry_hash, replayed.coordinator_sig)

    tamper(
        ledger_copy,
        ("DELETE FROM entries WHERE seq = 10", ()),  # drop the close entry, then append
        ("INSERT INTO entries VALUES (10, ?, ?, ?, ?, ?, ?)", values),
    )
    result = verify_ledger(ledger_copy, cross_check=False)

    assert result.first_error is not None and result.first_error.seq == 10
    assert "another run" in result.first_error.message


def test_a_ledger_rebuilt_with_other_keys_fails_against_the_pinned_coordinator_key(
    tmp_path: Path, keys: Keys
) -> None:
    forger = Keys(coordinator=generate_private_key(), sites=keys.sites)
    forged = build_ledger(tmp_path / "forged.db", "run-a", forger, rounds=1)

    unpinned = verify_ledger(forged, cross_check=False)
    pinned = verify_ledger(forged, coordinator_key=keys.coordinator.public_key(), cross_check=False)

    assert unpinned.ok and any("not pinned" in w for w in unpinned.warnings)
    assert not pinned.ok and pinned.first_error is not None and pinned.first_error.seq == 0


def test_a_wrong_epsilon_signed_by_everyone_is_caught_by_recomputation(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A colluding site and coordinator record an epsilon 3x too small, with valid signatures.
    path = tmp_path / "colluding.db"
    monkeypatch.setattr(Ledger, "_check_accounting", lambda self, body, where: None)
    site = keys.sites["hospital-a"]
    with Ledger.open(path, run_id="run-c", coordinator_key=keys.coordinator) as ledger:
        signed_round(ledger, site, "hospital-a", 1)
        honest = ledger.entries()[0]
        body = make_entry_body(
            run_id="run-c",
            site_id="hospital-a",
            round=2,
            mechanisms=honest.mechanisms,
            accountant="prv",
            epsilon_round=honest.epsilon_round / 3,
            epsilon_cumulative=honest.epsilon_cumulative / 3,
            delta=honest.delta,
            budget_epsilon=honest.budget_epsilon,
            model_hash="sha256:2",
            secret_noise=True,
            epsilon_lifetime=compute_epsilon([*honest.mechanisms] * 2, honest.delta),
        )
        ledger.append(body, site.public_key(), sign(site, canonical_bytes(body)))

    result = verify_ledger(path, cross_check=False)

    assert [f.seq for f in result.errors] == [2, 2]
    assert "recomputes" in result.errors[0].message


@pytest.mark.parametrize(
    "record",
    [b"[" * 100_000, b'{"a":' + b"1" * 5000 + b"}", "a text value, not a blob"],
    ids=["deeply-nested-json", "5000-digit-integer", "text-typed-record"],
)
def test_a_crafted_record_is_one_line_and_exit_4_not_a_traceback(
    ledger_copy: Path, record: object, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by the attack review: json.loads raises RecursionError on deep nesting and ValueError on
    # an integer of over 4,300 digits, and bytes() of a TEXT column raises TypeError. Write access
    # to the file is all it takes; no key.
    tamper(ledger_copy, ("UPDATE entries SET record = ? WHERE seq = 2", (record,)))

    code = main(["audit", "verify", str(ledger_copy), "--no-cross-check"])
    captured = capsys.readouterr()

    assert code == 4
    assert "Traceback" not in captured.out + captured.err
    said = [line for line in (captured.out + captured.err).splitlines() if "edited?" in line]
    assert said and said[0].startswith(("FAIL", "facefed: error:"))
