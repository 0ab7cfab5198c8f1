"""The publisher's signature over an app bundle, judged by Flower's own SuperNode verifier.

``flwr.supernode.start_client_internal._verify_fab`` is the function a site runs on every new run's
bundle; these tests give it what facefed's hub hands the SuperLink, formatted by the SuperLink's own
``_format_verification``, and check that only the trusted publisher's signature of those exact bytes
passes (round trip, wrong key, tampered byte, swapped signature).
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import stat
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.supercore.fab import Fab
from flwr.supercore.utils import request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.start_client_internal import _verify_fab

from common.crypto import pki
from common.errors import ConfigError
from server import deploy_publisher

APP = Path(__file__).parents[1] / "integration" / "smoke_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key(tmp_path: Path, name: str = "publisher") -> tuple[Path, deploy_publisher.SignedFab]:
    path = tmp_path / f"{name}.key"
    pki.write_secret(path, pki.create_publisher_keypair().private_openssh)
    key = deploy_publisher.load_signing_key(path)
    return path, deploy_publisher.build_signed_fab(APP, key)


def _trusted(path: Path) -> dict[str, str]:
    key = load_ssh_private_key(path.read_bytes(), None)
    return {
        deploy_publisher.key_id(key.public_key()): deploy_publisher.public_line(  # type: ignore[arg-type]
            key.public_key()  # type: ignore[arg-type]
        ).decode()
    }


def _as_site_receives(fab: deploy_publisher.SignedFab, content: bytes | None = None) -> Fab:
    """The Fab a SuperNode pulls after the SuperLink fetched ``fab`` from the hub."""
    body = fab.content if content is None else content
    # Flower annotates the entries as str; Flower Hub's JSON, like facefed's, carries an int signed_at.
    record = [fab.verification()]
    return Fab(hashlib.sha256(body).hexdigest(), body, _format_verification(record))  # type: ignore[arg-type]


def test_signed_bundle_passes_flowers_supernode_verification(tmp_path: Path) -> None:
    key, fab = _key(tmp_path)

    assert _verify_fab(_as_site_receives(fab), _trusted(key))
    assert fab.app_spec == "@facefed/deploysmoke==1.0.0"


def test_bundle_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    trusted_key, _ = _key(tmp_path, "trusted")
    _, rogue = _key(tmp_path, "rogue")

    assert not _verify_fab(_as_site_receives(rogue), _trusted(trusted_key))


def test_signature_by_another_key_under_the_trusted_key_id_is_refused(tmp_path: Path) -> None:
    trusted_key, genuine = _key(tmp_path, "trusted")
    _, rogue = _key(tmp_path, "rogue")
    forged = dataclasses.replace(rogue, key_id=genuine.key_id)

    assert not _verify_fab(_as_site_receives(forged), _trusted(trusted_key))


def test_one_flipped_byte_in_the_bundle_is_refused(tmp_path: Path) -> None:
    key, fab = _key(tmp_path)
    tampered = bytearray(fab.content)
    tampered[len(tampered) // 2] ^= 0x01

    assert not _verify_fab(_as_site_receives(fab, bytes(tampered)), _trusted(key))


def test_signature_with_an_altered_timestamp_is_refused(tmp_path: Path) -> None:
    key, fab = _key(tmp_path)
    altered = dataclasses.replace(fab, signed_at=fab.signed_at + 1)

    assert not _verify_fab(_as_site_receives(altered), _trusted(key))


def test_hub_answers_flowers_hub_client_with_the_bundle_and_its_signature(tmp_path: Path) -> None:
    _, fab = _key(tmp_path)
    port = free_port()

    with deploy_publisher.serve_hub(fab, port) as api:
        url, verifications, _ = request_download_link(
            fab.app_id, fab.version, f"{api}/hub/fetch-fab", "fab_url"
        )
        content = requests.get(url, timeout=10).content
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@facefed/other", "1.0.0", f"{api}/hub/fetch-fab", "fab_url")

    assert content == fab.content
    assert verifications == [fab.verification()]


def test_hub_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    _, fab = _key(tmp_path)
    port = free_port()

    with (
        deploy_publisher.serve_hub(fab, port),
        pytest.raises(ConfigError, match="is taken"),
        deploy_publisher.serve_hub(fab, port),
    ):
        pass


def test_signing_key_readable_by_other_users_is_refused(tmp_path: Path) -> None:
    key, _ = _key(tmp_path)
    key.chmod(0o640)

    with pytest.raises(ConfigError, match="chmod 600"):
        deploy_publisher.load_signing_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o640


def test_node_key_is_not_accepted_as_publisher_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    pki.write_secret(path, pki.create_node_keypair().private_openssh)

    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        deploy_publisher.load_signing_key(path)


def test_bundle_whose_version_cannot_name_a_hub_app_is_refused(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        (APP / "pyproject.toml").read_text().replace('version = "1.0.0"', 'version = "1.0.0rc1"')
    )
    key, _ = _key(tmp_path)

    with pytest.raises(ConfigError, match=r"x\.y\.z"):
        deploy_publisher.build_signed_fab(app, deploy_publisher.load_signing_key(key))
