"""The site's Ed25519 signing key for ledger entries.

In a deployment the key is a file the site keeps (``node_config["site-key"]``, created with
``facefed audit keygen``); it never leaves the site. In a simulation each virtual site generates its key
at its first round and keeps it in its own ``Context.state``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from flwr.app import ConfigRecord, RecordDict

from common.crypto.signing import generate_private_key, load_private_key

STATE_KEY = "site-signing-key"


def site_signing_key(state: RecordDict, node_config: Mapping[str, object]) -> Ed25519PrivateKey:
    """The site's key: from ``node_config["site-key"]`` if set, else kept in ``Context.state``."""
    path = node_config.get("site-key")
    if path:
        return load_private_key(str(path))
    if STATE_KEY in state.config_records:
        raw = state.config_records[STATE_KEY]["raw"]
        return Ed25519PrivateKey.from_private_bytes(raw)  # type: ignore[arg-type]
    key = generate_private_key()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    state.config_records[STATE_KEY] = ConfigRecord({"raw": raw})
    return key
