"""The append-only, hash-chained, signed privacy ledger (SQLite).

One entry per site per round (see :mod:`common.privacy.entry` for the fields). The coordinator opens
the ledger with its Ed25519 key; entry #0 is a header holding the run id and the coordinator's
public key, signed by that key. :meth:`Ledger.append` takes a body that the site built and signed,
checks the site's signature, that the round follows the site's last one, and recomputes both
epsilons from the mechanisms; then it chains the entry to the previous one, countersigns it and
commits it in one SQLite transaction (WAL, ``synchronous=FULL``), so a crash leaves either the whole
entry or none of it.

There is no update or delete API, and SQLite triggers reject ``UPDATE``/``DELETE`` on both tables;
someone with write access to the file can still drop the triggers, which is what ``facefed audit
verify`` (:mod:`common.privacy.verify`) is for.

An entry whose epsilon would exceed the site's budget is refused with :class:`PrivacyBudgetError`:
the caller must then discard that site's update (an update that is never released spends no
privacy).

Each entry also carries the site's *lifetime* epsilon (every run it ever took part in). One run's
ledger cannot recompute it, since other runs' events are recorded elsewhere; :func:`lifetime_problem`
checks what it can: it is at least this run's recomputed cumulative epsilon, and it never decreases
from one of the site's entries to the next.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from common.crypto.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    canonical_bytes,
    fingerprint,
    public_key_to_bytes,
    sign,
    verify,
)
from common.errors import IntegrityError, PrivacyBudgetError
from common.failpoints import failpoint
from common.privacy.accounting import compute_epsilon
from common.privacy.chain import ChainCheck, KeyRow, StoredRow, check_chain
from common.privacy.entry import (
    GENESIS_HASH,
    LIFETIME_TOLERANCE,
    RECORD_FORMAT,
    EntryBody,
    Guarantee,
    at_least,
    b64encode,
    check_id,
    parse_entry_body,
    record_hash,
    utc_now,
)
from common.privacy.events import DpSgdEvent

logger = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.01  # relative; the "mismatch over 1%"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    site_id TEXT,
    round INTEGER,
    record BLOB NOT NULL,
    entry_hash TEXT NOT NULL,
    coordinator_sig BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    site_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    first_seq INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_append_only_u BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_d BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS keys_append_only_u BEFORE UPDATE ON keys
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS keys_append_only_d BEFORE DELETE ON keys
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


@dataclass(frozen=True)
class Receipt:
    """What the coordinator returns for an appended entry; the site may keep it as proof."""

    seq: int
    entry_hash: str
    coordinator_signature: bytes


def relative_mismatch(recorded: float, recomputed: float) -> float:
    """Return ``|recorded - recomputed| / recomputed`` (0 when both are 0)."""
    if recomputed == 0:
        return 0.0 if recorded == 0 else float("inf")
    return abs(recorded - recomputed) / abs(recomputed)


def lifetime_problem(
    body: EntryBody, previous: EntryBody | None, epsilon_cumulative: float
) -> str | None:
    """Say what is wrong with an entry's lifetime epsilon, or return None.

    Args:
        body: the entry.
        previous: the same site's entry before it in this ledger (same guarantee), or None.
        epsilon_cumulative: this run's cumulative epsilon recomputed from the ledger's history; the
            lifetime may not be below it by more than the 1% accounting tolerance.
    """
    if not at_least(body.epsilon_lifetime, epsilon_cumulative, EPSILON_TOLERANCE):
        return (
            f"lifetime epsilon {body.epsilon_lifetime:.4f} is below this run's cumulative epsilon "
            f"{epsilon_cumulative:.4f}; the lifetime composes every run, this one included"
        )
    if previous is not None and not at_least(
        body.epsilon_lifetime, previous.epsilon_lifetime, LIFETIME_TOLERANCE
    ):
        return (
            f"lifetime epsilon {body.epsilon_lifetime:.4f} dropped below the "
            f"{previous.epsilon_lifetime:.4f} recorded at round {previous.round}; a site's "
            "lifetime epsilon never decreases"
        )
    return None


def read_rows(path: str | os.PathLike[str]) -> tuple[list[StoredRow], list[KeyRow]]:
    """Read every stored row, read-only, in ``seq`` order.

    Raises:
        IntegrityError: the file is missing or is not a ledger database.
    """
    if not Path(path).is_file():
        raise IntegrityError(f"no ledger at {path}; pass the ledger.db written by the run")
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            entries = conn.execute(
                "SELECT seq, kind, site_id, round, record, entry_hash, coordinator_sig "
                "FROM entries ORDER BY seq"
            ).fetchall()
            keys = conn.execute("SELECT site_id, public_key, first_seq FROM keys").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(f"{path} is not a readable privacy ledger ({exc})") from exc
    try:
        rows = [
            StoredRow(int(s), str(k), site, rnd, _blob(rec), str(h), _blob(sig))
            for s, k, site, rnd, rec, h, sig in entries
        ]
        return rows, [KeyRow(str(s), _blob(pk), int(first)) for s, pk, first in keys]
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"{path} holds a value of the wrong type ({exc}; edited?)") from exc


def _blob(value: object) -> bytes:
    """A BLOB column's value; a TEXT, number or NULL where a BLOB belongs is an edit."""
    if not isinstance(value, bytes):
        raise TypeError(f"a {type(value).__name__} where bytes belong")
    return value


class Ledger:
    """The coordinator's handle on one run's ledger. Use :meth:`open`; close it when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, coordinator_key: Ed25519PrivateKey):
        self._conn = conn
        self.path = path
        self._key = coordinator_key
        self._bodies: list[EntryBody] = []
        self._site_keys: dict[str, str] = {}  # site -> base64 public key
        self._last_hash = GENESIS_HASH
        self._next_seq = 0
        self._closed = False
        self.run_id = ""

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, run_id: str, coordinator_key: Ed25519PrivateKey
    ) -> Ledger:
        """Create the ledger at ``path``, or reopen it to resume the same run.

        Raises:
            IntegrityError: the file belongs to another run or coordinator key, or fails its checks.
        """
        check_id("run id", run_id)
        ledger_path = Path(path)
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(ledger_path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            ledger = cls(conn, ledger_path, coordinator_key)
            ledger._load(run_id)
        except BaseException:
            conn.close()
            raise
        return ledger

    def _load(self, run_id: str) -> None:
        rows, keys = read_rows(self.path)
        if not rows:
            self.run_id = run_id
            pub = public_key_to_bytes(self._key.public_key())
            self._commit(
                {
                    "kind": "header",
                    "coordinator_public_key": b64encode(pub),
                    "created_at": utc_now(),
                },
                None,
            )
            logger.info("created privacy ledger %s for run %s", self.path, run_id)
            return
        check = check_chain(rows, keys, pinned_coordinator=self._key.public_key())
        if check.run_id is not None and check.run_id != run_id:
            raise IntegrityError(
                f"ledger {self.path} records run {check.run_id!r}, not {run_id!r}; "
                "use a fresh ledger path for each run"
            )
        if not check.ok:
            raise IntegrityError(
                f"ledger {self.path} fails verification at {check.errors[0]}; "
                "run `facefed audit verify` and start a new ledger"
            )
        self._resume(check, rows[-1])

    def _resume(self, check: ChainCheck, last: StoredRow) -> None:
        self.run_id = check.run_id or ""
        self._bodies = [e.body for e in check.entries if e.body is not None]
        for entry in check.entries:
            if entry.body is not None:
                key_b64 = str(entry.record["site_public_key"])
                self._site_keys.setdefault(entry.body.site_id, key_b64)
        self._last_hash, self._next_seq, self._closed = last.entry_hash, last.seq + 1, check.closed
        logger.info("resumed privacy ledger %s at entry #%d", self.path, self._next_seq)

    # ------------------------------------------------------------------ queries
    @property
    def coordinator_public_key(self) -> Ed25519PublicKey:
        """The key that countersigns every entry (pin it when verifying)."""
        return self._key.public_key()

    def entries(self) -> list[EntryBody]:
        """Return every round entry, in ledger order."""
        return list(self._bodies)

    def _stream(self, site_id: str, guarantee: Guarantee) -> list[EntryBody]:
        return [b for b in self._bodies if b.stream == (site_id, guarantee)]

    def history(self, site_id: str, guarantee: Guarantee = "example-level") -> list[DpSgdEvent]:
        """Return every mechanism recorded for a site, in order (the input to accounting)."""
        return [m for b in self._stream(site_id, guarantee) for m in b.mechanisms]

    def cumulative_epsilon(self, site_id: str, guarantee: Guarantee = "example-level") -> float:
        """Return the site's last recorded cumulative epsilon (0.0 before its first entry)."""
        stream = self._stream(site_id, guarantee)
        return stream[-1].epsilon_cumulative if stream else 0.0

    def last_round(self, site_id: str, guarantee: Guarantee = "example-level") -> int | None:
        """Return the site's last recorded round, or None."""
        stream = self._stream(site_id, guarantee)
        return stream[-1].round if stream else None

    def budget(self, site_id: str, guarantee: Guarantee = "example-level") -> float | None:
        """Return the site's budget as recorded in its last entry, or None."""
        stream = self._stream(site_id, guarantee)
        return stream[-1].budget_epsilon if stream else None

    def site_key(self, site_id: str) -> str | None:
        """The base64 public key the site registered with its first entry, or None."""
        return self._site_keys.get(site_id)

    @property
    def closed(self) -> bool:
        """True once :meth:`finish` has recorded the end of the run."""
        return self._closed

    # ------------------------------------------------------------------ writing
    def append(
        self, body: Mapping[str, Any], site_public_key: Ed25519PublicKey, site_signature: bytes
    ) -> Receipt:
        """Check a site's signed entry, chain it, countersign it and commit it.

        Raises:
            IntegrityError: bad signature, wrong run, key change, round not after the last one,
                changed delta, epsilon mismatch over 1%, or the run is closed.
            PrivacyBudgetError: the recomputed cumulative epsilon exceeds the site's budget; discard
                the site's update.
        """
        parsed = parse_entry_body(body)
        where = f"site {parsed.site_id} round {parsed.round}"
        if self._closed:
            raise IntegrityError(f"{where}: the run's ledger is closed; start a new run")
        if parsed.run_id != self.run_id:
            raise IntegrityError(
                f"{where}: entry is for run {parsed.run_id!r}, this ledger is {self.run_id!r}"
            )
        raw_key = public_key_to_bytes(site_public_key)
        if not verify(site_public_key, canonical_bytes(dict(body)), site_signature):
            raise IntegrityError(f"{where}: site signature is invalid; re-sign the entry body")
        known = self._site_keys.get(parsed.site_id)
        if known is not None and known != b64encode(raw_key):
            raise IntegrityError(
                f"{where}: signed with {fingerprint(site_public_key)}, "
                "not the site's registered key"
            )
        self._check_accounting(parsed, where)
        record = {
            "kind": "round",
            "body": dict(body),
            "site_public_key": b64encode(raw_key),
            "site_sig": b64encode(site_signature),
        }
        receipt = self._commit(record, parsed, new_key=raw_key if known is None else None)
        self._site_keys.setdefault(parsed.site_id, b64encode(raw_key))
        return receipt

    def append_coordinator(self, body: Mapping[str, Any]) -> Receipt:
        """Append an entry that the coordinator itself spent (client-level DP), signed by it."""
        return self.append(body, self._key.public_key(), sign(self._key, canonical_bytes(body)))

    def finish(self, reason: str) -> Receipt:
        """Record the end of the run; nothing can be appended afterwards."""
        if self._closed:
            raise IntegrityError("the ledger is already closed")
        receipt = self._commit(
            {"kind": "close", "reason": str(reason), "closed_at": utc_now()}, None
        )
        self._closed = True
        return receipt

    def _check_accounting(self, body: EntryBody, where: str) -> None:
        stream = self._stream(body.site_id, body.guarantee)
        if stream and body.round <= stream[-1].round:
            raise IntegrityError(
                f"{where}: round must follow the site's last recorded round {stream[-1].round}"
            )
        if stream and body.delta != stream[0].delta:
            raise IntegrityError(f"{where}: delta {body.delta:g} differs from {stream[0].delta:g}")
        eps_round = compute_epsilon(body.mechanisms, body.delta, body.accountant)
        history = [m for b in stream for m in b.mechanisms]
        eps_cum = compute_epsilon([*history, *body.mechanisms], body.delta, body.accountant)
        for name, recorded, recomputed in (
            ("epsilon_round", body.epsilon_round, eps_round),
            ("epsilon_cumulative", body.epsilon_cumulative, eps_cum),
        ):
            if relative_mismatch(recorded, recomputed) > EPSILON_TOLERANCE:
                raise IntegrityError(
                    f"{where}: recorded {name}={recorded:.4f} but the ledger's history gives "
                    f"{recomputed:.4f} ({body.accountant}); compute it from Ledger.history()"
                )
        problem = lifetime_problem(body, stream[-1] if stream else None, eps_cum)
        if problem is not None:
            raise IntegrityError(f"{where}: {problem}")
        if eps_cum > body.budget_epsilon:
            raise PrivacyBudgetError(
                f"{where}: cumulative epsilon {eps_cum:.4f} exceeds the budget "
                f"{body.budget_epsilon:.4f}; the entry was not recorded, discard this update"
            )

    def _commit(
        self, fields: dict[str, Any], body: EntryBody | None, new_key: bytes | None = None
    ) -> Receipt:
        seq = self._next_seq
        record = {
            "format": RECORD_FORMAT,
            "seq": seq,
            "prev_hash": self._last_hash,
            "run_id": self.run_id,
            "appended_at": utc_now(),
            **fields,
        }
        data = canonical_bytes(record)
        digest, signature = record_hash(data), sign(self._key, data)
        site_id, rnd = (body.site_id, body.round) if body else (None, None)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (stored_max,) = conn.execute("SELECT COALESCE(MAX(seq), -1) FROM entries").fetchone()
            if stored_max != seq - 1:
                raise IntegrityError(
                    f"ledger {self.path} was written by another process; one coordinator per ledger"
                )
            conn.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, record["kind"], site_id, rnd, data, digest, signature),
            )
            failpoint("ledger.before-commit")
            if new_key is not None and body is not None:
                conn.execute("INSERT INTO keys VALUES (?, ?, ?)", (body.site_id, new_key, seq))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._last_hash, self._next_seq = digest, seq + 1
        if body is not None:
            self._bodies.append(body)
        return Receipt(seq, digest, signature)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the database connection (does not end the run; see :meth:`finish`)."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
