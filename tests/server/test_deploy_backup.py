"""``facefed deploy backup`` / ``restore``: point-in-time copies while writers run, a manifest that a
tampered file cannot pass, owner-only permissions, and a restore that never overwrites by accident."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import RecordDict

from client.training.site_store import Release, SiteStore
from common.cli import OneLineParser, report_errors
from common.errors import EXIT_INTEGRITY, EXIT_NOT_FOUND_OR_REFUSED
from server import deploy_backup, deploy_kitsign, deploy_provision, deploy_restore


def facefed(argv: list[str]) -> int:
    """``facefed deploy ARGV`` through this module's own parser and the CLI's error reporting."""
    parser = OneLineParser(prog="facefed deploy")
    deploy_backup.register(parser.add_subparsers(dest="deploy_command", required=True))
    args: argparse.Namespace = parser.parse_args(argv)
    return report_errors("facefed", lambda: int(args.func(args)))


@pytest.fixture
def site_kit(tmp_path: Path) -> Path:
    """A minimal site kit: its config, a key, a WAL ledger-like database and a site store."""
    kit = tmp_path / "kit"
    (kit / "keys").mkdir(parents=True)
    (kit / "site.toml").write_text("[site]\nsite-id = 'site-1'\n")
    (kit / "keys" / "supernode.key").write_text("PRIVATE\n")
    os.chmod(kit / "keys" / "supernode.key", 0o600)
    (kit / "start-site.sh").write_text("#!/bin/sh\n")
    os.chmod(kit / "start-site.sh", 0o700)
    _commit(kit / "state", 1)
    return kit


def _commit(root: Path, round_: int) -> None:
    store = SiteStore(root)
    with store.locked():
        store.newest()
        store.commit(
            Release("run-a", round_, (), True), f"model-{round_}", RecordDict(), RecordDict()
        )


def _wal_db(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, payload BLOB)")
    conn.execute("CREATE TABLE tally (n INTEGER)")
    conn.execute("INSERT INTO tally VALUES (0)")
    return conn


@pytest.fixture
def writer(site_kit: Path) -> Iterator[tuple[sqlite3.Connection, threading.Event]]:
    """A writer appending to ``runs/default/ledger.db`` in transactions of two statements (a row
    and the tally of rows) until the test ends."""
    conn = _wal_db(site_kit / "runs" / "default" / "ledger.db")
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO entries (payload) VALUES (randomblob(3000))")
            conn.execute("UPDATE tally SET n = n + 1")
            conn.execute("COMMIT")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield conn, stop
    finally:
        stop.set()
        thread.join()
        conn.close()


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT n FROM tally").fetchone()[0])


def test_backup_of_a_wal_database_under_concurrent_writes_is_one_point_in_time(
    site_kit: Path, tmp_path: Path, writer: tuple[sqlite3.Connection, threading.Event]
) -> None:
    conn, stop = writer
    copies = []
    for i in range(5):
        before = _count(conn)
        deploy_backup.backup(site_kit, tmp_path / f"backup-{i}")
        after = _count(conn)
        copies.append((before, after, tmp_path / f"backup-{i}" / "files/runs/default/ledger.db"))
    stop.set()

    for before, after, path in copies:
        copy = sqlite3.connect(path)
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows, tally = copy.execute("SELECT COUNT(*), (SELECT n FROM tally) FROM entries").fetchone()
        copy.close()
        assert rows == tally  # no transaction is half in the copy
        assert before <= rows <= after  # the database at one instant during the backup
        assert not Path(f"{path}-wal").exists()
    assert copies[-1][0] > copies[0][1] > 0  # the writer really ran across the backups


def test_manifest_names_every_file_with_its_hash_size_kind_and_the_version(
    site_kit: Path, tmp_path: Path
) -> None:
    _wal_db(site_kit / "runs" / "default" / "ledger.db").close()
    (site_kit / "logs").mkdir()
    (site_kit / "logs" / "x.log").write_text("log\n")

    assert facefed(["backup", "--kit", str(site_kit), "--to", str(tmp_path / "b")]) == 0

    manifest = json.loads((tmp_path / "b" / deploy_backup.MANIFEST).read_text())
    files = {f["path"]: f for f in manifest["files"]}
    assert manifest["facefed-version"] and manifest["created-at"] and manifest["kit-kind"] == "site"
    assert files["keys/supernode.key"]["kind"] == "key"
    assert files["runs/default/ledger.db"]["kind"] == "sqlite"
    assert files["state/release-00000001.state"]["kind"] == "site-state"
    assert files["state/store.json"]["kind"] == "site-state"
    assert files["start-site.sh"]["mode"] == "0700"
    assert not any(p.startswith("logs/") or p.endswith("-wal") for p in files)
    for path, item in files.items():
        data = (tmp_path / "b" / "files" / path).read_bytes()
        assert len(data) == item["size"]
        assert deploy_backup.sha256_file(tmp_path / "b" / "files" / path) == item["sha256"]


def test_backup_is_0700_and_every_file_0600_whatever_the_umask(
    site_kit: Path, tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        deploy_backup.backup(site_kit, tmp_path / "deep" / "b")
    finally:
        os.umask(old)

    root = tmp_path / "deep" / "b"
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(d.stat().st_mode) for d in dirs} == {0o700}
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert not [p for p in (tmp_path / "deep").iterdir() if p.name != "b"]  # no staging left


def test_backup_refuses_a_folder_that_holds_anything(site_kit: Path, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("x")

    code = facefed(["backup", "--kit", str(site_kit), "--to", str(tmp_path / "b")])

    assert code == EXIT_NOT_FOUND_OR_REFUSED
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["old"]


def test_site_state_is_copied_under_the_lock_the_site_commits_with(
    site_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy_backup, "LOCK_TIMEOUT_S", 0.3)
    fd = os.open(site_kit / "state", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the site, in the middle of committing a release
    try:
        with pytest.raises(deploy_backup.RefusedError, match="stayed locked"):
            deploy_backup.backup(
                site_kit,
                tmp_path / "b",
            )
    finally:
        os.close(fd)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.*"))


def test_round_trip_restores_every_file_and_a_signed_kit_still_verifies(tmp_path: Path) -> None:
    deploy_provision.provision(
        deploy_provision.ProvisionPlan(
            out=tmp_path / "kits", coordinator_host="127.0.0.1", sites=("site-1",)
        )
    )
    kit = deploy_provision.coordinator_dir(tmp_path / "kits")
    _wal_db(kit / "state" / "superlink.db").close()

    assert facefed(["backup", "--kit", str(kit), "--to", str(tmp_path / "b")]) == 0
    assert facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(tmp_path / "new")]) == 0

    def files(root: Path) -> dict[Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    original, restored = files(kit), files(tmp_path / "new")
    database = Path("state/superlink.db")
    assert {p for p in original if p.suffix not in (".db-wal", ".db-shm")} == set(restored)
    assert {p: b for p, b in restored.items() if p != database} == {
        p: b for p, b in original.items() if p in restored and p != database
    }
    assert _dump(kit / database) == _dump(tmp_path / "new" / database)
    assert os.access(tmp_path / "new" / "start-coordinator.sh", os.X_OK)
    dirs = {p.relative_to(kit) for p in kit.rglob("*") if p.is_dir()}
    assert {
        p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*") if p.is_dir()
    } == dirs
    assert Path("logs") in dirs  # empty run-time folders come back too
    deploy_kitsign.verify_kit(tmp_path / "new", pinned=None)


def test_a_tampered_backup_file_is_refused_in_one_line_with_exit_4(
    site_kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy_backup.backup(site_kit, tmp_path / "b")
    victim = tmp_path / "b" / "files" / "state" / "store.json"
    victim.write_bytes(victim.read_bytes().replace(b"1", b"9"))

    code = facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(tmp_path / "new")])

    err = capsys.readouterr().err
    assert code == EXIT_INTEGRITY
    assert err.count("\n") == 1 and err.startswith("facefed: error: ") and str(victim) in err
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))


def test_a_manifest_path_leaving_the_kit_is_refused(site_kit: Path, tmp_path: Path) -> None:
    deploy_backup.backup(site_kit, tmp_path / "b")
    manifest_path = tmp_path / "b" / deploy_backup.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "../escaped"
    manifest_path.write_text(json.dumps(manifest))

    code = facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(tmp_path / "new")])

    assert code == EXIT_INTEGRITY
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "new").exists()


def test_restore_refuses_a_non_empty_target_and_force_moves_it_aside(
    site_kit: Path, tmp_path: Path
) -> None:
    deploy_backup.backup(site_kit, tmp_path / "b")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep me")

    refused = facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(target)])
    assert refused == EXIT_NOT_FOUND_OR_REFUSED
    assert [p.name for p in target.iterdir()] == ["precious"]

    forced = facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(target), "--force"])
    assert forced == 0
    assert (target / "site.toml").exists() and not (target / "precious").exists()
    (aside,) = tmp_path.glob("target.replaced-*")
    assert (aside / "precious").read_text() == "keep me"


def test_restore_refuses_to_roll_a_site_state_back_even_with_force(
    site_kit: Path, tmp_path: Path
) -> None:
    deploy_backup.backup(site_kit, tmp_path / "b")
    _commit(site_kit / "state", 2)  # the site released another round after the backup

    code = facefed(["restore", "--from", str(tmp_path / "b"), "--kit", str(site_kit), "--force"])

    assert code == EXIT_NOT_FOUND_OR_REFUSED
    assert (site_kit / "state" / "release-00000002.state").exists()
    assert deploy_restore.restore(tmp_path / "b", site_kit, force=True, allow_older_state=True)
