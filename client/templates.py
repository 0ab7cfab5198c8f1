"""The site's encrypted face-template store (one SQLite file).

Every template is a float32 embedding sealed in its own :class:`~common.crypto.envelope.Envelope`.
The associated data binds the store id, the identity, the record version, the model tag and the
dimension, so a record copied to another identity, another version or another store fails to
decrypt. The database holds only ciphertexts, wrapped keys and non-secret metadata: never an image,
never a plaintext embedding, never the master key (:mod:`common.crypto.keys` stores only a one-way
verifier).

Disk hygiene: ``PRAGMA secure_delete=ON`` zeroes freed cells; ``journal_mode=WAL`` with
``synchronous=FULL`` makes every commit durable and atomic; ``temp_store=MEMORY`` keeps sort spills
off disk; after a delete, a renewal or a key rotation the WAL is checkpointed and truncated to zero
bytes so it no longer holds superseded pages. The directory is 0700 and the database files 0600.

Revocation: ``versions`` remembers the last version issued per identity, even after a delete, so a
renewed template gets a higher version (new associated data) and a stale copy put back into the
table is refused. A copy taken *before* a delete (a backup) still opens with the same master key:
run ``rotate-key`` after revoking to make such copies useless.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.crypto import envelope
from common.crypto.keys import KeyInfo, MasterKey, matches
from common.errors import ConfigError, DataError, IntegrityError

logger = logging.getLogger(__name__)

DB_NAME = "templates.db"
SCHEMA_VERSION = 1
_IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_NORM_TOLERANCE = 1e-3

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (identity TEXT PRIMARY KEY, version INTEGER NOT NULL);
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
    if not _IDENTITY_RE.fullmatch(identity):
        raise DataError(
            f"invalid identity id {identity!r}; use 1-128 letters, digits or ._@+- "
            "starting with a letter or digit"
        )
    return identity


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def record_aad(store_id: str, identity: str, version: int, model_tag: str, dim: int) -> bytes:
    """Associated data bound into a template record (length-prefixed fields)."""
    return b"facefed-template-v1" + b"".join(
        _field(part)
        for part in (
            store_id.encode(),
            identity.encode(),
            version.to_bytes(8, "big"),
            model_tag.encode(),
            dim.to_bytes(4, "big"),
        )
    )


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        raise IntegrityError(
            f"{path} is not a readable template database ({exc}); restore it from a backup"
        ) from exc
    return conn


class TemplateStore:
    """Encrypted templates of one site: :meth:`create` or :meth:`open`, then :meth:`unlock`."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self._conn = conn
        self._wrapping_key: bytes | None = None
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        try:
            self.store_id: str = meta["store_id"]
            self.dim: int = int(meta["embedding_dim"])
            self._key_info = KeyInfo.from_dict(json.loads(meta["key_info"]))
            schema = int(meta["schema_version"])
        except (KeyError, ValueError) as exc:
            raise IntegrityError(
                f"template store {directory} has damaged metadata ({exc}); restore it from a backup"
            ) from exc
        if schema != SCHEMA_VERSION:
            raise ConfigError(
                f"template store {directory} has schema {schema}, this facefed reads "
                f"{SCHEMA_VERSION}; use a matching facefed version"
            )

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
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = _connect(path)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "store_id": store_id or uuid.uuid4().hex,
            "embedding_dim": str(dim),
            "key_info": json.dumps(key.info.to_dict()),
        }
        with _transaction(conn):  # schema and metadata in one transaction: all or nothing
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        store = cls(directory, conn)
        store.unlock(key)
        return store

    @classmethod
    def open(cls, directory: Path) -> TemplateStore:
        """Open an existing store (locked: call :meth:`unlock` before touching templates)."""
        directory = Path(directory)
        path = directory / DB_NAME
        if not path.is_file():
            raise ConfigError(
                f"no template store in {directory}; run `facefed site init --store {directory}` "
                "or point --store / FACEFED_SITE_DIR to an existing one"
            )
        conn = _connect(path)
        try:
            return cls(directory, conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise IntegrityError(f"{path} is damaged ({exc}); restore it from a backup") from exc

    @property
    def key_info(self) -> KeyInfo:
        """What this store records about its master key (kind, scrypt params, verifier)."""
        return self._key_info

    def unlock(self, key: MasterKey) -> None:
        """Accept ``key`` if it is this store's master key."""
        if not matches(key.secret, self._key_info):
            raise IntegrityError(
                "this master key does not open the template store; use the store's key file or "
                "passphrase (after rotate-key, only the new key opens it)"
            )
        self._wrapping_key = key.wrapping_key

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

    # ------------------------------------------------------------------ metadata
    def get_meta(self, name: str) -> dict[str, Any] | None:
        """A JSON metadata entry (e.g. a threshold calibration), or ``None``."""
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def set_meta(self, name: str, value: dict[str, Any]) -> None:
        """Write a JSON metadata entry (not for secrets)."""
        if name in {"schema_version", "store_id", "embedding_dim", "key_info"}:
            raise ValueError(f"{name} is managed by the store")
        with _transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (name, json.dumps(value, sort_keys=True)),
            )

    # ------------------------------------------------------------------ templates
    def _key(self) -> bytes:
        if self._wrapping_key is None:
            raise RuntimeError("template store is locked; call unlock() first")
        return self._wrapping_key

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
        """Enrolled identity ids, sorted."""
        rows = self._conn.execute("SELECT identity FROM templates ORDER BY identity").fetchall()
        return [r[0] for r in rows]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

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
        """Store several templates in one transaction; return their versions."""
        prepared = [(validate_identity(i), self._check_embedding(e)) for i, e in items]
        key, versions, renewed = self._key(), [], False
        with _transaction(self._conn):
            for identity, plaintext in prepared:
                row = self._conn.execute(
                    "SELECT version FROM versions WHERE identity = ?", (identity,)
                ).fetchone()
                version = 1 if row is None else int(row[0]) + 1
                renewed = renewed or row is not None
                aad = record_aad(self.store_id, identity, version, model_tag, self.dim)
                env = envelope.seal(key, plaintext, aad)
                self._conn.execute(
                    "INSERT OR REPLACE INTO versions VALUES (?, ?)", (identity, version)
                )
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
                versions.append(version)
        if renewed:
            self._purge_wal()
        return versions

    def _decrypt_row(self, row: tuple[Any, ...], current_version: int | None) -> StoredTemplate:
        identity, version, model_tag, n_images, nonce, ct, wnonce, wkey = row
        if current_version is not None and version != current_version:
            raise IntegrityError(
                f"template of {identity!r} is version {version} but version {current_version} was "
                "issued: a revoked record was put back; delete it and enrol again"
            )
        env = envelope.Envelope(nonce=nonce, ciphertext=ct, wrap_nonce=wnonce, wrapped_key=wkey)
        aad = record_aad(self.store_id, identity, version, model_tag, self.dim)
        plaintext = envelope.open_envelope(self._key(), env, aad)
        return StoredTemplate(
            identity=identity,
            version=version,
            model_tag=model_tag,
            n_images=n_images,
            embedding=np.frombuffer(plaintext, dtype="<f4").astype(np.float32),
        )

    _SELECT = (
        "SELECT t.identity, t.version, t.model_tag, t.n_images, t.nonce, t.ciphertext, "
        "t.wrap_nonce, t.wrapped_key, v.version FROM templates t "
        "LEFT JOIN versions v ON v.identity = t.identity"
    )

    def get(self, identity: str) -> StoredTemplate:
        """Decrypt one identity's template.

        Raises:
            DataError: unknown identity.
            IntegrityError: the record fails authentication or was revoked.
        """
        row = self._conn.execute(self._SELECT + " WHERE t.identity = ?", (identity,)).fetchone()
        if row is None:
            raise DataError(
                f"unknown identity {identity!r} in template store {self.directory}; "
                "enrol it first or check the id with `facefed site list`"
            )
        return self._decrypt_row(row[:8], row[8])

    def iter_templates(self) -> Iterator[StoredTemplate]:
        """Decrypt every template (in memory, one at a time)."""
        for row in self._conn.execute(self._SELECT + " ORDER BY t.identity").fetchall():
            yield self._decrypt_row(row[:8], row[8])

    def delete(self, identity: str) -> None:
        """Revoke ``identity``: remove its record (zeroed on disk); its version stays used."""
        with _transaction(self._conn):
            cur = self._conn.execute("DELETE FROM templates WHERE identity = ?", (identity,))
            if cur.rowcount == 0:
                raise DataError(
                    f"unknown identity {identity!r} in template store {self.directory}; "
                    "nothing was deleted (check the id with `facefed site list`)"
                )
        self._purge_wal()

    def rotate(
        self,
        new_key: MasterKey,
        *,
        after_row: Callable[[int], None] | None = None,
    ) -> int:
        """Re-wrap every data key under ``new_key`` in one transaction; return the record count.

        Ciphertexts are not touched. If anything fails (or the process dies) before the commit, the
        store is exactly as before and only the old key opens it. ``after_row`` is a test hook.
        """
        old, new = self._key(), new_key.wrapping_key
        count = 0
        with _transaction(self._conn):
            rows = self._conn.execute(
                "SELECT identity, version, model_tag, nonce, ciphertext, wrap_nonce, wrapped_key "
                "FROM templates"
            ).fetchall()
            for identity, version, model_tag, nonce, ct, wnonce, wkey in rows:
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
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE name = 'key_info'",
                (json.dumps(new_key.info.to_dict()),),
            )
        self._key_info = new_key.info
        self._wrapping_key = new
        self._purge_wal()
        logger.info("re-wrapped %d template keys under the new master key", count)
        return count

    def _purge_wal(self) -> None:
        """Copy the WAL into the database and truncate it, so no superseded page stays in it."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
