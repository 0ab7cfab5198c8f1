"""Provisioning: the CA, the SuperLink certificate, site keys and kits (``facefed deploy init``).

Nothing here overwrites an existing key or kit file unless ``force`` is given; then each replaced
file is kept next to it as ``<name>.<UTC timestamp>.bak``. All target paths are checked before
the first write, so a refused run leaves the directory exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.crypto import pki
from common.errors import ConfigError
from common.paths import REPO_ROOT
from server import deploy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProvisionPlan:
    """What ``facefed deploy init`` creates."""

    out: Path
    coordinator_host: str
    sites: tuple[str, ...]
    port: int = deploy.DEFAULT_PORT
    bind: str = "0.0.0.0"
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
        deploy.CoordinatorConfig(host=self.coordinator_host, port=self.port, sites=self.sites)
        for host in self.extra_hosts:
            pki.san_entry(host)


def coordinator_dir(out: Path) -> Path:
    """The coordinator kit inside a provisioning directory."""
    return out / "coordinator"


def site_dir(out: Path, site_id: str) -> Path:
    """One site's kit inside a provisioning directory."""
    return out / "sites" / site_id


def provision(plan: ProvisionPlan) -> list[Path]:
    """Create the CA, server certificate, coordinator kit and one kit per site.

    Returns:
        The kit directories: the coordinator's first, then one per site.

    Raises:
        ConfigError: if any file to be written exists and ``plan.force`` is False.
    """
    out, coord = plan.out, coordinator_dir(plan.out)
    targets = [out / "ca" / "ca.key", out / "ca" / "ca.crt", coord / "coordinator.toml"]
    targets += [coord / "certs" / n for n in ("ca.crt", "server.crt", "server.key")]
    for site in plan.sites:
        targets += _site_targets(out, site)
    if not plan.force:
        _refuse_existing(targets)

    ca = pki.create_ca(valid_days=plan.ca_valid_days, now=plan.now)
    pki.write_secret(out / "ca" / "ca.key", ca.key_pem(), force=plan.force)
    pki.write_public(out / "ca" / "ca.crt", ca.cert_pem(), force=plan.force)
    cfg = deploy.CoordinatorConfig(
        host=plan.coordinator_host, port=plan.port, bind=plan.bind, sites=plan.sites
    )
    _write_coordinator_kit(plan, ca, cfg)
    kits = [coord]
    for index, site in enumerate(plan.sites):
        kits.append(_write_site_kit(plan, ca, cfg, site, index))
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
    plan = ProvisionPlan(
        out=out, coordinator_host=cfg.host, port=cfg.port, sites=(*cfg.sites, site_id),
        max_epsilon=max_epsilon, data_dir=data_dir, force=force,
    )  # fmt: skip
    kit = _write_site_kit(plan, ca, cfg, site_id, len(cfg.sites))
    epsilons = _site_epsilons(coord) | {site_id: max_epsilon}
    new_cfg = deploy.CoordinatorConfig(
        host=cfg.host, port=cfg.port, bind=cfg.bind, sites=tuple(epsilons)
    )
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


def _write_coordinator_kit(
    plan: ProvisionPlan, ca: pki.Issued, cfg: deploy.CoordinatorConfig
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
    # The flwr CLI dials the coordinator by its public name, which the certificate lists.
    home = deploy.connection_toml(cfg.address, coord / "certs" / "ca.crt")
    deploy.write_text(coord / "flwr-home" / "config.toml", home, force=True)
    deploy.write_text(
        coord / "start-coordinator.sh",
        deploy.start_script("coordinator", REPO_ROOT),
        force=True,
        executable=True,
    )
    for sub in ("state", "logs"):
        (coord / sub).mkdir(parents=True, exist_ok=True)


def _write_site_kit(
    plan: ProvisionPlan, ca: pki.Issued, cfg: deploy.CoordinatorConfig, site: str, index: int
) -> Path:
    kit, force = site_dir(plan.out, site), plan.force
    keys = pki.create_node_keypair(comment=site)
    pki.write_secret(kit / "keys" / "supernode.key", keys.private_openssh, force=force)
    pki.write_public(kit / "keys" / "supernode.pub", keys.public_openssh, force=force)
    pki.write_public(
        coordinator_dir(plan.out) / "sites" / f"{site}.pub", keys.public_openssh, force=force
    )
    pki.write_public(kit / "certs" / "ca.crt", ca.cert_pem(), force=True)
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
