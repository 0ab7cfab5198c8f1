"""Certificates and SuperNode keys for a real Flower deployment, made with ``cryptography`` only.

Three kinds of material, each in the format the Flower 1.41 tool that reads it expects:

* a certificate authority (CA): self-signed, ECDSA P-384, ``basicConstraints CA:TRUE, pathlen:0``;
* the SuperLink server certificate, signed by the CA, whose subjectAltName lists every DNS name and
  IP address that clients dial (``flower-supernode --superlink``, the ``flwr`` CLI) plus loopback,
  which SuperLink's own SuperExec dials for its Runtime API. PEM, read by uvicorn's ``ssl`` module;
* the app publisher's signing key pair: Ed25519, the private key in unencrypted OpenSSH format (as
  Flower's ``flwr app review`` loads a signing key), the public key as an ``ssh-ed25519`` line (as
  ``flower-supernode --trusted-entities`` requires). Only bundles signed with it run on a site;
* one authentication key pair per site: ECDSA P-384 (a NIST curve, as ``flwr supernode register``
  requires), the private key in unencrypted OpenSSH format (``flower-supernode
  --auth-supernode-private-key`` loads it with ``load_ssh_private_key(data, None)``), the public key
  as an OpenSSH ``ecdsa-sha2-nistp384`` line (``flwr supernode register`` loads it with
  ``load_ssh_public_key``).

Private keys are written with mode 0600, atomically, and never silently replace an existing file:
:func:`write_secret` refuses unless ``force`` is set. A replaced private key is gone, never kept as
a clear backup (the old key would outlive its revocation). The CA key may be encrypted at rest with
a passphrase (:meth:`Issued.key_pem`, :func:`load_ca`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import atomic_write_bytes
from common.errors import ConfigError

logger = logging.getLogger(__name__)

CURVE = ec.SECP384R1
SIGNATURE_HASH = hashes.SHA384
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True, kw_only=True)
class Issued:
    """A private key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self, passphrase: bytes | None = None) -> bytes:
        """Return the private key as PKCS#8 PEM, encrypted with ``passphrase`` when one is given.

        Encryption is ``cryptography``'s ``BestAvailableEncryption`` (PBES2, scrypt or PBKDF2 with
        AES-256-CBC in the current release).
        """
        if passphrase is not None and not passphrase:
            raise ConfigError("the CA passphrase is empty; choose a non-empty passphrase")
        encryption: serialization.KeySerializationEncryption = (
            serialization.NoEncryption()
            if passphrase is None
            else serialization.BestAvailableEncryption(passphrase)
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def cert_pem(self) -> bytes:
        """Return the certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, kw_only=True)
class NodeKeyPair:
    """A key pair serialized for Flower: a SuperNode's authentication key or the publisher's."""

    private_openssh: bytes
    public_openssh: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "facefed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(now: dt.datetime | None, valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    if valid_days == 0:
        raise ConfigError("certificate validity must be non-zero days; pass e.g. --valid-days 365")
    start = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    end = start + dt.timedelta(days=valid_days)
    # A negative validity is only useful to tests that need an already-expired certificate.
    return (min(start, end) - dt.timedelta(minutes=5), max(start, end))


def san_entry(host: str) -> x509.GeneralName:
    """Return the subjectAltName entry for ``host``: an IP address if it parses as one, else DNS.

    Raises:
        ConfigError: if ``host`` is empty or contains a scheme, port or whitespace.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c in host for c in ":/ \t") or host.startswith("."):
        raise ConfigError(
            f"coordinator host {host!r} is not a DNS name or IP address; pass the bare name "
            "that sites dial, without scheme or port, e.g. --coordinator fl.example.org"
        )
    return x509.DNSName(host.lower())


def create_ca(
    *,
    common_name: str = "facefed federation CA",
    valid_days: int = 3650,
    now: dt.datetime | None = None,
) -> Issued:
    """Create a self-signed CA that may sign end-entity certificates only (pathlen 0)."""
    key = ec.generate_private_key(CURVE())
    start, end = _validity(now, valid_days)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, SIGNATURE_HASH())
    )
    return Issued(key=key, cert=cert)


def issue_server_cert(
    ca: Issued,
    hosts: Sequence[str],
    *,
    valid_days: int = 825,
    include_loopback: bool = True,
    now: dt.datetime | None = None,
) -> Issued:
    """Issue the SuperLink TLS certificate for ``hosts`` (DNS names and/or IP addresses).

    Args:
        ca: the signing CA.
        hosts: names and addresses the SuperNodes and the ``flwr`` CLI dial; the first one is the
            certificate's common name.
        valid_days: lifetime; negative values produce an already-expired certificate (tests only).
        include_loopback: also list ``localhost`` and ``127.0.0.1``. SuperLink's own SuperExec
            reaches the Runtime API on loopback with the same certificate, so a deployment needs it.
        now: issue time (defaults to the current UTC time).
    """
    wanted = list(hosts) + (list(LOOPBACK_HOSTS) if include_loopback else [])
    if not hosts:
        raise ConfigError("no coordinator host given; pass --coordinator HOST (DNS name or IP)")
    sans: list[x509.GeneralName] = []
    for host in wanted:
        entry = san_entry(host)
        if entry not in sans:
            sans.append(entry)
    key = ec.generate_private_key(CURVE())
    start, end = _validity(now, valid_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0].strip().strip("[]")))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, SIGNATURE_HASH())
    )
    return Issued(key=key, cert=cert)


def create_node_keypair(comment: str = "") -> NodeKeyPair:
    """Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH encodings).

    Args:
        comment: appended to the public key line (e.g. the site id) so that an operator can tell
            keys apart; Flower ignores it.
    """
    key = ec.generate_private_key(CURVE())
    return _openssh_pair(key, comment)


def _openssh_pair(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, comment: str
) -> NodeKeyPair:
    """``key`` as an OpenSSH private key and an OpenSSH public key line ending in ``comment``."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        if any(c.isspace() for c in comment):
            raise ConfigError(f"key comment {comment!r} must not contain whitespace")
        public += b" " + comment.encode("ascii")
    return NodeKeyPair(private_openssh=private, public_openssh=public + b"\n")


def create_publisher_keypair(comment: str = "facefed-publisher") -> NodeKeyPair:
    """Create the app publisher's signing key pair (Ed25519, OpenSSH encodings).

    ``flower-supernode --trusted-entities`` accepts only Ed25519 public keys
    (``_validate_public_keys_ed25519`` in ``flwr.supernode.cli.flower_supernode``).
    """
    key = ed25519.Ed25519PrivateKey.generate()
    return _openssh_pair(key, comment)


def ca_key_is_encrypted(key_path: Path) -> bool:
    """Whether ``key_path`` holds a passphrase-encrypted PEM private key."""
    try:
        return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"CA key {key_path} is missing; point --out at the directory `deploy init` wrote"
        ) from exc


def load_ca(cert_path: Path, key_path: Path, passphrase: bytes | None = None) -> Issued:
    """Load the CA written by ``facefed deploy init``; ``passphrase`` for an encrypted key.

    Raises:
        ConfigError: if either file is missing or is not the expected PEM, if the key is encrypted
            and no passphrase is given, or if the passphrase is wrong.
    """
    encrypted = ca_key_is_encrypted(key_path)
    if encrypted and passphrase is None:
        raise ConfigError(
            f"{key_path} is encrypted; give its passphrase (prompt, FACEFED_CA_PASSPHRASE or "
            "--ca-passphrase-fd)"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(
            key_path.read_bytes(), password=passphrase if encrypted else None
        )
    except FileNotFoundError as exc:
        raise ConfigError(
            f"CA file {exc.filename} is missing; run `facefed deploy init` first or point --out at "
            "the provisioning directory that holds ca/ca.crt and ca/ca.key"
        ) from exc
    except ValueError as exc:
        if encrypted:
            raise ConfigError(
                f"wrong passphrase for {key_path} (or the key file is damaged); try again"
            ) from None
        raise ConfigError(
            f"cannot read the CA in {cert_path.parent}: {exc}; restore it from backup"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC private key; restore the CA key from backup")
    return Issued(key=key, cert=cert)


def load_public_key_line(path: Path) -> ec.EllipticCurvePublicKey:
    """Load an OpenSSH EC public key the way ``flwr supernode register`` does.

    Raises:
        ConfigError: if the file is missing or holds something other than a NIST EC key.
    """
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"public key {path} is missing; copy the site's keys/*.pub here") from exc
    except ValueError as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key ({exc}); re-copy it") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path} is not an ECDSA key; SuperNode auth needs ECDSA P-384")
    return key


def write_secret(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a private key with mode 0600, refusing to replace an existing one unless ``force``.

    A replaced key is gone: no backup of a private key is ever kept in clear.

    Raises:
        ConfigError: if ``path`` exists and ``force`` is False.
    """
    if path.exists() and not force:
        raise ConfigError(
            f"{path} already exists and facefed never overwrites keys silently; keep it, choose "
            "another --out, or pass --force to replace it (the old key is deleted, not kept)"
        )
    atomic_write_bytes(path, data, mode=PRIVATE_MODE)


def write_public(path: Path, data: bytes, *, force: bool = False) -> Path | None:
    """Write a certificate or public key (mode 0644) with the same overwrite rule as secrets."""
    backup = _backup_if_exists(path, force=force)
    atomic_write_bytes(path, data, mode=PUBLIC_MODE)
    return backup


def key_fingerprint(public_line: bytes) -> str:
    """``SHA256:...`` of an OpenSSH public key line, as ``ssh-keygen -lf`` prints it."""
    fields = public_line.split()
    if len(fields) < 2:
        raise ConfigError("not an OpenSSH public key line; re-copy the site's keys/supernode.pub")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except ValueError as exc:
        raise ConfigError("OpenSSH public key line has a damaged base64 body") from exc
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def cert_serial(cert_pem: bytes) -> str:
    """The serial number of a PEM certificate, as lowercase hex (the deny list's cert entry)."""
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def _backup_if_exists(path: Path, *, force: bool) -> Path | None:
    if not path.exists():
        return None
    if not force:
        raise ConfigError(
            f"{path} already exists and facefed never overwrites keys silently; keep it, choose "
            "another --out, or pass --force to replace it (the old file is kept as a .bak copy)"
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    backup = path.with_name(f"{path.name}.{stamp}.bak")
    os.link(path, backup)  # hard link keeps the original bytes and mode; rename below replaces
    logger.warning("replacing %s; previous version kept at %s", path, backup)
    return backup
