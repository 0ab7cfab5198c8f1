"""Integrity of a stored ledger: hash chain, signatures, run id, keys and monotone rounds.

Pure functions over the rows read from SQLite; no accounting here (see ``verify.py`` for epsilon). A
ledger passes when, for every row in sequence order:

* the sequence numbers are 0, 1, 2, ... with no gap (a deleted row leaves a gap or breaks the
  chain);
* the record is canonical JSON, its SHA-256 equals the stored hash, and its ``prev_hash`` equals the
  previous row's hash (catches edits, deletions, insertions and reordering);
* the coordinator's signature over the record verifies with the key in the header (row 0, signed by
  itself), and that key equals the pinned one when the auditor gives one;
* the record's run id and the body's run id equal the header's (catches entries replayed from
  another run, even one signed by the same keys);
* the site's signature over its body verifies; each site keeps one key (registered at its first
  entry, mirrored in the ``keys`` table, and equal to the pinned key if given);
* rounds strictly increase per ``(site, guarantee)``, delta is constant per site, and nothing
  follows the ``close`` record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.crypto.signing import (
    Ed25519PublicKey,
    canonical_bytes,
    fingerprint,
    public_key_from_bytes,
    public_key_to_bytes,
    verify,
)
from common.errors import IntegrityError
from common.privacy.entry import (
    GENESIS_HASH,
    RECORD_FORMAT,
    EntryBody,
    as_kind,
    b64decode,
    parse_entry_body,
    record_hash,
)


@dataclass(frozen=True)
class StoredRow:
    """One row of the ``entries`` table, exactly as stored."""

    seq: int
    kind: str
    site_id: str | None
    round: int | None
    record: bytes
    entry_hash: str
    coordinator_sig: bytes


@dataclass(frozen=True)
class KeyRow:
    """One row of the ``keys`` table: a site's public key and the entry that registered it."""

    site_id: str
    public_key: bytes
    first_seq: int


@dataclass(frozen=True)
class Finding:
    """One problem found in a ledger, tied to the entry where it shows."""

    seq: int
    message: str
    site_id: str | None = None
    round: int | None = None

    def __str__(self) -> str:
        where = f"entry #{self.seq}"
        if self.site_id is not None:
            where += f" (site {self.site_id}, round {self.round})"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class ChainEntry:
    """A row that passed parsing: its record, and its body for round entries."""

    seq: int
    kind: str
    record: dict[str, Any]
    entry_hash: str
    body: EntryBody | None


@dataclass
class ChainCheck:
    """The result of :func:`check_chain`."""

    run_id: str | None = None
    coordinator_key: Ed25519PublicKey | None = None
    entries: list[ChainEntry] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    closed: bool = False

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.errors


def _parse_record(row: StoredRow) -> dict[str, Any]:
    try:
        record = json.loads(row.record.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep, a huge integer
        raise IntegrityError("stored record is not valid JSON (edited?)") from exc
    if not isinstance(record, dict):
        raise IntegrityError("stored record is not a JSON object (edited?)")
    try:
        canonical = canonical_bytes(record)
    except ValueError as exc:
        raise IntegrityError(f"stored record holds a value that cannot be signed: {exc}") from exc
    if canonical != row.record:
        raise IntegrityError("stored record is not in canonical form (edited?)")
    if record.get("format") != RECORD_FORMAT:
        raise IntegrityError(f"record format is {record.get('format')!r}, not {RECORD_FORMAT!r}")
    return record


class _Checker:
    def __init__(
        self,
        keys: Sequence[KeyRow],
        pinned_coordinator: Ed25519PublicKey | None,
        pinned_sites: Mapping[str, Ed25519PublicKey],
    ) -> None:
        self.result = ChainCheck()
        self.key_rows = {k.site_id: k for k in keys}
        self.pinned_coordinator = pinned_coordinator
        self.pinned_sites = {s: public_key_to_bytes(k) for s, k in pinned_sites.items()}
        self.prev_hash = GENESIS_HASH
        self.site_keys: dict[str, bytes] = {}
        self.last_round: dict[tuple[str, str], int] = {}
        self.delta: dict[tuple[str, str], float] = {}

    def row(self, index: int, row: StoredRow) -> None:
        try:
            self._row(index, row)
        except IntegrityError as exc:
            self.result.errors.append(Finding(row.seq, str(exc), row.site_id, row.round))
        # Link to the *stored* hash so that one edited row is reported once, not at every later row.
        self.prev_hash = row.entry_hash

    def _row(self, index: int, row: StoredRow) -> None:
        res = self.result
        if row.seq != index:
            raise IntegrityError(
                f"expected entry #{index} here: entries are missing or were renumbered (deleted?)"
            )
        record = _parse_record(row)
        if record_hash(row.record) != row.entry_hash:
            raise IntegrityError("stored hash does not match the record (edited?)")
        if record.get("seq") != row.seq or record.get("kind") != row.kind:
            raise IntegrityError(
                "seq/kind columns disagree with the signed record (edited or reordered?)"
            )
        kind = as_kind(record.get("kind"))
        if index == 0:
            self._header(record, row)
        elif kind == "header":
            raise IntegrityError("a second header inside the ledger")
        if record.get("run_id") != res.run_id:
            raise IntegrityError(
                f"run id {record.get('run_id')!r} differs from the ledger's run {res.run_id!r} "
                "(entry replayed from another run?)"
            )
        if record.get("prev_hash") != self.prev_hash:
            raise IntegrityError(
                "hash chain broken: prev_hash does not match the entry before it "
                "(entry deleted, inserted or reordered?)"
            )
        if res.coordinator_key is None:
            raise IntegrityError("no valid header, cannot check the coordinator's signature")
        if not verify(res.coordinator_key, row.record, row.coordinator_sig):
            raise IntegrityError("coordinator countersignature is invalid")
        if res.closed:
            raise IntegrityError("entry after the run was closed")
        body = self._round(record, row) if kind == "round" else None
        if kind == "close":
            res.closed = True
        res.entries.append(ChainEntry(row.seq, kind, record, row.entry_hash, body))

    def _header(self, record: dict[str, Any], row: StoredRow) -> None:
        if record.get("kind") != "header":
            raise IntegrityError("entry #0 is not the run header")
        key = public_key_from_bytes(b64decode(record.get("coordinator_public_key")))
        if self.pinned_coordinator is not None and public_key_to_bytes(key) != public_key_to_bytes(
            self.pinned_coordinator
        ):
            raise IntegrityError(
                f"coordinator key {fingerprint(key)} is not the pinned key "
                f"{fingerprint(self.pinned_coordinator)} (ledger re-signed by someone else?)"
            )
        run_id = record.get("run_id")
        if not isinstance(run_id, str):
            raise IntegrityError("header has no run id")
        self.result.run_id, self.result.coordinator_key = run_id, key

    def _round(self, record: dict[str, Any], row: StoredRow) -> EntryBody:
        body = parse_entry_body(record.get("body") or {})
        if (row.site_id, row.round) != (body.site_id, body.round):
            raise IntegrityError("site/round columns disagree with the signed body (edited?)")
        if body.run_id != self.result.run_id:
            raise IntegrityError(
                f"body run id {body.run_id!r} differs from the ledger's run {self.result.run_id!r} "
                "(entry replayed from another run?)"
            )
        raw_key = b64decode(record.get("site_public_key"))
        site_key = public_key_from_bytes(raw_key)
        if not verify(site_key, canonical_bytes(record["body"]), b64decode(record.get("site_sig"))):
            raise IntegrityError("site signature is invalid")
        known = self.site_keys.setdefault(body.site_id, raw_key)
        if known != raw_key:
            raise IntegrityError("site signed with a different key than at its first entry")
        pinned = self.pinned_sites.get(body.site_id)
        if pinned is not None and pinned != raw_key:
            raise IntegrityError(f"site key {fingerprint(site_key)} is not the pinned key")
        key_row = self.key_rows.get(body.site_id)
        if key_row is None or key_row.public_key != raw_key:
            raise IntegrityError("keys table does not hold this site's key (edited?)")
        last = self.last_round.get(body.stream)
        if last is not None and body.round <= last:
            raise IntegrityError(
                f"round {body.round} does not follow round {last} (replayed or reordered?)"
            )
        self.last_round[body.stream] = body.round
        delta = self.delta.setdefault(body.stream, body.delta)
        if delta != body.delta:
            raise IntegrityError(f"delta changed from {delta:g} to {body.delta:g} for this site")
        return body

    def finish(self) -> ChainCheck:
        for site_id, key_row in self.key_rows.items():
            first = next(
                (e.seq for e in self.result.entries if e.body and e.body.site_id == site_id), None
            )
            if first is not None and key_row.first_seq != first:
                self.result.errors.append(
                    Finding(key_row.first_seq, f"keys table lists site {site_id} at a wrong entry")
                )
        return self.result


def check_chain(
    rows: Sequence[StoredRow],
    keys: Sequence[KeyRow],
    *,
    pinned_coordinator: Ed25519PublicKey | None = None,
    pinned_sites: Mapping[str, Ed25519PublicKey] | None = None,
) -> ChainCheck:
    """Check the integrity of a ledger's rows (in ``seq`` order); see the module docstring."""
    checker = _Checker(keys, pinned_coordinator, pinned_sites or {})
    if not rows:
        checker.result.errors.append(Finding(0, "the ledger is empty: no run header"))
    for index, row in enumerate(rows):
        checker.row(index, row)
    return checker.finish()
