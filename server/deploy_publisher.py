"""The trusted app publisher: a site runs only app bundles (FABs) that the publisher signed.

How Flower 1.41 does it (read from the installed ``flwr`` source):

* ``flower-supernode --trusted-entities FILE`` loads a YAML map ``{public-key-id: 'ssh-ed25519 …'}``
  (``_try_obtain_trusted_entities``, ``_validate_public_keys_ed25519`` in
  ``flwr/supernode/cli/flower_supernode.py``).
* On the first message of every run the SuperNode pulls the run's FAB. With trusted entities set it
  refuses the FAB (replies ``FAB_VERIFICATION_ERROR``; the bundle is never stored nor run) unless
  ``fab.verifications`` holds ``valid_license`` and, under a trusted key id, ``{signature,
  signed_at}`` where ``signature`` is the key's Ed25519 signature of ``signed_at`` (8 bytes,
  big-endian) followed by SHA-256(FAB) (``_pull_and_store_message`` and ``_verify_fab`` in
  ``flwr/supernode/start_client_internal.py``). An EMPTY map switches the check off, so facefed
  refuses to start a site with one (:func:`load_trusted_entities`).
* The SuperLink attaches verifications only to a FAB it fetched from "Flower Hub": ``flwr run
  @publisher/app==x.y.z`` makes it POST ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab`` and download the
  returned ``fab_url`` (``start_run``, ``_get_remote_fab``, ``_format_verification`` in
  ``flwr/superlink/servicer/control/control_handlers.py``). A bundle uploaded by a plain
  ``flwr run DIR`` carries no verifications, so every trusting site refuses it.

Offline, facefed plays that hub: the SuperLink starts with ``FLWR_SUPERGRID_API_URL`` pointing at
``127.0.0.1:<hub-port>``, and ``facefed deploy submit`` signs the FAB with the publisher key and serves
exactly that FAB and its signature there while ``flwr run`` starts the run (:func:`serve_hub`). The
hub and the coordinator are not trusted: each site checks the signature against its own
trusted-entities file. Run-config overrides are not signed: the site's own limits (``max-epsilon`` in
``site.toml``) guard them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.errors import ConfigError

logger = logging.getLogger(__name__)

TRUSTED_ENTITIES = "trusted-entities.yaml"
HUB_HOST = "127.0.0.1"
# Flower's own patterns for `flwr run @account/app==x.y.z` (flwr.supercore.constant).
APP_ID_RE = re.compile(r"@[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")  # fullmatch: `$` admits "\n"
APP_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
_MAX_HUB_REQUEST = 64 * 1024


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The publisher's key id: ``fpk_`` and the first 32 hex digits of SHA-256(raw public key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def parse_public_line(line: str, where: str) -> ed25519.Ed25519PublicKey:
    """Parse an ``ssh-ed25519 …`` line; ``where`` names it in the error.

    Raises:
        ConfigError: for anything but an OpenSSH Ed25519 public key.
    """
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ConfigError(f"{where} is not an OpenSSH public key line ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(
            f"{where} is not an Ed25519 key; flower-supernode --trusted-entities accepts only "
            "'ssh-ed25519 …' keys"
        )
    return key


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """Load the publisher's ``ssh-ed25519`` public key line.

    Raises:
        ConfigError: if the file is missing or holds another kind of key.
    """
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"publisher public key {path} cannot be read ({exc})") from exc
    return parse_public_line(text, str(path))


def public_line(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """``ssh-ed25519 <base64> facefed-publisher`` and a newline."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line + b" facefed-publisher\n"


def trusted_entities_yaml(public_key: ed25519.Ed25519PublicKey) -> str:
    """The ``--trusted-entities`` file naming the one publisher whose bundles a site runs."""
    line = public_line(public_key).decode("ascii").strip()
    return (
        "# Written by `facefed deploy init`: flower-supernode --trusted-entities reads this file.\n"
        "# This site runs only app bundles signed by these keys. Never leave it empty: an empty\n"
        "# file switches Flower's check off (facefed then refuses to start the site).\n"
        f"{key_id(public_key)}: '{line}'\n"
    )


def load_trusted_entities(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """Read a trusted-entities file as Flower does, and refuse one that would trust nothing.

    Raises:
        ConfigError: if the file is missing, is not a YAML map of key ids to Ed25519 keys, or is
            empty (Flower treats an empty map as "verify nothing").
    """
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path} not found: a site runs only app bundles from a trusted publisher; copy "
            f"{TRUSTED_ENTITIES} from the provisioning directory's publisher/ folder"
        ) from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{path} is not valid YAML ({reason}); re-provision the kit") from exc
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(
            f"{path} names no trusted publisher; Flower would then run any app bundle, so the site "
            "refuses to start. Copy publisher/trusted-entities.yaml from provisioning"
        )
    keys = {}
    for name, line in doc.items():
        if not isinstance(name, str) or not isinstance(line, str):
            raise ConfigError(f"{path}: each entry must be `key-id: 'ssh-ed25519 …'`")
        keys[name] = parse_public_line(line, f"{path} entry {name}")
    return keys


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load the publisher's private key (OpenSSH Ed25519, readable by its owner only).

    Raises:
        ConfigError: if it is missing, readable by others, or not an Ed25519 private key.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"publisher key {path} cannot be read ({exc.strerror}); pass --publisher-key with the "
            "publisher.key that `facefed deploy init` wrote"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"publisher key {path} is readable by other users; chmod 600 it")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; the publisher key must be Ed25519")
    return key


@dataclass(frozen=True, kw_only=True)
class SignedFab:
    """A FAB and the publisher's signature over it, in the form Flower's hub API returns."""

    content: bytes
    app_id: str
    version: str
    key_id: str
    signature: str
    signed_at: int

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bundle: Flower's FAB hash."""
        return hashlib.sha256(self.content).hexdigest()

    @property
    def app_spec(self) -> str:
        """``@publisher/name==x.y.z`` as ``flwr run`` takes a hub app."""
        return f"{self.app_id}=={self.version}"

    def verification(self) -> dict[str, str | int]:
        """One entry of the hub's ``verifications`` list."""
        return {
            "public_key_id": self.key_id,
            "signature": self.signature,
            "signed_at": self.signed_at,
        }


def sign_fab(
    content: bytes, key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None
) -> SignedFab:
    """Sign a FAB the way ``flwr app review`` does (``_sign_fab`` in ``flwr/cli/app_cmd``).

    Raises:
        ConfigError: if the bundle's ``publisher/name`` or version cannot name a hub app.
    """
    from flwr.common.config import get_fab_config, get_metadata_from_config
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    fab_id, version = get_metadata_from_config(get_fab_config(content))
    app_id = f"@{fab_id}"
    if not APP_ID_RE.fullmatch(app_id) or not APP_VERSION_RE.fullmatch(version):
        raise ConfigError(
            f"app {app_id} version {version!r}: a signed bundle needs [tool.flwr.app] publisher "
            "and [project] name of letters, digits, '.', '_' or '-', and a version x.y.z (digits)"
        )
    when = int(time.time()) if signed_at is None else signed_at
    message = create_message_to_sign(hashlib.sha256(content).digest(), when)
    signature = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode("ascii")
    return SignedFab(
        content=content,
        app_id=app_id,
        version=version,
        key_id=key_id(key.public_key()),
        signature=signature,
        signed_at=when,
    )


def build_signed_fab(app: Path, key: ed25519.Ed25519PrivateKey) -> SignedFab:
    """Build the app directory into a FAB with Flower's builder (as ``flwr run`` does) and sign it.

    Raises:
        ConfigError: if ``app`` is not a Flower app directory Flower can bundle.
    """
    import click
    from flwr.cli.build import build_fab_from_disk

    if not (app / "pyproject.toml").is_file():
        raise ConfigError(
            f"{app} has no pyproject.toml; pass --app pointing at the facefed checkout"
        )
    try:
        content = build_fab_from_disk(app)
    except (click.ClickException, ValueError, OSError) as exc:
        raise ConfigError(f"cannot bundle {app}: {exc}") from exc
    return sign_fab(content, key)


def hub_api_url(port: int) -> str:
    """``FLWR_SUPERGRID_API_URL`` for a SuperLink whose hub is facefed's on ``port``."""
    return f"http://{HUB_HOST}:{port}/v1"


def _handler(fab: SignedFab, port: int) -> type[BaseHTTPRequestHandler]:
    fab_path = f"/v1/hub/fab/{fab.sha256}"

    class HubHandler(BaseHTTPRequestHandler):
        """Answers exactly Flower's two hub calls, for exactly one signed bundle."""

        def do_POST(self) -> None:
            declared = self.headers.get("Content-Length", "").strip()
            length = int(declared) if declared.isdigit() else 0
            if self.path != "/v1/hub/fetch-fab" or not 0 < length <= _MAX_HUB_REQUEST:
                self._reply(404, {"detail": "facefed hub: unknown request"})
                return
            try:
                ask: Any = json.loads(self.rfile.read(length))
            except json.JSONDecodeError:
                ask = None
            if not isinstance(ask, dict) or (ask.get("app_id"), ask.get("app_version")) != (
                fab.app_id,
                fab.version,
            ):
                self._reply(404, {"detail": f"facefed hub serves only {fab.app_spec}"})
                return
            url = f"http://{HUB_HOST}:{port}{fab_path}"
            self._reply(200, {"fab_url": url, "verifications": [fab.verification()]})

        def do_GET(self) -> None:
            if self.path != fab_path:
                self._reply(404, {"detail": "facefed hub: unknown request"})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(fab.content)))
            self.end_headers()
            self.wfile.write(fab.content)

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("hub: " + format, *args)

    return HubHandler


@contextmanager
def serve_hub(fab: SignedFab, port: int) -> Iterator[str]:
    """Serve one signed bundle as Flower's hub API on ``127.0.0.1:port``; yield the API URL.

    Raises:
        ConfigError: if the port is taken (another ``deploy submit`` is starting a run).
    """
    try:
        server = ThreadingHTTPServer((HUB_HOST, port), _handler(fab, port))
    except OSError as exc:
        raise ConfigError(
            f"hub-port {port} on {HUB_HOST} is taken ({exc.strerror}): wait for the other "
            "`facefed deploy submit` to start its run, or set another hub-port in coordinator.toml "
            "and restart the coordinator"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="facefed-hub", daemon=True)
    thread.start()
    try:
        yield hub_api_url(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)
