"""Ed25519 signing keys for the privacy ledger, and the canonical JSON that gets signed.

Sites sign each ledger entry with their own Ed25519 key; the coordinator countersigns. Keys are PEM
files: the private key is PKCS#8 (optionally passphrase-encrypted), written atomically with mode
0600, and refused on load when other users can read it. The public key is SubjectPublicKeyInfo PEM.

A signature covers bytes, so every structure is first encoded by :func:`canonical_bytes`: JSON with
sorted keys, no whitespace, UTF-8, finite numbers only. The same value always gives the same bytes,
and ``canonical_bytes(json.loads(canonical_bytes(x))) == canonical_bytes(x)`` so a verifier can
re-derive the signed bytes from what it parsed. No primitive is implemented here: everything is the
``cryptography`` package's Ed25519.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import atomic_write_bytes
from common.errors import ConfigError, IntegrityError

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "canonical_bytes",
    "fingerprint",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "public_key_from_bytes",
    "public_key_to_bytes",
    "save_private_key",
    "save_public_key",
    "sign",
    "verify",
]


def _check_json_value(value: Any, where: str) -> Any:
    """Return ``value`` with tuples as lists; raise on anything JSON cannot encode exactly."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot sign non-finite number {value!r} at {where}")
        return value
    if isinstance(value, list | tuple):
        return [_check_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"cannot sign non-string key {key!r} at {where}")
            out[key] = _check_json_value(item, f"{where}.{key}")
        return out
    raise ValueError(f"cannot sign value of type {type(value).__name__} at {where}")


def canonical_bytes(value: Any) -> bytes:
    """Encode a JSON-able value as canonical JSON bytes (sorted keys, compact, UTF-8).

    Args:
        value: dicts with string keys, lists/tuples, str, int, finite float, bool or None.

    Returns:
        The canonical encoding, suitable for signing and hashing.

    Raises:
        ValueError: if the value holds NaN/inf, non-string keys or non-JSON types.
    """
    checked = _check_json_value(value, "$")
    text = json.dumps(
        checked, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def generate_private_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key (from the OS CSPRNG, via ``cryptography``)."""
    return Ed25519PrivateKey.generate()


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """Return True iff ``signature`` is a valid Ed25519 signature of ``data`` under the key."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def public_key_to_bytes(public_key: Ed25519PublicKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """Parse 32 raw bytes as an Ed25519 public key.

    Raises:
        IntegrityError: if the bytes are not a valid Ed25519 public key.
    """
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise IntegrityError(
            f"invalid Ed25519 public key ({len(raw)} bytes, expected 32); "
            "re-export the key with `facefed audit keygen`"
        ) from exc


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Return a short, human-comparable key fingerprint: ``SHA256:`` + 32 hex digits."""
    return "SHA256:" + hashlib.sha256(public_key_to_bytes(public_key)).hexdigest()[:32]


def save_private_key(
    private_key: Ed25519PrivateKey, path: str | os.PathLike[str], passphrase: bytes | None = None
) -> None:
    """Write the private key as PKCS#8 PEM, atomically, readable by the owner only (0600)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    atomic_write_bytes(path, pem, mode=0o600)


def save_public_key(public_key: Ed25519PublicKey, path: str | os.PathLike[str]) -> None:
    """Write the public key as SubjectPublicKeyInfo PEM, atomically (0644)."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(path, pem, mode=0o644)


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"key file {path} does not exist; create one with `facefed audit keygen`"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}; check its path") from exc


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None
) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM, refusing files that group or others can read.

    Raises:
        ConfigError: missing/unreadable file, loose permissions, wrong passphrase or not Ed25519.
    """
    key_path = Path(path)
    data = _read_key_file(key_path)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"private key {key_path} is readable by other users (mode {mode:o}); "
            f"run `chmod 600 {key_path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot load private key {key_path}: wrong passphrase or not a PEM key; "
            "check the passphrase or regenerate the key"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{key_path} is not an Ed25519 key; generate one with `facefed audit keygen`"
        )
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM.

    Raises:
        ConfigError: missing/unreadable file or not an Ed25519 public key.
    """
    key_path = Path(path)
    data = _read_key_file(key_path)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(
            f"{key_path} is not a PEM public key; export it with `facefed audit keygen`"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{key_path} is not an Ed25519 public key; use an Ed25519 key")
    return key
