"""A site's durable state: its signing key, privacy history, local head and its last replies.

Flower keeps ``Context.state`` in memory only, so a site process that restarts (a SuperNode reboot, a
simulation resumed after a crash) would forget how much privacy budget it has spent, and answer a
repeated round by training (and spending) again. With a state directory the site instead:

* restores its privacy history and local identity head from disk before every round (the disk is the
  authority; a newer state file that fails its checksum stops the site: fail closed);
* writes, atomically and before the reply leaves, one state file per round holding the updated history,
  the head and the exact reply;
* answers a round it has already released for the same run and the same global model (a coordinator
  resumed after a crash asks again) with that stored reply, byte for byte: nothing new is released, so
  nothing is charged twice, and the signed ledger record is the same one;
* refuses a round of the same run it already released on a *different* model (that would be a second
  release of the same round) or one it no longer holds.

The file is ``MAGIC`` + SHA-256 + a length-prefixed pair of Flower ``RecordDict`` protos (state, reply).
It holds model weights, scalars and the privacy record: never an image or a template.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import config_record_from_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

from common.atomic import atomic_write_bytes
from common.crypto.signing import generate_private_key, load_private_key, save_private_key
from common.errors import IntegrityError, PrivacyBudgetError
from common.privacy.site_record import RECORD_NAME

logger = logging.getLogger(__name__)

MAGIC = b"FFSITE01"
META = "site-store-meta"
KEEP = 3  # state files kept: a coordinator falls back at most a checkpoint or two
_NAME = re.compile(r"^round-(\d{6})\.state$")


@dataclass(frozen=True)
class StoredRound:
    """One state file: its round, the site's state after it, and the reply (decoded when asked for:
    restoring the state does not need the model weights it holds)."""

    run_id: str
    round: int
    model_hash: str
    state: RecordDict
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
    """One site's state directory (created 0700 on first use).

    A store object serves one round of one site (the ClientApp makes one per message): it reads each
    state file at most once, since only this object writes the directory meanwhile.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._loaded: dict[Path, StoredRound] = {}

    # ------------------------------------------------------------------ key
    def signing_key(self) -> Ed25519PrivateKey:
        """The site's Ed25519 ledger key, created (0600) on first use; it never leaves the site."""
        path = self.root / "site.key"
        if path.exists():
            return load_private_key(path)
        key = generate_private_key()
        save_private_key(key, path)
        return key

    # ------------------------------------------------------------------ rounds
    def _files(self) -> list[tuple[int, Path]]:
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> StoredRound | None:
        """The newest stored round; IntegrityError if it is unreadable (never fall back silently)."""
        files = self._files()
        return self._load(files[-1][1]) if files else None

    def restore(self, state: RecordDict, run_id: str) -> None:
        """Replace ``state`` by the newest stored one if it belongs to run ``run_id``.

        A site's budget, like the ledger, is per run: a new run starts from a fresh history.
        """
        latest = self.latest()
        if latest is None or latest.run_id != run_id:
            return
        for name in list(state.keys()):
            del state[name]
        for name, record in latest.state.items():
            state[name] = record

    def replay(self, run_id: str, server_round: int, model_hash: str) -> RecordDict | None:
        """The stored reply if this exact round was already released; None if it is new.

        Raises:
            PrivacyBudgetError: the site released this round (or a later one) of the run already, on
                another model or without a stored reply: training again would charge it twice.
        """
        latest = self.latest()
        if latest is None or latest.run_id != run_id or server_round > latest.round:
            return None
        for number, path in reversed(self._files()):
            if number == server_round:
                stored = self._load(path)
                if stored.run_id == run_id and stored.model_hash == model_hash:
                    logger.info(
                        "round %d of run %s was already released; resending the stored reply",
                        server_round,
                        run_id,
                    )
                    return stored.reply
                break
        raise PrivacyBudgetError(
            f"this site already released round {latest.round} of run {run_id} and holds no stored "
            f"reply for round {server_round} on this model; refusing to train it again (the round "
            "would be charged twice). Resume the coordinator from its latest checkpoint"
        )

    def previous_records(self, run_id: str, server_round: int) -> list[ConfigRecord]:
        """The signed privacy records of this run's stored rounds before ``server_round``, in order."""
        records = []
        for number, path in self._files():
            if number < server_round:
                stored = self._load(path)
                record = stored.privacy_record() if stored.run_id == run_id else None
                if record is not None:
                    records.append(record)
        return records

    def commit(
        self,
        run_id: str,
        server_round: int,
        model_hash: str,
        state: RecordDict,
        reply: RecordDict,
    ) -> None:
        """Durably record a round before its reply is sent; keep the newest ``KEEP`` rounds."""
        meta = ConfigRecord({"run-id": run_id, "round": server_round, "model-hash": model_hash})
        kept = RecordDict({**dict(state.items()), META: meta})
        state_bytes = recorddict_to_proto(kept).SerializeToString()
        reply_bytes = recorddict_to_proto(reply).SerializeToString()
        body = struct.pack(">Q", len(state_bytes)) + state_bytes + reply_bytes
        path = self.root / f"round-{server_round:06d}.state"
        self._loaded.clear()
        atomic_write_bytes(path, MAGIC + hashlib.sha256(body).digest() + body, mode=0o600)
        for number, old in self._files()[:-KEEP]:
            if number != server_round:
                old.unlink(missing_ok=True)

    def _load(self, path: Path) -> StoredRound:
        if path not in self._loaded:
            self._loaded[path] = _read(path)
        return self._loaded[path]


def _read(path: Path) -> StoredRound:
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
        (state_len,) = struct.unpack(">Q", body[:8])
        state_proto, reply_proto = RecordDictProto(), RecordDictProto()
        state_proto.ParseFromString(body[8 : 8 + state_len])
        reply_proto.ParseFromString(body[8 + state_len :])
        state = recorddict_from_proto(state_proto)
        meta = state.config_records.pop(META)
        return StoredRound(
            run_id=str(meta["run-id"]),
            round=int(meta["round"]),  # type: ignore[arg-type]
            model_hash=str(meta["model-hash"]),
            state=state,
            path=path,
            reply_proto=reply_proto,
        )
    except Exception as exc:  # a checksummed file we cannot decode: a foreign or newer writer
        raise IntegrityError(f"site state {path} cannot be decoded ({exc})") from None
