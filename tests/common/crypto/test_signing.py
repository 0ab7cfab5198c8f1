"""Ed25519 signing and canonical JSON: round trip, wrong key, tampered byte, key-file hygiene."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from common.crypto.signing import (
    canonical_bytes,
    fingerprint,
    generate_private_key,
    load_private_key,
    load_public_key,
    public_key_from_bytes,
    public_key_to_bytes,
    save_private_key,
    save_public_key,
    sign,
    verify,
)
from common.errors import ConfigError, IntegrityError


def test_sign_then_verify_round_trips() -> None:
    key = generate_private_key()
    data = canonical_bytes({"round": 1, "epsilon": 0.5})

    assert verify(key.public_key(), data, sign(key, data))


def test_wrong_key_tampered_byte_and_swapped_message_fail() -> None:
    key, other = generate_private_key(), generate_private_key()
    first, second = b"entry one", b"entry two"
    signature = sign(key, first)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]

    assert not verify(other.public_key(), first, signature)
    assert not verify(key.public_key(), first, tampered)
    assert not verify(key.public_key(), second, signature)


def test_canonical_bytes_ignore_key_order_and_survive_a_json_round_trip() -> None:
    value = {"b": [1, 2.5, None, True], "a": {"z": "é", "y": 1e-05}}

    encoded = canonical_bytes(value)

    assert encoded == canonical_bytes({"a": {"y": 1e-05, "z": "é"}, "b": (1, 2.5, None, True)})
    assert canonical_bytes(json.loads(encoded)) == encoded
    assert b" " not in encoded


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "x"}, b"bytes", {1, 2}])
def test_canonical_bytes_refuse_values_that_do_not_round_trip(bad: object) -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        canonical_bytes({"value": bad})


def test_key_files_round_trip_and_private_key_is_owner_only(tmp_path: Path) -> None:
    key = generate_private_key()
    save_private_key(key, tmp_path / "site.pem")
    save_public_key(key.public_key(), tmp_path / "site.pub")

    loaded = load_private_key(tmp_path / "site.pem")
    public = load_public_key(tmp_path / "site.pub")

    assert stat.S_IMODE((tmp_path / "site.pem").stat().st_mode) == 0o600
    assert fingerprint(loaded.public_key()) == fingerprint(public) == fingerprint(key.public_key())


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    save_private_key(generate_private_key(), tmp_path / "site.pem")
    os.chmod(tmp_path / "site.pem", 0o644)

    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(tmp_path / "site.pem")


def test_passphrase_protected_key_needs_the_passphrase(tmp_path: Path) -> None:
    save_private_key(generate_private_key(), tmp_path / "site.pem", passphrase=b"correct horse")

    assert load_private_key(tmp_path / "site.pem", passphrase=b"correct horse")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_private_key(tmp_path / "site.pem", passphrase=b"wrong")


def test_missing_key_file_and_bad_raw_key_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="facefed audit keygen"):
        load_public_key(tmp_path / "absent.pub")
    with pytest.raises(IntegrityError, match="expected 32"):
        public_key_from_bytes(b"short")
    raw = public_key_to_bytes(generate_private_key().public_key())
    assert public_key_to_bytes(public_key_from_bytes(raw)) == raw
