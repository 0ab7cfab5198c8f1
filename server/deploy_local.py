"""A site's own settings, beside its signed kit: ``local.toml`` (optional, written by the site).

The kit's ``site.toml`` is signed by the provisioner, so the site does not edit it. What only the site
can know, or may only decide for itself, goes in ``local.toml`` in the kit folder, outside the signed
set (:mod:`server.deploy_kitsign`)::

    [site]
    data-dir = '/srv/facefed/data'   # where this machine keeps the site's face data
    runtime-port = 9194              # if 9094 is taken on this machine

    [policy]                         # the site's privacy officer: may only TIGHTEN the kit's policy
    max-epsilon-run = 4.0
    max-delta = 1e-06

A ``[policy]`` value looser than the signed kit's (a larger budget, a smaller noise floor, another
accountant, ...) is refused in one line naming the file and the key. ``deploy site --data-dir`` /
``--runtime-port`` override both files.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from client.training.site_policy import SitePolicy
from common.errors import ConfigError
from server import deploy

LOCAL = "local.toml"
_SITE_KEYS = frozenset({"data-dir", "runtime-port"})


def _at_most(kit: Any, new: Any) -> bool:
    return bool(new <= kit)


def _at_least(kit: Any, new: Any) -> bool:
    return bool(new >= kit)


def _same_unless_any(kit: Any, new: Any) -> bool:
    return bool(kit == "any" or new == kit)


# For each policy key: is ``new`` at least as strict as the kit's value?
STRICTER: dict[str, Callable[[Any, Any], bool]] = {
    "require-dp": _at_least,  # true is stricter
    "allow-seeded-noise": _at_most,  # false is stricter
    "max-epsilon-run": _at_most,
    "max-epsilon-lifetime": _at_most,
    "max-delta": _at_most,
    "min-noise-multiplier": _at_least,
    "min-batch": _at_least,
    "accountant": _same_unless_any,
    "dp-unit": _same_unless_any,
}


def apply_local(kit: Path, cfg: deploy.SiteConfig) -> deploy.SiteConfig:
    """``cfg`` (from the signed ``site.toml``) with the site's ``local.toml`` applied, if any.

    Raises:
        ConfigError: an unreadable file, an unknown key, or a policy looser than the kit's.
    """
    path = kit / LOCAL
    if not path.exists():
        return cfg
    try:
        with path.open("rb") as handle:
            doc = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); fix or delete it") from exc
    if unknown := set(doc) - {"site", "policy"}:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; only [site] and [policy]")
    site, policy = doc.get("site", {}), doc.get("policy", {})
    if not isinstance(site, dict) or not isinstance(policy, dict):
        raise ConfigError(f"{path}: [site] and [policy] must be tables")
    if unknown := set(site) - _SITE_KEYS:
        raise ConfigError(
            f"{path}: [site] key(s) {sorted(unknown)} cannot be set locally; known: "
            f"{sorted(_SITE_KEYS)} (everything else comes from the signed site.toml)"
        )
    changes: dict[str, Any] = {}
    if "data-dir" in site:
        changes["data_dir"] = str(deploy._typed(site, "data-dir", str, path))
    if "runtime-port" in site:
        changes["runtime_port"] = deploy._typed(site, "runtime-port", int, path)
    if policy:
        changes["policy"] = tightened(cfg.site_policy, policy, f"{path} [policy]")
        changes["max_epsilon"] = min(cfg.max_epsilon, changes["policy"].max_epsilon_run)
    return dataclasses.replace(cfg, **changes)


def tightened(kit: SitePolicy, local: Mapping[str, Any], where: str) -> SitePolicy:
    """The kit's policy with ``local``'s values, each of which must be at least as strict.

    Raises:
        ConfigError: an unknown or invalid key, or a value looser than the kit's (named).
    """
    base = kit.to_mapping()
    merged = SitePolicy.from_mapping({**base, **local}, where)
    values = merged.to_mapping()
    for key in local:
        rule = STRICTER.get(key)
        if rule is None or not rule(base[key], values[key]):
            raise ConfigError(
                f"{where}: {key} = {values[key]!r} is looser than the signed kit's {base[key]!r}; a "
                "site may only tighten its policy here (ask the provisioner for a new kit otherwise)"
            )
    return merged
