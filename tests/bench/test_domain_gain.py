"""Domain gain: verification on the ORL / Extended Yale B people that domain-holdout keeps from every site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.domain_gain import POOLED, SOURCES, all_pairs, auc, holdout_rows, main
from client.training.site_data import SiteSpec, load_site_tensors
from common.checkpoint import save_checkpoint
from common.config import RunSettings
from common.data.chips import dataset_chips
from common.errors import ConfigError
from common.facenet.weights import default_pretrained_path
from common.features import ModelInputs
from common.model_spec import ModelSpec
from common.paths import DEFAULT_DATA_DIR
from simulations.scenarios import load_scenario, resolve

HOLDOUT = 10

needs_data = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "orl_att_faces_pgm.tar.gz").is_file()
    or not (DEFAULT_DATA_DIR / "eyaleb_cropped_96x84.npz").is_file()
    or not default_pretrained_path().is_file(),
    reason="ORL / Extended Yale B data or the pretrained face network not available",
)


def test_auc_counts_ties_as_half_and_matches_the_pair_definition() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.7])
    same = np.array([True, True, False, False, False])
    # genuine 0.9 beats all 3; genuine 0.5 ties one (0.5), beats 0.1, loses to 0.7 -> (3 + 1.5) / 6
    assert auc(scores, same) == pytest.approx(4.5 / 6)


def test_all_pairs_scores_each_unordered_pair_once() -> None:
    emb = torch.nn.functional.normalize(
        torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    labels = np.array([0, 0, 1, 1, 1])

    pairs = all_pairs(emb, labels)

    assert len(pairs.scores) == 10
    assert int(pairs.same.sum()) == 1 + 3
    # float32 products, summed in another order: equal to float32 precision, not to 1e-6 of a small value
    assert pairs.scores[0] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-6)


def test_holdout_rows_are_the_last_people_and_zero_is_refused() -> None:
    labels = np.array([3, 1, 2, 3, 0, 2])

    assert holdout_rows(labels, 2).tolist() == [0, 2, 3, 5]
    with pytest.raises(ConfigError, match="--holdout"):
        holdout_rows(labels, 0)


def test_skip_last_scores_validation_people_and_never_the_test_people() -> None:
    labels = np.array([3, 1, 2, 3, 0, 2, 4])

    # held out: people 2, 3, 4; the last one (4) is the test person, 2 and 3 validate
    assert holdout_rows(labels, 3, skip_last=1).tolist() == [0, 2, 3, 5]
    with pytest.raises(ConfigError, match="--skip-last"):
        holdout_rows(labels, 3, skip_last=3)


def _checkpoint(path: Path, pretrained_start: bool) -> Path:
    spec = ModelInputs(ModelSpec.from_settings(RunSettings(face_model="pretrained"))).spec
    with torch.random.fork_rng(devices=[]):
        face, emotion = spec.initial(0)
        if not pretrained_start:
            face, _ = spec.build()  # the same tail with random (untrained) weights
    return save_checkpoint(path, face, emotion, spec, 0)


@needs_data
def test_pretrained_start_verifies_held_out_people_far_better_than_an_untrained_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = _checkpoint(tmp_path / "start.ckpt", pretrained_start=True)
    untrained = _checkpoint(tmp_path / "untrained.ckpt", pretrained_start=False)
    out = tmp_path / "gain.json"

    code = main([str(start), str(untrained), "--holdout", str(HOLDOUT), "--json", str(out)])

    assert code == 0
    report = json.loads(out.read_text())["checkpoints"]
    good, bad = report[str(start)], report[str(untrained)]
    assert set(good) == {*SOURCES, POOLED}
    assert (good["orl"]["genuine_pairs"], good["orl"]["impostor_pairs"]) == (450, 4500)
    assert good[POOLED]["genuine_pairs"] == sum(good[s]["genuine_pairs"] for s in SOURCES)
    # measured: pooled TAR@1e-3 0.20 vs 0.13, AUC 0.92 vs 0.88; ORL TAR 0.98 vs 0.92
    assert good[POOLED]["tar"] > 1.4 * bad[POOLED]["tar"]
    assert good[POOLED]["auc"] > bad[POOLED]["auc"] + 0.02
    assert good["orl"]["tar"] > 0.95 and good["orl"]["tar"] > bad["orl"]["tar"]
    assert "| pooled |" in capsys.readouterr().out


@needs_data
def test_held_out_people_are_the_last_of_each_source_and_in_no_sites_training_data() -> None:
    root = DEFAULT_DATA_DIR
    for source, people in (("orl", 40), ("eyaleb", 38)):
        labels = dataset_chips(source, root).labels
        assert len(np.unique(labels)) == people
        held = np.unique(labels[holdout_rows(labels, HOLDOUT)])
        assert held.tolist() == sorted(np.unique(labels))[-HOLDOUT:]

    settings = resolve(
        load_scenario("bench"),
        {
            "face-sources": "orl",
            "face-model": "pretrained",
            "domain-holdout": HOLDOUT,
            "emotion-train-limit": 50,
            "num-sites": 2,
            "cohort-size": 2,
        },
    )
    sites = [load_site_tensors(settings, SiteSpec(i, 2)) for i in range(2)]
    # 30 ORL people of 10 images each remain, split by identity over the two sites
    assert sum(s.num_identities for s in sites) == 40 - HOLDOUT
    assert sum(len(s.face_y) for s in sites) == 10 * (40 - HOLDOUT)
    # no site's training input is the input of a held-out image (frozen features, row for row)
    chips = dataset_chips("orl", root)
    inputs = ModelInputs(ModelSpec.from_settings(settings))
    held_out = inputs.face(chips.chips[holdout_rows(chips.labels, HOLDOUT)]).x
    kept = inputs.face(
        chips.chips[~np.isin(np.arange(len(chips.labels)), holdout_rows(chips.labels, HOLDOUT))]
    ).x
    site_x = torch.cat([s.face_x for s in sites]).flatten(1)
    held_out, kept = held_out.flatten(1), kept.flatten(1)
    # (features of one image differ by < 0.02 with the batch they were computed in; images by > 1)
    assert torch.cdist(site_x, held_out).min() > 0.5
    assert torch.cdist(site_x, kept).min(dim=1).values.max() < 0.1  # each site row: a kept image
