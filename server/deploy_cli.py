"""``facefed deploy``: provision startup kits and run a real SuperLink / SuperNode federation.

Subcommands (see docs/deploy.md for the step-by-step guide)::

    init         CA + server certificate + publisher key + coordinator kit + one kit per site
    add-site     one more site kit signed by the existing CA
    rotate-cert  a fresh SuperLink certificate from the existing CA
    sign         sign every kit again after an edit on the provisioning machine
    coordinator  start flower-superlink (127.0.0.1) and the Fleet gateway, register the sites
    gateway      the public Fleet-only gateway alone (``coordinator`` starts it)
    register     register site public keys with a running SuperLink (idempotent)
    revoke       unregister a site's SuperNode and stop re-registering it
    site         start flower-supernode from a site kit (its signature, then local.toml)
    unit         print the systemd unit for a kit installed at a given path
    nodes        list SuperNodes and their status
    status       one screen: the kit's services, sites and last run; exit 1 if something is down
    submit       sign the facefed app and start it, show its rounds as they finish; success judged
                 from `flwr ls`, not flwr's exit code
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from common.cli import bounded_float, bounded_int, positive_int
from common.crypto import pki
from common.errors import ConfigError
from common.paths import REPO_ROOT
from server import (
    deploy,
    deploy_backup,
    deploy_flwr,
    deploy_kitsign,
    deploy_local,
    deploy_provision,
    deploy_publisher,
    deploy_status,
    deploy_units,
    deploy_watch,
)

logger = logging.getLogger(__name__)

CA_PASSPHRASE_ENV = "FACEFED_CA_PASSPHRASE"

EPSILON = bounded_float(0.0, 1e6, open_low=True)  # a privacy budget: finite and > 0
SECONDS = bounded_float(0.0, 1e7, open_low=True)
VALID_DAYS = bounded_int(1, 3650)  # a certificate lifetime; longer is refused (and overflows)


def _ca_passphrase_args(parser: argparse.ArgumentParser, *, new: bool) -> None:
    if new:
        parser.add_argument(
            "--encrypt-ca",
            action="store_true",
            help=f"encrypt ca/ca.key with a passphrase (prompted twice, or ${CA_PASSPHRASE_ENV}, "
            "or --ca-passphrase-fd); implied by either of those two",
        )
    parser.add_argument(
        "--ca-passphrase-fd",
        type=int,
        metavar="FD",
        help=f"read the CA passphrase (one line) from this file descriptor; else ${CA_PASSPHRASE_ENV}"
        ", else a prompt. Never on the command line",
    )


def ca_passphrase(
    args: argparse.Namespace, *, new: bool, key_path: Path | None = None
) -> bytes | None:
    """The CA passphrase from ``--ca-passphrase-fd``, ``$FACEFED_CA_PASSPHRASE`` or a prompt.

    For ``init`` (``new``), None unless encryption was asked for; the prompt asks twice. For the
    commands that load the CA, None when ``key_path`` is not encrypted.
    """
    fd = getattr(args, "ca_passphrase_fd", None)
    if not new and key_path is not None and not pki.ca_key_is_encrypted(key_path):
        return None
    if fd is not None:
        try:
            with os.fdopen(fd, "rb", closefd=False) as handle:
                value = handle.readline().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"--ca-passphrase-fd {fd}: cannot read it ({exc.strerror})") from exc
    elif CA_PASSPHRASE_ENV in os.environ:
        value = os.environ[CA_PASSPHRASE_ENV].encode()
    elif new and not args.encrypt_ca:
        return None
    elif not sys.stdin.isatty():
        raise ConfigError(
            f"the CA key needs a passphrase and there is no terminal to ask it on; set "
            f"${CA_PASSPHRASE_ENV} or pass --ca-passphrase-fd"
        )
    else:
        value = getpass.getpass("CA passphrase: ").encode()
        if new and getpass.getpass("CA passphrase (again): ").encode() != value:
            raise ConfigError("the two CA passphrases differ; run the command again")
    if not value:
        raise ConfigError("the CA passphrase is empty; choose a non-empty passphrase")
    return value


def register(subparsers: Any) -> None:
    """Add the ``deploy`` command group to the ``facefed`` parser."""
    parser = subparsers.add_parser(
        "deploy", help="provision and start a real SuperLink / SuperNode federation"
    )
    sub = parser.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND", required=True)
    deploy_backup.register(sub)

    p = sub.add_parser(
        "init", allow_abbrev=False, help="create the CA, server certificate and all kits"
    )
    p.add_argument("--sites", type=positive_int, help="number of sites (named site-1..site-N)")
    p.add_argument("--site-names", help="comma-separated site ids instead of --sites")
    p.add_argument("--coordinator", required=True, help="DNS name or IP the sites dial")
    p.add_argument("--extra-host", action="append", default=[], help="another SAN (repeatable)")
    p.add_argument(
        "--port",
        type=positive_int,
        default=deploy.DEFAULT_PORT,
        help="public HTTPS port (Fleet API only)",
    )
    p.add_argument("--bind", default="0.0.0.0", help="address the public port listens on")
    p.add_argument(
        "--control-port",
        type=positive_int,
        default=deploy.DEFAULT_CONTROL_PORT,
        help="the SuperLink's own port (Control API), on 127.0.0.1 only",
    )
    p.add_argument(
        "--hub-port",
        type=positive_int,
        default=deploy.DEFAULT_HUB_PORT,
        help="127.0.0.1 port where `deploy submit` serves the signed app bundle",
    )
    p.add_argument(
        "--publisher-pub",
        type=Path,
        help="trust this existing publisher (ssh-ed25519 public key file) instead of creating one",
    )
    p.add_argument("--out", type=Path, default=Path("facefed-kits"), help="output directory")
    p.add_argument("--max-epsilon", type=EPSILON, default=8.0, help="per-site privacy budget")
    p.add_argument(
        "--data-dir",
        default="/srv/facefed/data",
        help="the face data folder: data-dir of every site.toml, and of coordinator.toml unless "
        "--coordinator-data-dir is given (default: %(default)s)",
    )
    p.add_argument(
        "--coordinator-data-dir",
        help="the coordinator's evaluation data (FER2013 / LFW test sets) on the coordinator host "
        "(default: the --data-dir path)",
    )
    p.add_argument(
        "--valid-days", type=VALID_DAYS, default=825, help="server certificate lifetime, days"
    )
    p.add_argument(
        "--python",
        type=_python_path,
        help="the facefed installation's Python on the kits' machines, written to each kit.env "
        "(default: none; the start scripts run `facefed` from PATH)",
    )
    p.add_argument(
        "--demo-partitions",
        action="store_true",
        help="sites share one dataset: write partition-id/num-partitions into each site.toml",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing files; replaced keys are deleted and put on the deny list",
    )
    _provisioning_key_arg(p, new=True)
    _ca_passphrase_args(p, new=True)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser(
        "add-site", allow_abbrev=False, help="add one site to an existing provisioning directory"
    )
    p.add_argument("--out", type=Path, required=True, help="the directory `init` wrote")
    p.add_argument("--site", required=True, help="new site id")
    p.add_argument("--max-epsilon", type=EPSILON, default=8.0)
    p.add_argument("--data-dir", default="/srv/facefed/data")
    p.add_argument("--force", action="store_true", help="re-key the site (old key denied)")
    _provisioning_key_arg(p, new=False)
    _ca_passphrase_args(p, new=False)
    p.set_defaults(func=_cmd_add_site)

    p = sub.add_parser(
        "rotate-cert",
        allow_abbrev=False,
        help="issue a fresh SuperLink certificate (old key deleted, serial denied)",
    )
    p.add_argument("--out", type=Path, required=True, help="the directory `init` wrote")
    p.add_argument("--extra-host", action="append", default=[])
    p.add_argument("--valid-days", type=VALID_DAYS, default=825)
    _provisioning_key_arg(p, new=False)
    _ca_passphrase_args(p, new=False)
    p.set_defaults(func=_cmd_rotate)

    p = sub.add_parser(
        "sign",
        allow_abbrev=False,
        help="sign every kit under --out again, after an edit on the provisioning machine",
    )
    p.add_argument("--out", type=Path, required=True, help="the directory `init` wrote")
    _provisioning_key_arg(p, new=True)
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("coordinator", help="start flower-superlink and register the kit's sites")
    _kit_arg(p)
    _kit_key_arg(p)
    p.add_argument("--no-register", action="store_true", help="do not register site keys on start")
    p.add_argument("--print-command", action="store_true", help="print the commands and exit")
    p.set_defaults(func=_cmd_coordinator)

    p = sub.add_parser("gateway", help="serve only the Fleet API on the public port")
    _kit_arg(p)
    p.set_defaults(func=_cmd_gateway)

    for name, func, help_text in (
        ("register", _cmd_register, "register site keys with the running SuperLink"),
        ("revoke", _cmd_revoke, "unregister a site and stop re-registering it"),
    ):
        p = sub.add_parser(name, help=help_text)
        _kit_arg(p)
        p.add_argument(
            "--site",
            action="append",
            help="site id (repeatable; required)"
            if name == "revoke"
            else "site id (repeatable; default: every site in coordinator.toml)",
            required=name == "revoke",
        )
        p.set_defaults(func=func)

    p = sub.add_parser("site", help="start flower-supernode from a site kit")
    _kit_arg(p)
    _kit_key_arg(p)
    p.add_argument("--data-dir", help="override data-dir from site.toml")
    p.add_argument(
        "--runtime-port",
        type=positive_int,
        help="override runtime-port from site.toml (the signed kit stays as it was sent)",
    )
    p.add_argument("--print-command", action="store_true", help="print the command and exit")
    p.set_defaults(func=_cmd_site)

    p = sub.add_parser(
        "unit", help="print the systemd unit for a kit installed at --kit on this machine"
    )
    _kit_arg(p)
    _kit_key_arg(p)
    p.add_argument(
        "--python",
        type=_python_path,
        default=deploy_units.DEFAULT_PYTHON,
        help="the facefed installation's Python (default: %(default)s)",
    )
    p.add_argument("--user", default=deploy_units.DEFAULT_USER, help="service account")
    p.add_argument("--group", help="service group (default: the --user name)")
    p.set_defaults(func=_cmd_unit)

    p = sub.add_parser("nodes", help="list SuperNodes and their status (JSON)")
    _kit_arg(p)
    p.set_defaults(func=_cmd_nodes)

    p = sub.add_parser(
        "status",
        help="the kit's services, sites and last run on one screen; exit 0 healthy, 1 if down",
    )
    _kit_arg(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "submit", help="start a run; exit 0 only if `flwr ls` says finished:completed"
    )
    _kit_arg(p)
    p.add_argument(
        "--app", type=Path, default=REPO_ROOT, help="Flower app directory (default: this checkout)"
    )
    p.add_argument("--run-config", action="append", default=[], help="'k=v k2=v2' or a .toml file")
    p.add_argument(
        "--timeout", type=SECONDS, default=6 * 3600.0, help="seconds to wait for the run"
    )
    p.add_argument("--no-wait", action="store_true", help="print the run id and return")
    p.add_argument(
        "--publisher-key",
        type=Path,
        help="the publisher's private key (default: publisher/publisher.key next to the kit)",
    )
    p.set_defaults(func=_cmd_submit)


def _python_path(value: str) -> str:
    try:
        return deploy.check_python_path(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _coordinator_env(kit: Path) -> dict[str, str]:
    """Env for `flwr` calls from a coordinator kit; (re)writes its connection file for this path."""
    deploy.write_connection(kit, deploy.load_coordinator(kit))
    return deploy.flwr_env(kit)


def _provisioning_key_arg(parser: argparse.ArgumentParser, *, new: bool) -> None:
    parser.add_argument(
        "--provisioning-key",
        type=Path,
        help="the Ed25519 key that signs the kits (default: OUT/provisioning/provisioning.key"
        + (", created if absent)" if new else ")"),
    )


def _kit_key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kit-key",
        help=f"SHA256:… fingerprint of the provisioning key that must have signed the kit "
        f"(default: ${deploy_kitsign.KEY_ENV}, which the start script and systemd unit set)",
    )


def _kit_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kit", type=Path, required=True, help="kit directory made by `deploy init`"
    )


def _cmd_init(args: argparse.Namespace) -> int:
    if (args.sites is None) == (args.site_names is None):
        raise ConfigError("give exactly one of --sites N or --site-names a,b,c")
    names = deploy.site_ids(args.sites if args.sites is not None else args.site_names.split(","))
    plan = deploy_provision.ProvisionPlan(
        out=args.out, coordinator_host=args.coordinator, sites=tuple(names), port=args.port,
        bind=args.bind, control_port=args.control_port, hub_port=args.hub_port,
        publisher_pub=args.publisher_pub,
        extra_hosts=tuple(args.extra_host), max_epsilon=args.max_epsilon,
        data_dir=args.data_dir, coordinator_data_dir=args.coordinator_data_dir,
        server_valid_days=args.valid_days, force=args.force, partitions=args.demo_partitions,
        python=args.python, provisioning_key=args.provisioning_key,
    )  # fmt: skip
    kits = deploy_provision.provision(plan, ca_passphrase=ca_passphrase(args, new=True))
    key = args.provisioning_key or deploy_kitsign.default_key_path(args.out)
    pin = deploy_kitsign.key_fingerprint(deploy_publisher.load_signing_key(key).public_key())
    print(f"CA (keep offline):  {args.out / 'ca'}")
    print(f"app publisher:      {deploy_provision.publisher_dir(args.out)}   (signs every run)")
    print(f"kits signed by:     {pin}   ({key}; keep it with the CA key)")
    print(f"coordinator kit:    {kits[0]}")
    for kit in kits[1:]:
        print(f"site kit:           {kit}   (edit data-dir in site.toml, then ship it to the site)")
    return 0


def _cmd_add_site(args: argparse.Namespace) -> int:
    kit = deploy_provision.add_site(
        args.out, args.site, max_epsilon=args.max_epsilon, data_dir=args.data_dir,
        force=args.force, ca_passphrase=ca_passphrase(args, new=False, key_path=_ca_key(args.out)),
        provisioning_key=args.provisioning_key,
    )  # fmt: skip
    coord = deploy_provision.coordinator_dir(args.out)
    print(f"site kit: {kit}; now run `facefed deploy register --kit {coord}`")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    cert = deploy_provision.rotate_server_cert(
        args.out, extra_hosts=args.extra_host, valid_days=args.valid_days,
        ca_passphrase=ca_passphrase(args, new=False, key_path=_ca_key(args.out)),
        provisioning_key=args.provisioning_key,
    )  # fmt: skip
    print(f"new server certificate: {cert}; restart the coordinator to use it")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    coord = deploy_provision.coordinator_dir(args.out)
    deploy.load_coordinator(coord)  # a kit that no longer parses is not signed
    kits = [(coord, "coordinator")]
    for site in sorted(p.name for p in (args.out / "sites").glob("*") if p.is_dir()):
        deploy.load_site(deploy_provision.site_dir(args.out, site))
        kits.append((deploy_provision.site_dir(args.out, site), site))
    # Only once the kits are known to be there: kits made before kits were signed have no
    # provisioning key yet, and one is made at the default.
    key = deploy_kitsign.load_or_create_key(
        args.provisioning_key or deploy_kitsign.default_key_path(args.out),
        create=args.provisioning_key is None,
    )
    for kit, name in kits:
        deploy_kitsign.sign_kit(kit, key, name=name)
        print(f"signed {kit} ({deploy_kitsign.key_fingerprint(key.public_key())})")
    return 0


def _ca_key(out: Path) -> Path:
    return out / "ca" / "ca.key"


def _cmd_coordinator(args: argparse.Namespace) -> int:
    cfg = deploy.load_coordinator(args.kit)
    commands = {
        "superlink": (deploy.superlink_command(args.kit, cfg), deploy.superlink_env(args.kit, cfg)),
        "gateway": (deploy.gateway_command(args.kit), deploy.flwr_env(args.kit)),
    }
    if args.print_command:
        for cmd, _env in commands.values():
            print(shlex.join(cmd))
        return 0
    deploy_kitsign.verify_kit(args.kit, pinned=deploy_kitsign.pinned_key(args.kit_key))
    deploy.drop_installed_apps(args.kit)
    deploy_provision.refuse_revoked_server_cert(args.kit)
    for sub in ("state", "logs", "runs"):
        (args.kit / sub).mkdir(parents=True, exist_ok=True)
    if not cfg.data_dir or not Path(cfg.data_dir).is_dir():
        logger.warning(
            "data-dir %r in %s is not a folder: runs will fail until the evaluation data is there",
            cfg.data_dir, args.kit / "coordinator.toml",
        )  # fmt: skip
    deploy.secure_tree(args.kit)  # 0700 dirs, 0600 state/log files, whatever they were
    env = _coordinator_env(args.kit)
    logger.info(
        "starting SuperLink on %s (Control API, loopback only; log: %s), Fleet gateway on %s:%d",
        cfg.control_address, args.kit / "logs" / "superlink.log", cfg.bind, cfg.port,
    )  # fmt: skip
    # umask 077: superlink.db, its -wal/-shm and the log are created owner-only.
    # cwd = the kit: a relative path a run is given lands in the kit, never in the shell's folder.
    procs = {
        name: subprocess.Popen(cmd, env=penv, umask=deploy.PROCESS_UMASK, cwd=args.kit.resolve())
        for name, (cmd, penv) in commands.items()
    }

    asked: list[int] = []  # the stop signal received, if any

    def forward(signum: int, _frame: object) -> None:
        asked.append(signum)
        for proc in procs.values():
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not args.no_register:
            deploy_flwr.wait_for_superlink(env, timeout=120.0)
            _register_sites(args.kit, env, None)
        code = _wait_first(procs)
        # A stop that was asked for (systemctl stop, kill, Ctrl-C) is not a failure: a negative
        # code (the child died of the forwarded signal) would exit 241 and mark the unit failed.
        return (130 if asked[0] == signal.SIGINT else 0) if asked else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs.values():
            _stop(proc)


def _wait_first(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    """Block until one process exits (the other is then stopped by the caller); its exit code."""
    while True:
        for name, proc in procs.items():
            if (code := proc.poll()) is not None:
                logger.info("%s exited with code %d; stopping the coordinator", name, code)
                return code
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        if proc.poll() is None:
            proc.kill()


def _cmd_gateway(args: argparse.Namespace) -> int:
    from server import deploy_gateway  # uvicorn and httpx: only this command needs them

    cfg = deploy.load_coordinator(args.kit)
    deploy_provision.refuse_revoked_server_cert(args.kit)
    os.umask(deploy.PROCESS_UMASK)
    certs = args.kit.resolve() / "certs"
    for name in ("server.crt", "server.key", "ca.crt"):
        if not (certs / name).is_file():
            raise ConfigError(f"{certs / name} not found; re-provision or `deploy rotate-cert`")
    deploy_gateway.serve(
        host=cfg.bind, port=cfg.port, upstream=cfg.control_address,
        certfile=certs / "server.crt", keyfile=certs / "server.key", ca_file=certs / "ca.crt",
    )  # fmt: skip
    return 0


def _register_sites(kit: Path, env: dict[str, str], only: list[str] | None) -> int:
    cfg = deploy.load_coordinator(kit)
    for site in only or list(cfg.sites):
        if site not in cfg.sites:
            raise ConfigError(
                f"site {site!r} is not in {kit / 'coordinator.toml'}; add it with `deploy add-site`"
            )
        if (kit / "sites" / f"{site}.revoked").exists() or deploy_provision.site_key_revoked(
            kit, site
        ):
            if only:
                raise ConfigError(
                    f"site {site!r}: its key is revoked (deny list {kit / deploy_provision.REVOKED})"
                    f"; re-key it with `facefed deploy add-site --force --site {site}`"
                )
            logger.warning("site %s: its key is revoked; not registering it", site)
            continue
        node_id = deploy_flwr.register(env, kit / "sites" / f"{site}.pub", site)
        if node_id is not None:
            deploy.write_text(kit / "sites" / f"{site}.node-id", f"{node_id}\n", force=True)
            logger.info("site %s registered as node %d", site, node_id)
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    return _register_sites(args.kit, _coordinator_env(args.kit), args.site)


def _cmd_revoke(args: argparse.Namespace) -> int:
    env = _coordinator_env(args.kit)
    for site in args.site:
        deploy.check_site_id(site)
        id_file = args.kit / "sites" / f"{site}.node-id"
        pub = args.kit / "sites" / f"{site}.pub"
        if pub.exists():  # denied first: even if unregistering fails, it is never registered again
            fingerprint = pki.key_fingerprint(pub.read_bytes())
            deploy_provision.record_revoked(args.kit, "key", fingerprint, f"{site} revoked")
        if not id_file.exists():
            raise ConfigError(
                f"{id_file} not found: site {site!r} was never registered from this kit"
            )
        deploy_flwr.unregister(env, int(id_file.read_text().strip()))
        deploy.write_text(args.kit / "sites" / f"{site}.revoked", "revoked\n", force=True)
        print(f"site {site} unregistered; its key is refused from now on")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    if not args.print_command:  # the signed kit first, before any of it is read
        deploy_kitsign.verify_kit(args.kit, pinned=deploy_kitsign.pinned_key(args.kit_key))
    cfg = deploy_local.apply_local(args.kit, deploy.load_site(args.kit))
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=str(Path(args.data_dir).resolve()))
    if args.runtime_port:
        cfg = dataclasses.replace(cfg, runtime_port=args.runtime_port)
    cmd = deploy.supernode_command(args.kit, cfg)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    # Fail closed: without a trusted publisher, Flower runs whatever bundle a run brings.
    deploy_publisher.load_trusted_entities(args.kit / deploy_publisher.TRUSTED_ENTITIES)
    deploy.drop_installed_apps(args.kit)
    if not Path(cfg.data_dir).is_dir():
        raise ConfigError(
            f"data-dir {cfg.data_dir} (site.toml, {deploy_local.LOCAL} or --data-dir) does not "
            f"exist; set data-dir in {args.kit / deploy_local.LOCAL} to this site's face data "
            "folder (or pass --data-dir) before starting the SuperNode"
        )
    sys.stdout.flush()
    os.umask(deploy.PROCESS_UMASK)  # the site's state and logs: owner only
    deploy.secure_tree(args.kit)
    os.execvpe(cmd[0], cmd, deploy.flwr_env(args.kit))  # replaces this process (systemd-friendly)
    return 0  # pragma: no cover


def _cmd_unit(args: argparse.Namespace) -> int:
    kit = args.kit.resolve()
    kind: deploy_units.KitKind = "coordinator" if (kit / "coordinator.toml").exists() else "site"
    if kind == "site" and not (kit / "site.toml").exists():
        raise ConfigError(f"{kit} holds neither coordinator.toml nor site.toml; pass a kit folder")
    signer = deploy_kitsign.verify_kit(kit, pinned=deploy_kitsign.pinned_key(args.kit_key))
    print(
        deploy_units.unit_text(
            kind, kit=str(kit), python=args.python, user=args.user, group=args.group,
            kit_key=signer,
        ),
        end="",
    )  # fmt: skip
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    nodes = deploy_flwr.list_nodes(_coordinator_env(args.kit))
    print(json.dumps(site_nodes(args.kit, nodes), indent=2))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    kit, probes = args.kit.resolve(), deploy_status.Probes()
    if (kit / "coordinator.toml").exists():
        cfg = deploy.load_coordinator(kit)
        results = _read_results(Path(cfg.run_locations(kit)["out-dir"]) / "results.json")
        checks = deploy_status.coordinator_checks(
            kit, cfg, probes, results=results, now=dt.datetime.now().astimezone(),
            nodes=lambda: site_nodes(kit, deploy_flwr.list_nodes(_coordinator_env(kit), timeout=15)),
            runs=lambda: deploy_flwr.call(
                ["ls", deploy.CONNECTION], _coordinator_env(kit), timeout=15
            )["runs"],
        )  # fmt: skip
        title = f"coordinator kit {kit}"
        if any(c.state == "down" and not c.name.startswith("site ") for c in checks):
            hint = "start it: ./start-coordinator.sh or `systemctl start facefed-coordinator`"
        else:
            hint = (
                "start each such site's SuperNode: start-site.sh or `systemctl start facefed-site`"
            )
    elif (kit / "site.toml").exists():
        site_cfg = deploy_local.apply_local(kit, deploy.load_site(kit))
        checks = deploy_status.site_kit_checks(kit, site_cfg, probes)
        title = f"site kit {kit} ({site_cfg.site_id})"
        if checks[0].state == "down":
            hint = "start it: ./start-site.sh or `systemctl start facefed-site`"
        else:
            hint = "ask the coordinator's operator; check the firewall (docs/deploy.md section 2)"
    else:
        raise ConfigError(f"{kit} holds neither coordinator.toml nor site.toml; pass a kit folder")
    print(deploy_status.render(title, checks, hint))
    return 0 if deploy_status.healthy(checks) else 1


def _read_results(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def site_nodes(kit: Path, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flower's node list with each node's ``site`` (from the kit's ``sites/<site>.node-id``) and
    ``last-seen`` ("now" while online, else when it went offline), and a row per kit site that has
    no node (``status``: ``not registered`` or ``revoked``)."""
    cfg = deploy.load_coordinator(kit)
    by_id: dict[str, str] = {}
    for site in cfg.sites:
        id_file = kit / "sites" / f"{site}.node-id"
        if id_file.exists():
            by_id[id_file.read_text().strip()] = site
    rows = []
    for node in nodes:
        online = node.get("status") == "online"
        times = [node.get(k) for k in ("offline-at", "online-at")]
        known = [t for t in times if t and t != "N/A"]  # flwr writes N/A for a time not recorded
        last = "now" if online else known[0] if known else "never"
        rows.append({"site": by_id.get(str(node.get("node-id"))), "last-seen": last, **node})
    listed = {row["site"] for row in rows}
    for site in cfg.sites:
        if site not in listed:
            revoked = (kit / "sites" / f"{site}.revoked").exists()
            status = "revoked" if revoked else "not registered"
            rows.append({"site": site, "last-seen": "never", "node-id": None, "status": status})
    return rows


def _app_run_config(app: Path, run_config: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config keys the app declares with their defaults, what ``--run-config`` sets)."""
    from flwr.common.config import parse_config_args

    try:
        with (app / "pyproject.toml").open("rb") as handle:
            declared = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
        given = dict(parse_config_args(run_config)) if run_config else {}
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"--app {app} / --run-config cannot be read ({exc}); pass a Flower app folder and "
            "'key=value' pairs or a .toml file"
        ) from exc
    return declared, given


def _kit_run_locations(
    kit: Path, cfg: deploy.CoordinatorConfig, declared: dict[str, Any], given: dict[str, Any]
) -> list[str]:
    """The kit's ``data-dir`` / ``out-dir`` as one ``--run-config`` item, for the keys the app
    declares and the operator's ``--run-config`` does not set (empty list: nothing to add).

    Raises:
        ConfigError: if the run's evaluation data folder does not exist on this host.
    """
    wanted = {k: v for k, v in cfg.run_locations(kit).items() if k in declared and k not in given}
    data = str(given.get("data-dir", wanted.get("data-dir", "")))
    if "data-dir" in declared and not (data and Path(data).is_dir()):
        raise ConfigError(
            f"the coordinator's evaluation data folder {data or '(none)'} does not exist (data-dir "
            f"in {kit / 'coordinator.toml'}); put the FER2013 / LFW archives there, or set "
            "data-dir there or in --run-config"
        )
    if wanted:
        logger.info("run locations from the kit: %s", wanted)
    return [deploy.format_node_config(wanted)] if wanted else []


def _usable_sites(kit: Path, cfg: deploy.CoordinatorConfig) -> list[str]:
    """The kit's sites that are registered (a ``.node-id``) and not revoked."""
    return [
        site
        for site in cfg.sites
        if (kit / "sites" / f"{site}.node-id").exists()
        and not (kit / "sites" / f"{site}.revoked").exists()
        and not deploy_provision.site_key_revoked(kit, site)
    ]


def _refuse_too_many_sites(
    kit: Path, cfg: deploy.CoordinatorConfig, declared: dict[str, Any], given: dict[str, Any]
) -> None:
    if "num-sites" not in declared:
        return
    asked, usable = given.get("num-sites", declared["num-sites"]), _usable_sites(kit, cfg)
    if isinstance(asked, int) and asked > len(usable):
        raise ConfigError(
            f"the run asks for num-sites = {asked} but {len(usable)} site(s) are registered and not "
            f"revoked ({', '.join(usable) or 'none'}); lower num-sites, or add and register sites"
        )


def _cmd_submit(args: argparse.Namespace) -> int:
    cfg = deploy.load_coordinator(args.kit)
    key_path = args.publisher_key or deploy_provision.publisher_dir(args.kit.resolve().parent) / (
        "publisher.key"
    )
    key = deploy_publisher.load_signing_key(key_path)
    trusted = deploy_publisher.load_trusted_entities(args.kit / deploy_publisher.TRUSTED_ENTITIES)
    if deploy_publisher.key_id(key.public_key()) not in trusted:
        raise ConfigError(
            f"{key_path} is not the publisher the sites trust ({sorted(trusted)} in "
            f"{args.kit / deploy_publisher.TRUSTED_ENTITIES}); the sites would refuse the run"
        )
    declared, given = _app_run_config(args.app, args.run_config)
    _refuse_too_many_sites(args.kit, cfg, declared, given)
    run_config = [*args.run_config, *_kit_run_locations(args.kit, cfg, declared, given)]
    fab = deploy_publisher.build_signed_fab(args.app.resolve(), key)
    env = _coordinator_env(args.kit)
    results = _results_path(args.kit, cfg, declared, given)
    baseline = deploy_watch.file_stamp(results) if results is not None else None
    run_id = deploy_flwr.submit(env, fab, hub_port=cfg.hub_port, run_config=run_config)
    print(f"run {run_id} submitted ({fab.app_spec}, signed by {fab.key_id})", flush=True)
    if args.no_wait:
        return 0
    asked = given.get("num-sites", declared.get("num-sites", len(_usable_sites(args.kit, cfg))))
    watch = deploy_watch.RunWatch(
        run_id=run_id, results=results, baseline=baseline,
        num_sites=asked if isinstance(asked, int) else len(cfg.sites),
        nodes=lambda: site_nodes(args.kit, deploy_flwr.list_nodes(env, timeout=30.0)),
    )  # fmt: skip
    try:
        record = deploy_flwr.wait_for_run(env, run_id, timeout=args.timeout, on_poll=watch.poll)
    finally:
        watch.clear()
    status = record.get("status")
    print(f"run {run_id}: {status} (elapsed {record.get('elapsed')} s)")
    if status != deploy_flwr.RUN_COMPLETED:
        print(f"details: {record.get('status-details') or 'none'}; logs: flwr log {run_id}")
    return 0 if status == deploy_flwr.RUN_COMPLETED else 1


def _results_path(
    kit: Path, cfg: deploy.CoordinatorConfig, declared: dict[str, Any], given: dict[str, Any]
) -> Path | None:
    """The run's ``results.json``: in its ``out-dir`` (relative: in the kit, the SuperLink's cwd)."""
    if "out-dir" not in declared:
        return None
    out = Path(str(given.get("out-dir") or cfg.run_locations(kit)["out-dir"])).expanduser()
    return (out if out.is_absolute() else kit.resolve() / out) / "results.json"
