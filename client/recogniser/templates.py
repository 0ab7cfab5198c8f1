"""The site's encrypted face-template store (one SQLite file).

Every template is a float32 embedding sealed in its own :class:`~common.crypto.envelope.Envelope`.
The associated data binds the store id, the identity, the record version, the model tag and the
dimension, so a record copied to another identity, another version or another store fails to
decrypt. The database holds only ciphertexts, wrapped keys and non-secret metadata: never an image,
never a plaintext embedding, never the master key (:mod:`common.crypto.keys` stores only a one-way
verifier).

Everything else that decides a match or whether a person exists is authenticated too, with an
HMAC-SHA256 key derived from the master key by HKDF (RFC 5869; label and store id in ``info``):

* every ``meta`` row (threshold calibrations, store id, dimension, key metadata), MAC over
  (store id, name, value);
* every ``versions`` row, MAC over (store id, identity, version, deleted flag): the last version
  issued per identity, and a *tombstone* (deleted flag, version bumped) after a delete;
* the ``state`` row: a MAC over the store id and every other meta row and versions row, so a row
  removed (a tombstone), added or put back from an older copy is refused even when its own MAC is
  the one facefed wrote earlier.

Opening the store checks the file header, the tables and every metadata value (a calibration's
threshold must be finite and strictly between -1 and 1, cosine similarity's range; its FAR in
(0, 1); scrypt costs are bounded) and never writes to the files; unlocking checks every MAC. A
failure is a one-line :class:`~common.errors.IntegrityError` naming what failed. A whole-database
rollback to an older copy made with the same master key cannot be detected by the store alone
(docs/privacy-templates.md).

Disk hygiene: ``PRAGMA secure_delete=ON`` zeroes freed cells; ``journal_mode=WAL`` with
``synchronous=FULL`` makes every commit durable and atomic; ``temp_store=MEMORY`` keeps sort spills
off disk; after a delete, a renewal or a key rotation the WAL is checkpointed and truncated to zero
bytes. :meth:`TemplateStore.delete` reports success only when a byte scan finds no copy of the
deleted ciphertext left in the database or its WAL. The directory is 0700 and the files 0600.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from client.recogniser import store_mac
from client.recogniser.calibration import Calibration
from client.recogniser.store_mac import VersionState, mac_key
from common.crypto import envelope
from common.crypto.keys import KeyInfo, MasterKey, matches
from common.errors import ConfigError, DataError, IntegrityError

logger = logging.getLogger(__name__)

DB_NAME = "templates.db"
SCHEMA_VERSION = 2
CALIBRATION_PREFIX = "calibration:"
MAX_SCRYPT_MEMORY = 2**30  # bytes (128 * n * r); facefed's default needs 32 MiB
MAX_SCRYPT_WORK = 2**24  # n * r * p; facefed's default is 2**18
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
MAX_DIM = 65536  # the largest embedding a store holds
_STORE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_NORM_TOLERANCE = 1e-3
_MAX_VERSION = 2**62
_SQLITE_HEADER = b"SQLite format 3\0"
_BUSY_MS = 5000
_PURGE_WAIT_MS = 1000
_STATE = store_mac.STATE_ROW
_MANAGED = ("schema_version", "store_id", "embedding_dim", "key_info", _STATE)

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL, mac BLOB NOT NULL);
CREATE TABLE versions (
    identity TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    mac BLOB NOT NULL
);
CREATE TABLE templates (
    identity TEXT PRIMARY KEY REFERENCES versions(identity),
    version INTEGER NOT NULL,
    model_tag TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    wrap_nonce BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""
_COLUMNS = {
    "meta": ("name", "value", "mac"),
    "versions": ("identity", "version", "deleted", "mac"),
    "templates": (
        "identity",
        "version",
        "model_tag",
        "n_images",
        "nonce",
        "ciphertext",
        "wrap_nonce",
        "wrapped_key",
        "created_at",
    ),
}
_RESTORE = "restore templates.db from a backup"


def _schema_objects(conn: sqlite3.Connection) -> frozenset[tuple[str, str, str, str | None]]:
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return frozenset((str(t), str(n), str(tb), sq) for t, n, tb, sq in rows)


def _expected_schema() -> frozenset[tuple[str, str, str, str | None]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return _schema_objects(conn)
    finally:
        conn.close()


# Exactly the three tables facefed creates and their primary-key indexes: a trigger, view, index or
# table planted by someone with write access to the folder could rewrite rows while facefed writes
# (and its MACs would then vouch for them), or keep copies of deleted ciphertexts.
_EXPECTED_SCHEMA = _expected_schema()


def _check_schema(conn: sqlite3.Connection) -> None:
    """Refuse a database holding any schema object facefed did not create (IntegrityError)."""
    extra = _schema_objects(conn) - _EXPECTED_SCHEMA
    if extra:
        kind, name = sorted(extra)[0][:2]
        raise IntegrityError(
            f"the template database holds a {kind} {name!r} that facefed did not create (someone "
            f"with write access to the store changed it); {_RESTORE}"
        )


@dataclass(frozen=True)
class StoredTemplate:
    """A decrypted template, held in memory only."""

    identity: str
    version: int
    model_tag: str
    n_images: int
    embedding: np.ndarray


def validate_identity(identity: str) -> str:
    """Return ``identity`` if it is a valid id (1-128 chars of letters, digits, ``._@+-``)."""
    if not isinstance(identity, str) or not _IDENTITY_RE.fullmatch(identity):
        raise DataError(
            f"invalid identity id {identity!r}; use 1-128 letters, digits or ._@+- "
            "starting with a letter or digit"
        )
    return identity


def record_aad(store_id: str, identity: str, version: int, model_tag: str, dim: int) -> bytes:
    """Associated data bound into a template record (length-prefixed fields)."""
    return b"facefed-template-v1" + b"".join(
        store_mac.length_prefixed(part)
        for part in (
            store_id.encode(),
            identity.encode(),
            version.to_bytes(8, "big"),
            model_tag.encode(),
            dim.to_bytes(4, "big"),
        )
    )


# ---------------------------------------------------------------------- metadata checks
def _json_dict(name: str, value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise IntegrityError(f"store metadata {name!r} is not a JSON object; {_RESTORE}")
    return data


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def calibration_problem(name: str, data: dict[str, Any]) -> str:
    """What is wrong with the calibration ``data`` stored under ``name`` ("" if nothing).

    The threshold must be finite and strictly inside (-1, 1), the range of the cosine similarity
    of L2-normalised templates (at -1 every pair matches, at 1 none does); the target FAR in (0, 1).
    """
    fields = {f.name for f in dataclasses.fields(Calibration)}
    given = set(data) | {"gray"}  # stores written before gray calibrations lack the key
    if given != fields:
        return f"fields {sorted(map(str, given ^ fields))} missing or unexpected"
    gray = data.get("gray")
    if gray is not None:
        if not isinstance(gray, dict) or gray.get("gray") is not None:
            return "its gray calibration is not a single calibration"
        problem = calibration_problem(name, gray)
        if problem:
            return f"its gray calibration is invalid: {problem}"
    if not _is_number(data["threshold"]) or not -1 < data["threshold"] < 1:
        return f"threshold {data['threshold']!r} is not a finite number in (-1, 1)"
    if not _is_number(data["far"]) or not 0 < data["far"] < 1:
        return f"FAR {data['far']!r} is not in (0, 1)"
    if any(
        data[k] is not None and not (_is_number(data[k]) and 0 <= data[k] <= 1)
        for k in ("tar", "heldout_tar", "heldout_far")
    ):
        return "a TAR or held-out rate is not in [0, 1]"
    if any(
        not isinstance(data[k], int) or isinstance(data[k], bool) or data[k] < 0
        for k in ("n_genuine", "n_impostor", "n_folds")
    ):
        return "a pair or fold count is not a non-negative integer"
    if data["model_tag"] != name.removeprefix(CALIBRATION_PREFIX):
        return "its model tag differs from the one in its name"
    if not isinstance(data["source"], str) or len(data["source"]) > 200:
        return "its source is not a short string"
    return ""


def _stored_calibration(name: str, value: str) -> dict[str, Any]:
    data = _json_dict(name, value)
    problem = calibration_problem(name, data)
    if problem:
        raise IntegrityError(f"store calibration {name!r} is invalid: {problem}; {_RESTORE}")
    return data


def _check_key_info(value: str) -> KeyInfo:
    data = _json_dict("key_info", value)
    if data.get("kind") not in ("keyfile", "passphrase"):
        raise IntegrityError(f"store key metadata names an unknown key kind; {_RESTORE}")
    try:
        info = KeyInfo.from_dict(data)
    except ConfigError as exc:  # e.g. scrypt n not a power of two: the stored metadata is bad
        raise IntegrityError(f"store key metadata is malformed ({exc}); {_RESTORE}") from None
    if len(info.verifier) != store_mac.MAC_SIZE:
        raise IntegrityError(f"store key verifier has the wrong length; {_RESTORE}")
    s = info.scrypt
    if s is not None and (128 * s.n * s.r > MAX_SCRYPT_MEMORY or s.n * s.r * s.p > MAX_SCRYPT_WORK):
        raise IntegrityError(
            f"store key metadata asks for scrypt n={s.n} r={s.r} p={s.p}, beyond facefed's limits "
            f"({MAX_SCRYPT_MEMORY >> 20} MiB, n*r*p <= {MAX_SCRYPT_WORK}); {_RESTORE}"
        )
    return info


def _read_meta(conn: sqlite3.Connection) -> tuple[dict[str, str], dict[str, bytes]]:
    """Every meta row as ``(values, macs)``, type-checked (SQLite does not enforce column types)."""
    values, macs = {}, {}
    for name, value, tag in conn.execute("SELECT name, value, mac FROM meta").fetchall():
        if not isinstance(name, str) or not isinstance(value, str) or not isinstance(tag, bytes):
            raise IntegrityError(f"store metadata row {name!r} has the wrong types; {_RESTORE}")
        if name not in _MANAGED and not name.startswith(CALIBRATION_PREFIX):
            raise IntegrityError(f"store metadata has an unknown entry {name!r}; {_RESTORE}")
        values[name], macs[name] = value, tag
    missing = [n for n in _MANAGED if n not in values]
    if missing:
        raise IntegrityError(f"store metadata lacks {', '.join(missing)}; {_RESTORE}")
    return values, macs


def _read_versions(conn: sqlite3.Connection) -> tuple[dict[str, VersionState], dict[str, bytes]]:
    states, macs = {}, {}
    for identity, version, deleted, tag in conn.execute(
        "SELECT identity, version, deleted, mac FROM versions"
    ).fetchall():
        if (
            not isinstance(identity, str)
            or not isinstance(version, int)
            or not 1 <= version <= _MAX_VERSION
            or deleted not in (0, 1)
            or not isinstance(tag, bytes)
        ):
            raise IntegrityError(f"the version record of {identity!r} is malformed; {_RESTORE}")
        states[identity], macs[identity] = VersionState(version, bool(deleted)), tag
    return states, macs


def _check_file(path: Path) -> None:
    """Refuse anything that is not a SQLite database before SQLite could rewrite it."""
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    if header != _SQLITE_HEADER:
        raise IntegrityError(
            f"{path} is not a template database (empty or not SQLite); {_RESTORE} or remove the "
            "folder and run `facefed site init`"
        )


def _check_tables(conn: sqlite3.Connection, directory: Path) -> None:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" in names:
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if row is not None and row[0] != str(SCHEMA_VERSION):
            raise ConfigError(
                f"template store {directory} has schema {row[0]!r}; this facefed reads schema "
                f"{SCHEMA_VERSION} only (calibrations, versions and deletions authenticated). "
                "Stores of schema 1 are not migrated, since their unauthenticated versions cannot "
                "be trusted: create a new store with `facefed site init --store NEW`, enrol again "
                f"and remove {directory}"
            )
    for table, columns in _COLUMNS.items():
        found = tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
        if found != columns:
            what = "is missing" if not found else "has unexpected columns"
            raise IntegrityError(f"template store table {table!r} {what}; {_RESTORE}")
    _check_schema(conn)


def _connect(path: Path) -> sqlite3.Connection:
    """Open the database; only connection settings, nothing written (WAL is set on create)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_MS / 1000)
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA trusted_schema=OFF")
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(
            f"{path} is not a readable template database ({exc}); {_RESTORE}"
        ) from exc
    return conn


class TemplateStore:
    """Encrypted templates of one site: :meth:`create` or :meth:`open`, then :meth:`unlock`."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self._conn = conn
        self._wrapping_key: bytes | None = None
        self._mac_key: bytes | None = None
        _check_tables(conn, directory)
        meta, _ = _read_meta(conn)
        self.store_id: str = meta["store_id"]
        if not _STORE_ID_RE.fullmatch(self.store_id):
            raise IntegrityError(f"store metadata 'store_id' is malformed; {_RESTORE}")
        dim = meta["embedding_dim"]
        if not dim.isdigit() or not 1 <= int(dim) <= MAX_DIM:
            raise IntegrityError(f"store metadata 'embedding_dim' is malformed; {_RESTORE}")
        self.dim: int = int(dim)
        self._key_info = _check_key_info(meta["key_info"])
        _json_dict(_STATE, meta[_STATE])
        for name, value in meta.items():
            if name.startswith(CALIBRATION_PREFIX):
                _stored_calibration(name, value)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls, directory: Path, key: MasterKey, *, dim: int, store_id: str | None = None
    ) -> TemplateStore:
        """Create an empty store in ``directory`` (made 0700) protected by ``key``."""
        directory = Path(directory)
        path = directory / DB_NAME
        if path.exists():
            raise ConfigError(
                f"a template store already exists in {directory}; use it or pick another --store"
            )
        if not 1 <= dim <= MAX_DIM:  # what open() accepts: never write a store it refuses
            raise ConfigError(f"the embedding size must be 1..{MAX_DIM}, got {dim}")
        store_id = store_id or uuid.uuid4().hex
        if not _STORE_ID_RE.fullmatch(store_id):
            raise ValueError(f"store id must match {_STORE_ID_RE.pattern}, got {store_id!r}")
        for folder in [*reversed(directory.parents), directory]:  # any folder made here: 0700
            if not folder.exists():
                folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = _connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        k = mac_key(key, store_id)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "store_id": store_id,
            "embedding_dim": str(dim),
            "key_info": json.dumps(key.info.to_dict()),
        }
        with _transaction(conn):  # schema and metadata in one transaction: all or nothing
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            for name, value in meta.items():
                conn.execute(
                    "INSERT INTO meta VALUES (?, ?, ?)",
                    (
                        name,
                        value,
                        store_mac.mac(k, "meta", *store_mac.meta_mac_parts(store_id, name, value)),
                    ),
                )
            conn.execute(
                "INSERT INTO meta VALUES (?, '{}', ?)", (_STATE, bytes(store_mac.MAC_SIZE))
            )
            _write_state(conn, k, store_id)
        store = cls(directory, conn)
        store.unlock(key)
        return store

    @classmethod
    def open(cls, directory: Path) -> TemplateStore:
        """Open an existing store (locked: call :meth:`unlock` before touching templates).

        A store that fails a check is left byte for byte as it was (the only write, after every
        check passed, switches a store found outside WAL mode back to WAL).

        Raises:
            ConfigError: no store there, or a store of another schema.
            IntegrityError: not a SQLite file, a missing table, malformed metadata or a hostile
                scrypt cost.
        """
        directory = Path(directory)
        path = directory / DB_NAME
        if not path.is_file():
            raise ConfigError(
                f"no template store in {directory}; run `facefed site init --store {directory}` "
                "or point --store / FACEFED_SITE_DIR to an existing one"
            )
        _check_file(path)
        conn = _connect(path)
        try:
            store = cls(directory, conn)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise IntegrityError(f"{path} is damaged ({exc}); {_RESTORE}") from exc
        except BaseException:
            conn.close()
            raise
        return store

    @property
    def key_info(self) -> KeyInfo:
        """What this store records about its master key (kind, scrypt params, verifier)."""
        return self._key_info

    def unlock(self, key: MasterKey) -> None:
        """Accept ``key`` if it is this store's master key and every MAC in the store verifies.

        Raises:
            IntegrityError: wrong key, or a calibration, version, tombstone or the store's state
                fails authentication (the message names which).
        """
        if not matches(key.secret, self._key_info):
            raise IntegrityError(
                "this master key does not open the template store; use the store's key file or "
                "passphrase (after rotate-key, only the new key opens it)"
            )
        k = mac_key(key, self.store_id)
        self._verified_state(k)
        self._wrapping_key, self._mac_key = key.wrapping_key, k

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> TemplateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        """The SQLite database file."""
        return self.directory / DB_NAME

    # ------------------------------------------------------------------ authenticated state
    def _keys(self) -> tuple[bytes, bytes]:
        if self._wrapping_key is None or self._mac_key is None:
            raise RuntimeError("template store is locked; call unlock() first")
        return self._wrapping_key, self._mac_key

    def _verified_state(
        self, k: bytes | None = None
    ) -> tuple[dict[str, str], dict[str, VersionState]]:
        """Check every meta and versions MAC and the state MAC; return the meta rows and versions.

        Call it inside a transaction whose later reads must see the same state.

        Raises:
            IntegrityError: naming the first row that fails.
        """
        k = k if k is not None else self._keys()[1]
        try:
            meta, meta_macs = _read_meta(self._conn)
            versions, version_macs = _read_versions(self._conn)
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(f"{self.path} is damaged ({exc}); {_RESTORE}") from exc
        for name, value in meta.items():
            if name != _STATE and not store_mac.mac_ok(
                k, meta_macs[name], "meta", *store_mac.meta_mac_parts(self.store_id, name, value)
            ):
                raise IntegrityError(
                    f"store metadata {name!r} fails authentication: it was edited outside "
                    f"facefed or moved from another row; {_RESTORE}"
                )
        for identity, state in versions.items():
            if not store_mac.mac_ok(
                k,
                version_macs[identity],
                "version",
                *store_mac.version_mac_parts(self.store_id, identity, state),
            ):
                raise IntegrityError(
                    f"the version record of {identity!r} fails authentication: its version or "
                    f"tombstone was edited or its MAC moved from another row; {_RESTORE}"
                )
        recorded = _json_dict(_STATE, meta[_STATE])
        counts = {"meta": len(meta) - 1, "versions": len(versions)}
        digest = store_mac.state_digest(meta, versions)
        if not store_mac.mac_ok(
            k, meta_macs[_STATE], "state", self.store_id.encode(), meta[_STATE].encode(), digest
        ):
            raise IntegrityError(
                "the store's state fails authentication: its record of versions and tombstones "
                f"is forged{_count_note(recorded, counts)}; {_RESTORE}"
            )
        if recorded != counts:
            raise IntegrityError(
                f"the store's state is inconsistent{_count_note(recorded, counts)}; {_RESTORE}"
            )
        try:
            present = {r[0] for r in self._conn.execute("SELECT identity FROM templates")}
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(f"{self.path} is damaged ({exc}); {_RESTORE}") from exc
        missing = sorted(
            i for i, state in versions.items() if not state.deleted and i not in present
        )
        if missing:  # a live version is issued with its template: a row gone is a row removed
            raise IntegrityError(
                f"the template of {missing[0]!r} is missing (its live version record is "
                f"authenticated): the row was removed outside facefed; {_RESTORE}"
            )
        return meta, versions

    def _write_version(self, identity: str, state: VersionState) -> None:
        tag = store_mac.mac(
            self._keys()[1], "version", *store_mac.version_mac_parts(self.store_id, identity, state)
        )
        self._conn.execute(
            "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?)",
            (identity, state.version, int(state.deleted), tag),
        )

    # ------------------------------------------------------------------ metadata
    def get_meta(self, name: str) -> dict[str, Any] | None:
        """An authenticated, range-checked calibration (``calibration:<model tag>``), or ``None``."""
        _check_meta_name(name)
        with _transaction(self._conn, "DEFERRED"):  # one snapshot: what is verified is returned
            meta, _ = self._verified_state()
        return None if name not in meta else _stored_calibration(name, meta[name])

    def set_meta(self, name: str, value: dict[str, Any]) -> None:
        """Write an authenticated calibration entry ``calibration:<model tag>`` (not for secrets).

        Raises:
            ConfigError: the calibration is malformed or out of range.
            IntegrityError: the store fails authentication.
        """
        _check_meta_name(name)
        problem = calibration_problem(name, value)
        if problem:
            raise ConfigError(f"refusing to store calibration {name!r}: {problem}")
        text = json.dumps(value, sort_keys=True)
        k = self._keys()[1]
        with _transaction(self._conn):
            self._verified_state()
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)",
                (
                    name,
                    text,
                    store_mac.mac(k, "meta", *store_mac.meta_mac_parts(self.store_id, name, text)),
                ),
            )
            _write_state(self._conn, k, self.store_id)

    # ------------------------------------------------------------------ templates
    def _check_embedding(self, embedding: np.ndarray) -> bytes:
        emb = np.asarray(embedding, dtype=np.float32)
        if emb.shape != (self.dim,) or not np.all(np.isfinite(emb)):
            raise DataError(
                f"template must be {self.dim} finite floats, got shape {emb.shape}; "
                "check that the checkpoint matches this store's embedding size"
            )
        if abs(float(np.linalg.norm(emb)) - 1.0) > _NORM_TOLERANCE:
            raise DataError(
                "template must be L2-normalised; normalise the embedding before storing"
            )
        return emb.astype("<f4").tobytes()

    def identities(self) -> list[str]:
        """Enrolled identity ids, sorted (each checked against its authenticated version)."""
        with _transaction(self._conn, "DEFERRED"):
            _, versions = self._verified_state()
            rows = self._conn.execute(
                "SELECT identity, version FROM templates ORDER BY identity"
            ).fetchall()
        for identity, version in rows:
            _check_current(identity, version, versions.get(identity))
        return [r[0] for r in rows]

    def __len__(self) -> int:
        return len(self.identities())

    def enroll(self, identity: str, embedding: np.ndarray, *, model_tag: str, n_images: int) -> int:
        """Store (or renew) ``identity``'s template; return its new version."""
        return self.enroll_many([(identity, embedding)], model_tag=model_tag, n_images=n_images)[0]

    def enroll_many(
        self,
        items: Iterable[tuple[str, np.ndarray]],
        *,
        model_tag: str,
        n_images: int = 1,
    ) -> list[int]:
        """Store several templates in one transaction; return their versions.

        A renewal, or an enrolment after a delete, gets the next version (new associated data).
        """
        prepared = [(validate_identity(i), self._check_embedding(e)) for i, e in items]
        (key, k), out, renewed = self._keys(), [], False
        with _transaction(self._conn):
            _, versions = self._verified_state()
            for identity, plaintext in prepared:
                last = versions.get(identity)
                version = 1 if last is None else last.version + 1
                renewed = renewed or (last is not None and not last.deleted)
                aad = record_aad(self.store_id, identity, version, model_tag, self.dim)
                env = envelope.seal(key, plaintext, aad)
                versions[identity] = VersionState(version, deleted=False)
                self._write_version(identity, versions[identity])
                self._conn.execute(
                    "INSERT OR REPLACE INTO templates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        identity,
                        version,
                        model_tag,
                        n_images,
                        env.nonce,
                        env.ciphertext,
                        env.wrap_nonce,
                        env.wrapped_key,
                        time.time(),
                    ),
                )
                out.append(version)
            _write_state(self._conn, k, self.store_id)
        if renewed and not self._purge([]):
            logger.warning("a superseded template may stay in the WAL until the next checkpoint")
        return out

    def _decrypt_row(self, row: tuple[Any, ...], state: VersionState | None) -> StoredTemplate:
        identity, version, model_tag, n_images, nonce, ct, wnonce, wkey = row
        _check_current(identity, version, state)
        _check_row_types(identity, model_tag, n_images, nonce, ct, wnonce, wkey)
        env = envelope.Envelope(nonce=nonce, ciphertext=ct, wrap_nonce=wnonce, wrapped_key=wkey)
        aad = record_aad(self.store_id, identity, version, model_tag, self.dim)
        plaintext = envelope.open_envelope(self._keys()[0], env, aad)
        return StoredTemplate(
            identity=identity,
            version=version,
            model_tag=model_tag,
            n_images=int(n_images),
            embedding=np.frombuffer(plaintext, dtype="<f4").astype(np.float32),
        )

    _SELECT = (
        "SELECT identity, version, model_tag, n_images, nonce, ciphertext, wrap_nonce, "
        "wrapped_key FROM templates"
    )

    def get(self, identity: str) -> StoredTemplate:
        """Decrypt one identity's template.

        Raises:
            DataError: unknown (or deleted) identity.
            IntegrityError: the record fails authentication, was revoked or put back.
        """
        with _transaction(self._conn, "DEFERRED"):
            _, versions = self._verified_state()
            row = self._conn.execute(self._SELECT + " WHERE identity = ?", (identity,)).fetchone()
        if row is None:
            raise DataError(
                f"unknown identity {identity!r} in template store {self.directory}; "
                "enrol it first or check the id with `facefed site list`"
            )
        return self._decrypt_row(row, versions.get(identity))

    def iter_templates(self) -> Iterator[StoredTemplate]:
        """Decrypt every template (in memory, one at a time)."""
        with _transaction(self._conn, "DEFERRED"):  # fetched whole: no read held while yielding
            _, versions = self._verified_state()
            rows = self._conn.execute(self._SELECT + " ORDER BY identity").fetchall()
        for row in rows:
            yield self._decrypt_row(row, versions.get(row[0]))

    def delete(self, identity: str) -> None:
        """Revoke ``identity``: remove its record and leave an authenticated tombstone.

        The tombstone takes the next version, so no earlier record of ``identity`` is accepted
        again. Success is reported only once a byte scan finds no copy of the deleted ciphertext
        or wrapped key in the database or its WAL. Deleting an already deleted identity finishes
        a pending purge.

        Raises:
            DataError: ``identity`` was never enrolled (nothing changed).
            IntegrityError: the store fails authentication (nothing changed), or the record is
                revoked but a copy is still on disk because another connection holds a read.
        """
        needles: list[bytes] = []
        with _transaction(self._conn):
            _, versions = self._verified_state()
            last = versions.get(identity)
            row = self._conn.execute(
                "SELECT version, ciphertext, wrapped_key FROM templates WHERE identity = ?",
                (identity,),
            ).fetchone()
            if row is None and last is None:
                raise DataError(
                    f"unknown identity {identity!r} in template store {self.directory}; "
                    "nothing was deleted (check the id with `facefed site list`)"
                )
            if row is not None or (last is not None and not last.deleted):
                top = max(
                    last.version if last else 0,
                    row[0] if row is not None and isinstance(row[0], int) else 0,
                )
                if row is not None:
                    needles = [b for b in row[1:] if isinstance(b, bytes) and len(b) >= 16]
                    self._conn.execute("DELETE FROM templates WHERE identity = ?", (identity,))
                self._write_version(identity, VersionState(min(top + 1, _MAX_VERSION), True))
                _write_state(self._conn, self._keys()[1], self.store_id)
        if not self._purge(needles):
            raise IntegrityError(
                f"{identity!r} is revoked (tombstone committed), but a copy of its record may "
                f"still be in {DB_NAME} or its WAL: another process holds the store open, so "
                "the checkpoint is pending; close it and run the delete again to finish"
            )

    def rotate(
        self,
        new_key: MasterKey,
        *,
        after_row: Callable[[int], None] | None = None,
    ) -> int:
        """Re-wrap every data key and re-MAC every row under ``new_key`` in one transaction.

        Ciphertexts are not touched. If anything fails (or the process dies) before the commit, the
        store is exactly as before and only the old key opens it. ``after_row`` is a test hook.
        Returns the number of records re-wrapped.
        """
        old, _ = self._keys()
        new, new_mac = new_key.wrapping_key, mac_key(new_key, self.store_id)
        count = 0
        with _transaction(self._conn):
            meta, versions = self._verified_state()
            rows = self._conn.execute(
                "SELECT identity, version, model_tag, nonce, ciphertext, wrap_nonce, wrapped_key "
                "FROM templates"
            ).fetchall()
            for identity, version, model_tag, nonce, ct, wnonce, wkey in rows:
                _check_current(identity, version, versions.get(identity))
                _check_row_types(identity, model_tag, 0, nonce, ct, wnonce, wkey)
                env = envelope.Envelope(
                    nonce=nonce, ciphertext=ct, wrap_nonce=wnonce, wrapped_key=wkey
                )
                aad = record_aad(self.store_id, identity, version, model_tag, self.dim)
                fresh = envelope.rewrap(old, new, env, aad)
                self._conn.execute(
                    "UPDATE templates SET wrap_nonce = ?, wrapped_key = ? WHERE identity = ?",
                    (fresh.wrap_nonce, fresh.wrapped_key, identity),
                )
                count += 1
                if after_row is not None:
                    after_row(count)
            meta["key_info"] = json.dumps(new_key.info.to_dict())
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'key_info'", (meta["key_info"],)
            )
            for name, value in meta.items():  # the verified values only, never a fresh read
                tag = store_mac.mac(
                    new_mac, "meta", *store_mac.meta_mac_parts(self.store_id, name, value)
                )
                self._conn.execute("UPDATE meta SET mac = ? WHERE name = ?", (tag, name))
            for identity, state in versions.items():
                tag = store_mac.mac(
                    new_mac, "version", *store_mac.version_mac_parts(self.store_id, identity, state)
                )
                self._conn.execute(
                    "UPDATE versions SET mac = ? WHERE identity = ?", (tag, identity)
                )
            _write_state(self._conn, new_mac, self.store_id)
        self._key_info = new_key.info
        self._wrapping_key, self._mac_key = new, new_mac
        if not self._purge([]):
            logger.warning("old wrapped keys may stay in the WAL until the next checkpoint")
        logger.info("re-wrapped %d template keys under the new master key", count)
        return count

    def _purge(self, needles: list[bytes]) -> bool:
        """Checkpoint the WAL into the database and truncate it; return whether nothing is left.

        Nothing is left when the checkpoint completed, the WAL is empty and none of ``needles``
        (the deleted record's bytes) occurs in the database or the WAL file.
        """
        self._conn.execute(f"PRAGMA busy_timeout={_PURGE_WAIT_MS}")
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        wal = self.path.with_name(DB_NAME + "-wal")
        wal_bytes = wal.read_bytes() if wal.exists() else b""
        blobs = (self.path.read_bytes(), wal_bytes)
        left = [n for n in needles if any(n in blob for blob in blobs)]
        if busy or wal_bytes or left:
            logger.warning(
                "WAL checkpoint incomplete (busy=%s, WAL %d bytes, %d record copies on disk)",
                busy,
                len(wal_bytes),
                len(left),
            )
            return False
        return True


def _check_row_types(identity: str, model_tag: object, n_images: object, *blobs: object) -> None:
    """Refuse a template row whose columns hold the wrong SQLite types (edited outside facefed)."""
    if (
        not isinstance(model_tag, str)
        or not isinstance(n_images, int)
        or not all(isinstance(b, bytes) for b in blobs)
    ):
        raise IntegrityError(f"the template row of {identity!r} is malformed; {_RESTORE}")


def _check_current(identity: str, version: object, state: VersionState | None) -> None:
    """Refuse a template row whose version is not the live, authenticated one."""
    if state is None:
        raise IntegrityError(
            f"the template of {identity!r} has no authenticated version record: the row was "
            f"put back or the versions table was edited; {_RESTORE}"
        )
    if state.deleted:
        raise IntegrityError(
            f"{identity!r} was deleted (tombstone, version {state.version}) but a template row "
            f"is back in the store: a revoked record was put back; run the delete again"
        )
    if version != state.version:
        raise IntegrityError(
            f"template of {identity!r} is version {version!r} but version {state.version} was "
            "issued: a revoked record was put back; delete it and enrol again"
        )


def _check_meta_name(name: str) -> None:
    if not name.startswith(CALIBRATION_PREFIX) or name == CALIBRATION_PREFIX:
        raise ValueError(
            f"only calibration entries ({CALIBRATION_PREFIX}<model tag>), not {name!r}"
        )


def _count_note(recorded: dict[str, Any], counts: dict[str, int]) -> str:
    if recorded.get("versions") != counts["versions"]:
        return (
            f" ({recorded.get('versions')!r} version/tombstone rows recorded, "
            f"{counts['versions']} found: one was removed or added)"
        )
    if recorded.get("meta") != counts["meta"]:
        return f" ({recorded.get('meta')!r} metadata rows recorded, {counts['meta']} found)"
    return " (a row was put back from an older copy)"


def _write_state(conn: sqlite3.Connection, k: bytes, store_id: str) -> None:
    """Record the counts and MAC of every meta and versions row (inside a write transaction)."""
    meta, _ = _read_meta(conn)
    versions, _ = _read_versions(conn)
    value = json.dumps({"meta": len(meta) - 1, "versions": len(versions)}, sort_keys=True)
    tag = store_mac.mac(
        k, "state", store_id.encode(), value.encode(), store_mac.state_digest(meta, versions)
    )
    conn.execute("UPDATE meta SET value = ?, mac = ? WHERE name = ?", (value, tag, _STATE))


class _transaction:
    """``BEGIN IMMEDIATE`` (a write) or ``DEFERRED`` (one read snapshot) ... ``COMMIT``, or
    ``ROLLBACK`` on any exception."""

    def __init__(
        self, conn: sqlite3.Connection, mode: Literal["IMMEDIATE", "DEFERRED"] = "IMMEDIATE"
    ) -> None:
        self._conn, self._mode = conn, mode

    def __enter__(self) -> None:
        self._conn.execute(f"BEGIN {self._mode}")
        try:  # under the write lock (or in the read snapshot): no trigger can fire on our writes
            _check_schema(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
