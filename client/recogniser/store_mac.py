"""What authenticates a template store: its MAC key, and what each MAC covers.

Everything in the store that decides a match or whether a person exists is covered by HMAC-SHA256
under a key derived by HKDF-SHA256 from the store's master key, bound to a label and the store id
(``cryptography``'s primitives; nothing hand-made): every ``meta`` row (its name and value), every
identity's version and tombstone, and a state MAC over all of them, which catches a row removed or
put back. Fields are length-prefixed, so no field can shift into another. :mod:`client.recogniser.templates`
checks and writes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.crypto.keys import MasterKey

_MAC_LABEL = b"facefed/template-store-mac/v1\0"
MAC_SIZE = 32
STATE_ROW = "state"  # the meta row holding the state MAC


@dataclass(frozen=True)
class VersionState:
    """The authenticated last version issued to an identity, and whether it was deleted."""

    version: int
    deleted: bool


def length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def mac_key(master: MasterKey, store_id: str) -> bytes:
    """The store's MAC key: HKDF-SHA256 of the master key, bound to a label and the store id."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=MAC_SIZE,
        salt=None,
        info=_MAC_LABEL + store_id.encode(),
    )
    return hkdf.derive(master.secret)


def _hmac(key: bytes, kind: str, parts: tuple[bytes, ...]) -> hmac.HMAC:
    """HMAC-SHA256 over a kind label and length-prefixed fields (so fields cannot shift)."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(
        b"facefed-store-mac-v1"
        + length_prefixed(kind.encode())
        + b"".join(map(length_prefixed, parts))
    )
    return h


def mac(key: bytes, kind: str, *parts: bytes) -> bytes:
    return _hmac(key, kind, parts).finalize()


def mac_ok(key: bytes, tag: object, kind: str, *parts: bytes) -> bool:
    if not isinstance(tag, bytes) or len(tag) != MAC_SIZE:
        return False
    try:
        _hmac(key, kind, parts).verify(tag)  # constant-time comparison
    except InvalidSignature:
        return False
    return True


def meta_mac_parts(store_id: str, name: str, value: str) -> tuple[bytes, ...]:
    return store_id.encode(), name.encode(), value.encode()


def version_mac_parts(store_id: str, identity: str, state: VersionState) -> tuple[bytes, ...]:
    return (
        store_id.encode(),
        identity.encode(),
        state.version.to_bytes(8, "big"),
        bytes([int(state.deleted)]),
    )


def state_digest(meta: dict[str, str], versions: dict[str, VersionState]) -> bytes:
    """SHA-256 over every meta row (but ``state``) and every versions row, in sorted order."""
    h = hashlib.sha256()
    for name in sorted(meta):
        if name != STATE_ROW:
            h.update(b"m" + length_prefixed(name.encode()) + length_prefixed(meta[name].encode()))
    for identity in sorted(versions):
        state = versions[identity]
        h.update(b"v" + length_prefixed(identity.encode()))
        h.update(state.version.to_bytes(8, "big") + bytes([int(state.deleted)]))
    return h.digest()
