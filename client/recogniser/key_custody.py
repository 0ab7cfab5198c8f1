"""Where a site's template-store master key comes from, and how the store is unlocked.

A key file (default ``~/.config/facefed/keys/ID.key``, apart from the store folder), a passphrase
(prompted twice when new; from standard input only with ``--passphrase-stdin``), or a key held by the
institution's secret manager: ``--key-command CMD`` (run without a shell) or ``--key-fd N``. The key
is never a command-line argument. The default key file protects a copy of the store on its own, not
against whoever can read the home directory or the disk (:data:`KEY_FILE_CUSTODY`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from client.recogniser.templates import TemplateStore
from common.crypto import keys
from common.errors import ConfigError, KeyUnavailableError

KEY_ENV = "FACEFED_SITE_KEY"
KEY_COMMAND_ENV = "FACEFED_SITE_KEY_COMMAND"
PASSPHRASE_ENV = "FACEFED_SITE_PASSPHRASE"
KEY_DIR_ENV = "FACEFED_KEY_DIR"
KEY_FILE_CUSTODY = (
    "the key file protects a copy of the store on its own (a stolen backup or synced folder); it "
    "does not protect against whoever can read this home directory or disk: for that, use "
    "--passphrase or the institution's secret manager (--key-command / --key-fd)"
)


def env_path(name: str) -> Path | None:
    """The path in environment variable ``name``, if set."""
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def default_key_path(store_id: str) -> Path:
    directory = env_path(KEY_DIR_ENV) or Path.home() / ".config" / "facefed" / "keys"
    return directory / f"{store_id}.key"


def key_path(args: argparse.Namespace, store_id: str) -> Path:
    return Path(args.key_file or env_path(KEY_ENV) or default_key_path(store_id)).expanduser()


MAX_PASSPHRASE_CHARS = 4096


def stdin_passphrase() -> str:
    line = sys.stdin.readline(MAX_PASSPHRASE_CHARS + 1)  # bounded: stdin may be endless
    if not line:
        raise ConfigError("--passphrase-stdin: standard input is empty; pipe the passphrase in")
    if len(line.rstrip("\r\n")) > MAX_PASSPHRASE_CHARS:
        raise ConfigError(
            f"--passphrase-stdin: the first line is longer than {MAX_PASSPHRASE_CHARS} characters; "
            "pipe in the passphrase alone"
        )
    return line.rstrip("\r\n")


def read_passphrase(
    file: Path | None, env_name: str | None, from_stdin: bool, prompt: str, *, new: bool = False
) -> str | None:
    """The passphrase from a file, a variable, stdin (only if asked) or a terminal prompt.

    A ``new`` passphrase typed at the prompt is asked twice; a mismatch is refused.
    """
    if file is not None:
        return keys.read_passphrase_file(Path(file))
    if env_name:
        if env_name not in os.environ:
            raise ConfigError(f"environment variable {env_name} (from --passphrase-env) is not set")
        return os.environ[env_name]
    if from_stdin:
        return stdin_passphrase()
    if not prompt or not sys.stdin.isatty():
        return None
    passphrase = getpass.getpass(prompt)
    if new and getpass.getpass("repeat the passphrase: ") != passphrase:
        raise ConfigError("the two passphrases differ; nothing was changed, try again")
    return passphrase


def no_tty_passphrase(what: str) -> ConfigError:
    return ConfigError(
        f"{what}, but standard input is not a terminal; pass --passphrase-file PATH, "
        "--passphrase-env VAR, or --passphrase-stdin to read it from standard input"
    )


def uses_external_key(args: argparse.Namespace) -> bool:
    """Whether the random key comes from a secret manager (command or fd) rather than a file."""
    if args.key_file is not None:
        return False
    return (
        args.key_command is not None  # an empty --key-command is an error, not "no command"
        or args.key_fd is not None
        or bool(os.environ.get(KEY_COMMAND_ENV))
    )


def external_secret(command: str | None, fd: int | None, *, env: bool = True) -> bytes | None:
    """The key from a secret-manager command or a file descriptor, if either is configured."""
    if fd is not None:
        return keys.read_key_fd(fd)
    if command is None and env:
        command = os.environ.get(KEY_COMMAND_ENV)
    return keys.read_key_command(command) if command is not None else None


def unlock(store: TemplateStore, args: argparse.Namespace) -> None:
    info = store.key_info
    external = info.kind == "keyfile" and uses_external_key(args)
    secret = external_secret(args.key_command, args.key_fd) if external else None
    if secret is not None:
        store.unlock(keys.external_key(secret, info))
        return
    if info.kind == "keyfile":
        store.unlock(keys.load_key_file(key_path(args, store.store_id), info))
        return
    passphrase = read_passphrase(
        args.passphrase_file, args.passphrase_env, args.passphrase_stdin, ""
    )
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase is None and sys.stdin.isatty():
        passphrase = getpass.getpass("store passphrase: ")
    if passphrase is None:
        raise KeyUnavailableError(
            "this store is protected by a passphrase; pass --passphrase-file PATH, "
            f"--passphrase-env VAR or --passphrase-stdin, or set {PASSPHRASE_ENV}"
        )
    store.unlock(keys.passphrase_key(passphrase, info))
