"""A site's privacy policy: what the site alone decides, whatever a run asks for.

The run config is written by whoever submits a run, and that party is not trusted by the site. So the
settings a site's guarantee rests on come from the site's own policy: in a deployment the ``[policy]``
table of the kit's ``site.toml`` (passed to the SuperNode as ``policy-*`` node-config keys), in a
simulation the ``[site-policy]`` tables of the scenario. A run that asks for less than the policy is
refused before any data is read, with one line naming the site and the setting (:class:`PolicyRefusal`);
nothing is trained, charged or written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

from common.config import RunSettings, Scalar
from common.errors import ConfigError, PrivacyBudgetError

NODE_PREFIX = "policy-"
_ACCOUNTANTS = ("any", "prv", "rdp", "pld")


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """The privacy settings a site requires of every run it takes part in.

    Attributes:
        require_dp: refuse runs with ``dp = false``.
        max_epsilon_run: the largest epsilon budget one run may ask of this site.
        max_epsilon_lifetime: the cap on the composition of everything the site ever released, over
            all runs (a new run id does not reset it).
        max_delta: the largest delta a run may state its guarantee at.
        accountant: the accountant runs must use (``any``: the run's choice).
        min_noise_multiplier: a floor under the noise multiplier (0: none); a calibrated sigma below
            it is raised to it, a run that fixes a lower one is refused.
        allow_seeded_noise: accept ``noise-source = "seeded"`` (reproducible noise) in research
            simulations. A deployed site refuses seeded noise whatever this says.
        min_batch: the smallest expected batch a run may ask for. The sampling rate is
            ``1 / ceil(N / batch)``, and every signed record carries it: a batch of 1 would tell the
            coordinator the site's example count N exactly; this floor keeps it to within a batch.
        dp_unit: ``"person"``: refuse runs whose face model is not person-level DP (a person with k
            images is protected only at about k times epsilon at example level); ``"any"``: the
            run's choice. The emotion model has no person ids and stays example-level either way.
    """

    require_dp: bool = True
    max_epsilon_run: float = 8.0
    max_epsilon_lifetime: float = 16.0
    max_delta: float = 1e-5
    accountant: Literal["any", "prv", "rdp", "pld"] = "any"
    min_noise_multiplier: float = 0.0
    allow_seeded_noise: bool = False
    min_batch: int = 16
    dp_unit: Literal["any", "person"] = "any"

    def __post_init__(self) -> None:
        for name in ("max_epsilon_run", "max_epsilon_lifetime"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0 and not math.isnan(value)):
                raise ConfigError(f"policy {_kebab(name)} must be a number > 0, got {value!r}")
        if self.max_epsilon_lifetime < self.max_epsilon_run:
            raise ConfigError(
                f"policy max-epsilon-lifetime ({self.max_epsilon_lifetime:g}) is below "
                f"max-epsilon-run ({self.max_epsilon_run:g}); raise the lifetime cap or lower the run cap"
            )
        if not (_is_number(self.max_delta) and 0 < self.max_delta < 1):
            raise ConfigError(f"policy max-delta must be in (0, 1), got {self.max_delta!r}")
        floor = self.min_noise_multiplier
        if not (_is_number(floor) and math.isfinite(floor) and floor >= 0):
            raise ConfigError(
                f"policy min-noise-multiplier must be a finite number >= 0, got {floor!r}"
            )
        if self.dp_unit not in ("any", "person"):
            raise ConfigError(f"policy dp-unit must be any or person, got {self.dp_unit!r}")
        if self.accountant not in _ACCOUNTANTS:
            raise ConfigError(
                f"policy accountant must be one of {', '.join(_ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if (
            isinstance(self.min_batch, bool)
            or not isinstance(self.min_batch, int)
            or self.min_batch < 1
        ):
            raise ConfigError(f"policy min-batch must be an integer >= 1, got {self.min_batch!r}")
        for name in ("require_dp", "allow_seeded_noise"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"policy {_kebab(name)} must be true or false")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> SitePolicy:
        """Parse kebab-case keys (a TOML table); ``where`` names the file or table in errors."""
        hints = get_type_hints(cls)
        fields = {_kebab(f.name): f.name for f in dataclasses.fields(cls)}
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{where}: unknown policy key {key!r}; known keys: {', '.join(sorted(fields))}"
                )
            parsed[fields[key]] = _coerce(f"{where}: policy {key}", value, hints[fields[key]])
        try:
            return cls(**parsed)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        """The policy a SuperNode was started with: its ``policy-*`` node-config keys.

        A kit's older ``max-epsilon`` key still caps the run budget (the stricter value wins).
        """
        values: dict[str, Any] = {
            key.removeprefix(NODE_PREFIX): value
            for key, value in node_config.items()
            if key.startswith(NODE_PREFIX)
        }
        if "max-epsilon" in node_config:
            legacy = _coerce("node config max-epsilon", node_config["max-epsilon"], float)
            values["max-epsilon-run"] = min(
                legacy,
                _coerce("policy max-epsilon-run", values.get("max-epsilon-run", legacy), float),
            )
            if "max-epsilon-lifetime" not in values:
                values["max-epsilon-lifetime"] = max(values["max-epsilon-run"], 16.0)
        return cls.from_mapping(values, "node config")

    def to_mapping(self) -> dict[str, Scalar]:
        """Kebab-case keys, as in a TOML table (inverse of :meth:`from_mapping`)."""
        return {_kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_node_config(self) -> dict[str, Scalar]:
        return {NODE_PREFIX + k: v for k, v in self.to_mapping().items()}


class PolicyRefusal(PrivacyBudgetError):
    """The run asks for less than the site's policy allows; nothing was read, trained or charged."""

    def __init__(self, site_index: int, setting: str, detail: str) -> None:
        self.site_index = site_index
        self.setting = setting
        super().__init__(f"site-{site_index} refuses: {detail} (site policy {setting})")


def check_run(
    policy: SitePolicy, settings: RunSettings, site_index: int, *, deployed: bool
) -> float:
    """Refuse a run that asks for less than ``policy``; return the site's epsilon budget for it.

    Raises:
        PolicyRefusal: naming the first setting the run breaks.
    """
    p = settings.privacy

    def refuse(setting: str, detail: str) -> PolicyRefusal:
        return PolicyRefusal(site_index, setting, detail)

    if not p.dp:
        if policy.require_dp:
            raise refuse("require-dp", "the run sets dp = false, but this site trains only with DP")
        if policy.dp_unit == "person" and settings.face_steps > 0:
            raise refuse(
                "dp-unit", "the run sets dp = false, but this site protects whole people with DP"
            )
        return math.inf
    if p.delta > policy.max_delta:
        raise refuse("max-delta", f"the run's delta {p.delta:g} is above {policy.max_delta:g}")
    if policy.accountant != "any" and p.accountant != policy.accountant:
        raise refuse(
            "accountant", f"the run asks for accountant {p.accountant}, not {policy.accountant}"
        )
    budget = p.budget_for(site_index)
    if budget > policy.max_epsilon_run:
        raise refuse(
            "max-epsilon-run",
            f"the run asks for an epsilon budget of {budget:g}, above {policy.max_epsilon_run:g}",
        )
    if budget > policy.max_epsilon_lifetime:
        raise refuse(
            "max-epsilon-lifetime",
            f"the run's budget {budget:g} is above the lifetime cap {policy.max_epsilon_lifetime:g}",
        )
    for key, batch in (
        ("face-batch", settings.face_batch),
        ("emotion-batch", settings.emotion_batch),
    ):
        if batch < policy.min_batch:
            raise refuse(
                "min-batch",
                f"the run's {key} {batch} is below {policy.min_batch}; the sampling rate it gives "
                "would tell the site's example count",
            )
    if policy.dp_unit == "person" and settings.face_steps > 0 and p.dp_unit != "person":
        raise refuse(
            "dp-unit",
            f'the run trains the face model at dp-unit = "{p.dp_unit}", but this site protects '
            "whole people only",
        )
    if 0 < p.noise_multiplier < policy.min_noise_multiplier:
        raise refuse(
            "min-noise-multiplier",
            f"the run fixes noise-multiplier {p.noise_multiplier:g}, below "
            f"{policy.min_noise_multiplier:g}",
        )
    if p.noise_source == "seeded":
        if deployed:
            raise refuse("allow-seeded-noise", "a deployed site never releases seeded noise")
        if not policy.allow_seeded_noise:
            raise refuse("allow-seeded-noise", "the run asks for seeded (reproducible) noise")
    if deployed:
        _check_site_data_settings(settings, refuse)
    return budget


def _check_site_data_settings(
    settings: RunSettings, refuse: Callable[[str, str], PolicyRefusal]
) -> None:
    """Refuse run settings that make a deployed site's own data decide more than each unit's part.

    In a simulation they shape the simulated sites' datasets; on a site they would run on its own
    images: a fixed-size subset of them changes which *other* images train when one is removed, and
    ``domain-holdout`` refuses exactly when the site holds k + 1 people or fewer (free refusals
    that count them). LFW's people with a single image are left out, so at dp-unit "example"
    removing one image of a two-image person removes the other too.
    """
    for key, value in (
        ("emotion-train-limit", settings.emotion_train_limit),
        ("face-train-limit", settings.face_train_limit),
        ("domain-holdout", settings.domain_holdout),
    ):
        if value:
            raise refuse(
                "simulation-only",
                f"the run sets {key} = {value}, a simulation setting: on a site it would let one "
                "image change which others train, or let a refusal count the site's people",
            )
    lfw = "lfw" in settings.face_source_list
    if lfw and settings.face_steps > 0 and settings.privacy.dp_unit != "person":
        raise refuse(
            "dp-unit",
            'the run trains the face model on LFW-layout faces at dp-unit = "example": people '
            "with one image are left out, so removing one image can remove another; use "
            'dp-unit = "person"',
        )


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(where: str, value: object, annotation: Any) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if _is_number(value):
            return float(value)  # type: ignore[arg-type]
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class SitePolicies:
    """The policies of a simulation's sites: one for every site, with per-site overrides."""

    default: SitePolicy = dataclasses.field(default_factory=SitePolicy)
    sites: tuple[tuple[int, SitePolicy], ...] = ()

    def for_site(self, site_index: int) -> SitePolicy:
        return dict(self.sites).get(site_index, self.default)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> SitePolicies:
        """Parse a ``[site-policy]`` table: its keys apply to every site, a ``[site-policy.site-N]``
        sub-table overrides them for site N."""
        common = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        default = SitePolicy.from_mapping(common, f"{where} [site-policy]")
        sites = []
        for name, sub in table.items():
            if not isinstance(sub, Mapping):
                continue
            index = name.removeprefix("site-")
            if not name.startswith("site-") or not index.isdigit():
                raise ConfigError(
                    f"{where}: [site-policy.{name}] must name a site as site-N, e.g. site-0"
                )
            merged = {**common, **sub}
            sites.append(
                (int(index), SitePolicy.from_mapping(merged, f"{where} [site-policy.{name}]"))
            )
        return cls(default, tuple(sorted(sites)))

    def to_table(self) -> dict[str, Any]:
        table: dict[str, Any] = dict(self.default.to_mapping())
        for index, policy in self.sites:
            table[f"site-{index}"] = policy.to_mapping()
        return table
