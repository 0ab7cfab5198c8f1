"""A site's durable state: its signing key, lifetime privacy history, per-run state and its replies.

Flower keeps ``Context.state`` in memory only, and per run. A site that trusted it would forget, at
every restart and every new run id, how much privacy it has spent. With a state directory the site
instead keeps one file per **release** (``release-NNNNNNNN.state``, numbered in the order they were
written), each written atomically, and before its reply leaves, holding:

* the release's run id, round and the hash of the model it trained from;
* the run's ``Context.state`` after the round (privacy history of the run, local identity head);
* the exact reply;
* the site's **lifetime** history: every DP event of every release it ever made, over all runs.

From these the site

* restores the right run after a restart, whatever other runs the directory holds;
* accounts its lifetime epsilon across runs: a new run id does not reset it;
* answers a round it already released for the same run and model (a coordinator that resumed after a
  crash asks again) with the stored reply, byte for byte, so nothing is released or charged twice;
* refuses a round of a run it already released on another model, or one it no longer holds.

``store.json`` records the number of the newest release. A release file that is missing (deleted, or
a directory restored from an older backup *next to* a newer marker) or unreadable after the site has
trained stops the site: without its history it cannot establish what it has spent (fail closed). A
rollback of the *whole* directory to an older backup cannot be detected from the directory itself;
the coordinator's ledger holds the site's signed releases and shows it (docs/threat-model.md).

A release file is ``MAGIC`` + SHA-256 + three length-prefixed parts: the meta JSON, the state and the
reply (Flower ``RecordDict`` protos). It holds model weights, scalars and the privacy record: never an
image or a template.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import config_record_from_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from common.atomic import atomic_create_bytes, atomic_write_text
from common.crypto.signing import generate_private_key, load_private_key, save_private_key
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.events import DpSgdEvent
from common.privacy.site_record import RECORD_NAME

logger = logging.getLogger(__name__)

MAGIC = b"FFSITE02"
MARKER = "store.json"
STORE_FORMAT = "facefed-site-store/2"
KEEP = 3  # releases kept per run: a coordinator falls back at most a checkpoint or two
RUNS_KEPT = 4  # runs whose newest releases are kept (older runs live on in the lifetime history)
_NAME = re.compile(r"release-(\d{8})\.state")
_LEN = struct.Struct(">QQ")


class ReplayRefused(PrivacyBudgetError):
    """The round was released (or failed and was charged) already: it is never trained again."""


@dataclass(frozen=True)
class Release:
    """One past release in the lifetime history: which run and round, and the DP events it spent."""

    run_id: str
    round: int
    events: tuple[DpSgdEvent, ...]
    secret_noise: bool
    private: bool = True  # False: released without DP; no finite lifetime guarantee remains

    def to_json(self) -> dict[str, Any]:
        return {
            "run-id": self.run_id,
            "round": self.round,
            "events": [e.to_dict() for e in self.events],
            "secret-noise": self.secret_noise,
            "private": self.private,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Release:
        return cls(
            run_id=str(data["run-id"]),
            round=int(data["round"]),
            events=tuple(DpSgdEvent.from_dict(e) for e in data["events"]),
            secret_noise=bool(data["secret-noise"]),
            private=bool(data.get("private", True)),
        )


@dataclass(frozen=True)
class StoredRelease:
    """One release file: the run's state after it, the lifetime history, and the reply (decoded
    when asked for: restoring the state does not need the model weights it holds)."""

    seq: int
    run_id: str
    round: int
    model_hash: str
    state: RecordDict
    lifetime: tuple[Release, ...]
    path: Path
    reply_proto: RecordDictProto

    @functools.cached_property
    def reply(self) -> RecordDict:
        try:
            return recorddict_from_proto(self.reply_proto)
        except Exception as exc:  # checksummed yet undecodable: a foreign or newer writer
            raise IntegrityError(f"site state {self.path} cannot be decoded ({exc})") from None

    def privacy_record(self) -> ConfigRecord | None:
        """The reply's signed privacy record, without decoding the rest of the reply."""
        for item in self.reply_proto.items:
            if item.key == RECORD_NAME and item.WhichOneof("value") == "config_record":
                try:
                    return config_record_from_proto(item.config_record)
                except Exception as exc:
                    raise IntegrityError(
                        f"site state {self.path} cannot be decoded ({exc})"
                    ) from None
        return None


class SiteStore:
    """One site's state directory (created 0700 when the site first writes to it).

    A store object serves one round of one site (the ClientApp makes one per message): it reads each
    release file at most once, since only this object writes the directory meanwhile. Nothing is
    created by reading: a refused run leaves the directory exactly as it was.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._loaded: dict[Path, StoredRelease] = {}
        self._new_key: Ed25519PrivateKey | None = None
        self._basis: int | None = None  # the newest release when this object first read the spend

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory exclusively (``flock``) from reading the spend to recording a release.

        Two rounds of one site in parallel would otherwise both pass the budget check on the same
        history. A directory that does not exist yet has nothing to protect; two first releases
        racing for it are stopped by :meth:`commit` (only one can create release 1).
        """
        if not self.root.is_dir():
            yield
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ------------------------------------------------------------------ key
    def signing_key(self) -> Ed25519PrivateKey:
        """The site's Ed25519 ledger key; it never leaves the site.

        A new key is written (0600) only with the first release, so that a refused first run
        leaves no state behind.
        """
        path = self.root / "site.key"
        if path.exists():
            return load_private_key(path)
        if self._new_key is None:
            self._new_key = generate_private_key()
        return self._new_key

    # ------------------------------------------------------------------ releases
    def _files(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.fullmatch(p.name))
        ]
        return sorted(found)

    def _marker_seq(self) -> int:
        path = self.root / MARKER
        if not path.exists():
            # The marker is written before the site's key and release 1: either without it means
            # it was removed.
            if self._files() or (self.root / "site.key").exists():
                raise IntegrityError(
                    f"site state {path} is missing beside the site's key or releases; the privacy budget this "
                    "site has spent cannot be established, so it refuses to train. Restore the "
                    "state directory from backup"
                )
            return 0
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != STORE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            seq = int(data["last-release"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"site state {path} is unreadable ({exc}); the privacy budget this site has spent "
                "cannot be established, so it refuses to train. Restore the state directory"
            ) from None
        return seq

    def newest(self) -> StoredRelease | None:
        """The newest release; IntegrityError if it is missing or unreadable (fail closed)."""
        files, last = self._files(), self._marker_seq()
        newest = files[-1][0] if files else 0
        if newest < last:
            raise IntegrityError(
                f"site state {self.root}: release {last} is missing (newest found: {newest}); the "
                "privacy budget this site has spent cannot be established, so it refuses to train. "
                "Restore the state directory from backup"
            )
        if self._basis is None:
            self._basis = newest
        return self._load(files[-1][1]) if files else None

    def lifetime(self) -> tuple[Release, ...]:
        """Every release this site ever made, over all runs, oldest first."""
        newest = self.newest()
        return newest.lifetime if newest is not None else ()

    def _run_files(self, run_id: str) -> list[StoredRelease]:
        return [r for _, p in self._files() if (r := self._load(p)).run_id == run_id]

    def restore(self, state: RecordDict, run_id: str) -> None:
        """Replace ``state`` by run ``run_id``'s newest stored state, or empty it if none is stored.

        Never keep what ``state`` held: Flower's Context belongs to the Flower run, and one Flower
        run may name several facefed runs, so it may hold another run's state.
        """
        self.newest()  # fail closed on a missing or corrupt newest release
        stored = self._run_files(run_id)
        for name in list(state.keys()):
            del state[name]
        for name, record in stored[-1].state.items() if stored else ():
            state[name] = record

    def replay(self, run_id: str, server_round: int, model_hash: str) -> RecordDict | None:
        """The stored reply if this exact round was already released; None if it is new.

        Raises:
            PrivacyBudgetError: the site released this round (or a later one) of the run already, on
                another model or without a stored reply: training again would charge it twice.
        """
        released = [r.round for r in self.lifetime() if r.run_id == run_id]
        if not released or server_round > max(released):
            return None
        for stored in self._run_files(run_id):
            if stored.round == server_round and not stored.reply_proto.items:
                raise ReplayRefused(
                    f"round {server_round} of run {run_id} failed on this site and was charged; "
                    "it is not trained again"
                )
            if stored.round == server_round and stored.model_hash == model_hash:
                logger.info(
                    "round %d of run %s was already released; resending the stored reply",
                    server_round,
                    run_id,
                )
                return stored.reply
        raise ReplayRefused(
            f"this site already released round {max(released)} of run {run_id} and holds no stored "
            f"reply for round {server_round} on this model; refusing to train it again (the round "
            "would be charged twice). Resume the coordinator from its latest checkpoint"
        )

    def stored_record(self, run_id: str, server_round: int) -> ConfigRecord | None:
        """The signed privacy record of a stored round of run ``run_id`` (None if not held)."""
        for stored in self._run_files(run_id):
            if stored.round == server_round:
                return stored.privacy_record()
        return None

    def previous_records(self, run_id: str, server_round: int) -> dict[int, ConfigRecord]:
        """The signed privacy records of this run's stored rounds before ``server_round``."""
        records = {}
        for stored in self._run_files(run_id):
            record = stored.privacy_record() if stored.round < server_round else None
            if record is not None:
                records[stored.round] = record
        return records

    def commit(
        self, release: Release, model_hash: str, state: RecordDict, reply: RecordDict
    ) -> None:
        """Durably record ``release`` (of the model ``model_hash``) before its reply is sent, with
        the run's ``state`` after it; prune old releases.

        A round that failed after reading data is recorded too, with an empty ``reply``: its
        planned spend is charged, and it is never trained again.

        Raises:
            IntegrityError: another process recorded a release meanwhile (nothing was written).
        """
        newest = self.newest()
        basis = self._basis or 0  # the spend every check of this round was made against
        if newest is not None and newest.seq != basis:
            raise IntegrityError(
                f"site state {self.root}: another process recorded release {newest.seq} "
                "meanwhile; this round is not released (a site's rounds must run one at a time)"
            )
        seq = basis + 1
        lifetime = [*(newest.lifetime if newest is not None else ()), release]
        meta = {
            "run-id": release.run_id,
            "round": release.round,
            "model-hash": model_hash,
            "seq": seq,
            "lifetime": [r.to_json() for r in lifetime],
        }
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
        state_bytes = recorddict_to_proto(state).SerializeToString()
        reply_bytes = recorddict_to_proto(reply).SerializeToString()
        body = _LEN.pack(len(meta_bytes), len(state_bytes)) + meta_bytes + state_bytes + reply_bytes
        self._mkdir()
        if seq == 1 and not (self.root / MARKER).exists():  # before any release file exists
            self._write_marker(0)
        if self._new_key is not None:
            save_private_key(self._new_key, self.root / "site.key")
            self._new_key = None
        self._loaded.clear()
        try:
            atomic_create_bytes(
                self.root / f"release-{seq:08d}.state",
                MAGIC + hashlib.sha256(body).digest() + body,
                mode=0o600,
            )
        except FileExistsError:
            raise IntegrityError(
                f"site state {self.root}: another process recorded release {seq} meanwhile; this "
                "round is not released (a site's rounds must run one at a time)"
            ) from None
        self._basis = seq
        self._write_marker(seq)
        self._prune()

    def _write_marker(self, seq: int) -> None:
        """Record ``seq`` as the newest release (atomically; a missing newest file then stops the
        site)."""
        marker = {"format": STORE_FORMAT, "last-release": seq}
        atomic_write_text(self.root / MARKER, json.dumps(marker), mode=0o600)

    def _prune(self) -> None:
        """Keep the newest ``KEEP`` releases of each of the newest ``RUNS_KEPT`` runs."""
        by_run: dict[str, list[Path]] = {}
        for _, path in reversed(self._files()):
            by_run.setdefault(self._load(path).run_id, []).append(path)
        for rank, paths in enumerate(by_run.values()):
            for path in paths[KEEP if rank < RUNS_KEPT else 0 :]:  # rank 0 holds the newest
                path.unlink(missing_ok=True)
                self._loaded.pop(path, None)

    def _mkdir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _load(self, path: Path) -> StoredRelease:
        if path not in self._loaded:
            self._loaded[path] = _read(path)
        return self._loaded[path]


def events_of(releases: Sequence[Release]) -> list[DpSgdEvent]:
    """All DP events of ``releases``, in order (what the lifetime epsilon composes)."""
    return [event for release in releases for event in release.events]


def _read(path: Path) -> StoredRelease:
    raw = path.read_bytes()
    body = raw[len(MAGIC) + 32 :]
    if (
        not raw.startswith(MAGIC)
        or hashlib.sha256(body).digest() != raw[len(MAGIC) : len(MAGIC) + 32]
    ):
        raise IntegrityError(
            f"site state {path} is corrupt (checksum mismatch); the privacy budget this site has "
            "spent cannot be established, so it refuses to train. Restore the file from backup"
        )
    try:
        meta_len, state_len = _LEN.unpack(body[: _LEN.size])
        start = _LEN.size
        meta = json.loads(body[start : start + meta_len])
        state_proto, reply_proto = RecordDictProto(), RecordDictProto()
        state_proto.ParseFromString(body[start + meta_len : start + meta_len + state_len])
        reply_proto.ParseFromString(body[start + meta_len + state_len :])
        return StoredRelease(
            seq=int(meta["seq"]),
            run_id=str(meta["run-id"]),
            round=int(meta["round"]),
            model_hash=str(meta["model-hash"]),
            state=recorddict_from_proto(state_proto),
            lifetime=tuple(Release.from_json(r) for r in meta["lifetime"]),
            path=path,
            reply_proto=reply_proto,
        )
    except Exception as exc:  # a checksummed file we cannot decode: a foreign or newer writer
        raise IntegrityError(f"site state {path} cannot be decoded ({exc})") from None
