"""The site master key: a random 256-bit key in a 0600 key file, or one derived from a passphrase.

Nothing stored next to the template database reveals the key. The store keeps only a
:class:`KeyInfo`: the kind of key, scrypt's salt and cost parameters for a passphrase, and a
*verifier*: 32 bytes derived from the key with HKDF under a label of their own (RFC 5869). HKDF is
one-way, so the verifier identifies the right key (a wrong passphrase gets a clear error instead of
a wall of failed records) without disclosing it. Templates are wrapped with a second HKDF output,
:attr:`MasterKey.wrapping_key`.

Passphrases go through scrypt (Percival 2009; RFC 7914) with n=2**15, r=8, p=1 by default (32 MiB,
about 0.1 s). Key files and passphrase files that group or others can read are refused, like ``ssh``
does.

An institution can keep the random key in its own secret manager instead of a file: a
configured command prints it (:func:`read_key_command`, run without a shell, with a timeout) or the
caller hands it over on an open file descriptor (:func:`read_key_fd`). Either way the key never
appears on a command line, where ``ps`` would show it. The text is the base64 of 32 random bytes
(``openssl rand -base64 32``) or a key-file line. The store cannot tell where a random key came
from (kind ``"keyfile"`` either way), so a key can move from a file into a secret manager.

Rotating a key-file key is crash-safe in three steps (see :func:`stage_key_file`): the new key is
written to ``<key file>.new``; the store re-wraps every record and records the new verifier in one
SQLite transaction; then ``.new`` is renamed over the key file. :func:`load_key_file` finishes or
discards an interrupted rotation by checking both files against the verifier the store holds.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import selectors
import shlex
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.atomic import atomic_write_text
from common.crypto.envelope import KEY_SIZE, RandBytes
from common.errors import ConfigError, IntegrityError, KeyUnavailableError

KeyKind = Literal["keyfile", "passphrase"]  # "keyfile": a random key, from a file, command or fd
KEY_COMMAND_TIMEOUT_S = 30.0
MAX_KEY_TEXT_BYTES = 4096
KEY_FILE_HEADER = "facefed-master-key-v1"
MIN_PASSPHRASE_CHARS = 8
MIN_SCRYPT_N = 2**14
SALT_SIZE = 16
_VERIFIER_LABEL = b"facefed/key-verifier/v1"
_WRAPPING_LABEL = b"facefed/template-wrapping-key/v1"


def _hkdf(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label).derive(secret)


@dataclass(frozen=True, kw_only=True)
class ScryptParams:
    """scrypt salt and cost parameters, stored with the template database."""

    salt: bytes
    n: int = 2**15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if len(self.salt) < SALT_SIZE:
            raise ConfigError(
                f"scrypt salt must be at least {SALT_SIZE} bytes, got {len(self.salt)}"
            )
        if self.n < MIN_SCRYPT_N or self.n & (self.n - 1):
            raise ConfigError(f"scrypt n must be a power of two >= {MIN_SCRYPT_N}, got {self.n}")
        if self.r < 1 or self.p < 1:
            raise ConfigError(f"scrypt r and p must be >= 1, got r={self.r} p={self.p}")


@dataclass(frozen=True, kw_only=True)
class KeyInfo:
    """What the store records about its master key: never the key itself."""

    kind: KeyKind
    verifier: bytes
    scrypt: ScryptParams | None = None

    def __post_init__(self) -> None:
        if (self.kind == "passphrase") != (self.scrypt is not None):
            raise ConfigError("a passphrase key needs scrypt parameters and a key file has none")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the store's metadata table."""
        out: dict[str, Any] = {"kind": self.kind, "verifier": self.verifier.hex()}
        if self.scrypt is not None:
            s = self.scrypt
            out["scrypt"] = {"salt": s.salt.hex(), "n": s.n, "r": s.r, "p": s.p}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyInfo:
        """Inverse of :meth:`to_dict`."""
        try:
            raw = data.get("scrypt")
            params = (
                None
                if raw is None
                else ScryptParams(
                    salt=bytes.fromhex(raw["salt"]), n=raw["n"], r=raw["r"], p=raw["p"]
                )
            )
            return cls(kind=data["kind"], verifier=bytes.fromhex(data["verifier"]), scrypt=params)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(
                f"the store's key metadata is malformed ({exc}); restore the store from a backup"
            ) from exc


@dataclass(frozen=True, repr=False)
class MasterKey:
    """A verified site master key. ``repr`` never shows the secret."""

    secret: bytes
    info: KeyInfo

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise ValueError(f"master key must be {KEY_SIZE} bytes, got {len(self.secret)}")

    @property
    def wrapping_key(self) -> bytes:
        """The AES-256 key that wraps template data keys (HKDF of the master key)."""
        return _hkdf(self.secret, _WRAPPING_LABEL)

    def __repr__(self) -> str:
        return f"MasterKey(kind={self.info.kind!r})"


def key_verifier(secret: bytes) -> bytes:
    """The one-way fingerprint of a master key that the store keeps to recognise it."""
    return _hkdf(secret, _VERIFIER_LABEL)


def matches(secret: bytes, info: KeyInfo) -> bool:
    """Whether ``secret`` is the key that ``info`` describes (constant-time comparison)."""
    return hmac.compare_digest(key_verifier(secret), info.verifier)


def _check_private(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path} is not a regular file; point to the file itself")
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is readable or writable by group/others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )


def _encode_key_file(secret: bytes) -> str:
    return f"{KEY_FILE_HEADER} {base64.b64encode(secret).decode('ascii')}\n"


def _read_key_secret(path: Path) -> bytes:
    if not path.exists():
        raise KeyUnavailableError(
            f"master key file {path} not found; pass --key-file PATH or set FACEFED_SITE_KEY "
            "to the key file created by `facefed site init` (or --key-command / --key-fd if "
            "the key is in a secret manager)"
        )
    _check_private(path, "master key file")
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise KeyUnavailableError(f"cannot read master key file {path} ({exc.strerror})") from None
    header, _, body = text.partition(" ")
    try:
        secret = base64.b64decode(body, validate=True) if header == KEY_FILE_HEADER else b""
    except ValueError:
        secret = b""
    if len(secret) != KEY_SIZE:
        raise KeyUnavailableError(
            f"{path} is not a facefed master key file; point --key-file to the file written by "
            "`facefed site init`"
        )
    return secret


def new_key_file(path: Path, randbytes: RandBytes = os.urandom) -> MasterKey:
    """Create a fresh random master key in a new 0600 file; refuse to overwrite an existing one."""
    if path.exists():
        raise ConfigError(f"key file {path} already exists; choose another path or remove it first")
    secret = randbytes(KEY_SIZE)
    atomic_write_text(path, _encode_key_file(secret), mode=0o600)
    return MasterKey(secret, KeyInfo(kind="keyfile", verifier=key_verifier(secret)))


def pending_key_path(path: Path) -> Path:
    """Where a rotation stages the next key before the store commits to it."""
    return path.with_name(path.name + ".new")


def stage_key_file(path: Path, randbytes: RandBytes = os.urandom) -> MasterKey:
    """Write a new random key to ``<path>.new`` (0600) for a rotation (:func:`commit_key_file`)."""
    secret = randbytes(KEY_SIZE)
    atomic_write_text(pending_key_path(path), _encode_key_file(secret), mode=0o600)
    return MasterKey(secret, KeyInfo(kind="keyfile", verifier=key_verifier(secret)))


def commit_key_file(path: Path) -> None:
    """Atomically replace the key file by the staged ``.new`` key (after the store committed)."""
    os.replace(pending_key_path(path), path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key_file(path: Path, info: KeyInfo) -> MasterKey:
    """Load and verify the master key from ``path``, completing an interrupted rotation if needed.

    Raises:
        ConfigError: missing, malformed or group/world-accessible key file.
        IntegrityError: the file holds a key that is not this store's.
    """
    if info.kind != "keyfile":
        raise ConfigError(
            "this store is protected by a passphrase, not a key file; pass --passphrase-file PATH "
            "or --passphrase-env VAR"
        )
    pending = pending_key_path(path)
    if pending.exists() and not path.exists():
        raise KeyUnavailableError(
            f"key file {path} is missing but {pending} exists; restore {path}"
        )
    secret = _read_key_secret(path)
    if matches(secret, info):
        if pending.exists():  # rotation interrupted before the store committed: discard the new key
            with contextlib.suppress(FileNotFoundError):
                pending.unlink()
        return MasterKey(secret, info)
    if pending.exists():
        staged = _read_key_secret(pending)
        if matches(staged, info):  # store committed, rename did not happen: finish the rotation
            commit_key_file(path)
            return MasterKey(staged, info)
    raise IntegrityError(
        f"key file {path} does not hold this store's master key; pass the key file that was "
        "created for this store (after rotate-key, the old key no longer opens it)"
    )


def _derive(passphrase: str, params: ScryptParams) -> bytes:
    kdf = Scrypt(salt=params.salt, length=KEY_SIZE, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode("utf-8"))


def new_passphrase_key(
    passphrase: str,
    *,
    n: int = 2**15,
    r: int = 8,
    p: int = 1,
    randbytes: RandBytes = os.urandom,
) -> MasterKey:
    """Derive a new master key from ``passphrase`` with a fresh random salt."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ConfigError(
            f"the passphrase is too short ({len(passphrase)} characters); use at least "
            f"{MIN_PASSPHRASE_CHARS}"
        )
    params = ScryptParams(salt=randbytes(SALT_SIZE), n=n, r=r, p=p)
    secret = _derive(passphrase, params)
    return MasterKey(
        secret, KeyInfo(kind="passphrase", verifier=key_verifier(secret), scrypt=params)
    )


def passphrase_key(passphrase: str, info: KeyInfo) -> MasterKey:
    """Derive and verify this store's master key from ``passphrase``.

    Raises:
        ConfigError: the store uses a key file.
        IntegrityError: wrong passphrase.
    """
    if info.scrypt is None:
        raise ConfigError(
            "this store is protected by a key file, not a passphrase; pass --key-file PATH "
            "or set FACEFED_SITE_KEY"
        )
    secret = _derive(passphrase, info.scrypt)
    if not matches(secret, info):
        raise IntegrityError("wrong passphrase for this template store; check it and try again")
    return MasterKey(secret, info)


def read_passphrase_file(path: Path) -> str:
    """Read a passphrase from a private file (first line, without the newline)."""
    if not path.exists():
        raise ConfigError(f"passphrase file {path} not found; check --passphrase-file")
    _check_private(path, "passphrase file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyUnavailableError(f"cannot read passphrase file {path} ({exc})") from None
    return lines[0] if lines else ""


def parse_key_text(data: bytes, source: str) -> bytes:
    """The 32-byte key in ``data``: base64 of the key, or a key-file line; else one-line error."""
    text = data.decode("ascii", errors="replace").strip()
    header, _, body = text.partition(" ")
    if header == KEY_FILE_HEADER:
        text = body.strip()
    try:
        secret = base64.b64decode(text, validate=True)
    except ValueError:
        secret = b""
    if len(secret) != KEY_SIZE:
        raise KeyUnavailableError(
            f"{source} did not give a facefed master key; it must print the base64 of "
            f"{KEY_SIZE} random bytes (e.g. made once by `openssl rand -base64 {KEY_SIZE}`)"
        )
    return secret


def read_key_command(command: str, *, timeout_s: float = KEY_COMMAND_TIMEOUT_S) -> bytes:
    """Run ``command`` (split with :func:`shlex.split`, no shell) and read the key from its stdout.

    Its error output is never shown: a secret manager may echo what it was asked for.

    Raises:
        ConfigError: the command line is empty or unbalanced.
        KeyUnavailableError: the command is missing, times out, fails or prints no key.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"--key-command is not a valid command line ({exc})") from None
    if not argv:
        raise ConfigError("--key-command is empty; give the secret manager's command")
    name = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(  # the operator's configured command, no shell
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise KeyUnavailableError(
            f"key command {name!r} not found; check --key-command and PATH"
        ) from None
    except OSError as exc:
        raise KeyUnavailableError(
            f"key command {name!r} could not start ({exc.strerror}); check --key-command"
        ) from None
    try:
        output = _bounded_output(proc, name, timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        raise KeyUnavailableError(
            f"key command {name!r} failed with exit code {proc.returncode}; run it by hand to "
            "see why (is this user logged in to the secret manager?)"
        )
    return parse_key_text(output, f"key command {name!r}")


def _bounded_output(proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> bytes:
    """Everything ``proc`` prints until it exits, within ``timeout_s`` and MAX_KEY_TEXT_BYTES.

    Read as it comes, so that a command printing without end is stopped at the bound instead of
    being buffered whole (``subprocess.run`` would hold all of it in memory until the timeout).
    """
    if proc.stdout is None:
        raise RuntimeError("the key command was started without a stdout pipe")
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout_s
    output = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KeyUnavailableError(
                    f"key command {name!r} did not answer within {timeout_s:g} s; check that the "
                    "secret manager is reachable"
                )
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output += chunk
            if len(output) > MAX_KEY_TEXT_BYTES:
                raise KeyUnavailableError(
                    f"key command {name!r} printed more than {MAX_KEY_TEXT_BYTES} bytes; it must "
                    "print the key alone"
                )
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise KeyUnavailableError(
            f"key command {name!r} did not exit within {timeout_s:g} s; check that the secret "
            "manager is reachable"
        ) from None
    return bytes(output)


def read_key_fd(fd: int) -> bytes:
    """Read the key from the open file descriptor ``fd`` (then closed), e.g. ``3<key.txt``."""
    try:
        with os.fdopen(fd, "rb", closefd=True) as stream:
            data = stream.read(MAX_KEY_TEXT_BYTES)
    except OverflowError:
        raise KeyUnavailableError(f"{fd} is not a file descriptor number") from None
    except OSError as exc:
        raise KeyUnavailableError(
            f"cannot read the key from file descriptor {fd} ({exc.strerror}); open it for the "
            f"command, e.g. `{fd}<keyfile`"
        ) from None
    return parse_key_text(data, f"file descriptor {fd}")


def new_external_key(secret: bytes) -> MasterKey:
    """A new store's random master key held by an external secret manager (kind ``keyfile``)."""
    if len(secret) != KEY_SIZE:
        raise KeyUnavailableError(f"an external master key must be {KEY_SIZE} bytes")
    return MasterKey(secret, KeyInfo(kind="keyfile", verifier=key_verifier(secret)))


def external_key(secret: bytes, info: KeyInfo) -> MasterKey:
    """Verify that ``secret`` (from a key command or fd) is this store's master key."""
    if info.kind != "keyfile":
        raise ConfigError(
            "this store is protected by a passphrase, not a random key; pass --passphrase-file "
            "PATH, --passphrase-env VAR or --passphrase-stdin"
        )
    if not matches(secret, info):
        raise IntegrityError(
            "the key from the secret manager does not open this template store; check that "
            "--key-command / --key-fd gives this store's key"
        )
    return MasterKey(secret, info)
