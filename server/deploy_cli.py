"""``facefed deploy``: provision startup kits and run a real SuperLink / SuperNode federation.

Subcommands (see docs/deploy.md for the step-by-step guide)::

    init         CA + server certificate + coordinator kit + one kit per site
    add-site     one more site kit signed by the existing CA
    rotate-cert  a fresh SuperLink certificate from the existing CA
    coordinator  start flower-superlink from a coordinator kit, register the kit's sites
    register     register site public keys with a running SuperLink (idempotent)
    revoke       unregister a site's SuperNode and stop re-registering it
    site         start flower-supernode from a site kit
    nodes        list SuperNodes and their status
    submit       `flwr run` the facefed app; success judged from `flwr ls`, not flwr's exit code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.paths import REPO_ROOT
from server import deploy, deploy_flwr, deploy_provision

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``deploy`` command group to the ``facefed`` parser."""
    parser = subparsers.add_parser(
        "deploy", help="provision and start a real SuperLink / SuperNode federation"
    )
    sub = parser.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("init", help="create the CA, server certificate and all kits")
    p.add_argument("--sites", type=int, help="number of sites (named site-1..site-N)")
    p.add_argument("--site-names", help="comma-separated site ids instead of --sites")
    p.add_argument("--coordinator", required=True, help="DNS name or IP the sites dial")
    p.add_argument("--extra-host", action="append", default=[], help="another SAN (repeatable)")
    p.add_argument("--port", type=int, default=deploy.DEFAULT_PORT, help="SuperLink HTTPS port")
    p.add_argument("--bind", default="0.0.0.0", help="address the SuperLink listens on")
    p.add_argument("--out", type=Path, default=Path("facefed-kits"), help="output directory")
    p.add_argument("--max-epsilon", type=float, default=8.0, help="per-site privacy budget")
    p.add_argument(
        "--data-dir", default="/srv/facefed/data", help="site data path written to site.toml"
    )
    p.add_argument("--valid-days", type=int, default=825, help="server certificate lifetime")
    p.add_argument(
        "--demo-partitions",
        action="store_true",
        help="sites share one dataset: write partition-id/num-partitions into each site.toml",
    )
    p.add_argument(
        "--force", action="store_true", help="replace existing files, keeping .bak copies"
    )
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("add-site", help="add one site to an existing provisioning directory")
    p.add_argument("--out", type=Path, required=True, help="the directory `init` wrote")
    p.add_argument("--site", required=True, help="new site id")
    p.add_argument("--max-epsilon", type=float, default=8.0)
    p.add_argument("--data-dir", default="/srv/facefed/data")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_add_site)

    p = sub.add_parser(
        "rotate-cert", help="issue a fresh SuperLink certificate (old one kept as .bak)"
    )
    p.add_argument("--out", type=Path, required=True, help="the directory `init` wrote")
    p.add_argument("--extra-host", action="append", default=[])
    p.add_argument("--valid-days", type=int, default=825)
    p.set_defaults(func=_cmd_rotate)

    p = sub.add_parser("coordinator", help="start flower-superlink and register the kit's sites")
    _kit_arg(p)
    p.add_argument("--no-register", action="store_true", help="do not register site keys on start")
    p.add_argument("--print-command", action="store_true", help="print the command and exit")
    p.set_defaults(func=_cmd_coordinator)

    for name, func, help_text in (
        ("register", _cmd_register, "register site keys with the running SuperLink"),
        ("revoke", _cmd_revoke, "unregister a site and stop re-registering it"),
    ):
        p = sub.add_parser(name, help=help_text)
        _kit_arg(p)
        p.add_argument(
            "--site",
            action="append",
            help="site id (repeatable; default: all)",
            required=name == "revoke",
        )
        p.set_defaults(func=func)

    p = sub.add_parser("site", help="start flower-supernode from a site kit")
    _kit_arg(p)
    p.add_argument("--data-dir", help="override data-dir from site.toml")
    p.add_argument("--print-command", action="store_true", help="print the command and exit")
    p.set_defaults(func=_cmd_site)

    p = sub.add_parser("nodes", help="list SuperNodes and their status (JSON)")
    _kit_arg(p)
    p.set_defaults(func=_cmd_nodes)

    p = sub.add_parser(
        "submit", help="start a run; exit 0 only if `flwr ls` says finished:completed"
    )
    _kit_arg(p)
    p.add_argument(
        "--app", type=Path, default=REPO_ROOT, help="Flower app directory (default: this checkout)"
    )
    p.add_argument("--run-config", action="append", default=[], help="'k=v k2=v2' or a .toml file")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait for the run")
    p.add_argument("--no-wait", action="store_true", help="print the run id and return")
    p.set_defaults(func=_cmd_submit)


def _coordinator_env(kit: Path) -> dict[str, str]:
    """Env for `flwr` calls from a coordinator kit; (re)writes its connection file for this path."""
    cfg = deploy.load_coordinator(kit)
    home = deploy.connection_toml(cfg.address, kit / "certs" / "ca.crt")
    deploy.write_text(kit / "flwr-home" / "config.toml", home, force=True)
    return deploy.flwr_env(kit)


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
        bind=args.bind, extra_hosts=tuple(args.extra_host), max_epsilon=args.max_epsilon,
        data_dir=args.data_dir,
        server_valid_days=args.valid_days, force=args.force, partitions=args.demo_partitions,
    )  # fmt: skip
    kits = deploy_provision.provision(plan)
    print(f"CA (keep offline):  {args.out / 'ca'}")
    print(f"coordinator kit:    {kits[0]}")
    for kit in kits[1:]:
        print(f"site kit:           {kit}   (edit data-dir in site.toml, then ship it to the site)")
    return 0


def _cmd_add_site(args: argparse.Namespace) -> int:
    kit = deploy_provision.add_site(
        args.out, args.site, max_epsilon=args.max_epsilon, data_dir=args.data_dir, force=args.force
    )
    coord = deploy_provision.coordinator_dir(args.out)
    print(f"site kit: {kit}; now run `facefed deploy register --kit {coord}`")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    cert = deploy_provision.rotate_server_cert(
        args.out, extra_hosts=args.extra_host, valid_days=args.valid_days
    )
    print(f"new server certificate: {cert}; restart the coordinator to use it")
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    cfg = deploy.load_coordinator(args.kit)
    cmd = deploy.superlink_command(args.kit, cfg)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    for sub in ("state", "logs"):
        (args.kit / sub).mkdir(parents=True, exist_ok=True)
    env = _coordinator_env(args.kit)
    logger.info(
        "starting SuperLink on %s (log: %s)", cfg.address, args.kit / "logs" / "superlink.log"
    )
    proc = subprocess.Popen(cmd, env=env)
    previous = {
        s: signal.signal(s, lambda n, _f: proc.send_signal(n))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        if not args.no_register:
            deploy_flwr.wait_for_superlink(env, timeout=120.0)
            _register_sites(args.kit, env, None)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()


def _register_sites(kit: Path, env: dict[str, str], only: list[str] | None) -> int:
    cfg = deploy.load_coordinator(kit)
    for site in only or list(cfg.sites):
        if site not in cfg.sites:
            raise ConfigError(
                f"site {site!r} is not in {kit / 'coordinator.toml'}; add it with `deploy add-site`"
            )
        if (kit / "sites" / f"{site}.revoked").exists():
            logger.info("site %s is revoked; not registering it", site)
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
        id_file = args.kit / "sites" / f"{site}.node-id"
        if not id_file.exists():
            raise ConfigError(
                f"{id_file} not found: site {site!r} was never registered from this kit"
            )
        deploy_flwr.unregister(env, int(id_file.read_text().strip()))
        deploy.write_text(args.kit / "sites" / f"{site}.revoked", "revoked\n", force=True)
        print(f"site {site} unregistered; its key is refused from now on")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    cfg = deploy.load_site(args.kit)
    if args.data_dir:
        cfg = deploy.SiteConfig(**{**cfg.__dict__, "data_dir": str(Path(args.data_dir).resolve())})
    cmd = deploy.supernode_command(args.kit, cfg)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    if not Path(cfg.data_dir).is_dir():
        raise ConfigError(
            f"data-dir {cfg.data_dir} in {args.kit / 'site.toml'} does not exist; set it to this "
            "site's face data folder (or pass --data-dir) before starting the SuperNode"
        )
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, deploy.flwr_env(args.kit))  # replaces this process (systemd-friendly)
    return 0  # pragma: no cover


def _cmd_nodes(args: argparse.Namespace) -> int:
    print(json.dumps(deploy_flwr.list_nodes(_coordinator_env(args.kit)), indent=2))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    env = _coordinator_env(args.kit)
    run_id = deploy_flwr.submit(env, args.app.resolve(), run_config=args.run_config)
    print(f"run {run_id} submitted")
    if args.no_wait:
        return 0
    record = deploy_flwr.wait_for_run(env, run_id, timeout=args.timeout)
    status = record.get("status")
    print(f"run {run_id}: {status} (elapsed {record.get('elapsed')} s)")
    if status != deploy_flwr.RUN_COMPLETED:
        print(f"details: {record.get('status-details') or 'none'}; logs: flwr log {run_id}")
    return 0 if status == deploy_flwr.RUN_COMPLETED else 1
