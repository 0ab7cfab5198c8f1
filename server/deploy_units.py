"""systemd units for a coordinator kit (SuperLink + Fleet gateway) and a site kit (SuperNode).

``facefed deploy init`` writes one into each kit (``systemd/facefed-coordinator.service``,
``systemd/facefed-site.service``) for the install locations docs/deploy.md uses; ``facefed deploy
unit --kit PATH`` prints one for a kit installed elsewhere. Each unit:

* runs facefed from the installation named by an absolute Python path (``ExecStart=``), never from
  the kit, as a dedicated ``User=`` / ``Group=``, with ``WorkingDirectory=`` the kit;
* pins the provisioning key (``Environment=FACEFED_KIT_KEY=``) in the unit itself, which lives in
  ``/etc`` where the service cannot write, so a kit re-signed by another key is refused. It reads no
  ``EnvironmentFile=`` from the kit: such a file would override that pin;
* restarts on failure, and is sandboxed: read-only system (``ProtectSystem=strict``) with write
  access only to the kit's run-time folders (``ReadWritePaths=``) and a private cache folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from common.errors import ConfigError
from server import deploy, deploy_kitsign

KitKind = Literal["coordinator", "site"]
DEFAULT_INSTALL = {"coordinator": "/opt/facefed-coordinator", "site": "/opt/facefed-site"}
DEFAULT_PYTHON = "/opt/facefed/.venv/bin/python"
DEFAULT_USER = "facefed"
UNIT_DIR = "systemd"
# The folders each kit's own processes write while running (the rest of the kit is read-only).
WRITABLE = {
    "coordinator": ("state", "logs", "runs", "flwr-home", "sites"),
    "site": ("state", "flwr-home"),
}
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HARDENING = (
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("SystemCallArchitectures", "native"),
    ("CapabilityBoundingSet", ""),
    ("UMask", "0077"),
)


def unit_name(kind: KitKind) -> str:
    """``facefed-coordinator.service`` or ``facefed-site.service``."""
    return f"facefed-{kind}.service"


def unit_text(
    kind: KitKind,
    *,
    kit: str,
    python: str = DEFAULT_PYTHON,
    user: str = DEFAULT_USER,
    group: str | None = None,
    kit_key: str | None = None,
) -> str:
    """The systemd unit starting the kit installed at ``kit`` (an absolute path on its machine).

    Raises:
        ConfigError: for a relative or unsafe path, or a malformed user or group name.
    """
    deploy.check_python_path(python)
    if not re.fullmatch(r"/[A-Za-z0-9_./+-]*", kit):
        raise ConfigError(f"--kit {kit!r} must be an absolute path of letters, digits, _ . / + -")
    for name in (user, group or user):
        if not _USER_RE.fullmatch(name):
            raise ConfigError(f"user/group {name!r} must be a plain system account name")
    kit = kit.rstrip("/") or "/"
    cache = f"facefed-{kind}"
    what = "Flower SuperLink and Fleet gateway" if kind == "coordinator" else "Flower SuperNode"
    lines = [
        f"# facefed {kind} ({what}). Written by `facefed deploy`; install with",
        f"#   sudo cp {unit_name(kind)} /etc/systemd/system/ && sudo systemctl daemon-reload",
        f"#   sudo systemctl enable --now {unit_name(kind)}",
        f"# For a kit installed elsewhere: facefed deploy unit --kit PATH > {unit_name(kind)}",
        "[Unit]",
        f"Description=facefed {kind} ({what})",
        "Wants=network-online.target",
        "After=network-online.target time-sync.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={group or user}",
        f"WorkingDirectory={kit}",
        f"ExecStart={python} -m common.cli deploy {kind} --kit {kit}",
        "Restart=on-failure",
        "RestartSec=10",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=60",
        *([f"Environment={deploy_kitsign.KEY_ENV}={kit_key}"] if kit_key else []),
        f"Environment=FACEFED_CACHE=/var/cache/{cache}",
        f"Environment=HOME=/var/cache/{cache}",
        f"CacheDirectory={cache}",
        "CacheDirectoryMode=0700",
        "ReadWritePaths=" + " ".join(f"{kit}/{sub}" for sub in WRITABLE[kind]),
        *(
            ["# A site that trains on a GPU: replace PrivateDevices=yes by DeviceAllow= lines."]
            if kind == "site"
            else []
        ),
        *(f"{key}={value}" for key, value in HARDENING),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def write_kit_unit(kit: Path, kind: KitKind, *, python: str | None, kit_key: str) -> Path:
    """Write ``systemd/<unit>`` into a kit, for the default install location."""
    path = kit / UNIT_DIR / unit_name(kind)
    text = unit_text(
        kind, kit=DEFAULT_INSTALL[kind], python=python or DEFAULT_PYTHON, kit_key=kit_key
    )
    deploy.write_text(path, text, force=True)
    return path
