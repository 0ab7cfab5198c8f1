"""Envelope encryption: each payload under its own AES-256-GCM data key, wrapped by a master key.

Format of one sealed record (:class:`Envelope`), all fields stored side by side:

* ``nonce`` (12 bytes) and ``ciphertext`` (payload + 16-byte GCM tag): the payload under a fresh
  random 256-bit data key, with associated data ``b"facefed/data/v1\\0" + aad``;
* ``wrap_nonce`` (12 bytes) and ``wrapped_key`` (32 + 16 bytes): the data key under the wrapping key
  with AES-256-GCM and associated data ``b"facefed/wrap/v1\\0" + aad``.

Binding ``aad`` (identity, record version, store id...) into both layers means a record, or just its
wrapped key, moved to another identity or version fails authentication. Key rotation
(:func:`rewrap`) replaces only ``wrap_nonce`` and ``wrapped_key``; the payload ciphertext is
untouched.

Only primitives from ``cryptography`` are used (NIST SP 800-38D GCM); nonces are 96-bit random
values, safe for far more than the 2**32 messages per key that SP 800-38D allows with random nonces.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
WRAPPED_KEY_SIZE = KEY_SIZE + TAG_SIZE
_DATA_DOMAIN = b"facefed/data/v1\0"
_WRAP_DOMAIN = b"facefed/wrap/v1\0"

RandBytes = Callable[[int], bytes]


@dataclass(frozen=True, repr=False)
class Envelope:
    """One sealed payload: its GCM nonce and ciphertext, and its wrapped data key."""

    nonce: bytes
    ciphertext: bytes
    wrap_nonce: bytes
    wrapped_key: bytes

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE or len(self.wrap_nonce) != NONCE_SIZE:
            raise IntegrityError(
                f"envelope nonce has the wrong length (expected {NONCE_SIZE} bytes); "
                "the record is damaged: delete it and enrol again"
            )
        if len(self.wrapped_key) != WRAPPED_KEY_SIZE or len(self.ciphertext) < TAG_SIZE:
            raise IntegrityError(
                "envelope wrapped key or ciphertext has the wrong length; "
                "the record is damaged: delete it and enrol again"
            )

    def __repr__(self) -> str:
        return f"Envelope(ciphertext={len(self.ciphertext)} bytes)"


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")


def wrap_key(
    wrapping_key: bytes, data_key: bytes, aad: bytes, randbytes: RandBytes = os.urandom
) -> tuple[bytes, bytes]:
    """Wrap ``data_key`` under ``wrapping_key``; return ``(wrap_nonce, wrapped_key)``."""
    _check_key(wrapping_key, "wrapping key")
    _check_key(data_key, "data key")
    nonce = randbytes(NONCE_SIZE)
    return nonce, AESGCM(wrapping_key).encrypt(nonce, data_key, _WRAP_DOMAIN + aad)


def unwrap_key(wrapping_key: bytes, wrap_nonce: bytes, wrapped_key: bytes, aad: bytes) -> bytes:
    """Unwrap a data key.

    Raises:
        IntegrityError: wrong wrapping key, tampered wrapped key or nonce, or different ``aad``.
    """
    _check_key(wrapping_key, "wrapping key")
    try:
        return AESGCM(wrapping_key).decrypt(wrap_nonce, wrapped_key, _WRAP_DOMAIN + aad)
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError(
            "a wrapped data key failed authentication: wrong master key, or the record was "
            "tampered with or moved to another identity; use the right key, or delete and re-enrol"
        ) from exc


def seal(
    wrapping_key: bytes, plaintext: bytes, aad: bytes, randbytes: RandBytes = os.urandom
) -> Envelope:
    """Encrypt ``plaintext`` under a fresh data key and wrap that key under ``wrapping_key``."""
    data_key = randbytes(KEY_SIZE)
    nonce = randbytes(NONCE_SIZE)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, _DATA_DOMAIN + aad)
    wrap_nonce, wrapped = wrap_key(wrapping_key, data_key, aad, randbytes)
    return Envelope(nonce=nonce, ciphertext=ciphertext, wrap_nonce=wrap_nonce, wrapped_key=wrapped)


def open_envelope(wrapping_key: bytes, envelope: Envelope, aad: bytes) -> bytes:
    """Decrypt an :class:`Envelope` sealed with the same ``aad``.

    Raises:
        IntegrityError: if any byte of the envelope, the key or the associated data differs.
    """
    data_key = unwrap_key(wrapping_key, envelope.wrap_nonce, envelope.wrapped_key, aad)
    try:
        return AESGCM(data_key).decrypt(envelope.nonce, envelope.ciphertext, _DATA_DOMAIN + aad)
    except InvalidTag as exc:
        raise IntegrityError(
            "an encrypted template failed authentication: its ciphertext or nonce was tampered "
            "with or it belongs to another identity; delete it and enrol again"
        ) from exc


def rewrap(
    old_key: bytes,
    new_key: bytes,
    envelope: Envelope,
    aad: bytes,
    randbytes: RandBytes = os.urandom,
) -> Envelope:
    """Re-wrap an envelope's data key under ``new_key`` without touching its ciphertext.

    Raises:
        IntegrityError: if ``old_key`` does not open the wrapped key.
    """
    data_key = unwrap_key(old_key, envelope.wrap_nonce, envelope.wrapped_key, aad)
    wrap_nonce, wrapped = wrap_key(new_key, data_key, aad, randbytes)
    return Envelope(
        nonce=envelope.nonce,
        ciphertext=envelope.ciphertext,
        wrap_nonce=wrap_nonce,
        wrapped_key=wrapped,
    )
