"""Provisioning: the CA, the SuperLink certificate, site keys and kits (``facefed deploy init``).

Nothing here overwrites an existing key or kit file unless ``force`` is given; then each replaced
file is kept next to it as ``<name>.<UTC timestamp>.bak``. All target paths are checked before
the first write, so a refused run leaves the directory exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.crypto import pki
from common.errors import ConfigError
from common.paths import REPO_ROOT
from server import deploy, deploy_publisher

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
    ca_valid_days: int = 3650
    server_valid_days: int = 825
    force: bool = False
    partitions: bool = False
    now: dt.datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        deploy.site_ids(list(self.sites))
        self.coordinator_config()
        for host in self.extra_hosts:
            pki.san_entry(host)

    def coordinator_config(self) -> deploy.CoordinatorConfig:
        """The coordinator's settings (validated)."""
        return deploy.CoordinatorConfig(
            host=self.coordinator_host,
            port=self.port,
            bind=self.bind,
            control_port=self.control_port,
            hub_port=self.hub_port,
            sites=self.sites,
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


def provision(plan: ProvisionPlan) -> list[Path]:
    """Create the CA, server certificate, coordinator kit and one kit per site.

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

    ca = pki.create_ca(valid_days=plan.ca_valid_days, now=plan.now)
    pki.write_secret(out / "ca" / "ca.key", ca.key_pem(), force=plan.force)
    pki.write_public(out / "ca" / "ca.crt", ca.cert_pem(), force=plan.force)
    trusted = _write_publisher(pub, publisher, force=plan.force)
    cfg = plan.coordinator_config()
    _write_coordinator_kit(plan, ca, cfg, trusted)
    kits = [coord]
    for index, site in enumerate(plan.sites):
        kits.append(_write_site_kit(plan, ca, cfg, site, index, trusted))
    logger.info("provisioned %d site kit(s) and the coordinator kit under %s", len(plan.sites), out)
    return kits


def add_site(
    out: Path, site_id: str, *, max_epsilon: float, data_dir: str, force: bool = False
) -> Path:
    """Add one site to an existing provisioning directory (new key pair, kit, coordinator entry)."""
    deploy.check_site_id(site_id)
    coord = coordinator_dir(out)
    cfg = deploy.load_coordinator(coord)
    if site_id in cfg.sites and not force:
        raise ConfigError(
            f"site {site_id!r} is already provisioned; pick another id or pass --force"
        )
    if not force:
        _refuse_existing(_site_targets(out, site_id))
    ca = pki.load_ca(out / "ca" / "ca.crt", out / "ca" / "ca.key")
    trusted_file = publisher_dir(out) / deploy_publisher.TRUSTED_ENTITIES
    deploy_publisher.load_trusted_entities(trusted_file)  # refuses a missing or empty file
    plan = ProvisionPlan(
        out=out, coordinator_host=cfg.host, port=cfg.port, bind=cfg.bind,
        control_port=cfg.control_port, hub_port=cfg.hub_port, sites=(*cfg.sites, site_id),
        max_epsilon=max_epsilon, data_dir=data_dir, force=force,
    )  # fmt: skip
    kit = _write_site_kit(plan, ca, cfg, site_id, len(cfg.sites), trusted_file.read_text())
    epsilons = _site_epsilons(coord) | {site_id: max_epsilon}
    new_cfg = replace(cfg, sites=tuple(epsilons))
    deploy.write_text(
        coord / "coordinator.toml", deploy.coordinator_toml(new_cfg, epsilons), force=True
    )
    return kit


def rotate_server_cert(
    out: Path, *, extra_hosts: Sequence[str] = (), valid_days: int = 825
) -> Path:
    """Issue a fresh SuperLink certificate from the existing CA; the old one is kept as ``.bak``.

    Sites need nothing new: they trust the CA, not the server certificate.
    """
    coord = coordinator_dir(out)
    cfg = deploy.load_coordinator(coord)
    ca = pki.load_ca(out / "ca" / "ca.crt", out / "ca" / "ca.key")
    server = pki.issue_server_cert(ca, [cfg.host, *extra_hosts], valid_days=valid_days)
    pki.write_secret(coord / "certs" / "server.key", server.key_pem(), force=True)
    pki.write_public(coord / "certs" / "server.crt", server.cert_pem(), force=True)
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
            "overwrites keys silently: choose a new --out, or pass --force (old files kept as .bak)"
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
    plan: ProvisionPlan, ca: pki.Issued, cfg: deploy.CoordinatorConfig, trusted: str
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
    # The flwr CLI dials the SuperLink on loopback (in the certificate); the public port is Fleet only.
    home = deploy.connection_toml(cfg.control_address, coord / "certs" / "ca.crt")
    deploy.write_text(coord / "flwr-home" / "config.toml", home, force=True)
    # Public: `deploy submit` checks that it signs with the key the sites trust.
    deploy.write_text(coord / deploy_publisher.TRUSTED_ENTITIES, trusted, force=True)
    deploy.write_text(
        coord / "start-coordinator.sh",
        deploy.start_script("coordinator", REPO_ROOT),
        force=True,
        executable=True,
    )
    for sub in ("state", "logs"):
        (coord / sub).mkdir(parents=True, exist_ok=True)


def _write_site_kit(
    plan: ProvisionPlan,
    ca: pki.Issued,
    cfg: deploy.CoordinatorConfig,
    site: str,
    index: int,
    trusted: str,
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
        kit / "start-site.sh", deploy.start_script("site", REPO_ROOT), force=True, executable=True
    )
    (kit / "logs").mkdir(parents=True, exist_ok=True)
    return kit
