"""Scenario files: TOML tables of run-config keys under ``simulations/`` (or any path)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from client.training.site_policy import SitePolicies
from common.config import RunSettings, Scalar, parse_run_config
from common.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent
POLICY_TABLE = "site-policy"


def scenario_path(name_or_path: str) -> Path:
    """``default`` -> simulations/default.toml; anything with a slash or .toml is a path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(f"scenario {name_or_path!r} not found ({path}); known scenarios: {known}")
    return path


def _read(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    path = scenario_path(name_or_path)
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"scenario {path} is not valid TOML: {exc}") from None


def load_scenario(name_or_path: str) -> dict[str, Scalar]:
    """Read a scenario file into a flat run-config mapping (values checked later, when parsed).

    The ``[site-policy]`` table is the simulated sites' own policy, not run config: see
    :func:`load_site_policies`.
    """
    path, raw = _read(name_or_path)
    flat: dict[str, Scalar] = {}
    for key, value in raw.items():
        if key == POLICY_TABLE:
            continue
        if isinstance(value, dict | list):
            raise ConfigError(f"scenario {path}: key {key!r} must be a scalar, not a table or list")
        flat[key] = value
    return flat


def load_site_policies(name_or_path: str) -> SitePolicies:
    """The simulated sites' privacy policies: the scenario's ``[site-policy]`` table (keys for every
    site, ``[site-policy.site-N]`` for one), or the defaults of :class:`SitePolicy` without one."""
    path, raw = _read(name_or_path)
    table = raw.get(POLICY_TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"scenario {path}: {POLICY_TABLE} must be a table, [{POLICY_TABLE}]")
    return SitePolicies.from_table(table, f"scenario {path}")


def parse_assignment(text: str) -> tuple[str, Scalar]:
    """``key=value`` from ``--set``; the value is read as TOML (so 3, 0.5, true, "x" all work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set partition=dirichlet
    return key.strip(), value


def resolve(base: dict[str, Scalar], overrides: dict[str, Scalar]) -> RunSettings:
    return parse_run_config({**base, **overrides})
