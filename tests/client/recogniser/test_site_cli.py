"""``facefed site ...`` end to end on real photos.

Every bad input gets one line, a non-zero exit, and leaves the store unchanged.
"""

from __future__ import annotations

import base64
import getpass
import io
import json
import os
import shlex
import sqlite3
import stat
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.recogniser.templates import DB_NAME, TemplateStore
from common.cli import main
from common.crypto import keys
from common.errors import KeyUnavailableError
from tests.client.conftest import site_cli_env

YaleRgb = Callable[[int, str], np.ndarray]
Files = Callable[[Path], dict[str, bytes]]
Cap = pytest.CaptureFixture[str]
FAR_LINE = {
    "threshold": 0.5,
    "far": 0.001,
    "tar": 0.9,
    "heldout_tar": 0.88,
    "heldout_far": 0.0013,
    "n_genuine": 1500,
    "n_impostor": 1500,
    "n_folds": 5,
    "source": "LFW View 2 folds",
}


@pytest.fixture
def env(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: store and key folders under tmp, the small checkpoint."""
    return site_cli_env(tmp_path, monkeypatch, checkpoint)


@pytest.fixture
def photos(env: Path, yale_rgb: YaleRgb, write_image: Callable[[Path, np.ndarray], Path]) -> dict:
    folder = env / "photos"
    folder.mkdir()
    out = {}
    for subject in (0, 1):
        for cond in ("normal", "happy", "glasses"):
            out[f"{subject}-{cond}"] = write_image(
                folder / f"s{subject}-{cond}.jpg", yale_rgb(subject, cond)
            )
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["site", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def enrolled(env: Path, photos: dict, capsys: pytest.CaptureFixture[str]) -> Path:
    """An initialised store with subject 0 enrolled and a stored calibration."""
    assert run(capsys, "init")[0] == 0
    code, _, err = run(
        capsys, "enroll", "--id", "s0", str(photos["0-normal"]), str(photos["0-glasses"])
    )
    assert code == 0, err
    store = TemplateStore.open(env / "store")
    store.unlock(keys.load_key_file(next((env / "keys").iterdir()), store.key_info))
    model_tag = store._conn.execute("SELECT model_tag FROM templates").fetchone()[0]
    store.set_meta(f"calibration:{model_tag}", FAR_LINE | {"model_tag": model_tag})
    store.close()
    return env / "store"


def test_init_creates_a_private_key_outside_the_store(env: Path, capsys: Cap) -> None:
    code, out, _ = run(capsys, "init", "--json")
    info = json.loads(out)
    key_file = Path(info["key_file"])
    assert code == 0 and key_file.parent == env / "keys"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not any(p.suffix == ".key" for p in (env / "store").iterdir())
    assert run(capsys, "init")[0] != 0  # a second init refuses to overwrite


def test_key_file_inside_the_store_is_refused(env: Path, capsys: Cap) -> None:
    code, _, err = run(capsys, "init", "--key-file", str(env / "store" / "k.key"))
    assert code != 0 and "inside the store" in err


def test_enroll_then_verify_same_person_matches_with_far_stated(
    enrolled: Path, photos: dict, capsys
) -> None:
    code, out, _ = run(capsys, "verify", "--id", "s0", str(photos["0-normal"]))
    assert code == 0 and out.startswith("MATCH: s0 score ")
    assert "FAR 0.001" in out
    code, out, _ = run(capsys, "verify", "--json", "--id", "s0", str(photos["0-normal"]))
    result = json.loads(out)
    assert result["match"] is True and result["far"] == 0.001 and result["score"] > 0.8


def test_verify_with_threshold_above_the_score_is_no_match_exit_1(
    enrolled: Path, photos: dict, capsys
) -> None:
    code, out, _ = run(capsys, "verify", "--id", "s0", "--threshold", "1", str(photos["1-happy"]))
    assert code == 1 and out.startswith("NO MATCH")
    assert "FAR not measured" in out and "nan" not in out


def test_identify_ranks_the_enrolled_people(enrolled: Path, photos: dict, capsys: Cap) -> None:
    assert run(capsys, "enroll", "--id", "s1", str(photos["1-normal"]))[0] == 0
    code, out, _ = run(capsys, "identify", "--json", "--top-k", "2", str(photos["1-normal"]))
    candidates = json.loads(out)["candidates"]
    assert code == 0 and candidates[0]["id"] == "s1" and len(candidates) == 2


def test_emotion_prints_a_label(env: Path, photos: dict, capsys: Cap) -> None:
    code, out, _ = run(capsys, "emotion", "--json", str(photos["0-happy"]))
    assert code == 0 and len(json.loads(out)["probabilities"]) == 7


def test_rotate_key_old_key_file_opens_nothing(
    enrolled: Path, env: Path, photos: dict, capsys
) -> None:
    key_file = next((env / "keys").iterdir())
    old_copy = env / "old.key"
    old_copy.write_bytes(key_file.read_bytes())
    old_copy.chmod(0o600)
    code, out, _ = run(capsys, "rotate-key")
    assert code == 0 and "re-wrapped 1" in out
    assert key_file.read_bytes() != old_copy.read_bytes()
    code, _, err = run(capsys, "list", "--key-file", str(old_copy))
    assert code == 4 and "does not hold this store's master key" in err
    assert run(capsys, "verify", "--id", "s0", str(photos["0-normal"]))[0] == 0


def test_rotate_key_on_a_row_edited_to_the_wrong_type_is_one_line_and_keeps_the_key(
    enrolled: Path, env: Path, capsys: Cap
) -> None:
    # Found by the attack review: a nonce edited to an integer raised TypeError mid-rotation
    key_file = next((env / "keys").iterdir())
    before = key_file.read_bytes()
    conn = sqlite3.connect(enrolled / DB_NAME)
    conn.execute("UPDATE templates SET nonce = 5 WHERE identity = 's0'")
    conn.commit()
    conn.close()
    one_line_error(*run(capsys, "rotate-key"), 4, "template row of 's0' is malformed")
    assert key_file.read_bytes() == before
    assert run(capsys, "list")[0] == 0  # the old key still opens the store


def test_delete_revokes(enrolled: Path, photos: dict, capsys: Cap) -> None:
    assert run(capsys, "delete", "--id", "s0")[0] == 0
    code, _, err = run(capsys, "verify", "--id", "s0", str(photos["0-normal"]))
    assert code == 3 and "no template for 's0'" in err  # not found: docs/exit-codes.md


def test_passphrase_store_and_wrong_passphrase(
    env: Path, photos: dict, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", "a long passphrase")
    assert run(capsys, "init", "--passphrase-env", "PW")[0] == 0
    assert not (env / "keys").exists()
    assert (
        run(capsys, "enroll", "--passphrase-env", "PW", "--id", "s0", str(photos["0-normal"]))[0]
        == 0
    )
    monkeypatch.setenv("PW", "another passphrase")
    code, _, err = run(capsys, "list", "--passphrase-env", "PW")
    assert code == 4 and err.count("\n") == 1 and "wrong passphrase" in err
    code, _, err = run(capsys, "list")
    assert code == 4 and "--passphrase-file" in err  # no key: a key failure


def test_keys_never_appear_in_output(enrolled: Path, env: Path, capsys: Cap) -> None:
    key_file = next((env / "keys").iterdir())
    secret = key_file.read_text().split()[1]
    _, out, err = run(capsys, "list", "--json")
    assert secret not in out + err and json.loads(out)["identities"] == ["s0"]


# ---------------------------------------------------------------------- bad input
def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 80_000, 80_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(999)))
        + chunk(b"IEND", b"")
    )


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


BAD_FILES: dict[str, Callable[[bytes, bytes], bytes]] = {
    "truncated-jpeg": lambda jpg, png: jpg[: len(jpg) // 2],
    "truncated-png": lambda jpg, png: png[: len(png) // 2],
    "corrupt-jpeg": lambda jpg, png: jpg[:2] + bytes(len(jpg) - 2),
    "non-image": lambda jpg, png: b"#!/bin/sh\necho not a photo\n",
    "bomb": lambda jpg, png: _bomb(),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_image_is_one_line_nonzero_and_store_unchanged(
    enrolled: Path,
    env: Path,
    photos: dict,
    yale: dict,
    capsys: Cap,
    store_files: Files,
    kind: str,
) -> None:
    bad = env / f"bad-{kind}.img"
    bad.write_bytes(BAD_FILES[kind](photos["0-happy"].read_bytes(), _png(yale["images"][0])))
    before = store_files(enrolled)
    for argv in (
        ("enroll", "--id", "s9", str(photos["0-happy"]), str(bad)),
        ("verify", "--id", "s0", str(bad)),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", (kind, argv)
        assert (
            err.count("\n") == 1 and err.startswith("facefed: error: ") and "Traceback" not in err
        )
    assert store_files(enrolled) == before


@pytest.mark.parametrize(
    "argv_kind",
    ["missing-key-file", "unknown-identity", "no-face", "bad-identity", "no-checkpoint"],
)
def test_other_bad_input_is_one_line_and_store_unchanged(
    enrolled: Path,
    env: Path,
    photos: dict,
    capsys: Cap,
    store_files: Files,
    monkeypatch: pytest.MonkeyPatch,
    argv_kind: str,
) -> None:
    blank = env / "blank.png"
    blank.write_bytes(_png(np.full((200, 200), 128, np.uint8)))
    argv = {
        "missing-key-file": (
            "enroll",
            "--key-file",
            str(env / "nope.key"),
            "--id",
            "s2",
            str(photos["1-happy"]),
        ),
        "unknown-identity": ("verify", "--id", "nobody", str(photos["1-happy"])),
        "no-face": ("enroll", "--id", "s2", str(blank)),
        "bad-identity": ("enroll", "--id", "../x", str(photos["1-happy"])),
        "no-checkpoint": ("enroll", "--id", "s2", str(photos["1-happy"])),
    }[argv_kind]
    if argv_kind == "no-checkpoint":
        monkeypatch.delenv("FACEFED_CHECKPOINT")
    before = store_files(enrolled)
    code, out, err = run(capsys, *argv)
    assert code >= 2 and out == "" and err.count("\n") == 1, err
    assert store_files(enrolled) == before


@pytest.mark.parametrize("variant", ["gray", "rgba", "16bit"])
def test_grayscale_rgba_and_16bit_photos_are_converted_and_enrolled(
    enrolled: Path,
    env: Path,
    yale: dict,
    capsys: Cap,
    variant: str,
) -> None:
    gray = yale["images"][np.flatnonzero(yale["identity"] == 1)[0]]
    array = {
        "gray": gray,
        "rgba": np.dstack([gray, gray, gray, np.full_like(gray, 255)]),
        "16bit": gray.astype(np.uint16) * 257,
    }[variant]
    path = env / f"{variant}.png"
    path.write_bytes(_png(array))
    code, out, err = run(capsys, "enroll", "--id", f"s1-{variant}", str(path))
    assert code == 0 and f"enrolled s1-{variant}" in out, err


def test_store_files_hold_no_embedding_bytes_and_no_pixel_runs(
    enrolled: Path, photos: dict, checkpoint: Path, store_files: Files, capsys: Cap
) -> None:
    from client.recogniser.imageio import read_image
    from client.recogniser.pipeline import load_pipeline

    assert run(capsys, "verify", "--id", "s0", str(photos["0-normal"]))[0] == 0  # a read, too
    pipe, _ = load_pipeline(checkpoint)
    images = [read_image(photos[k]) for k in ("0-normal", "0-glasses")]
    template = pipe.template(images, ["a", "b"])
    needles = [template.astype("<f4").tobytes()[i : i + 16] for i in range(0, 512, 64)]
    for rgb in images:
        face = pipe.aligned_face(rgb)
        for source in (rgb[:, :, 0], face[:, :, 0], face.reshape(-1)):
            flat = np.ascontiguousarray(source).reshape(-1)
            step = max(len(flat) // 12, 1)
            needles += [flat[i : i + 16].tobytes() for i in range(step, len(flat) - 16, step)]
        needles.append(photos["0-normal"].read_bytes()[600:632])
    needles = [
        n for n in needles if len(set(n)) > 2
    ]  # skip flat runs (zeros also pad SQLite pages)
    assert len(needles) > 40
    blobs = store_files(enrolled)
    assert set(blobs) <= {"templates.db", "templates.db-wal", "templates.db-shm"}
    found = [i for i, n in enumerate(needles) if any(n in blob for blob in blobs.values())]
    assert found == []


# ---------------------------------------------------------------------- careless operators
KEY_B64 = base64.b64encode(bytes(range(32))).decode()


def one_line_error(code: int, out: str, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code and out == "", (code, err)
    assert err.count("\n") == 1 and err.startswith("facefed: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def key_command(text: str = KEY_B64, exit_code: int = 0) -> str:
    script = f"import sys; print({text!r}); sys.exit({exit_code})"
    return shlex.join([sys.executable, "-c", script])


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o755])
def test_init_refuses_a_shared_or_open_folder_and_leaves_its_mode(
    env: Path, capsys: Cap, mode: int
) -> None:
    folder = env / "shared"
    folder.mkdir()
    folder.chmod(mode)
    code, out, err = run(capsys, "init", "--store", str(folder))
    one_line_error(code, out, err, 3, str(folder), "never changes the mode")
    assert stat.S_IMODE(folder.stat().st_mode) == mode and list(folder.iterdir()) == []
    assert not (env / "keys").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_init_refuses_a_folder_of_another_user(env: Path, capsys: Cap) -> None:
    folder = env / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    code, out, err = run(capsys, "init", "--store", str(folder))
    one_line_error(code, out, err, 3, "belongs to another user")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and list(folder.iterdir()) == []


def test_init_in_a_new_folder_makes_it_private_and_states_what_the_key_file_protects(
    env: Path, capsys: Cap
) -> None:
    code, out, _ = run(capsys, "init", "--store", str(env / "new" / "site"))
    assert code == 0 and stat.S_IMODE((env / "new" / "site").stat().st_mode) == 0o700
    assert "stolen backup" in out and "does not protect" in out and "--key-command" in out


def test_passphrase_on_stdin_is_refused_without_the_flag(
    env: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
    code, out, err = run(capsys, "init", "--passphrase")
    one_line_error(code, out, err, 2, "--passphrase-stdin")
    assert not (env / "store").exists() and not (env / "keys").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
    code, out, _ = run(capsys, "init", "--json", "--passphrase", "--passphrase-stdin")
    assert code == 0 and json.loads(out)["key"] == "passphrase"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
    assert run(capsys, "list", "--passphrase-stdin")[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
    one_line_error(*run(capsys, "list"), 4, "--passphrase-stdin")


@pytest.mark.parametrize("second", ["a long passphrase", "a long passphrasE"])
def test_a_new_prompted_passphrase_is_confirmed(
    env: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    answers = iter(["a long passphrase", second])
    asked: list[str] = []
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or next(answers))
    code, out, err = run(capsys, "init", "--passphrase")
    assert len(asked) == 2
    if second == "a long passphrase":
        assert code == 0 and "passphrase (scrypt)" in out
    else:
        one_line_error(code, out, err, 2, "differ")
        assert not (env / "store").exists()


def test_key_from_a_secret_manager_command_and_from_a_file_descriptor(
    env: Path, capsys: Cap
) -> None:
    code, out, err = run(capsys, "init", "--json", "--key-command", key_command())
    assert code == 0 and json.loads(out)["key_file"] is None, err
    assert not (env / "keys").exists()
    code, out, _ = run(capsys, "list", "--key-command", key_command())
    assert code == 0 and "no identities" in out
    read_end, write_end = os.pipe()
    os.write(write_end, f"{KEY_B64}\n".encode())
    os.close(write_end)
    assert run(capsys, "list", "--key-fd", str(read_end))[0] == 0
    other = base64.b64encode(bytes(32)).decode()
    one_line_error(*run(capsys, "list", "--key-command", key_command(other)), 4, "does not open")
    one_line_error(*run(capsys, "list"), 4, "--key-command")


def test_the_key_command_from_the_environment_serves_init_and_use_but_not_a_passphrase_store(
    env: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEFED_SITE_KEY_COMMAND", key_command())
    assert run(capsys, "init")[0] == 0 and not (env / "keys").exists()
    assert run(capsys, "list")[0] == 0
    monkeypatch.setenv("PW", "a long passphrase")
    other = ("--store", str(env / "pw-store"))
    assert run(capsys, "init", *other, "--passphrase-env", "PW")[0] == 0
    assert run(capsys, "list", *other, "--passphrase-env", "PW")[0] == 0


def test_rotating_a_secret_manager_key_needs_the_new_key(env: Path, capsys: Cap) -> None:
    new = base64.b64encode(bytes(range(1, 33))).decode()
    assert run(capsys, "init", "--key-command", key_command())[0] == 0
    one_line_error(*run(capsys, "rotate-key", "--key-command", key_command()), 2, "--new-key")
    assert not (env / "keys").exists()  # no key file slipped in
    code, out, _ = run(
        capsys, "rotate-key", "--key-command", key_command(), "--new-key-command", key_command(new)
    )
    assert code == 0 and "secret manager" in out
    assert run(capsys, "list", "--key-command", key_command(new))[0] == 0
    one_line_error(*run(capsys, "list", "--key-command", key_command()), 4, "does not open")


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (key_command(exit_code=3), "failed with exit code 3"),
        (key_command("not a key"), "did not give a facefed master key"),
        ("/nonexistent/vault kv get x", "not found"),
    ],
)
def test_a_failing_key_command_is_one_line(
    env: Path, capsys: Cap, command: str, needle: str
) -> None:
    code, out, err = run(capsys, "init", "--key-command", command)
    one_line_error(code, out, err, 4, needle)
    assert KEY_B64 not in err and not (env / "store").exists()


def test_a_key_command_that_hangs_is_stopped_by_the_timeout() -> None:
    hang = shlex.join([sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(KeyUnavailableError, match=r"did not answer within 0\.5 s"):
        keys.read_key_command(hang, timeout_s=0.5)


def test_an_os_error_the_command_did_not_foresee_is_one_line(
    env: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise IsADirectoryError(21, "Is a directory", str(env / "somewhere"))

    monkeypatch.setattr(TemplateStore, "create", broken)
    one_line_error(*run(capsys, "init"), 2, "Is a directory", str(env / "somewhere"))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("identify", "--top-k", "-2", "x.jpg"), "--top-k"),
        (("identify", "--top-k", "0", "x.jpg"), "--top-k"),
        (("init", "--dim", "0"), "--dim"),
        (("verify", "--id", "s0", "--threshold", "nan", "x.jpg"), "--threshold"),
        (("verify", "--id", "s0", "--threshold", "-5", "x.jpg"), "--threshold"),
        (("verify", "--id", "s0", "--threshold", "inf", "x.jpg"), "--threshold"),
        (("calibrate", "--far", "0"), "--far"),
        (("calibrate", "--far", "nan"), "--far"),
        (("enroll", "--id", "s0", "--min-face", "-1", "x.jpg"), "--min-face"),
        (("list", "--key-fd", "-1"), "--key-fd"),
        (("list", "--key-fd", "2"), "--key-fd"),
        (("list", "--key-fd", "99999999999999999999"), "--key-fd"),  # attack review: a traceback
        (("init", "--dim", "70000"), "--dim"),  # attack review: a store that never opens again
    ],
)
def test_each_bad_numeric_flag_is_one_line_exit_2(
    env: Path, capsys: Cap, argv: tuple[str, ...], flag: str
) -> None:
    one_line_error(*run(capsys, *argv), 2, flag)
    assert not (env / "store").exists()


def test_an_unreadable_image_is_one_line_exit_2(
    enrolled: Path, photos: dict, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = photos["0-happy"]
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # chmod 000 does not stop root: refuse like the kernel
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for argv in (("verify", "--id", "s0", str(locked)), ("enroll", "--id", "s5", str(locked))):
        one_line_error(*run(capsys, *argv), 2, "cannot read image", "Permission denied")


@pytest.mark.parametrize("action", [("init",), ("list",), ("delete", "--id", "s0")])
def test_store_pointing_at_a_file_is_one_line(
    env: Path, capsys: Cap, action: tuple[str, ...]
) -> None:
    file = env / "not-a-folder"
    file.write_text("x")
    one_line_error(*run(capsys, *action, "--store", str(file)), 2, "is a file")
    assert file.read_text() == "x"


# --- found by the attack review of the hardened CLI ------------------------------------------------


def test_a_key_command_printing_without_end_is_stopped_at_the_bound() -> None:
    endless = shlex.join(
        [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('A' * 65536)"]
    )
    with pytest.raises(KeyUnavailableError, match="printed more than 4096 bytes"):
        keys.read_key_command(endless, timeout_s=20)


def test_an_empty_key_command_is_an_error_not_the_default_key_file(env: Path, capsys: Cap) -> None:
    code, out, err = run(capsys, "init", "--key-command", "")
    one_line_error(code, out, err, 2, "--key-command is empty")
    assert not (env / "store").exists()


def test_an_endless_passphrase_on_stdin_is_one_line(
    env: Path, capsys: Cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 100_000))
    code, out, err = run(capsys, "init", "--passphrase", "--passphrase-stdin")
    one_line_error(code, out, err, 2, "longer than 4096 characters")
    assert not (env / "store").exists()


def test_folders_init_creates_above_the_store_are_private(env: Path, capsys: Cap) -> None:
    code, _, _ = run(capsys, "init", "--store", str(env / "new" / "deeper" / "store"))
    assert code == 0
    for folder in (env / "new", env / "new" / "deeper", env / "new" / "deeper" / "store"):
        assert folder.stat().st_mode & 0o077 == 0, folder
