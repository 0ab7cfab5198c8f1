"""Run settings are parsed once, typed, and reject what a user could get wrong."""

import math

import pytest

from common.config import RunSettings, parse_run_config
from common.errors import ConfigError


def test_defaults_round_trip_through_flowers_flat_config() -> None:
    settings = RunSettings()
    assert parse_run_config(settings.to_flat()) == settings


def test_unknown_key_is_an_error_that_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'num-round'.*num-rounds"):
        parse_run_config({"num-round": 3})


@pytest.mark.parametrize("epsilon", [0, -1, -0.5, float("nan")])
def test_non_positive_epsilon_is_rejected(epsilon: float) -> None:
    with pytest.raises(ConfigError, match="max-epsilon must be a positive number"):
        parse_run_config({"max-epsilon": epsilon})


def test_infinite_epsilon_is_accepted_as_text() -> None:
    assert math.isinf(parse_run_config({"max-epsilon": "inf"}).privacy.max_epsilon)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-rounds": "three"}, "num-rounds must be a int"),
        ({"strategy": "fedsgd"}, "strategy must be one of fedavg, fedadam"),
        ({"cohort-size": 5, "num-sites": 4}, "cohort-size .5. exceeds num-sites .4."),
        (
            {"lfw-train-sets": "1,4", "lfw-eval-sets": "4,5"},
            "both lfw-train-sets and lfw-eval-sets",
        ),
        ({"delta": 1.0}, "delta must be in"),
        ({"face-sources": "lfw,vggface"}, "face-sources must list"),
        ({"lfw-eval-sets": "9,10"}, "people sets 1..5"),
    ],
)
def test_invalid_values_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(config)


def test_privacy_settings_are_kept_apart_from_performance_settings() -> None:
    settings = parse_run_config({"max-epsilon": 3.0, "face-steps": 5})
    assert settings.privacy.max_epsilon == 3.0
    assert settings.face_steps == 5


def test_flower_app_config_in_pyproject_lists_every_key_with_its_default() -> None:
    import tomllib

    from common.paths import REPO_ROOT

    table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    assert parse_run_config(table) == RunSettings()
    assert set(table) == set(RunSettings().to_flat())


def test_central_dp_with_a_server_optimiser_is_refused() -> None:
    # The central noise is sized for a mean; FedAdam would build its moments from un-noised averages.
    with pytest.raises(
        ConfigError, match=r"central-dp cannot be combined with strategy = .fedadam."
    ):
        parse_run_config({"central-dp": True, "strategy": "fedadam"})


def test_noise_source_is_secret_unless_a_run_opts_in() -> None:
    assert parse_run_config({}).privacy.noise_source == "secret"
    assert parse_run_config({"noise-source": "seeded"}).privacy.noise_source == "seeded"
    with pytest.raises(ConfigError, match="noise-source must be one of secret, seeded"):
        parse_run_config({"noise-source": "fixed"})
