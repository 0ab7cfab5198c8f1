"""Provisioning: the CA, the SuperLink certificate, site keys and kits (``facefed deploy init``).

Nothing here overwrites an existing key or kit file unless ``force`` is given; a replaced private
key is deleted, never kept in clear, and the key or certificate it belonged to goes on the
coordinator's deny list (``coordinator/revoked.txt``), which ``deploy register`` and the
coordinator / gateway start check. Provisioning is all or nothing: every file is written into a
staging folder beside ``OUT`` and moved into place only when all of them were written, so a
refused or failed run leaves ``OUT`` byte-identical. Directories are 0700 whatever the umask.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import atomic_write_text
from common.crypto import pki
from common.errors import ConfigError
from server import deploy, deploy_kitsign, deploy_publisher, deploy_units

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProvisionPlan:
    """What ``facefed deploy init`` creates.

    ``publisher_pub``: the ``ssh-ed25519`` public key of an existing app publisher, whose private
    key stays with its holder; without it a publisher key pair is created under ``OUT/publisher``.
    """

    out: Path
    coordinator_host: str
    sites: tuple[str, ...]
    port: int = deploy.DEFAULT_PORT
    bind: str = "0.0.0.0"
    control_port: int = deploy.DEFAULT_CONTROL_PORT
    hub_port: int = deploy.DEFAULT_HUB_PORT
    publisher_pub: Path | None = None
    extra_hosts: tuple[str, ...] = ()
    max_epsilon: float = 8.0
    data_dir: str = "/srv/facefed/data"
    # the coordinator's evaluation data (FER2013 / LFW test sets); None: the same path as data_dir
    coordinator_data_dir: str | None = None
    ca_valid_days: int = 3650
    server_valid_days: int = 825
    force: bool = False
    partitions: bool = False
    # the facefed installation's Python on the kits' machines (kit.env); None: `facefed` on PATH
    python: str | None = None
    # the Ed25519 key that signs every kit (kitsign); None: OUT/provisioning/provisioning.key,
    # created if absent. A given key must exist.
    provisioning_key: Path | None = None
    now: dt.datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        deploy.site_ids(list(self.sites))
        self.coordinator_config()
        for host in self.extra_hosts:
            pki.san_entry(host)
        if self.python is not None:
            deploy.check_python_path(self.python)

    def coordinator_config(self) -> deploy.CoordinatorConfig:
        """The coordinator's settings (validated)."""
        return deploy.CoordinatorConfig(
            host=self.coordinator_host,
            port=self.port,
            bind=self.bind,
            control_port=self.control_port,
            hub_port=self.hub_port,
            sites=self.sites,
            data_dir=self.data_dir
            if self.coordinator_data_dir is None
            else self.coordinator_data_dir,
        )


def coordinator_dir(out: Path) -> Path:
    """The coordinator kit inside a provisioning directory."""
    return out / "coordinator"


def site_dir(out: Path, site_id: str) -> Path:
    """One site's kit inside a provisioning directory."""
    return out / "sites" / site_id


def publisher_dir(out: Path) -> Path:
    """The app publisher's keys inside a provisioning directory."""
    return out / "publisher"


REVOKED = "revoked.txt"
_REVOKED_HEADER = (
    "# facefed deny list: site keys (SHA256 fingerprints) and server certificates (hex serials)\n"
    "# that must never be used again. Append-only; checked by `deploy register`, `deploy\n"
    "# coordinator` and `deploy gateway`. Format: kind id note time\n"
)


def deny_list(coord: Path) -> set[str]:
    """The revoked key fingerprints and certificate serials of a coordinator kit."""
    path = coord / REVOKED
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines()
    return {f.split()[1] for f in lines if not f.startswith("#") and len(f.split()) >= 2}


def record_revoked(coord: Path, kind: str, ident: str, note: str) -> None:
    """Append ``ident`` (a key fingerprint or certificate serial) to the deny list."""
    if ident in deny_list(coord):
        return
    path = coord / REVOKED
    old = path.read_text(encoding="utf-8") if path.exists() else _REVOKED_HEADER
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    atomic_write_text(path, f"{old}{kind} {ident} {note} {stamp}\n", mode=0o644)
    logger.warning("deny list %s: %s %s (%s)", path, kind, ident, note)


def site_key_revoked(coord: Path, site: str) -> bool:
    """Whether the key in ``coord/sites/<site>.pub`` is on the deny list."""
    pub = coord / "sites" / f"{site}.pub"
    return pki.key_fingerprint(pub.read_bytes()) in deny_list(coord)


def refuse_revoked_server_cert(coord: Path) -> None:
    """Raise if the kit's ``certs/server.crt`` was rotated out (its serial is on the deny list)."""
    cert = coord / "certs" / "server.crt"
    if cert.exists() and (serial := pki.cert_serial(cert.read_bytes())) in deny_list(coord):
        raise ConfigError(
            f"{cert} (serial {serial}) was rotated out and is on the deny list "
            f"{coord / REVOKED}; run `facefed deploy rotate-cert` for a fresh one"
        )


def provision(plan: ProvisionPlan, *, ca_passphrase: bytes | None = None) -> list[Path]:
    """Create the CA, server certificate, coordinator kit and one kit per site, all or nothing.

    Args:
        plan: what to create.
        ca_passphrase: encrypt ``ca/ca.key`` with it (None: unencrypted).

    Returns:
        The kit directories: the coordinator's first, then one per site.

    Raises:
        ConfigError: if any file to be written exists and ``plan.force`` is False.
    """
    out, coord, pub = plan.out, coordinator_dir(plan.out), publisher_dir(plan.out)
    targets = [out / "ca" / "ca.key", out / "ca" / "ca.crt", coord / "coordinator.toml"]
    targets += [coord / "certs" / n for n in ("ca.crt", "server.crt", "server.key")]
    targets += [
        pub / n for n in ("publisher.key", "publisher.pub", deploy_publisher.TRUSTED_ENTITIES)
    ]
    targets += [coord / deploy_publisher.TRUSTED_ENTITIES]
    for site in plan.sites:
        targets += _site_targets(out, site)
    if not plan.force:
        _refuse_existing(targets)
    publisher = deploy_publisher.load_public_key(plan.publisher_pub) if plan.publisher_pub else None
    replaced = _replaced_identities(coord, plan.sites) if plan.force else []
    key_path = plan.provisioning_key or deploy_kitsign.default_key_path(out)
    reuse = plan.provisioning_key is not None or key_path.exists()

    with _staging(out) as stage:
        signer = deploy_kitsign.load_or_create_key(
            key_path if reuse else deploy_kitsign.default_key_path(stage), create=not reuse
        )
        staged = replace(plan, out=stage, force=False)
        ca = pki.create_ca(valid_days=plan.ca_valid_days, now=plan.now)
        pki.write_secret(stage / "ca" / "ca.key", ca.key_pem(ca_passphrase))
        pki.write_public(stage / "ca" / "ca.crt", ca.cert_pem())
        trusted = _write_publisher(publisher_dir(stage), publisher, force=False)
        cfg = plan.coordinator_config()
        pin = deploy_kitsign.key_fingerprint(signer.public_key())
        _write_coordinator_kit(staged, ca, cfg, trusted, pin)
        for index, site in enumerate(plan.sites):
            _write_site_kit(staged, ca, cfg, site, index, trusted, pin)
        if (coord / REVOKED).exists():
            shutil.copy2(coord / REVOKED, coordinator_dir(stage) / REVOKED)
        for kind, ident, note in replaced:
            record_revoked(coordinator_dir(stage), kind, ident, note)
        deploy_kitsign.sign_kit(coordinator_dir(stage), signer, name="coordinator")
        for site in plan.sites:
            deploy_kitsign.sign_kit(site_dir(stage, site), signer, name=site)
        _commit(stage, out)
    kits = [coord, *(site_dir(out, site) for site in plan.sites)]
    logger.info("provisioned %d site kit(s) and the coordinator kit under %s", len(plan.sites), out)
    return kits


class _staging:
    """A 0700 staging folder beside ``out`` (same file system), removed on exit."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=parent)
        )
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _commit(stage: Path, out: Path) -> None:
    """Move a fully written staging tree into ``out``: one rename when ``out`` does not exist."""
    deploy.secure_tree(stage, state_dirs=())
    if not out.exists():
        os.rename(stage, out)
    else:
        for src in sorted(stage.rglob("*")):
            dest = out / src.relative_to(stage)
            if src.is_dir():  # empty ones too: state/ and logs/
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
    deploy.secure_tree(out, state_dirs=())
    for kit in (coordinator_dir(out), *sorted((out / "sites").glob("*"))):
        deploy.secure_tree(kit)


def _replaced_identities(
    coord: Path, sites: Sequence[str], *, server: bool = True
) -> list[tuple[str, str, str]]:
    """The site keys and server certificate that ``--force`` is about to replace (deny list)."""
    found = []
    for site in sites:
        if (pub := coord / "sites" / f"{site}.pub").exists():
            found.append(("key", pki.key_fingerprint(pub.read_bytes()), f"{site} re-keyed"))
    cert = coord / "certs" / "server.crt"
    if server and cert.exists():
        found.append(("cert", pki.cert_serial(cert.read_bytes()), "server re-provisioned"))
    return found


def add_site(
    out: Path,
    site_id: str,
    *,
    max_epsilon: float,
    data_dir: str,
    force: bool = False,
    ca_passphrase: bytes | None = None,
    provisioning_key: Path | None = None,
) -> Path:
    """Add one site to an existing provisioning directory (new key pair, kit, coordinator entry).

    With ``force`` an existing site is re-keyed: its old key goes on the deny list. A site still
    registered with the SuperLink must be revoked first (``deploy revoke``), so that its old key
    is unregistered too.
    """
    deploy.check_site_id(site_id)
    coord = coordinator_dir(out)
    cfg = deploy.load_coordinator(coord)
    if site_id in cfg.sites and not force:
        raise ConfigError(
            f"site {site_id!r} is already provisioned; pick another id or pass --force"
        )
    registered = coord / "sites" / f"{site_id}.node-id"
    if registered.exists() and not (coord / "sites" / f"{site_id}.revoked").exists():
        raise ConfigError(
            f"site {site_id!r} is registered ({registered}); run `facefed deploy revoke --kit "
            f"{coord} --site {site_id}` first so that its old key cannot be used again"
        )
    if not force:
        _refuse_existing(_site_targets(out, site_id))
    ca = pki.load_ca(out / "ca" / "ca.crt", out / "ca" / "ca.key", ca_passphrase)
    signer = deploy_kitsign.load_or_create_key(
        provisioning_key or deploy_kitsign.default_key_path(out), create=False
    )
    pin = deploy_kitsign.key_fingerprint(signer.public_key())
    sites = cfg.sites if site_id in cfg.sites else (*cfg.sites, site_id)
    trusted_file = publisher_dir(out) / deploy_publisher.TRUSTED_ENTITIES
    deploy_publisher.load_trusted_entities(trusted_file)  # refuses a missing or empty file
    plan = ProvisionPlan(
        out=out, coordinator_host=cfg.host, port=cfg.port, bind=cfg.bind,
        control_port=cfg.control_port, hub_port=cfg.hub_port, sites=sites,
        max_epsilon=max_epsilon, data_dir=data_dir, coordinator_data_dir=cfg.data_dir,
        force=force, python=deploy.read_kit_env(coord).get(deploy.PYTHON_ENV) or None,
    )  # fmt: skip
    old = _replaced_identities(coord, [site_id], server=False)
    with _staging(out / ".staging") as stage:
        staged = replace(plan, out=stage, force=False)
        _write_site_kit(
            staged, ca, cfg, site_id, sites.index(site_id), trusted_file.read_text(), pin
        )
        deploy_kitsign.sign_kit(site_dir(stage, site_id), signer, name=site_id)
        _commit(stage, out)
    for kind, ident, note in old:
        record_revoked(coord, kind, ident, note)
    for stale in (f"{site_id}.revoked", f"{site_id}.node-id"):  # of the old key, now denied
        (coord / "sites" / stale).unlink(missing_ok=True)
    epsilons = _site_epsilons(coord) | {site_id: max_epsilon}
    new_cfg = replace(cfg, sites=tuple(epsilons))
    deploy.write_text(
        coord / "coordinator.toml", deploy.coordinator_toml(new_cfg, epsilons), force=True
    )
    deploy_kitsign.sign_kit(coord, signer, name="coordinator")  # new .pub, coordinator.toml
    return site_dir(out, site_id)


def rotate_server_cert(
    out: Path,
    *,
    extra_hosts: Sequence[str] = (),
    valid_days: int = 825,
    ca_passphrase: bytes | None = None,
    provisioning_key: Path | None = None,
) -> Path:
    """Issue a fresh SuperLink certificate from the existing CA.

    The old private key is deleted (not kept as a backup) and the old certificate's serial goes on
    the deny list, so the coordinator and gateway refuse to start with it again. Sites need nothing
    new: they trust the CA, not the server certificate.
    """
    coord = coordinator_dir(out)
    cfg = deploy.load_coordinator(coord)
    ca = pki.load_ca(out / "ca" / "ca.crt", out / "ca" / "ca.key", ca_passphrase)
    signer = deploy_kitsign.load_or_create_key(
        provisioning_key or deploy_kitsign.default_key_path(out), create=False
    )
    server = pki.issue_server_cert(ca, [cfg.host, *extra_hosts], valid_days=valid_days)
    old = coord / "certs" / "server.crt"
    if old.exists():
        record_revoked(coord, "cert", pki.cert_serial(old.read_bytes()), "server rotated")
    pki.write_secret(coord / "certs" / "server.key", server.key_pem(), force=True)
    pki.write_public(coord / "certs" / "server.crt", server.cert_pem(), force=True)
    for backup in (coord / "certs").glob("server.crt.*"):  # the old public certificate, kept
        backup.unlink()  # outside the signed kit: its serial is on the deny list
    deploy_kitsign.sign_kit(coord, signer, name="coordinator")
    return coord / "certs" / "server.crt"


def _site_targets(out: Path, site: str) -> list[Path]:
    kit = site_dir(out, site)
    return [
        kit / "keys" / "supernode.key",
        kit / "keys" / "supernode.pub",
        kit / "site.toml",
        kit / deploy_publisher.TRUSTED_ENTITIES,
        coordinator_dir(out) / "sites" / f"{site}.pub",
    ]


def _refuse_existing(targets: Sequence[Path]) -> None:
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} (and {len(existing) - 1} other file(s)) already exist; facefed never "
            "overwrites keys silently: choose a new --out, or pass --force (old keys deleted, denied)"
        )


def _site_epsilons(coord: Path) -> dict[str, float]:
    import tomllib

    with (coord / "coordinator.toml").open("rb") as handle:
        sites = tomllib.load(handle).get("sites", {})
    return {name: float(table.get("max-epsilon", 0.0)) for name, table in sites.items()}


def _write_publisher(pub: Path, public_key: Ed25519PublicKey | None, *, force: bool) -> str:
    """Write the publisher's keys (a new pair unless ``public_key`` is given).

    Returns:
        The trusted-entities file that every site kit gets.
    """
    if public_key is None:
        keys = pki.create_publisher_keypair()
        pki.write_secret(pub / "publisher.key", keys.private_openssh, force=force)
        public_key = deploy_publisher.parse_public_line(keys.public_openssh.decode(), "new key")
    pki.write_public(pub / "publisher.pub", deploy_publisher.public_line(public_key), force=force)
    trusted = deploy_publisher.trusted_entities_yaml(public_key)
    deploy.write_text(pub / deploy_publisher.TRUSTED_ENTITIES, trusted, force=True)
    return trusted


def _write_coordinator_kit(
    plan: ProvisionPlan,
    ca: pki.Issued,
    cfg: deploy.CoordinatorConfig,
    trusted: str,
    kit_key: str,
) -> None:
    coord, force = coordinator_dir(plan.out), plan.force
    server = pki.issue_server_cert(
        ca,
        [plan.coordinator_host, *plan.extra_hosts],
        valid_days=plan.server_valid_days,
        now=plan.now,
    )
    pki.write_public(coord / "certs" / "ca.crt", ca.cert_pem(), force=force)
    pki.write_public(coord / "certs" / "server.crt", server.cert_pem(), force=force)
    pki.write_secret(coord / "certs" / "server.key", server.key_pem(), force=force)
    epsilons = dict.fromkeys(plan.sites, plan.max_epsilon)
    deploy.write_text(
        coord / "coordinator.toml", deploy.coordinator_toml(cfg, epsilons), force=force
    )
    # Public: `deploy submit` checks that it signs with the key the sites trust.
    deploy.write_text(coord / deploy_publisher.TRUSTED_ENTITIES, trusted, force=True)
    deploy.write_text(
        coord / "start-coordinator.sh", deploy.start_script("coordinator", kit_key), force=True,
        executable=True,
    )  # fmt: skip
    deploy.write_text(coord / deploy.KIT_ENV, deploy.kit_env(plan.python), force=True)
    deploy_units.write_kit_unit(coord, "coordinator", python=plan.python, kit_key=kit_key)
    for sub in deploy_units.WRITABLE["coordinator"]:  # a unit's ReadWritePaths must exist
        (coord / sub).mkdir(parents=True, exist_ok=True)


def _write_site_kit(
    plan: ProvisionPlan,
    ca: pki.Issued,
    cfg: deploy.CoordinatorConfig,
    site: str,
    index: int,
    trusted: str,
    kit_key: str,
) -> Path:
    kit, force = site_dir(plan.out, site), plan.force
    keys = pki.create_node_keypair(comment=site)
    pki.write_secret(kit / "keys" / "supernode.key", keys.private_openssh, force=force)
    pki.write_public(kit / "keys" / "supernode.pub", keys.public_openssh, force=force)
    pki.write_public(
        coordinator_dir(plan.out) / "sites" / f"{site}.pub", keys.public_openssh, force=force
    )
    pki.write_public(kit / "certs" / "ca.crt", ca.cert_pem(), force=True)
    deploy.write_text(kit / deploy_publisher.TRUSTED_ENTITIES, trusted, force=force)
    site_cfg = deploy.SiteConfig(
        site_id=site,
        superlink=cfg.address,
        data_dir=plan.data_dir,
        max_epsilon=plan.max_epsilon,
        runtime_port=deploy.DEFAULT_SITE_RUNTIME_PORT + index,
        partition_id=index if plan.partitions else None,
        num_partitions=len(plan.sites) if plan.partitions else None,
    )
    deploy.write_text(kit / "site.toml", deploy.site_toml(site_cfg), force=force)
    deploy.write_text(
        kit / "start-site.sh", deploy.start_script("site", kit_key), force=True, executable=True
    )
    deploy.write_text(kit / deploy.KIT_ENV, deploy.kit_env(plan.python), force=True)
    deploy_units.write_kit_unit(kit, "site", python=plan.python, kit_key=kit_key)
    for sub in deploy_units.WRITABLE["site"]:  # a unit's ReadWritePaths must exist
        (kit / sub).mkdir(parents=True, exist_ok=True)
    return kit
