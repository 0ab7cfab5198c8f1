"""Signed kits: a manifest of every kit file's SHA-256, signed by the provisioning key.

``facefed deploy init`` creates an Ed25519 *provisioning key* outside the kits
(``OUT/provisioning/provisioning.key``, 0600; or reuses one given with ``--provisioning-key``) and
writes into each kit ``kit-manifest.json`` (the SHA-256 of every signed file, the SHA-256 fingerprint
of the kit's CA certificate, the signer's public key) and ``kit-manifest.sig`` (the Ed25519
signature of the manifest's exact bytes). ``deploy site`` and ``deploy coordinator`` check it before
they start anything and refuse, in one line naming the file (:class:`IntegrityError`, exit 4), a kit
in which a signed file was changed, added or removed.

The signed set is everything in the kit (configuration, certificates, keys, scripts, units) except
what the kit's own processes write while it runs (:data:`UNSIGNED_DIRS`, :data:`UNSIGNED_FILES`):
SuperLink / site state, logs, run output, Flower's app cache, the deny list and registration markers,
and a site's own ``local.toml`` (which can only tighten the signed policy).

Which key may sign is pinned outside the manifest: ``--kit-key SHA256:…`` or ``$FACEFED_KIT_KEY``,
which the systemd units (in ``/etc``, not writable by the service) and the start scripts set. Without
a pin the manifest is checked against the key it names: that catches damaged or edited files, not a
kit re-signed by someone else.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.atomic import atomic_write_bytes
from common.crypto import pki
from common.errors import ConfigError, IntegrityError
from server import deploy_publisher

logger = logging.getLogger(__name__)

MANIFEST = "kit-manifest.json"
SIGNATURE = "kit-manifest.sig"
FORMAT = "facefed-kit-manifest/1"
KEY_ENV = "FACEFED_KIT_KEY"
PROVISIONING_DIR = "provisioning"
# Written by the kit's processes while it runs, never by provisioning: outside the signed set.
UNSIGNED_DIRS = frozenset({"state", "logs", "runs", "flwr-home"})
# local.toml: the site's own settings (server/deploy_local.py), which may only tighten the kit's.
UNSIGNED_FILES = frozenset({MANIFEST, SIGNATURE, "revoked.txt", "local.toml"})
UNSIGNED_SITE_MARKERS = (".node-id", ".revoked")  # coordinator kit: sites/<site>.node-id, .revoked
_REFUSED_FIX = "restore the kit you were sent, or ask its provisioner for a newly signed kit"


def default_key_path(out: Path) -> Path:
    """Where ``deploy init`` keeps the provisioning key: beside the kits, never inside one."""
    return out / PROVISIONING_DIR / "provisioning.key"


def key_fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """``SHA256:…`` of a public key, as ``ssh-keygen -lf`` prints it."""
    return pki.key_fingerprint(
        public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


def load_or_create_key(path: Path, *, create: bool) -> ed25519.Ed25519PrivateKey:
    """The provisioning key at ``path``; a new one (0600, with ``.pub``) if absent and ``create``.

    Raises:
        ConfigError: missing (and not ``create``), readable by others, or not Ed25519.
    """
    if not path.exists():
        if not create:
            raise ConfigError(
                f"provisioning key {path} not found; pass --provisioning-key with the key that "
                "signed these kits (`deploy init` wrote it under OUT/provisioning/)"
            )
        keys = pki.create_publisher_keypair(comment="facefed-provisioning")
        pki.write_secret(path, keys.private_openssh)
        pki.write_public(path.with_suffix(".pub"), keys.public_openssh, force=True)
    return deploy_publisher.load_signing_key(path)


def _ca_fingerprint(kit: Path) -> str:
    path = kit / "certs" / "ca.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} cannot be read as a certificate; {_REFUSED_FIX}") from exc
    return cert.fingerprint(hashes.SHA256()).hex()


# The temporary file of an interrupted atomic write of those (common/atomic.py: ".NAME.XXXX.tmp").
_LEFTOVER_RE = re.compile(r"\.(revoked\.txt|[^/]+\.node-id|[^/]+\.revoked)\.[^/.]+\.tmp")


def _is_signed(rel: PurePosixPath) -> bool:
    if rel.parts[0] in UNSIGNED_DIRS or str(rel) in UNSIGNED_FILES:
        return False
    in_sites = len(rel.parts) == 2 and rel.parts[0] == "sites"
    if in_sites and rel.suffix in UNSIGNED_SITE_MARKERS:
        return False
    return not ((in_sites or len(rel.parts) == 1) and _LEFTOVER_RE.fullmatch(rel.name))


def signed_files(kit: Path) -> dict[str, Path]:
    """The kit's signed files by relative POSIX path.

    Raises:
        IntegrityError: for a symbolic link in the signed part of the kit.
    """
    found = {}
    for path in sorted(kit.rglob("*")):
        rel = PurePosixPath(path.relative_to(kit).as_posix())
        if not _is_signed(rel):
            continue
        if path.is_symlink():
            raise IntegrityError(f"{path} is a symbolic link inside a signed kit; {_REFUSED_FIX}")
        if path.is_file():
            found[str(rel)] = path
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sign_kit(kit: Path, key: ed25519.Ed25519PrivateKey, *, name: str) -> None:
    """Write ``kit-manifest.json`` and its signature over the kit as it is now."""
    public = key.public_key()
    doc = {
        "format": FORMAT,
        "kit": name,
        "signed-at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signer": deploy_publisher.public_line(public).decode("ascii").split(" ")[1],
        "signer-fingerprint": key_fingerprint(public),
        "ca-sha256": _ca_fingerprint(kit),
        "files": {rel: _digest(path) for rel, path in signed_files(kit).items()},
    }
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    atomic_write_bytes(kit / MANIFEST, data, mode=0o644)
    atomic_write_bytes(kit / SIGNATURE, base64.b64encode(key.sign(data)) + b"\n", mode=0o644)
    logger.debug("signed %s (%d files)", kit, len(doc["files"]))


def pinned_key(explicit: str | None) -> str | None:
    """The provisioning key fingerprint to insist on: ``--kit-key``, else ``$FACEFED_KIT_KEY``."""
    return explicit or os.environ.get(KEY_ENV) or None


def verify_kit(kit: Path, *, pinned: str | None) -> str:
    """Check the kit's signature, CA fingerprint and every signed file before anything starts.

    Args:
        kit: the kit folder.
        pinned: the ``SHA256:…`` fingerprint of the provisioning key that must have signed it
            (None: the key the manifest names).

    Returns:
        The signer's fingerprint.

    Raises:
        IntegrityError: unsigned, signed by another key, a bad signature, another CA, or a signed
            file changed, added or removed (the message names the file).
    """
    manifest, signature = kit / MANIFEST, kit / SIGNATURE
    try:
        data = manifest.read_bytes()
        sig = base64.b64decode(signature.read_bytes().strip(), validate=True)
        doc = json.loads(data)
        public = serialization.load_ssh_public_key(b"ssh-ed25519 " + doc["signer"].encode())
        if not isinstance(public, ed25519.Ed25519PublicKey):
            raise ValueError("the signer is not an Ed25519 key")
        files = {str(k): str(v) for k, v in dict(doc["files"]).items()}
        ca_sha256 = str(doc["ca-sha256"])
    except FileNotFoundError as exc:
        raise IntegrityError(
            f"{exc.filename} not found: this kit is not signed; use a kit made by `facefed deploy "
            "init` (or re-sign it there with `deploy add-site --force` / `deploy init --force`)"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{manifest} is damaged ({exc}); {_REFUSED_FIX}") from exc
    signer = key_fingerprint(public)
    if pinned is not None and signer != pinned:
        raise IntegrityError(
            f"{manifest} is signed by {signer}, not by the provisioning key {pinned} ({KEY_ENV} / "
            f"--kit-key); {_REFUSED_FIX}"
        )
    try:
        public.verify(sig, data)
    except InvalidSignature as exc:
        raise IntegrityError(f"{signature} does not match {manifest}; {_REFUSED_FIX}") from exc
    if _ca_fingerprint(kit) != ca_sha256:
        raise IntegrityError(
            f"{kit / 'certs' / 'ca.crt'} is not the CA this kit was signed with; {_REFUSED_FIX}"
        )
    present = signed_files(kit)
    for rel in sorted(set(files) | set(present)):
        if rel not in present:
            raise IntegrityError(
                f"{kit / rel} was removed after the kit was signed; {_REFUSED_FIX}"
            )
        if rel not in files:
            raise IntegrityError(f"{kit / rel} was added after the kit was signed; {_REFUSED_FIX}")
        if _digest(present[rel]) != files[rel]:
            raise IntegrityError(
                f"{kit / rel} was changed after the kit was signed; {_REFUSED_FIX}"
            )
    if pinned is None:
        logger.debug("kit %s verified against the key it names (%s); not pinned", kit, signer)
    return signer
