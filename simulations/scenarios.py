"""Scenario files: TOML tables of run-config keys under ``simulations/`` (or any path)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from common.config import RunSettings, Scalar, parse_run_config
from common.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent


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


def load_scenario(name_or_path: str) -> dict[str, Scalar]:
    """Read a scenario file into a flat run-config mapping (values checked later, when parsed)."""
    path = scenario_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"scenario {path} is not valid TOML: {exc}") from None
    flat: dict[str, Scalar] = {}
    for key, value in raw.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"scenario {path}: key {key!r} must be a scalar, not a table or list")
        flat[key] = value
    return flat


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
