"""Deployment PKI: certificates a real TLS client accepts or refuses, keys Flower really loads."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.crypto import pki
from common.errors import ConfigError


def _handshake(tmp_path: Path, server: pki.Issued, trusted: pki.Issued, hostname: str) -> None:
    """A real TLS 1.3 handshake in memory; raises ssl.SSLCertVerificationError when refused."""
    (tmp_path / "s.crt").write_bytes(server.cert_pem())
    (tmp_path / "s.key").write_bytes(server.key_pem())
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    client_ctx = ssl.create_default_context(cadata=trusted.cert_pem().decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()  # completes once the client has verified the server's chain
            return
        except ssl.SSLWantReadError:
            pass
        if data := c_out.read():
            s_in.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            srv.do_handshake()
        if data := s_out.read():
            c_in.write(data)
    raise AssertionError("handshake did not complete")


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.create_ca()


def test_server_cert_lists_dns_ip_and_loopback_sans_and_chains_to_ca(ca: pki.Issued) -> None:
    server = pki.issue_server_cert(ca, ["FL.example.org", "10.0.0.5"])

    sans = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    server.cert.verify_directly_issued_by(ca.cert)
    assert not server.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_ca_may_only_sign_end_entities(ca: pki.Issued) -> None:
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value

    assert constraints.ca and constraints.path_length == 0


@pytest.mark.parametrize("host", ["fl.example.org", "10.0.0.5", "127.0.0.1", "localhost"])
def test_tls_client_accepts_server_cert_for_each_listed_host(
    ca: pki.Issued, tmp_path: Path, host: str
) -> None:
    _handshake(tmp_path, pki.issue_server_cert(ca, ["fl.example.org", "10.0.0.5"]), ca, host)


def test_tls_client_rejects_server_cert_for_another_host(ca: pki.Issued, tmp_path: Path) -> None:
    server = pki.issue_server_cert(ca, ["fl.example.org"], include_loopback=False)

    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tmp_path, server, ca, "127.0.0.1")


def test_tls_client_rejects_expired_server_cert(ca: pki.Issued, tmp_path: Path) -> None:
    server = pki.issue_server_cert(ca, ["fl.example.org"], valid_days=-1)

    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(tmp_path, server, ca, "fl.example.org")


def test_tls_client_rejects_server_cert_from_another_ca(ca: pki.Issued, tmp_path: Path) -> None:
    server = pki.issue_server_cert(ca, ["fl.example.org"])

    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path, server, pki.create_ca(), "fl.example.org")


def test_validity_window_follows_injected_clock(ca: pki.Issued) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    cert = pki.issue_server_cert(ca, ["a.example"], valid_days=10, now=now).cert

    assert cert.not_valid_after_utc == now + dt.timedelta(days=10)


def test_node_keypair_is_p384_in_the_openssh_formats_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pair = pki.create_node_keypair(comment="site-1")
    private = load_ssh_private_key(pair.private_openssh, None)
    (tmp_path / "k.pub").write_bytes(pair.public_openssh)

    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert pair.public_openssh.startswith(b"ecdsa-sha2-nistp384 ")
    assert try_load_public_key(tmp_path / "k.pub") == public_key_to_bytes(private.public_key())
    assert load_ssh_public_key(pair.public_openssh).public_numbers() == (  # type: ignore[union-attr]
        private.public_key().public_numbers()
    )


def test_publisher_keypair_is_ed25519_in_the_openssh_formats_flower_loads(tmp_path: Path) -> None:
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key
    from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519

    pair = pki.create_publisher_keypair()
    (tmp_path / "p.key").write_bytes(pair.private_openssh)
    private = load_private_key(tmp_path / "p.key")  # how `flwr app review` loads a signing key

    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert pair.public_openssh.startswith(b"ssh-ed25519 ")
    _validate_public_keys_ed25519({"fpk_x": pair.public_openssh.decode()})  # exits if not Ed25519
    assert load_ssh_public_key(pair.public_openssh).public_bytes_raw() == (  # type: ignore[union-attr]
        private.public_key().public_bytes_raw()
    )


def test_secret_is_written_0600(tmp_path: Path) -> None:
    pki.write_secret(tmp_path / "a.key", b"secret")

    assert stat.S_IMODE((tmp_path / "a.key").stat().st_mode) == 0o600


def test_existing_key_is_never_silently_overwritten(tmp_path: Path) -> None:
    pki.write_secret(tmp_path / "a.key", b"first")

    with pytest.raises(ConfigError, match="--force"):
        pki.write_secret(tmp_path / "a.key", b"second")
    assert (tmp_path / "a.key").read_bytes() == b"first"


def test_force_replaces_key_and_keeps_no_clear_copy(tmp_path: Path) -> None:
    pki.write_secret(tmp_path / "a.key", b"first")

    pki.write_secret(tmp_path / "a.key", b"second", force=True)

    assert (tmp_path / "a.key").read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.key"]


def _write_ca(tmp_path: Path, passphrase: bytes | None) -> tuple[pki.Issued, Path, Path]:
    ca = pki.create_ca()
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    pki.write_public(cert, ca.cert_pem())
    pki.write_secret(key, ca.key_pem(passphrase))
    return ca, cert, key


def test_encrypted_ca_key_round_trips_with_its_passphrase(tmp_path: Path) -> None:
    ca, cert, key = _write_ca(tmp_path, b"correct horse")

    loaded = pki.load_ca(cert, key, b"correct horse")

    assert pki.ca_key_is_encrypted(key)
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_encrypted_ca_key_refuses_a_wrong_passphrase_in_one_line(tmp_path: Path) -> None:
    _, cert, key = _write_ca(tmp_path, b"correct horse")

    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        pki.load_ca(cert, key, b"battery staple")
    assert "\n" not in str(info.value)


def test_encrypted_ca_key_without_a_passphrase_says_how_to_give_one(tmp_path: Path) -> None:
    _, cert, key = _write_ca(tmp_path, b"correct horse")

    with pytest.raises(ConfigError, match="FACEFED_CA_PASSPHRASE"):
        pki.load_ca(cert, key)


def test_unencrypted_ca_key_still_loads_without_a_passphrase(tmp_path: Path) -> None:
    ca, cert, key = _write_ca(tmp_path, None)

    assert not pki.ca_key_is_encrypted(key)
    assert pki.load_ca(cert, key).key.private_numbers() == ca.key.private_numbers()


def test_key_fingerprint_matches_ssh_keygen_format() -> None:
    pair = pki.create_node_keypair(comment="site-1")

    fingerprint = pki.key_fingerprint(pair.public_openssh)

    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 7 + 43
    assert fingerprint != pki.key_fingerprint(pki.create_node_keypair().public_openssh)


@pytest.mark.parametrize("bad", ["https://fl.example.org", "fl.example.org:9093", "", "a b"])
def test_malformed_coordinator_host_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="--coordinator"):
        pki.san_entry(bad)
