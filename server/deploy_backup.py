"""``facefed deploy backup`` / ``restore``: consistent copies of a kit while its services run.

A backup is a folder (0700, every file 0600: it holds private keys) with ``files/`` mirroring the
kit and ``backup-manifest.json``: each file's path relative to the kit, kind, size, SHA-256 and
mode, the facefed version and the time. What is copied, in this order:

1. every plain file of the kit: configuration, certificates, keys, the run folders (``run.json``,
   ``results.json``, ``checkpoints/``, the coordinator's ``keys/``), written atomically by their
   writers, so each copy is one whole version;
2. every SQLite database (the SuperLink's ``superlink.db``, each run's ``ledger.db``), with SQLite's
   online backup API (:meth:`sqlite3.Connection.backup`): one read transaction, so the copy is
   the database at one instant, whatever a writer in WAL mode does meanwhile; ``-wal`` / ``-shm``
   files are never copied;
3. every site-state folder (:mod:`client.training.site_store`: a ``store.json`` with its
   ``release-*.state`` files), under the same ``flock`` the site holds while it commits a release,
   then each release's own checksum is verified.

The order makes the copies agree the way a resume needs: a checkpoint is written after the
ledger records its round, and a site records a release before the ledger does, so copying
checkpoints, then the ledger, then the site states gives checkpoint <= ledger <= site state, the
situation ``resume = true`` is made for (a site resends what it released, nothing is charged
twice). Not copied: ``logs/`` and ``flwr-home/`` (Flower's app cache and connection file, which
facefed rewrites). ``restore`` lives in :mod:`server.deploy_restore`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from client.training import site_store
from common.errors import ConfigError, IntegrityError, RefusedError

logger = logging.getLogger(__name__)

MANIFEST = "backup-manifest.json"
FILES = "files"
FORMAT = "facefed-backup/1"
SKIPPED_DIRS = frozenset({"logs", "flwr-home"})  # regenerated or not needed to resume
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
LOCK_TIMEOUT_S = 60.0
DIR_MODE, FILE_MODE = 0o700, 0o600

Kind = Literal["sqlite", "site-state", "key", "certificate", "config", "run", "file"]


@dataclass(frozen=True)
class Entry:
    """One backed-up file: where it belongs in the kit and what it must hash to."""

    path: str  # relative to the kit, POSIX separators
    kind: Kind
    size: int
    sha256: str
    mode: int  # the kit file's permission bits (restored owner-only)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "size": self.size, "sha256": self.sha256,
            "mode": f"{self.mode:04o}",
        }  # fmt: skip


def facefed_version() -> str:
    try:
        return importlib.metadata.version("facefed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kit_kind(kit: Path) -> str:
    """``coordinator`` or ``site``, from the kit's configuration file."""
    if (kit / "coordinator.toml").is_file():
        return "coordinator"
    if (kit / "site.toml").is_file():
        return "site"
    raise ConfigError(
        f"{kit} holds neither coordinator.toml nor site.toml; pass --kit the folder of a kit"
    )


def is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _kind(rel: PurePosixPath, path: Path) -> Kind:
    if rel.suffix == ".key":
        return "key"
    if rel.suffix in (".crt", ".pub"):
        return "certificate"
    if rel.parts[0] == "runs":
        return "run"
    if rel.suffix in (".toml", ".yaml", ".env", ".json", ".sig", ".sh", ".service", ".txt"):
        return "config"
    return "file"


def _walk(kit: Path) -> tuple[list[Path], list[Path], list[Path], list[str]]:
    """(plain files, SQLite databases, site-state folders, every folder) of ``kit``, sorted."""
    plain, databases, stores, folders = [], [], [], []
    for root, dirs, names in os.walk(kit):
        here = Path(root)
        dirs.sort()
        folders += [(here / d).relative_to(kit).as_posix() for d in dirs]
        if here == kit:
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        if site_store.MARKER in names or any(site_store._NAME.fullmatch(n) for n in names):
            stores.append(here)
            dirs[:] = []  # a site store holds no sub-folders
            continue
        for name in sorted(names):
            path = here / name
            if not stat.S_ISREG(path.lstat().st_mode):
                logger.warning("%s is not a plain file (a link or socket); not backed up", path)
            elif name.endswith(SQLITE_SIDECARS):
                continue  # the online backup reads them through SQLite
            elif is_sqlite(path):
                databases.append(path)
            else:
                plain.append(path)
    return plain, databases, stores, folders


class _Writer:
    """Writes backup files (0600) under ``staging/files`` and collects their manifest entries."""

    def __init__(self, kit: Path, staging: Path) -> None:
        self.kit, self.files, self.entries = kit, staging / FILES, list[Entry]()

    def target(self, source: Path) -> tuple[PurePosixPath, Path]:
        rel = PurePosixPath(source.relative_to(self.kit).as_posix())
        dest = self.files / rel
        for parent in reversed(dest.parents):
            if not parent.exists() and self.files in (parent, *parent.parents):
                parent.mkdir(mode=DIR_MODE)
                os.chmod(parent, DIR_MODE)
        return rel, dest

    def record(self, source: Path, rel: PurePosixPath, dest: Path, kind: Kind) -> None:
        os.chmod(dest, FILE_MODE)
        with dest.open("rb") as handle:
            os.fsync(handle.fileno())
        mode = stat.S_IMODE(source.stat().st_mode)
        entry = Entry(str(rel), kind, dest.stat().st_size, sha256_file(dest), mode)
        self.entries.append(entry)

    def copy_plain(self, source: Path, kind: Kind | None = None) -> None:
        rel, dest = self.target(source)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with source.open("rb") as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
        except FileNotFoundError:  # removed meanwhile (an archived run, a pruned checkpoint)
            dest.unlink(missing_ok=True)
            logger.warning("%s was removed while the backup ran; not backed up", source)
            return
        self.record(source, rel, dest, kind or _kind(rel, source))

    def copy_sqlite(self, source: Path) -> None:
        """One consistent snapshot with SQLite's online backup API; checked before it counts."""
        rel, dest = self.target(source)
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                out = sqlite3.connect(dest)
                try:
                    src.backup(out)  # pages=-1: one step, one read transaction
                    (check,) = out.execute("PRAGMA integrity_check").fetchone()
                finally:
                    out.close()
            finally:
                src.close()
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(
                f"{source} cannot be backed up ({exc}); check the database with `sqlite3 "
                f"{source} 'PRAGMA integrity_check'` before relying on any backup of it"
            ) from None
        if check != "ok":
            raise IntegrityError(
                f"the backup of {source} fails SQLite's integrity check ({check}); the database "
                "itself is damaged: restore it from an older backup"
            )
        for suffix in SQLITE_SIDECARS:  # the copy is whole in its main file
            Path(f"{dest}{suffix}").unlink(missing_ok=True)
        self.record(source, rel, dest, "sqlite")

    def copy_store(self, folder: Path) -> None:
        """A site-state folder under the site's own lock, then each release's checksum checked."""
        with _shared_lock(folder):
            names = sorted(p for p in folder.iterdir() if stat.S_ISREG(p.lstat().st_mode))
            for path in names:
                self.copy_plain(path, "site-state")
        _check_store_copy(self.target(folder)[1], folder)


@contextlib.contextmanager
def _shared_lock(folder: Path) -> Iterator[None]:
    """``flock(LOCK_SH)`` on ``folder``: waits while a site commits a release (it holds LOCK_EX)."""
    timeout = LOCK_TIMEOUT_S
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() > deadline:
                    raise RefusedError(
                        f"site state {folder} stayed locked for {timeout:.0f} s (the site is "
                        "committing a round); run the backup again"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_store_copy(copy: Path, source: Path) -> None:
    """Every copied release verifies and the newest one ``store.json`` names is there."""
    seqs = []
    for path in sorted(copy.glob("release-*.state")):
        raw = path.read_bytes()
        head = len(site_store.MAGIC)
        body = raw[head + 32 :]
        if not raw.startswith(site_store.MAGIC) or hashlib.sha256(body).digest() != raw[head:][:32]:
            raise IntegrityError(
                f"site state {source / path.name} fails its own checksum; the site's state is "
                "damaged: restore it from an older backup before the site trains again"
            )
        match = site_store._NAME.fullmatch(path.name)
        seqs.append(int(match.group(1)) if match else 0)
    marker = copy / site_store.MARKER
    if marker.exists():
        last = int(json.loads(marker.read_text(encoding="utf-8")).get("last-release", 0))
        if last and last not in seqs:
            raise IntegrityError(
                f"site state {source}: store.json names release {last}, which the copy lacks; "
                "run the backup again"
            )


def prepare_target(to: Path) -> Path:
    """A fresh staging folder (0700) beside ``to``; refuses a ``to`` that holds anything."""
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise RefusedError(
            f"backup folder {to} is not empty; name a new folder (e.g. one per date) for each backup"
        )
    to.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", suffix=".partial", dir=to.parent))
    os.chmod(staging, DIR_MODE)
    (staging / FILES).mkdir(mode=DIR_MODE)
    os.chmod(staging / FILES, DIR_MODE)
    return staging


def backup(kit: Path, to: Path) -> dict[str, Any]:
    """Back ``kit`` up into the new folder ``to``; return the manifest.

    Raises:
        ConfigError: ``kit`` is not a kit. RefusedError: ``to`` is not empty.
        IntegrityError: a database or site state in the kit is damaged.
    """
    kit = kit.resolve()
    kind = kit_kind(kit)
    to = to.resolve()  # a '..' or a symlink must not hide that it points into the kit
    if to == kit or kit in to.parents:
        raise ConfigError(f"backup folder {to} is inside the kit {kit}; put it outside the kit")
    plain, databases, stores, folders = _walk(kit)
    staging = prepare_target(to)
    try:
        writer = _Writer(kit, staging)
        for path in plain:  # 1. checkpoints before the ledger: checkpoint <= ledger
            writer.copy_plain(path)
        for path in databases:  # 2. the ledger before site states: ledger <= site state
            writer.copy_sqlite(path)
        for folder in stores:  # 3. site states
            writer.copy_store(folder)
        manifest = {
            "format": FORMAT,
            "facefed-version": facefed_version(),
            "created-at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "kit-kind": kind,
            "kit": str(kit),
            "dirs": folders,  # recreated empty by restore, e.g. logs/
            "files": [e.to_json() for e in sorted(writer.entries, key=lambda e: e.path)],
        }
        fd = os.open(staging / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if to.exists():
            to.rmdir()  # empty (checked): the rename takes its place
        os.rename(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _warn_outside_runs(kit, kind)
    return manifest


def _warn_outside_runs(kit: Path, kind: str) -> None:
    if kind != "coordinator":
        return
    from server import deploy

    try:
        out = Path(deploy.load_coordinator(kit).out_dir)
    except ConfigError:  # a kit that no longer parses is still worth its backup
        return
    if out.is_absolute() and kit not in out.resolve().parents:
        logger.warning(
            "coordinator.toml's out-dir %s lies outside the kit and is not in this backup; "
            "back that folder up too (or keep run folders inside the kit)",
            out,
        )


def register(subparsers: Any) -> None:
    """Add ``backup`` and ``restore`` to the ``deploy`` subcommands."""
    p = subparsers.add_parser(
        "backup",
        allow_abbrev=False,
        help="copy a kit consistently while it runs (SQLite online backup, site state under lock)",
    )
    p.add_argument("--kit", type=Path, required=True, help="the coordinator or site kit folder")
    p.add_argument("--to", type=Path, required=True, help="a new (or empty) folder for the backup")
    p.set_defaults(func=cmd_backup)

    p = subparsers.add_parser(
        "restore",
        allow_abbrev=False,
        help="check a backup's manifest, then restore the kit from it",
    )
    p.add_argument("--from", dest="source", type=Path, required=True, help="the backup folder")
    p.add_argument("--kit", type=Path, required=True, help="where the kit goes (new or empty)")
    p.add_argument(
        "--force",
        action="store_true",
        help="restore over a non-empty --kit (moved aside to KIT.replaced-<time>, not deleted)",
    )
    p.add_argument(
        "--allow-older-state",
        action="store_true",
        help="with --force: restore even over a site state newer than the backup's",
    )
    p.set_defaults(func=cmd_restore)


def cmd_backup(args: Any) -> int:
    manifest = backup(args.kit, args.to)
    files = manifest["files"]
    databases = sum(1 for f in files if f["kind"] == "sqlite")
    digest = sha256_file(args.to / MANIFEST)
    print(
        f"backed up {len(files)} files ({databases} SQLite databases) of {manifest['kit-kind']} "
        f"kit {args.kit} to {args.to}; manifest SHA-256 {digest}"
    )
    return 0


def cmd_restore(args: Any) -> int:
    from server import deploy_restore

    aside = deploy_restore.restore(
        args.source, args.kit, force=args.force, allow_older_state=args.allow_older_state
    )
    if aside is not None:
        print(f"the kit that was in {args.kit} is now in {aside}")
    print(
        f"restored {args.kit} from {args.source}; start it as before, and resume an interrupted "
        "run with `deploy submit --run-config '... resume=true'` (the run's own config)"
    )
    return 0
