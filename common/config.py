"""Typed run settings, parsed once from Flower's flat ``run_config`` (or a scenario TOML) and validated.

Flower passes settings as a flat ``{"kebab-key": scalar}`` mapping. :func:`parse_run_config` turns it into
frozen dataclasses, rejects unknown keys (nanoGPT's habit: a typo must not silently fall back to a
default), checks types and ranges, and keeps privacy settings apart from everything else so that an audit
can see at a glance what determines the guarantee.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from common.errors import ConfigError

Scalar = bool | int | float | str
MAX_PERSON_IMAGES = 10_000


# The smallest clip norm a run may set (client/training/fast_dp.py refuses below it too).
MIN_CLIP = 1e-12


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """Everything that determines the per-site DP guarantee."""

    dp: bool = True
    # The unit the face model's guarantee protects: one image ("example") or all of one person's
    # images ("person": people are Poisson-sampled and each person's summed gradient is clipped,
    # client/training/fast_dp.py). FER2013 has no person ids: the emotion model is always example-level.
    dp_unit: Literal["example", "person"] = "example"
    # person-level: at most this many of a sampled person's images in one step
    person_max_images: int = 8
    max_epsilon: float = 8.0
    delta: float = 1e-5
    accountant: Literal["prv", "rdp"] = "prv"
    face_clip: float = 1.0
    emotion_clip: float = 1.0
    noise_multiplier: float = 0.0  # 0: calibrate per site to spend max-epsilon over num-rounds
    # where Poisson sampling and noise come from: the OS CSPRNG, fresh per release ("secret"), or a
    # seed (research simulations only, if the site's policy allows it; client/training/dp_random.py)
    noise_source: Literal["secret", "seeded"] = "secret"
    # Optional client-level central DP on top (Flower's client-side fixed clipping + server noise),
    # recorded in the ledger as a separate guarantee of the coordinator.
    central_dp: bool = False
    central_noise_multiplier: float = 1.0
    central_clip: float = 5.0
    central_max_epsilon: float = 10.0
    site_budgets: str = ""  # per-site budgets, e.g. "0=1.5,3=4" (site index = epsilon)

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or math.isnan(self.noise_multiplier):
            raise ConfigError(
                f"noise-multiplier must be >= 0 (0 = calibrate), got {self.noise_multiplier}"
            )
        self.budget_for(0)  # validates site-budgets
        for name in ("central_noise_multiplier", "central_clip", "central_max_epsilon"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{_kebab(name)} must be a positive finite number, got {value}")
        if not self.max_epsilon > 0 or math.isnan(self.max_epsilon):
            raise ConfigError(
                f"max-epsilon must be a positive number, got {self.max_epsilon}; "
                "set e.g. max-epsilon = 8.0 (or dp = false for non-private training)"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}; typical is 1e-5")
        for name in ("face_clip", "emotion_clip"):
            if not MIN_CLIP <= getattr(self, name) < math.inf:
                raise ConfigError(
                    f"{_kebab(name)} must be a finite number >= {MIN_CLIP:g}, got "
                    f"{getattr(self, name)}"
                )
        if not 1 <= self.person_max_images <= MAX_PERSON_IMAGES:
            raise ConfigError(
                f"person-max-images must be in 1..{MAX_PERSON_IMAGES}, got "
                f"{self.person_max_images}; it caps how many of a sampled person's images one step "
                "uses (e.g. 8)"
            )

    def budget_for(self, site_index: int) -> float:
        """The epsilon budget of one site: its ``site-budgets`` entry, else ``max-epsilon``."""
        budgets: dict[int, float] = {}
        for item in filter(None, (s.strip() for s in self.site_budgets.split(","))):
            key, sep, value = item.partition("=")
            try:
                site, epsilon = int(key), float(value)
            except ValueError:
                site, epsilon = -1, math.nan
            if not sep or site < 0 or not epsilon > 0:
                raise ConfigError(
                    f"site-budgets entry {item!r} is invalid; use site=epsilon pairs with epsilon > 0, "
                    'e.g. site-budgets = "0=1.5,3=4"'
                )
            budgets[site] = epsilon
        return min(budgets.get(site_index, self.max_epsilon), self.max_epsilon)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """A federated run: federation shape, data, models and optimisation (privacy kept separate)."""

    num_rounds: int = 3
    num_sites: int = 4
    cohort_size: int = 4
    strategy: Literal["fedavg", "fedadam"] = "fedavg"
    server_lr: float = 0.01
    seed: int = 0
    out_dir: str = "runs/default"
    data_dir: str = ""
    # data
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    face_sources: str = "lfw,orl,eyaleb"
    lfw_train_sets: str = "1,2,3"
    lfw_eval_sets: str = "4,5"
    face_train_limit: int = 0
    # people of ORL and of Extended Yale B kept out of every site (the last N subjects of each), so a
    # benchmark can measure what federation adds on identities of the sites' kind (bench/domain_gain.py)
    domain_holdout: int = 0
    emotion_train_limit: int = 0
    emotion_eval_limit: int = 0
    # models and local optimisation
    # "pretrained": fine-tune the tail of dlib's public face ResNet on its frozen features;
    # "scratch": facefed's own small network from random weights (common/model_spec.py)
    face_model: Literal["pretrained", "scratch"] = "scratch"
    face_tail_blocks: int = 0  # pretrained: residual blocks fine-tuned besides the embedding layer
    face_width: int = 16  # scratch
    # "transfer": a linear head on the frozen face trunk's features (cut after emotion-trunk-blocks
    # blocks, at emotion-input-size pixels, pooled to emotion-pool x emotion-pool); "scratch": EmotionNet;
    # "vgg": EmotionVGG, deeper, at full resolution, its faces also rotated, zoomed and shifted at random
    emotion_model: Literal["transfer", "scratch", "vgg"] = "scratch"
    emotion_trunk_blocks: int = 10
    emotion_input_size: int = 96
    emotion_pool: int = 2
    # transfer: 0 = the linear head above; N > 0 = two 3x3 conv layers of N channels on the unpooled
    # feature map first (common/facenet/transfer.py)
    emotion_head_width: int = 0
    # transfer with a conv head (ignored otherwise): > 0 = also the face's log wavelet scattering at
    # this many scales (common/scattering.py), standardised with the shipped public statistics
    emotion_scatter: int = 0
    emotion_width: int = 32  # scratch, vgg (the first stage's channels)
    face_steps: int = 25
    emotion_steps: int = 40
    face_batch: int = 64
    emotion_batch: int = 128
    local_optimizer: Literal["adam", "sgd"] = "adam"
    face_lr: float = 0.002
    face_augment: bool = (
        False  # random rotation/zoom/shift of face examples (client/training/augment.py)
    )
    emotion_lr: float = 0.002
    momentum: float = 0.9
    max_update_norm: float = 1000.0  # coordinator refuses a site update with a larger L2 norm
    dp_path: Literal["fast", "opacus"] = (
        "fast"  # per-sample clipping: client/training/fast_dp.py or Opacus
    )
    # reliability
    aggregation: Literal["mean", "trimmed-mean", "median"] = "mean"
    trim_fraction: float = 0.25  # trimmed-mean: fraction cut from each end, per coordinate
    min_replies: int = 1  # fewer valid replies than this: the round is not aggregated
    round_timeout: float = 1800.0  # seconds to wait for a round's replies; late sites are dropouts
    # most training messages in flight at once (0: the whole cohort); ``facefed simulate`` sets it
    # to 4 per Ray CPU, since Flower's simulation engine rescans every queued message for each site
    # on every poll, work that grows with the square of the cohort
    dispatch_window: int = 0
    resume: bool = False  # continue the run in out-dir from its last completed round
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    def __post_init__(self) -> None:
        positive = (
            "num_rounds",
            "num_sites",
            "cohort_size",
            "face_width",
            "emotion_width",
            "face_batch",
            "emotion_batch",
            "face_lr",
            "emotion_lr",
            "server_lr",
            "max_update_norm",
            "min_replies",
            "round_timeout",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_kebab(name)} must be > 0, got {getattr(self, name)}")
        for name in (
            "face_steps",
            "emotion_steps",
            "dispatch_window",
            "face_train_limit",
            "domain_holdout",
            "emotion_train_limit",
            "emotion_eval_limit",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_kebab(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.face_tail_blocks <= 5:
            raise ConfigError(f"face-tail-blocks must be in 0..5, got {self.face_tail_blocks}")
        if not 1 <= self.emotion_trunk_blocks <= 14:
            raise ConfigError(
                f"emotion-trunk-blocks must be in 1..14, got {self.emotion_trunk_blocks}"
            )
        if not 48 <= self.emotion_input_size <= 150:
            raise ConfigError(
                f"emotion-input-size must be in 48..150 pixels, got {self.emotion_input_size}"
            )
        if not 1 <= self.emotion_pool <= 4:
            raise ConfigError(f"emotion-pool must be in 1..4, got {self.emotion_pool}")
        if not 0 <= self.emotion_head_width <= 256:
            raise ConfigError(
                f"emotion-head-width must be in 0..256 channels, got {self.emotion_head_width}"
            )
        if not 0 <= self.emotion_scatter <= 3:
            raise ConfigError(f"emotion-scatter must be in 0..3 scales, got {self.emotion_scatter}")
        if self.emotion_scatter and self.emotion_model == "transfer" and self.emotion_head_width:
            from common.facenet.emotion_input import shipped_cuts

            cut = (self.emotion_trunk_blocks, self.emotion_input_size, self.emotion_scatter)
            if cut not in shipped_cuts():
                raise ConfigError(
                    f"emotion-scatter {cut[2]} with {cut[0]} trunk blocks at {cut[1]} px has no shipped "
                    "input statistics (models/emotion-input-stats-v1.json; python -m "
                    "bench.emotion_input_stats makes them)"
                )
        try:
            from common.model_spec import ModelSpec

            ModelSpec.from_settings(self)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from None
        if self.face_augment and self.face_model == "pretrained":
            raise ConfigError(
                'face-augment works on images; with face-model = "pretrained" the sites train on '
                'frozen features: set face-augment = false or face-model = "scratch"'
            )
        if self.privacy.dp and self.privacy.dp_unit == "person" and self.dp_path != "fast":
            raise ConfigError(
                'dp-unit = "person" runs on the fast DP path only (Opacus clips per example); '
                'set dp-path = "fast"'
            )
        if self.privacy.dp and self.privacy.dp_unit == "person" and self.face_train_limit > 0:
            raise ConfigError(
                "face-train-limit keeps images across all people, so removing one person would "
                'change which images of the others are kept; with dp-unit = "person" set '
                "face-train-limit = 0"
            )
        if self.privacy.dp and self.privacy.dp_unit == "person" and self.face_steps == 0:
            raise ConfigError(
                'dp-unit = "person" protects the people of the face data, but face-steps = 0; the '
                "emotion data (FER2013) has no person ids, so the emotion model is example-level "
                'only: set dp-unit = "example" or train the face model'
            )
        if self.face_steps == 0 and self.emotion_steps == 0:
            raise ConfigError("face-steps and emotion-steps are both 0: nothing would be trained")
        if self.cohort_size > self.num_sites:
            raise ConfigError(
                f"cohort-size ({self.cohort_size}) exceeds num-sites ({self.num_sites}); "
                "lower cohort-size or add sites"
            )
        if self.min_replies > self.cohort_size:
            raise ConfigError(
                f"min-replies ({self.min_replies}) exceeds cohort-size ({self.cohort_size}); "
                "no round could ever be aggregated"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.aggregation != "mean" and self.strategy != "fedavg":
            raise ConfigError(
                f"aggregation = {self.aggregation!r} replaces the server optimiser; use it with "
                'strategy = "fedavg"'
            )
        if self.aggregation != "mean" and self.privacy.central_dp:
            raise ConfigError(
                f"aggregation = {self.aggregation!r} cannot be combined with central-dp: the central "
                'noise is calibrated to the sensitivity of a plain mean; use aggregation = "mean"'
            )
        if self.privacy.central_dp and self.strategy != "fedavg":
            raise ConfigError(
                f"central-dp cannot be combined with strategy = {self.strategy!r}: the central noise "
                "is sized for the mean of the clipped updates, and a server optimiser's moments "
                'would be built from un-noised averages; use strategy = "fedavg"'
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.partition == "dirichlet" and not self.dirichlet_alpha > 0:
            raise ConfigError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        unknown = set(self.face_source_list) - {"lfw", "orl", "eyaleb"}
        if unknown or not self.face_source_list:
            raise ConfigError(
                f"face-sources must list some of lfw, orl, eyaleb; got {self.face_sources!r}"
            )
        train, held_out = set(self.lfw_train_set_list), set(self.lfw_eval_set_list)
        if train & held_out:
            raise ConfigError(
                f"LFW people sets {sorted(train & held_out)} are in both lfw-train-sets and "
                "lfw-eval-sets; verification must use identities no site trained on"
            )
        if len(held_out) < 2:
            raise ConfigError("lfw-eval-sets needs at least 2 people sets for the k-fold protocol")

    @property
    def face_source_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.face_sources.split(",") if s.strip())

    @property
    def lfw_train_set_list(self) -> tuple[int, ...]:
        return _int_list(self.lfw_train_sets, "lfw-train-sets")

    @property
    def lfw_eval_set_list(self) -> tuple[int, ...]:
        return _int_list(self.lfw_eval_sets, "lfw-eval-sets")

    def to_flat(self) -> dict[str, Scalar]:
        """The flat kebab-case mapping Flower carries as ``run_config`` (inverse of parsing)."""
        flat: dict[str, Scalar] = {}
        for obj in (self, self.privacy):
            for f in dataclasses.fields(obj):
                if f.name != "privacy":
                    flat[_kebab(f.name)] = getattr(obj, f.name)
        return flat


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            f"{key} must be comma-separated people-set numbers 1..5, got {text!r}"
        ) from None
    if any(not 1 <= v <= 5 for v in values):
        raise ConfigError(f"{key} must use LFW people sets 1..5, got {text!r}")
    return values


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    choices = get_args(annotation)
    if choices and all(isinstance(c, str) for c in choices):  # Literal[...]
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
            return math.inf
    elif annotation is str:
        return str(value)
    raise ConfigError(f"{key} must be a {annotation.__name__}, got {value!r}")


def parse_run_config(config: Mapping[str, Scalar]) -> RunSettings:
    """Parse Flower's flat run config into :class:`RunSettings`; unknown keys are errors.

    Keys Flower itself adds (none at the moment) and keys with a leading underscore are ignored.
    """
    fields_by_key: dict[str, tuple[type[RunSettings] | type[PrivacySettings], str, Any]] = {}
    for cls in (RunSettings, PrivacySettings):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "privacy":
                fields_by_key[_kebab(f.name)] = (cls, f.name, hints[f.name])
    values: dict[type[RunSettings] | type[PrivacySettings], dict[str, Any]] = {
        RunSettings: {},
        PrivacySettings: {},
    }
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in fields_by_key:
            close = [k for k in fields_by_key if k.split("-")[0] == key.split("-")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; see simulations/default.toml")
        cls, name, annotation = fields_by_key[key]
        values[cls][name] = _coerce(key, value, annotation)
    privacy = PrivacySettings(**values[PrivacySettings])
    return RunSettings(**values[RunSettings], privacy=privacy)
