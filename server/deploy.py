"""Startup kits for a real Flower federation, and the SuperLink / gateway / SuperNode command lines.

``facefed deploy init`` provisions one directory tree (NVIDIA FLARE calls these startup kits)::

    OUT/ca/                      ca.crt, ca.key (0600)       keep offline: rotation, adding sites
    OUT/provisioning/            provisioning.key (0600), .pub: signs every kit (deploy_kitsign)
    OUT/publisher/               publisher.key (0600), publisher.pub, trusted-entities.yaml
                                 the app publisher: only bundles it signed run on a site
    OUT/coordinator/             coordinator.toml, start-coordinator.sh, kit.env, trusted-entities.yaml
        certs/                   ca.crt, server.crt, server.key (0600)
        sites/<site>.pub         public keys to register (and <site>.node-id once registered)
        systemd/                 facefed-coordinator.service (deploy_units)
        kit-manifest.json/.sig   every file's SHA-256 and the CA fingerprint, signed
        state/ logs/ runs/       SuperLink database, log files, run output (written while running)
        flwr-home/               config.toml for the ``flwr`` CLI (loopback), written where it runs
        revoked.txt              deny list: revoked site keys, rotated server certificates
    OUT/sites/<site>/            site.toml, start-site.sh, kit.env, certs/ca.crt, trusted-entities.yaml
        keys/                    supernode.key (0600), supernode.pub
        systemd/                 facefed-site.service
        kit-manifest.json/.sig
        state/ flwr-home/        the site's privacy history; installed app bundles
        (local.toml)             the site's own settings, unsigned (deploy_local)

Every directory is 0700 and every state / log file 0600 whatever the umask (:func:`secure_tree`),
and the processes facefed starts run with umask 077 (:data:`PROCESS_UMASK`, ``start_script``).

Flower 1.41 serves its Fleet, Control and Runtime APIs over HTTPS on ONE ``--host/--port``, with no
login on the Control API. So the SuperLink listens on ``127.0.0.1:<control-port>`` only, and the
public ``<bind>:<port>`` is facefed's gateway, which forwards the Fleet API and nothing else
(:mod:`server.deploy_gateway`). The ``flwr`` CLI (register, submit) therefore works only on the
coordinator host, or through an SSH tunnel to it. Kit files name no path of the provisioning
machine (a kit works wherever it is copied); commands are built with absolute paths at start.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import re
import shutil
import stat
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.training.site_policy import SitePolicy
from common.atomic import atomic_write_text
from common.crypto import pki
from common.errors import ConfigError
from server import deploy_publisher

logger = logging.getLogger(__name__)

CONNECTION = "facefed"
DEFAULT_PORT = 9093
DEFAULT_CONTROL_PORT = 9091
DEFAULT_HUB_PORT = 9092
LOOPBACK = "127.0.0.1"
DEFAULT_SITE_RUNTIME_PORT = 9094
DEFAULT_OUT_DIR = "runs/default"  # a coordinator kit's run output, relative to the kit
SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # always fullmatch: `$` admits a final "\n"
# Kit permissions, whatever the umask: directories owner-only, state and logs owner-only, and the
# processes facefed starts create files with umask 077 (superlink.db and its -wal/-shm, logs).
DIR_MODE = 0o700
STATE_FILE_MODE = 0o600
PROCESS_UMASK = 0o077
# Air-gapped: no telemetry, no PyPI version check (the two outbound calls flwr makes on its own).
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """``coordinator.toml``: how the SuperLink and its gateway are started, which sites belong.

    ``port`` (on ``bind``) is the gateway: the Fleet API, open to the sites. ``control-port`` is the
    SuperLink itself, on 127.0.0.1 only. ``hub-port`` (127.0.0.1) is where ``deploy submit`` serves
    the signed app bundle while a run starts.
    """

    host: str
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    control_port: int = DEFAULT_CONTROL_PORT
    hub_port: int = DEFAULT_HUB_PORT
    sites: tuple[str, ...] = ()
    # The ServerApp's evaluation data (FER2013 / LFW test sets) on the coordinator host, and where
    # a run's results and privacy ledger go (relative: inside the kit). `deploy submit` passes both.
    data_dir: str = ""
    out_dir: str = DEFAULT_OUT_DIR

    def __post_init__(self) -> None:
        pki.san_entry(self.host)  # raises ConfigError for a malformed host
        if not self.out_dir.strip() or "\n" in self.out_dir or "\n" in self.data_dir:
            raise ConfigError(
                f"out-dir = {self.out_dir!r} in coordinator.toml must name a folder (relative: "
                f"inside the kit), e.g. {DEFAULT_OUT_DIR!r}"
            )
        for value, key in (
            (self.port, "port"),
            (self.control_port, "control-port"),
            (self.hub_port, "hub-port"),
        ):
            _check_port(value, key)
        if len({self.port, self.control_port, self.hub_port}) != 3:
            raise ConfigError(
                f"port = {self.port}, control-port = {self.control_port} and hub-port = "
                f"{self.hub_port} must be three different ports"
            )
        for site in self.sites:
            check_site_id(site)

    @property
    def address(self) -> str:
        """``host:port`` as SuperNodes dial it (the gateway)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def control_address(self) -> str:
        """The SuperLink itself (Control API), as the ``flwr`` CLI on the coordinator dials it."""
        return f"{LOOPBACK}:{self.control_port}"

    def run_locations(self, kit: Path) -> dict[str, str]:
        """``data-dir`` and ``out-dir`` for a run, absolute: never the shell's current folder.

        A relative ``out-dir`` lies inside the kit; ``data-dir`` is omitted when the kit names none.
        """
        out = Path(self.out_dir)
        found = {"out-dir": str(out if out.is_absolute() else kit.resolve() / out)}
        if self.data_dir:
            found["data-dir"] = str(Path(self.data_dir).expanduser())
        return found


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """``site.toml``: one site's SuperNode. ``data_dir`` is filled in by the site's IT team."""

    site_id: str
    superlink: str
    data_dir: str
    max_epsilon: float
    runtime_port: int = DEFAULT_SITE_RUNTIME_PORT
    partition_id: int | None = None
    num_partitions: int | None = None
    # the rest of the site's privacy policy (``[policy]``); max-epsilon above is its run cap
    policy: SitePolicy | None = None

    def __post_init__(self) -> None:
        check_site_id(self.site_id)
        if (self.partition_id is None) != (self.num_partitions is None) or (
            self.partition_id is not None
            and self.num_partitions is not None
            and not 0 <= self.partition_id < self.num_partitions
        ):
            raise ConfigError(
                f"partition-id = {self.partition_id}, num-partitions = {self.num_partitions} in "
                "site.toml: set both, with 0 <= partition-id < num-partitions, or neither"
            )
        _check_port(self.runtime_port, "runtime-port")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(
                f"max-epsilon = {self.max_epsilon} in site.toml must be a finite number > 0; "
                "set the privacy budget this site agreed to, e.g. 8.0"
            )
        if ":" not in self.superlink:
            raise ConfigError(
                f"superlink = {self.superlink!r} must be host:port, e.g. fl.example.org:9093"
            )

    @property
    def site_policy(self) -> SitePolicy:
        """The site's privacy policy: ``[policy]``, with ``max-epsilon`` as the run cap."""
        policy = self.policy or SitePolicy(
            max_epsilon_run=self.max_epsilon, max_epsilon_lifetime=max(16.0, self.max_epsilon)
        )
        run_cap = min(policy.max_epsilon_run, self.max_epsilon)
        return dataclasses.replace(policy, max_epsilon_run=run_cap)

    def node_config(self) -> dict[str, str | float | int | bool]:
        """Key/values the ClientApp reads from ``context.node_config`` in deployment; the policy
        travels as ``policy-*`` keys (client/training/site_policy.py), set by the site alone."""
        cfg: dict[str, str | float | int | bool] = {
            "data-dir": self.data_dir,
            "site-id": self.site_id,
            "max-epsilon": float(self.max_epsilon),
            **self.site_policy.to_node_config(),
        }
        if self.partition_id is not None and self.num_partitions is not None:
            cfg["partition-id"] = self.partition_id
            cfg["num-partitions"] = self.num_partitions
        return cfg


def check_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is a safe directory / key-comment name, else raise ConfigError."""
    if not isinstance(site_id, str) or not SITE_ID_RE.fullmatch(site_id):
        raise ConfigError(
            f"site id {site_id!r} must be 1-63 lowercase letters, digits, '-' or '_', starting "
            "with a letter or digit (it names a directory and a key), e.g. uni-hospital-1"
        )
    return site_id


def _check_port(port: int, key: str) -> None:
    if not (isinstance(port, int) and 0 < port < 65536):
        raise ConfigError(f"{key} = {port!r} must be a TCP port between 1 and 65535")


def format_node_config(values: Mapping[str, str | float | int | bool]) -> str:
    """Render ``--node-config`` for Flower 1.41.

    Flower splits the string with ``(\\S+?)=('[^']*'|"[^"]*"|\\S+)`` and parses each value as TOML,
    so strings must be quoted (unquoted ``8`` is an int, ``8.0`` a float), and a quoted string
    cannot contain its own quote character. Strings go in single quotes (TOML literal strings:
    no escape processing, so Windows paths survive).

    Raises:
        ConfigError: for a value Flower's parser cannot carry intact.
    """
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ConfigError(f"node-config key {key!r} may only use letters, digits, '-' and '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            if not math.isfinite(value):
                raise ConfigError(f"node-config {key} = {value} must be finite")
            text = repr(float(value)) if isinstance(value, float) else str(value)
        elif "'" not in value and "\n" not in value:
            text = f"'{value}'"
        else:
            raise ConfigError(
                f"node-config {key} = {value!r}: Flower cannot pass a value containing a single "
                "quote or newline; rename the directory"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _read_toml(path: Path, what: str) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path} not found; pass --kit pointing at the {what} kit made by `facefed deploy init`"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML ({exc}); fix the file or re-provision"
        ) from exc


def _table(doc: Mapping[str, object], name: str, path: Path) -> dict[str, object]:
    table = doc.get(name)
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [{name}] table; re-provision with `facefed deploy init`")
    return table


def _typed(
    table: Mapping[str, object], key: str, kind: type, path: Path, default: object = None
) -> object:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{path}: key {key!r} is missing; add it (see docs/deploy.md)")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise ConfigError(f"{path}: {key} = {value!r} must be a {kind.__name__}")
    return value


def load_coordinator(kit: Path) -> CoordinatorConfig:
    """Read and validate ``coordinator.toml`` in a coordinator kit."""
    path = kit / "coordinator.toml"
    doc = _read_toml(path, "coordinator")
    table = _table(doc, "coordinator", path)
    known = {"host", "port", "bind", "control-port", "hub-port", "data-dir", "out-dir"}
    if unknown := set(table) - known:
        raise ConfigError(
            f"{path}: unknown key(s) {sorted(unknown)} in [coordinator]; known: {sorted(known)}"
        )
    sites = doc.get("sites", {})
    if not isinstance(sites, dict):
        raise ConfigError(f"{path}: [sites] must be a table of site ids")
    return CoordinatorConfig(
        host=str(_typed(table, "host", str, path)),
        port=int(_typed(table, "port", int, path, DEFAULT_PORT)),  # type: ignore[call-overload]
        bind=str(_typed(table, "bind", str, path, "0.0.0.0")),
        control_port=int(_typed(table, "control-port", int, path, DEFAULT_CONTROL_PORT)),  # type: ignore[call-overload]
        hub_port=int(_typed(table, "hub-port", int, path, DEFAULT_HUB_PORT)),  # type: ignore[call-overload]
        sites=tuple(sorted(sites)),
        data_dir=str(_typed(table, "data-dir", str, path, "")),
        out_dir=str(_typed(table, "out-dir", str, path, DEFAULT_OUT_DIR)),
    )


def load_site(kit: Path) -> SiteConfig:
    """Read and validate ``site.toml`` in a site kit."""
    path = kit / "site.toml"
    raw = _read_toml(path, "site")
    table = _table(raw, "site", path)
    known = {
        "site-id",
        "superlink",
        "data-dir",
        "max-epsilon",
        "runtime-port",
        "partition-id",
        "num-partitions",
    }
    if unknown := set(table) - known:
        raise ConfigError(
            f"{path}: unknown key(s) {sorted(unknown)} in [site]; known: {sorted(known)}"
        )
    policy_table = raw.get("policy")
    if policy_table is not None and not isinstance(policy_table, dict):
        raise ConfigError(f"{path}: [policy] must be a table of the site's privacy settings")
    policy = (
        None
        if policy_table is None
        else SitePolicy.from_mapping(
            # [site] max-epsilon is the run cap unless [policy] sets a stricter one
            {
                **({"max-epsilon-run": table["max-epsilon"]} if "max-epsilon" in table else {}),
                **policy_table,
            },
            f"{path} [policy]",
        )
    )
    return SiteConfig(
        site_id=str(_typed(table, "site-id", str, path)),
        superlink=str(_typed(table, "superlink", str, path)),
        data_dir=str(_typed(table, "data-dir", str, path)),
        max_epsilon=float(_typed(table, "max-epsilon", float, path)),  # type: ignore[arg-type]
        runtime_port=int(_typed(table, "runtime-port", int, path, DEFAULT_SITE_RUNTIME_PORT)),  # type: ignore[call-overload]
        partition_id=_optional_int(table, "partition-id", path),
        num_partitions=_optional_int(table, "num-partitions", path),
        policy=policy,
    )


def _optional_int(table: Mapping[str, object], key: str, path: Path) -> int | None:
    return None if key not in table else int(_typed(table, key, int, path))  # type: ignore[call-overload]


def superlink_command(kit: Path, cfg: CoordinatorConfig) -> list[str]:
    """The ``flower-superlink`` argument list: loopback only, TLS, node auth, offline, on disk."""
    kit = kit.resolve()
    return [
        _flwr_bin("flower-superlink"),
        "--ssl-ca-certfile", str(kit / "certs" / "ca.crt"),
        "--ssl-certfile", str(kit / "certs" / "server.crt"),
        "--ssl-keyfile", str(kit / "certs" / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(kit / "state" / "superlink.db"),
        "--log-file", str(kit / "logs" / "superlink.log"),
        "--host", LOOPBACK,
        "--port", str(cfg.control_port),
    ]  # fmt: skip


def superlink_env(kit: Path, cfg: CoordinatorConfig) -> dict[str, str]:
    """Environment for ``flower-superlink``: :func:`flwr_env`, plus facefed's hub on loopback.

    ``FLWR_SUPERGRID_API_URL`` is where Flower's SuperLink fetches hub apps, with their signatures
    (:mod:`server.deploy_publisher`). The two ``FLWR_INTERNAL_GRPC_*`` switches would open legacy
    gRPC Fleet/Control servers on 0.0.0.0, so they are forced off.
    """
    env = flwr_env(kit)
    if (
        cfg.data_dir
    ):  # the ServerApp's evaluation data, also for a run started with plain `flwr run`
        env["FACEFED_DATA"] = cfg.run_locations(kit)["data-dir"]
    env["FLWR_SUPERGRID_API_URL"] = deploy_publisher.hub_api_url(cfg.hub_port)
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY", ""), LOOPBACK, "localhost"]))
    env["FLWR_INTERNAL_GRPC_CONTROL_API"] = "0"
    env["FLWR_INTERNAL_GRPC_FLEET_API"] = "0"
    return env


def gateway_command(kit: Path) -> list[str]:
    """The public Fleet-only gateway (:mod:`server.deploy_gateway`) for a coordinator kit."""
    return [sys.executable, "-m", "common.cli", "deploy", "gateway", "--kit", str(kit.resolve())]


def supernode_command(kit: Path, cfg: SiteConfig) -> list[str]:
    """The ``flower-supernode`` argument list for a site kit.

    Runtime dependency installation is off by default for SuperNodes in 1.41 (only
    ``--allow-runtime-dependency-installation`` turns it on), so nothing is added for it.
    ``--trusted-entities`` makes the SuperNode refuse every app bundle not signed by the publisher
    named in the kit's ``trusted-entities.yaml`` (:mod:`server.deploy_publisher`). The site's
    durable state (privacy history, ledger key, stored replies: :mod:`client.training.site_store`) lives in the
    kit's ``state/``, so a rebooted site keeps its spent budget.
    """
    kit = kit.resolve()
    return [
        _flwr_bin("flower-supernode"),
        "--superlink", cfg.superlink,
        "--root-certificates", str(kit / "certs" / "ca.crt"),
        "--auth-supernode-private-key", str(kit / "keys" / "supernode.key"),
        "--trusted-entities", str(kit / deploy_publisher.TRUSTED_ENTITIES),
        "--node-config", format_node_config({**cfg.node_config(), "state-dir": str(kit / "state")}),
        "--host", "127.0.0.1",
        "--port", str(cfg.runtime_port),
    ]  # fmt: skip


def drop_installed_apps(kit: Path) -> None:
    """Remove the app bundles Flower installed under the kit's ``flwr-home/apps``.

    Flower reuses an installed app folder without checking it against the signed bundle, and
    ``flwr-home`` is written at run time, outside the kit's signature: code planted there would run
    in place of the publisher's. Every start therefore begins without installed apps; each run
    installs its verified bundle afresh.
    """
    shutil.rmtree(kit / "flwr-home" / "apps", ignore_errors=True)


def flwr_env(kit: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline switches, this venv first on PATH, FLWR_HOME.

    ``flower-superlink`` starts ``flower-superexec`` by name, so the venv's ``bin`` must be on PATH.
    ``FLWR_HOME`` is the kit's ``flwr-home``: the ``flwr`` CLI connection file on the coordinator,
    the installed app bundles on a site, so that kits on one machine never share state.
    """
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if kit is not None:
        env["FLWR_HOME"] = str(kit.resolve() / "flwr-home")
    return env


def _flwr_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_connection(kit: Path, cfg: CoordinatorConfig) -> None:
    """(Re)write the coordinator kit's ``flwr-home/config.toml`` for the kit's path on this host.

    Not part of the signed kit: it names the kit's absolute path, known only where the kit runs.
    """
    home = connection_toml(cfg.control_address, kit / "certs" / "ca.crt")
    write_text(kit / "flwr-home" / "config.toml", home, force=True)


def connection_toml(address: str, ca_cert: Path) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink for ``flwr run/ls/supernode``."""
    return (
        "# Written by `facefed deploy init`. Flower 1.41 reads SuperLink connections from here\n"
        "# ($FLWR_HOME/config.toml), not from pyproject.toml.\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {_toml_str(address)}\n"
        f"root-certificates = {_toml_str(str(ca_cert.resolve()))}\n"
    )


def _toml_str(value: str) -> str:
    return "'" + value + "'" if "'" not in value and "\n" not in value else repr_toml_basic(value)


def repr_toml_basic(value: str) -> str:
    """A TOML basic string (JSON escaping is a subset of TOML's)."""
    import json

    return json.dumps(value)


KIT_ENV = "kit.env"
PYTHON_ENV = "FACEFED_PYTHON"
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+-]*")  # fullmatch: no spaces, quotes or `$`


def check_python_path(path: str) -> str:
    """``path`` if it is an absolute path safe in a shell script and a systemd unit, else raise."""
    if not _SAFE_PATH_RE.fullmatch(path):
        raise ConfigError(
            f"--python {path!r} must be an absolute path of letters, digits and _ . / + -, e.g. "
            "/opt/facefed/.venv/bin/python (the facefed installation on the kit's machine)"
        )
    return path


def kit_env(python: str | None, values: Mapping[str, str] = {}) -> str:
    """``kit.env``: KEY=VALUE lines read by the start script and by the systemd unit
    (``EnvironmentFile=``). ``FACEFED_PYTHON`` names the facefed installation on the kit's machine;
    without it the start script runs ``facefed`` from PATH."""
    lines = [
        "# facefed kit environment, written by `facefed deploy init`: read by start-*.sh and by the",
        "# systemd unit (EnvironmentFile=). The environment of the start script wins over this file.",
        f"# {PYTHON_ENV}: the Python of the facefed installation on THIS machine; unset: `facefed`",
        "# from PATH. Choose it with `deploy init --python PATH`.",
        f"{PYTHON_ENV}={check_python_path(python)}" if python else f"#{PYTHON_ENV}=",
    ]
    lines += [f"{key}={value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def read_kit_env(kit: Path) -> dict[str, str]:
    """The KEY=VALUE settings of a kit's ``kit.env`` (empty if it has none)."""
    path = kit / KIT_ENV
    if not path.exists():
        return {}
    pairs = (ln.split("=", 1) for ln in path.read_text(encoding="utf-8").splitlines())
    return {p[0].strip(): p[1].strip() for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def start_script(kit_kind: str, kit_key: str | None = None) -> str:
    """A POSIX shell script starting this kit's process, on whatever machine the kit is copied to.

    It names no path of the provisioning machine: facefed is ``$FACEFED_PYTHON -m common.cli`` (from
    the environment, else ``kit.env``), or else ``facefed`` from PATH, resolved when it starts.
    """
    return (
        "#!/bin/sh\n"
        f"# Start this facefed {kit_kind}. Written by `facefed deploy init`; part of the signed kit.\n"
        "set -eu\n"
        "umask 077   # state, logs and keys this process creates: owner only\n"
        'KIT="$(cd "$(dirname "$0")" && pwd)"\n'
        + (
            "# The provisioning key that signed this kit (deploy site/coordinator check it first).\n"
            f'FACEFED_KIT_KEY="${{FACEFED_KIT_KEY:-{kit_key}}}"\nexport FACEFED_KIT_KEY\n'
            if kit_key
            else ""
        )
        + f'if [ -z "${{{PYTHON_ENV}:-}}" ] && [ -f "$KIT/{KIT_ENV}" ]; then\n'
        f'  {PYTHON_ENV}="$(sed -n \'s/^{PYTHON_ENV}=//p\' "$KIT/{KIT_ENV}" | tail -n 1)"\n'
        "fi\n"
        f'if [ -n "${{{PYTHON_ENV}:-}}" ]; then\n'
        f'  exec "${PYTHON_ENV}" -m common.cli deploy {kit_kind} --kit "$KIT" "$@"\n'
        "fi\n"
        f'exec facefed deploy {kit_kind} --kit "$KIT" "$@"\n'
    )


def now_utc() -> dt.datetime:
    """The current UTC time (a seam for tests)."""
    return dt.datetime.now(dt.UTC)


def write_text(path: Path, text: str, *, force: bool, executable: bool = False) -> None:
    """Write a kit text file, refusing to replace an existing one unless ``force``."""
    if path.exists() and not force:
        raise ConfigError(
            f"{path} already exists; choose a new --out, or pass --force to re-provision"
        )
    atomic_write_text(path, text, mode=0o700 if executable else 0o644)


def secure_tree(root: Path, *, state_dirs: Sequence[str] = ("state", "logs")) -> None:
    """Set kit modes explicitly, whatever the umask was: every directory 0700, and every file in
    ``state_dirs`` (the SuperLink database with its -wal/-shm, logs, site state) 0600."""
    if not root.is_dir():
        return
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        # chmod only what differs: under systemd's ProtectSystem=strict most of the kit is read-only
        want = (
            DIR_MODE
            if path.is_dir()
            else STATE_FILE_MODE
            if path.relative_to(root).parts[0] in state_dirs
            else None
        )
        if want is not None and stat.S_IMODE(path.stat().st_mode) != want:
            path.chmod(want)


def site_toml(cfg: SiteConfig) -> str:
    """Render ``site.toml``; ``data-dir`` carries a comment telling IT what to put there."""
    return (
        "# facefed site kit, signed by its provisioner: do not edit (the site refuses to start).\n"
        "# This machine's own settings (data-dir, runtime-port, a stricter [policy]) go in\n"
        "# local.toml beside this file; see docs/deploy.md.\n"
        "[site]\n"
        f"site-id = {_toml_str(cfg.site_id)}\n"
        f"superlink = {_toml_str(cfg.superlink)}\n"
        f"data-dir = {_toml_str(cfg.data_dir)}   # absolute path to this site's face data\n"
        f"max-epsilon = {float(cfg.max_epsilon)!r}   # privacy budget this site accepts\n"
        f"runtime-port = {cfg.runtime_port}   # loopback only; if taken, set it in local.toml\n"
        + (
            "# Demo only (sites sharing one dataset): which slice of data-dir this site uses.\n"
            "# Delete both lines when the site trains on its own data.\n"
            f"partition-id = {cfg.partition_id}\nnum-partitions = {cfg.num_partitions}\n"
            if cfg.partition_id is not None
            else ""
        )
        + _policy_toml(cfg.site_policy)
    )


def _policy_toml(policy: SitePolicy) -> str:
    """The ``[policy]`` table: set by the site's privacy officer; no run config can ask for less."""
    values = policy.to_mapping()
    return (
        "\n# This site's privacy policy (docs/threat-model.md). A run that asks for less is refused\n"
        "# before any data is read; the coordinator sees one line naming this site and the setting.\n"
        "# max-epsilon above is the per-run cap; a deployed site never releases seeded noise.\n"
        "[policy]\n"
        f"require-dp = {str(values['require-dp']).lower()}\n"
        f"max-epsilon-lifetime = {float(values['max-epsilon-lifetime'])!r}   # over every run\n"
        f"max-delta = {float(values['max-delta'])!r}\n"
        f"accountant = {_toml_str(str(values['accountant']))}   # any, prv, rdp or pld\n"
        f"min-noise-multiplier = {float(values['min-noise-multiplier'])!r}   # 0: no floor\n"
        f"min-batch = {values['min-batch']}   # a smaller batch would tell the site's image count\n"
    )


def coordinator_toml(cfg: CoordinatorConfig, site_epsilons: Mapping[str, float]) -> str:
    """Render ``coordinator.toml``."""
    lines = [
        "# facefed coordinator kit. Sites listed here are registered by `facefed deploy register`.",
        "[coordinator]",
        f"host = {_toml_str(cfg.host)}   # the name sites dial; it is in the server certificate",
        f"port = {cfg.port}   # HTTPS gateway: the Fleet API only; open to sites",
        f"bind = {_toml_str(cfg.bind)}   # the gateway's address",
        f"control-port = {cfg.control_port}   # the SuperLink (Control API): 127.0.0.1 only",
        f"hub-port = {cfg.hub_port}   # 127.0.0.1: signed app bundle, while `deploy submit` runs",
        "# The ServerApp evaluates on FER2013 / LFW test sets in data-dir (on this host); each run's",
        "# results.json, checkpoints and privacy ledger go to out-dir (relative: inside this kit).",
        f"data-dir = {_toml_str(cfg.data_dir)}",
        f"out-dir = {_toml_str(cfg.out_dir)}",
        "",
    ]
    for site in sorted(site_epsilons):
        lines += [f"[sites.{site}]", f"max-epsilon = {float(site_epsilons[site])!r}", ""]
    return "\n".join(lines)


def site_ids(sites: int | Sequence[str]) -> list[str]:
    """``site-1..site-N`` for a count, or the validated given names (unique)."""
    if isinstance(sites, int):
        if sites < 1:
            raise ConfigError(f"--sites {sites}: a federation needs at least one site")
        return [f"site-{i}" for i in range(1, sites + 1)]
    names = [check_site_id(s) for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names {names} contain duplicates; give each site a unique id")
    return names
