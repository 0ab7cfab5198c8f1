"""Fuzzing the ``facefed site`` command line: whatever flags a careless operator types, the only
thing that escapes is facefed's one-line error with a code from docs/exit-codes.md (never a
traceback, never another exit code). Hypothesis, derandomized so CI is reproducible.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import io
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.cli import main

DOCUMENTED_CODES = {0, 1, 2, 3, 4}
ACTIONS = (
    "init",
    "enroll",
    "verify",
    "identify",
    "emotion",
    "rotate-key",
    "delete",
    "calibrate",
    "list",
)
KEY_B64 = base64.b64encode(bytes(range(32))).decode()


def _py(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


NUMBER = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-inf", "1e999", "", "abc", "0x10", " 3", "-0", "1_000", "٣"]),
)
COMMAND = st.sampled_from(
    [
        _py(f"print({KEY_B64!r})"),
        _py("print('junk')"),
        _py("import sys; sys.exit(7)"),
        "/nonexistent/vault kv get -field=key secret/facefed",
        "'unbalanced",
        "",
    ]
)
PLACE = st.sampled_from(["store", "shared", "file", "open.key", "missing/deep", "dir", "photo"])
FLAG = st.one_of(
    st.tuples(st.sampled_from(["--top-k", "--dim", "--threshold", "--far", "--min-face"]), NUMBER),
    st.tuples(st.sampled_from(["--key-fd", "--new-key-fd"]), st.sampled_from(["pipe", "-1", "x"])),
    st.tuples(st.sampled_from(["--key-command", "--new-key-command"]), COMMAND),
    st.tuples(
        st.sampled_from(["--store", "--key-file", "--passphrase-file", "--new-passphrase-file"]),
        PLACE,
    ),
    st.tuples(
        st.sampled_from(["--passphrase-env", "--new-passphrase-env"]),
        st.sampled_from(["PW", "UNSET"]),
    ),
    st.tuples(st.just("--id"), st.text(max_size=12)),
    st.tuples(st.sampled_from(["--lfw-sets", "--pairs"]), st.text(max_size=6)),
    st.sampled_from(["--passphrase", "--passphrase-stdin", "--json", "--largest"]).map(
        lambda flag: (flag,)
    ),
)


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    """A store, a shared folder, a plain file, a group-readable key and a non-image, in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp)
        for name in ("FACEFED_SITE_KEY", "FACEFED_SITE_PASSPHRASE", "FACEFED_SITE_KEY_COMMAND"):
            mp.delenv(name, raising=False)
        mp.setenv("FACEFED_SITE_DIR", str(root / "store"))
        mp.setenv("FACEFED_KEY_DIR", str(root / "keys"))
        mp.setenv("FACEFED_CHECKPOINT", str(root / "missing.ckpt"))
        mp.setenv("PW", "a long passphrase")
        mp.delenv("UNSET", raising=False)
        mp.setattr(sys, "stdin", io.StringIO("a long passphrase\n"))
        mp.setattr(getpass, "getpass", _no_terminal)
        assert main(["site", "init"]) == 0
        (root / "shared").mkdir(mode=0o777)
        (root / "shared").chmod(0o1777)
        (root / "file").write_text("not a folder, a key or an image\n")
        (root / "open.key").write_text(f"facefed-master-key-v1 {KEY_B64}\n")
        (root / "open.key").chmod(0o644)
        (root / "dir").mkdir()
        (root / "photo").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
        yield root


def _no_terminal(prompt: str = "") -> str:
    raise AssertionError(f"prompted {prompt!r} although standard input is not a terminal")


def _argv(root: Path, action: str, flags: list[tuple[str, ...]], images: list[str]) -> list[str]:
    argv = ["site", action]
    for flag in flags:
        argv.append(flag[0])
        if len(flag) == 1:
            continue
        value = flag[1]
        if value == "pipe":
            read_end, write_end = os.pipe()
            os.write(write_end, f"{KEY_B64}\n".encode())
            os.close(write_end)
            value = str(read_end)
        elif flag[0] in {"--store", "--key-file", "--passphrase-file", "--new-passphrase-file"}:
            value = str(root / value)
        argv.append(value)
    return argv + [str(root / name) for name in images]


@settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    action=st.sampled_from(ACTIONS),
    flags=st.lists(FLAG, max_size=5),
    images=st.lists(st.sampled_from(["photo", "dir", "nowhere.jpg", "file"]), max_size=2),
)
def test_site_flags_only_ever_give_one_line_errors_with_documented_codes(
    action: str, flags: list[tuple[str, ...]], images: list[str]
) -> None:
    with _workspace() as root:
        argv = _argv(root, action, flags, images)
        err_buf, out_buf = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err_buf), contextlib.redirect_stdout(out_buf):
            code = main(argv)
        err = err_buf.getvalue()
        event(f"exit {code}")
        assert code in DOCUMENTED_CODES, (argv, code, err)
        assert "Traceback" not in err, argv
        if code >= 2:
            assert err.count("\n") == 1 and err.startswith("facefed: error: "), (argv, err)
            assert out_buf.getvalue() == "", argv
        assert (root / "shared").stat().st_mode & 0o7777 == 0o1777  # never chmodded
