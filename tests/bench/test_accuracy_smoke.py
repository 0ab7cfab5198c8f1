"""The accuracy-vs-privacy benchmark: its scenario, compute matching, report, and (slow) end to end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.accuracy import (
    bench_overrides,
    build_parser,
    domain_gain_markdown,
    domain_gain_summary,
    federated_overrides,
    main,
    parse_epsilons,
    setting_overrides,
    summarise_federated,
)
from bench.centralised import matched_steps, union_tensors
from bench.report import markdown_table
from client.training.site_data import SiteSpec, load_site_tensors
from client.training.train import SiteTensors
from common.config import RunSettings
from common.errors import ConfigError
from common.paths import DEFAULT_DATA_DIR
from simulations.scenarios import load_scenario, resolve

# Keys the benchmark may change relative to the default scenario; everything else (models, local
# training, privacy mechanics, data split) must stay the same so that its numbers describe the default.
ALLOWED_DIFFERENCES = {
    "num-rounds",
    "out-dir",
    "face-train-limit",
    "emotion-train-limit",
    "emotion-eval-limit",
    "domain-holdout",
}


def _sites(sizes: list[tuple[int, int]]) -> list[SiteTensors]:
    """Shape-only site tensors with ``(faces, emotions)`` examples each (two identities per site)."""
    return [
        SiteTensors(
            face_x=torch.zeros(n_face, 1, 4, 4),
            face_y=torch.arange(n_face) % 2,
            emotion_x=torch.zeros(n_emotion, 1, 4, 4),
            emotion_y=torch.zeros(n_emotion, dtype=torch.int64),
        )
        for n_face, n_emotion in sizes
    ]


def test_bench_scenario_is_the_default_run_for_more_rounds() -> None:
    default = resolve(load_scenario("default"), {}).to_flat()
    bench = resolve(load_scenario("bench"), {}).to_flat()

    differing = {k for k in default if default[k] != bench[k]}

    assert differing <= ALLOWED_DIFFERENCES, f"bench.toml drifted from default.toml on {differing}"
    assert bench["num-sites"] == 4 and bench["cohort-size"] == 4
    assert int(bench["num-rounds"]) > int(default["num-rounds"])
    assert bench["emotion-eval-limit"] == 0  # the full 3,589-image PublicTest split
    assert bench["face-model"] == "pretrained"
    assert bench["domain-holdout"] == 10


def test_parse_epsilons_accepts_infinity_and_rejects_non_positive_values() -> None:
    assert parse_epsilons("1, 3,8,inf") == [1.0, 3.0, 8.0, math.inf]
    for bad in ("0", "-1", "eight", "nan", ""):
        with pytest.raises(ConfigError, match="--epsilons"):
            parse_epsilons(bad)


def test_infinite_epsilon_runs_without_dp_and_finite_epsilon_sets_the_budget(
    tmp_path: Path,
) -> None:
    base = load_scenario("bench")

    private = resolve(base, federated_overrides(3.0, tmp_path / "a"))
    public = resolve(base, federated_overrides(math.inf, tmp_path / "b"))

    assert private.privacy.dp and private.privacy.max_epsilon == 3.0
    assert not public.privacy.dp
    assert private.out_dir != public.out_dir


def test_matched_steps_process_as_many_examples_as_the_federated_run() -> None:
    settings = RunSettings(
        num_rounds=6, num_sites=4, cohort_size=4, face_steps=25, emotion_steps=40
    )
    sites = _sites([(300, 7000)] * 4)

    face, emotion = matched_steps(settings, sites, union_tensors(sites))

    assert (face.steps, face.batch, face.federated_examples) == (600, 64, 6 * 4 * 25 * 64)
    assert (emotion.steps, emotion.batch) == (960, 128)


def test_matched_steps_count_small_sites_batches_and_partial_cohorts() -> None:
    # A site with 50 faces trains at batch 25 (half its data); half the sites train per round.
    settings = RunSettings(num_rounds=2, num_sites=2, cohort_size=1, face_steps=10, emotion_steps=1)
    sites = _sites([(50, 400), (400, 400)])

    face, _ = matched_steps(settings, sites, union_tensors(sites))

    assert face.federated_examples == 2 * (10 * 25 + 10 * 64) // 2
    assert face.steps * face.batch >= face.federated_examples > (face.steps - 1) * face.batch


def test_union_keeps_every_sites_identities_distinct() -> None:
    sites = _sites([(6, 2), (4, 3)])  # two identities per site

    union = union_tensors(sites)

    assert union.num_identities == 4
    assert union.face_y.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3]
    assert len(union.emotion_y) == 5


def test_union_of_real_sites_holds_all_their_faces_and_people() -> None:
    if not (DEFAULT_DATA_DIR / "lfw_deepfunneled112_sets1-5.tar.gz").is_file():
        pytest.skip("real face data not available")
    settings = resolve(
        load_scenario("bench"),
        {"face-sources": "orl", "emotion-train-limit": 50, "num-sites": 4, "cohort-size": 4},
    )
    sites = [load_site_tensors(settings, SiteSpec(i, 4)) for i in range(4)]

    union = union_tensors(sites)

    # ORL: 40 people less the bench's 10 held out (domain-holdout), each at exactly one site
    assert union.num_identities == 30
    assert len(union.face_y) == 300
    assert torch.bincount(union.face_y).tolist() == [10] * 30
    assert len(union.emotion_y) == 200


def _report(central_fer: float, central_lfw: float) -> dict[str, object]:
    metrics = {
        "emotion": {"accuracy": 0.3, "macro_f1": 0.2, "single_view_accuracy": 0.29},
        "face": {"lfw_accuracy": 0.6},
    }
    return {
        "config": {"delta": 1e-5},
        "settings": {
            "centralised": {
                "kind": "centralised",
                "epsilon": "inf",
                "emotion": {"accuracy": central_fer, "macro_f1": 0.5},
                "face": {"lfw_accuracy": central_lfw, "lfw_std": 0.01},
                "wall_time_s": 60.0,
            },
            "eps-8": {
                "kind": "federated",
                "epsilon": "8",
                "emotion": metrics["emotion"],
                "face": {**metrics["face"], "lfw_std": 0.02},
                "site_epsilon": {"site-0": 7.9, "site-1": 7.95},
                "wall_time_s": 120.0,
            },
            "eps-inf": {
                "kind": "federated",
                "epsilon": "inf",
                "error": "round 1: no site returned a valid update",
                "wall_time_s": 30.0,
            },
        },
    }


def test_report_table_gives_ratios_to_the_centralised_baseline_and_shows_failures() -> None:
    table = markdown_table(_report(central_fer=0.6, central_lfw=0.75))

    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert "| 0.300 | 0.290 | 0.200 | 0.600 ± 0.020 | 0.50 | 0.80 | 2.0 min |" in rows["eps-8"]
    assert "7.90–7.95 (1e-05)" in rows["eps-8"]
    assert "failed: round 1: no site returned a valid update" in rows["eps-inf"]
    assert "| 1.00 | 1.00 |" in rows["centralised"]
    assert "| 0.600 | – | 0.500 |" in rows["centralised"]  # a result from before the single view


def test_summary_keeps_each_sites_latest_epsilon() -> None:
    def client(eps: float) -> dict[str, float]:
        return {"epsilon": eps, "noise_multiplier": 1.1}

    results = {
        "rounds": [
            {
                "round": 1,
                "emotion": {"accuracy": 0.2, "macro_f1": 0.1},
                "face": {"lfw_accuracy": 0.55, "lfw_std": 0.01},
                "clients": {"site-0": client(1.0), "site-1": client(1.2)},
            },
            {
                "round": 2,
                "emotion": {"accuracy": 0.3, "macro_f1": 0.2},
                "face": {"lfw_accuracy": 0.6, "lfw_std": 0.01},
                "clients": {"site-1": client(2.0)},  # site-0 not sampled in the last round
            },
        ],
        "checkpoint": "ckpt",
    }

    summary = summarise_federated(results, wall_s=10.0)

    assert summary["site_epsilon"] == {"site-0": 1.0, "site-1": 2.0}
    assert summary["emotion"]["accuracy"] == 0.3
    assert [r["round"] for r in summary["per_round"]] == [1, 2]


def test_bad_epsilon_is_one_clear_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--epsilons", "1,-3"])

    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("bench.accuracy: error: --epsilons entry '-3'")
    assert "\n" not in err


def test_set_overrides_a_run_config_key_of_every_setting() -> None:
    args = build_parser().parse_args(["--set", "emotion-model=vgg", "--set", "emotion-steps=90"])

    overrides = bench_overrides(args)
    settings = resolve(load_scenario("bench"), overrides)

    assert overrides == {"emotion-model": "vgg", "emotion-steps": 90}
    assert (settings.emotion_model, settings.emotion_steps) == ("vgg", 90)


def test_set_at_overrides_a_key_of_one_setting_only() -> None:
    args = build_parser().parse_args(
        [
            "--set-at",
            "inf:emotion-batch=256",
            "--set-at",
            "inf:emotion-steps=200",
            "--set-at",
            "1:emotion-batch=512",
        ]
    )

    at = setting_overrides(args, parse_epsilons("1,3,8,inf"))

    assert at == {"inf": {"emotion-batch": 256, "emotion-steps": 200}, "1": {"emotion-batch": 512}}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("emotion-batch=256", "EPSILON:KEY=VALUE"),
        ("2:emotion-batch=256", "does not train"),
        ("x:emotion-batch=256", "--set-at entry 'x' is not a positive number"),
        ("1,3:emotion-batch=256", "--set-at entry '1,3' is not a positive number"),
        ("inf:emotion-batch", "key=value"),
    ],
)
def test_a_bad_set_at_is_refused_with_the_reason(entry: str, message: str) -> None:
    args = build_parser().parse_args(["--set-at", entry])

    with pytest.raises(ConfigError, match=message):
        setting_overrides(args, parse_epsilons("1,3,8,inf"))


def test_set_at_inf_needs_the_non_private_run_or_the_baseline() -> None:
    args = build_parser().parse_args(["--set-at", "inf:emotion-batch=256", "--no-baseline"])

    with pytest.raises(ConfigError, match="does not train"):
        setting_overrides(args, parse_epsilons("8"))
    assert setting_overrides(args, parse_epsilons("8,inf")) == {"inf": {"emotion-batch": 256}}


def test_a_bad_set_at_value_is_one_clear_line_before_any_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--set-at", "inf:emotion-model=vgg16", "--epsilons", "8,inf"])

    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("bench.accuracy: error:") and "emotion" in err
    assert "\n" not in err


def test_a_bad_set_is_one_clear_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--set", "emotion-model=vgg16", "--epsilons", "8"])

    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("bench.accuracy: error:") and "emotion" in err
    assert "\n" not in err


def _scores(tar: float) -> dict[str, dict[str, float]]:
    return {s: {"tar": tar, "auc": 0.9} for s in ("orl", "eyaleb", "pooled")}


def test_domain_gain_is_the_eps8_runs_pooled_tar_over_the_start_and_failures_show() -> None:
    table = {
        "holdout": 10,
        "far": 1e-3,
        "models": {
            "start": {"scores": _scores(0.2)},
            "eps-8": {"scores": _scores(0.25)},
            "eps-1": {"error": "boom"},
        },
    }

    table["gain"] = domain_gain_summary(table)
    text = domain_gain_markdown(table)

    assert table["gain"] == {"tar": 0.05, "auc": 0.0}
    assert "| eps-8 | 0.250 | 0.900 |" in text
    assert "| eps-1 | failed: boom |" in text
    assert "pooled TAR +0.050" in text
    assert domain_gain_summary({"models": {"start": {"scores": _scores(0.2)}}}) is None


@pytest.mark.slow
def test_quick_benchmark_with_dp_and_baseline_completes(tmp_path: Path) -> None:
    code = main(["--quick", "--epsilons", "8", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert code == 0
    assert set(report["settings"]) == {"centralised", "eps-8"}
    private = report["settings"]["eps-8"]
    assert all(0 < e <= 8.0 for e in private["site_epsilon"].values())
    assert len(private["site_epsilon"]) == 4
    central = report["settings"]["centralised"]
    assert central["data"]["lfw_pairs"] == 1200
    assert (
        central["compute"]["face"]["steps"] * central["compute"]["face"]["batch"]
        >= (central["compute"]["face"]["federated_examples"])
    )
    for entry in report["settings"].values():
        assert 0 <= entry["emotion"]["accuracy"] <= 1
        assert 0 <= entry["face"]["lfw_accuracy"] <= 1
    assert "| eps-8 |" in (tmp_path / "accuracy.md").read_text()
    assert report["machine"]["torch"] and report["machine"]["cpus"]
    assert all(entry["wall_time_s"] > 0 for entry in report["settings"].values())
    gain = report["domain_gain"]
    assert gain["holdout"] == 10 and set(gain["models"]) == {"start", "centralised", "eps-8"}
    start = gain["models"]["start"]["scores"]
    assert start["orl"]["genuine_pairs"] == 450  # 10 ORL people x 10 images
    assert start["pooled"]["tar"] > 0.1  # dlib's pretrained start verifies unseen people
    assert set(gain["gain"]) == {"tar", "auc"}
    assert "Domain gain" in (tmp_path / "accuracy.md").read_text()


@pytest.mark.slow
def test_quick_benchmark_non_private_federated_run_completes(tmp_path: Path) -> None:
    code = main(["--quick", "--epsilons", "inf", "--no-baseline", "--out", str(tmp_path)])

    report = json.loads((tmp_path / "accuracy.json").read_text())
    entry = report["settings"]["eps-inf"]
    assert "error" not in entry, entry.get("error")
    assert code == 0
    assert set(entry["site_epsilon"].values()) == {"inf"}
