"""The site owns its guarantee: attacks by the coordinator or the run submitter, each written first.

* the noise of a release cannot be re-derived from run-config values, ids or round numbers;
* a round is released once: a repeated request is answered from the store or refused;
* the site's policy, not the run config, decides DP, delta, the budgets and seeded noise;
* the two liveness bugs: equal (sigma, q) for both models, and an empty Poisson batch on Opacus.

Real faces (ORL) and real FER2013 images throughout (tests/client/training/test_round.py's tiny site).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client.training import site_data
from client.training.app import build_client_app
from client.training.dp_random import SecretRandomness
from client.training.privacy_state import SitePrivacyState
from client.training.round import run_round
from client.training.site_policy import PolicyRefusal, SitePolicies, SitePolicy, check_run
from client.training.site_store import SiteStore, events_of
from client.training.train import sample_rate, train_round
from common.config import parse_run_config
from common.errors import ConfigError
from common.models import CosineHead, EmotionNet, FaceEmbedder
from common.privacy.accounting import compute_epsilon
from common.privacy.events import DpSgdEvent
from common.serde import arrays_digest, to_arrays
from tests.client.training.test_round import KEY, SMALL, config, initial_arrays, release, tiny_site
from tests.messages import train_message

SIGMA = 4.0
# One face DP-SGD step of plain SGD at lr 1: the released update is -(clipped sum + noise) / B.
ONE_STEP = {
    **SMALL,
    "face-steps": 1,
    "emotion-steps": 0,
    "local-optimizer": "sgd",
    "momentum": 0.0,
    "face-lr": 1.0,
    "noise-multiplier": SIGMA,
    "max-epsilon": 8.0,
}


def face_update(noise_source: str, server_round: int = 1) -> np.ndarray:
    """The released face-backbone update of one round, flattened."""
    overrides = {**ONE_STEP, "noise-source": noise_source}
    start = initial_arrays(parse_run_config(overrides))
    policy = SitePolicy(allow_seeded_noise=True)
    reply = release(RecordDict(), server_round, policy=policy, **overrides).content
    after = reply.array_records["arrays"]
    return np.concatenate(
        [
            (after[k].numpy() - start[k].numpy()).ravel()
            for k in sorted(start.keys())
            if k.startswith("face.")
        ]
    )


def independent_noise_norm(dims: int) -> float:
    """E||(n1 - n2) / B|| for n1, n2 ~ N(0, (sigma C)^2 I_d): the norm independent noise gives."""
    data = tiny_site()
    batch = sample_rate(ONE_STEP["face-batch"], len(data.face_y)) * len(data.face_y)
    return math.sqrt(2 * dims) * SIGMA * 1.0 / int(batch)


# --- secret, fresh randomness ---------------------------------------------------------------------


def test_two_releases_of_the_same_round_carry_independent_noise() -> None:
    first, second = face_update("secret"), face_update("secret")
    expected = independent_noise_norm(first.size)
    # The clipped sums of the two Poisson batches differ by at most 2 * n * C / B, < 2% of this.
    assert np.linalg.norm(first - second) == pytest.approx(expected, rel=0.05)


def test_seeded_noise_is_what_the_attack_recovers_so_the_test_above_can_fail() -> None:
    # With noise derived from (seed, site, round), anyone holding the run config replays it exactly.
    first, second = face_update("seeded"), face_update("seeded")
    assert np.linalg.norm(first - second) < 1e-6 * independent_noise_norm(first.size)


def test_re_deriving_the_generator_from_the_run_config_does_not_recover_the_release() -> None:
    # The attacker replays the release with every value it knows (seed 0, site 0, round 1) and the
    # generator those values seed: what is left is the full independent noise, not the clipped sum.
    released = face_update("secret")
    replayed = face_update("seeded")
    expected = independent_noise_norm(released.size)
    assert np.linalg.norm(released - replayed) == pytest.approx(expected, rel=0.05)


def test_secret_noise_has_the_requested_standard_deviation_and_no_seed() -> None:
    rng = SecretRandomness()
    draws = rng.normal((200_000,), 3.0, torch.float64).numpy()
    assert draws.std() == pytest.approx(3.0, rel=0.01) and abs(draws.mean()) < 0.03
    assert not np.array_equal(draws[:100], rng.normal((100,), 3.0, torch.float64).numpy())
    uniforms = rng.uniform(100_000).numpy()
    assert (
        uniforms.min() >= 0
        and uniforms.max() < 1
        and uniforms.mean() == pytest.approx(0.5, abs=0.01)
    )


# --- one release per (run, round) -----------------------------------------------------------------


def test_a_repeated_round_without_a_store_is_refused_not_trained_again() -> None:
    state = RecordDict()
    release(state, 1)
    history = list(SitePrivacyState.load(state, "rdp").history)
    with pytest.raises(PolicyRefusal, match="round 1 was already released"):
        release(state, 1)
    assert SitePrivacyState.load(state, "rdp").history == history  # not charged again


def deployed_site(tmp_path: Path, **node: object) -> tuple[object, Context]:
    node_config = {"partition-id": 0, "num-partitions": 8, "state-dir": str(tmp_path), **node}
    app = build_client_app(parse_run_config(SMALL).to_flat())
    return app, Context(
        run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=node_config
    )


def ask(app: object, context: Context, server_round: int = 1, **run_config: object):
    settings = parse_run_config({**SMALL, **run_config})
    content = RecordDict(
        {"arrays": initial_arrays(settings), "config": config(server_round, "run-x")}
    )
    context.run_config = {k: v for k, v in run_config.items()}
    return app(train_message(content), context)  # type: ignore[operator]


def test_a_repeated_round_with_a_store_is_answered_byte_for_byte(tmp_path: Path) -> None:
    first = ask(*deployed_site(tmp_path))
    again = ask(*deployed_site(tmp_path))  # a restarted site, asked the same round
    assert not first.has_error() and not again.has_error()
    assert arrays_digest(first.content["arrays"]) == arrays_digest(again.content["arrays"])
    assert first.content.config_records["privacy"] == again.content.config_records["privacy"]


# --- the site's policy wins -----------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("run_config", "node", "reason"),
    [
        ({"dp": False}, {}, "site-0 refused: policy (require-dp)"),
        ({"delta": 1e-4}, {}, "site-0 refused: policy (max-delta)"),
        ({"max-epsilon": 9.0}, {}, "site-0 refused: policy (max-epsilon-run)"),
        ({}, {"policy-max-epsilon-run": 2.0}, "site-0 refused: policy (max-epsilon-run)"),
        (
            {"noise-source": "seeded"},
            {"policy-allow-seeded-noise": True},
            "site-0 refused: policy (allow-seeded-noise)",
        ),
        (
            {"accountant": "prv"},
            {"policy-accountant": "rdp"},
            "site-0 refused: policy (accountant)",
        ),
        # Found by the attack review: simulation settings that, on a site, make one image change
        # which other images train (a fixed-size subset; LFW's one-image people left out), or give
        # an uncharged refusal that counts the site's people (domain-holdout k fails iff <= k + 1)
        ({"emotion-train-limit": 100}, {}, "site-0 refused: policy (simulation-only)"),
        ({"face-train-limit": 40}, {}, "site-0 refused: policy (simulation-only)"),
        ({"domain-holdout": 2}, {}, "site-0 refused: policy (simulation-only)"),
        ({"face-sources": "lfw"}, {}, "site-0 refused: policy (dp-unit)"),
    ],
    ids=[
        "dp-off",
        "delta",
        "run-cap",
        "site-run-cap",
        "seeded-deployed",
        "accountant",
        "emotion-train-limit",
        "face-train-limit",
        "domain-holdout",
        "lfw-at-example-level",
    ],
)
def test_a_run_asking_for_less_than_the_site_policy_is_refused_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_config: dict, node: dict, reason: str
) -> None:
    ask(*deployed_site(tmp_path))  # the site has trained once: it holds state worth protecting
    before = snapshot(tmp_path)

    def no_reading(*args: object) -> None:
        raise AssertionError("the site read its data for a refused run")

    monkeypatch.setattr(site_data, "load_site_tensors", no_reading)
    reply = ask(*deployed_site(tmp_path, **node), server_round=2, **run_config)
    assert reply.has_error()
    assert reply.error.reason == reason  # one line naming the site and the setting, nothing else
    assert snapshot(tmp_path) == before


def test_a_refused_first_run_creates_no_state(tmp_path: Path) -> None:
    reply = ask(*deployed_site(tmp_path / "state"), dp=False)
    assert reply.error.reason == "site-0 refused: policy (require-dp)"
    assert not (tmp_path / "state").exists()


def test_a_round_past_the_lifetime_cap_is_refused_before_training() -> None:
    spent = [DpSgdEvent(noise_multiplier=0.8, sample_rate=0.2, steps=200, clip_norm=1.0)]
    with pytest.raises(PolicyRefusal, match="max-epsilon-lifetime"):
        # other_runs: what earlier runs of this site released
        release(RecordDict(), 1, other_runs=spent, policy=SitePolicy(max_epsilon_lifetime=8.0))


def test_the_policy_floor_raises_a_calibrated_noise_multiplier() -> None:
    state = RecordDict()
    release(state, 1, policy=SitePolicy(min_noise_multiplier=5.0))
    assert SitePrivacyState.load(state, "rdp").noise_multiplier == 5.0


def test_a_simulation_may_opt_into_seeded_noise_only_where_the_policy_allows() -> None:
    settings = parse_run_config({**SMALL, "noise-source": "seeded"})
    with pytest.raises(PolicyRefusal, match="allow-seeded-noise"):
        check_run(SitePolicy(), settings, 0, deployed=False)
    assert check_run(SitePolicy(allow_seeded_noise=True), settings, 0, deployed=False) == 8.0
    with pytest.raises(PolicyRefusal, match="deployed site never releases seeded noise"):
        check_run(SitePolicy(allow_seeded_noise=True), settings, 0, deployed=True)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max-epsilon": 3}, "unknown policy key 'max-epsilon'"),
        ({"max-delta": 2.0}, "max-delta must be in (0, 1)"),
        (
            {"max-epsilon-run": 8.0, "max-epsilon-lifetime": 4.0},
            "max-epsilon-lifetime (4) is below",
        ),
        ({"require-dp": "maybe"}, "require-dp must be true or false"),
        ({"min-noise-multiplier": float("nan")}, "min-noise-multiplier must be a finite number"),
        ({"site-x": {"max-delta": 1e-6}}, "must name a site as site-N"),
        ({"min-batch": 0}, "min-batch must be an integer >= 1"),
    ],
)
def test_a_bad_policy_table_is_one_line_naming_the_file_and_setting(
    table: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        SitePolicies.from_table(table, "scenario sites.toml")
    text = str(caught.value)
    assert message in text and "sites.toml" in text and "\n" not in text


def test_per_site_policy_entries_override_the_common_ones() -> None:
    policies = SitePolicies.from_table(
        {"max-epsilon-run": 4.0, "site-2": {"max-epsilon-run": 1.0}}, "scenario"
    )
    assert policies.for_site(0).max_epsilon_run == 4.0
    assert policies.for_site(2).max_epsilon_run == 1.0
    assert SitePolicies.from_table(policies.to_table(), "round trip") == policies


# --- liveness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp_path", ["fast", "opacus"])
def test_face_and_emotion_at_equal_sigma_and_q_both_train_and_are_recorded(dp_path: str) -> None:
    data = tiny_site()
    # 50 faces at batch 10 and 200 emotions at batch 40: both sampled at q = 1/5
    assert sample_rate(10, len(data.face_y)) == sample_rate(40, len(data.emotion_y))
    state = RecordDict()
    release(state, 1, **{"face-batch": 10, "emotion-batch": 40, "dp-path": dp_path})
    history = SitePrivacyState.load(state, "rdp").history
    assert [e.name for e in history] == ["face", "emotion"]


class EmptyFirstBatch(SecretRandomness):
    """Secret randomness whose first Poisson draw samples nobody (an empty batch)."""

    def __init__(self) -> None:
        self.calls = 0

    def uniform(self, n: int) -> torch.Tensor:
        self.calls += 1
        return torch.ones(n, dtype=torch.float64) if self.calls == 1 else super().uniform(n)


def test_the_opacus_path_takes_a_noise_only_step_on_an_empty_batch() -> None:
    data = tiny_site()
    settings = parse_run_config({**SMALL, "dp-path": "opacus", "emotion-steps": 0})
    privacy = SitePrivacyState("rdp", noise_multiplier=1.0)
    face, emotion = FaceEmbedder(settings.face_width), EmotionNet(settings.emotion_width)
    before = [p.detach().clone() for p in face.parameters()]
    randomness = EmptyFirstBatch()
    outcome = train_round(
        face,
        CosineHead(data.num_identities),
        emotion,
        data,
        settings,
        privacy,
        torch.Generator().manual_seed(0),
        randomness,
    )
    assert randomness.calls == settings.face_steps  # every step drew its batch from it
    assert [(e.name, e.steps) for e in outcome.events] == [("face", 2)]
    assert any(not torch.equal(a, b) for a, b in zip(before, face.parameters(), strict=True))


# --- found by the attack review (each reproduced against the code before its fix) -----------------


def ask_run(
    state_dir: Path, run_id: str, server_round: int, node: dict | None = None, **run_config: object
):
    """One training request of run ``run_id`` to a freshly started deployed site."""
    app, context = deployed_site(state_dir, **(node or {}))
    settings = parse_run_config({**SMALL, **run_config})
    content = RecordDict(
        {"arrays": initial_arrays(settings), "config": config(server_round, run_id)}
    )
    context.run_config = dict(run_config)
    return app(train_message(content), context)  # type: ignore[operator]


def test_a_run_whose_files_were_pruned_keeps_its_spend_and_its_run_cap(tmp_path: Path) -> None:
    for server_round in (1, 2, 3):  # run A spends its whole budget of 8
        assert not ask_run(tmp_path, "run-a", server_round).has_error()
    for other in ("b", "c", "d", "e"):  # four cheap runs later, run A's own files are pruned
        assert not ask_run(tmp_path, f"run-{other}", 1, **{"noise-multiplier": 50.0}).has_error()
    assert not any(SiteStore(tmp_path)._run_files("run-a"))
    again = ask_run(tmp_path, "run-a", 4)  # run A comes back
    assert again.has_error()
    assert again.error.reason == "site-0 refused: budget (max-epsilon-run)"


def test_a_pruned_run_cannot_resume_on_the_history_another_run_left_in_the_context(
    tmp_path: Path,
) -> None:
    """Flower's Context belongs to the Flower run, but the run id is the coordinator's: one Flower run
    may ask for several. The attack: replay a cheap decoy's round (its state is loaded into the
    Context), then ask a pruned run's next round; its files are gone, so its state used to stay the
    decoy's, whose rounds [1, 2, 3] match the lifetime record's, and the run's real spend was dropped
    from both the run cap and the lifetime cap."""
    policy = {"policy-max-epsilon-run": 8.0, "policy-max-epsilon-lifetime": 8.0}
    decoy = {"noise-multiplier": 1.0, "face-steps": 1, "emotion-steps": 1}
    for server_round in (1, 2, 3):  # run A spends nearly all of the lifetime cap
        assert not ask_run(tmp_path, "run-a", server_round, policy).has_error()
    for other in ("b", "c", "d"):  # three nearly free runs and the decoy prune run A's files
        assert not ask_run(
            tmp_path, f"run-{other}", 1, policy, **{"noise-multiplier": 50.0}
        ).has_error()
    for server_round in (1, 2, 3):
        assert not ask_run(tmp_path, "decoy", server_round, policy, **decoy).has_error()
    assert not any(SiteStore(tmp_path)._run_files("run-a"))
    # one Flower run (one Context) asks the decoy's round 3 again, then run A's round 4
    attack = {**decoy, "face-steps": 200, "emotion-steps": 200}
    app, context = deployed_site(tmp_path, **policy)
    context.run_config = dict(attack)
    arrays = initial_arrays(parse_run_config({**SMALL, **attack}))

    def request(run_id: str, server_round: int):
        content = RecordDict({"arrays": arrays, "config": config(server_round, run_id)})
        return app(train_message(content), context)  # type: ignore[operator]

    assert not request("decoy", 3).has_error()  # a replay: answered from the store
    reply = request("run-a", 4)
    # Assert: refused on run A's own spend, and the site never went past its lifetime cap
    assert reply.has_error()
    assert reply.error.reason == "site-0 refused: budget (max-epsilon-run)"
    spent = compute_epsilon(events_of(SiteStore(tmp_path).lifetime()), 1e-5, "rdp")
    assert spent <= 8.0


def poisoned_emotion_arrays(settings, klass: int = 1):
    """A global model whose emotion logit for one class overflows to -inf (its weights are finite)."""
    torch.manual_seed(0)
    face, emotion = FaceEmbedder(settings.face_width), EmotionNet(settings.emotion_width)
    with torch.no_grad():
        emotion.classifier.weight[klass] = -3.0e38
    return to_arrays(face, emotion)


@pytest.mark.parametrize("dp_path", ["fast", "opacus"])
def test_a_model_that_overflows_on_some_examples_gives_no_data_dependent_error(
    dp_path: str,
) -> None:
    # Before: the non-finite loss raised iff the Poisson batch held such an example, and that
    # yes/no left the site as an error, uncharged, as often as the coordinator asked.
    data = tiny_site()
    settings = parse_run_config({**SMALL, "dp-path": dp_path, "emotion-batch": 100})
    arrays = poisoned_emotion_arrays(settings)
    assert (data.emotion_y == 1).any()  # the site holds examples of that class
    released = run_round(arrays, config(1), RecordDict(), data, settings, 8.0, 0, KEY)
    out = released.content.array_records["arrays"]
    assert all(np.isfinite(out[k].numpy()).all() for k in out)  # a normal, charged release
    assert [e.name for e in released.events] == ["face", "emotion"]


def test_a_request_with_a_malformed_round_or_run_id_is_refused_before_anything(
    tmp_path: Path,
) -> None:
    ask_run(tmp_path, "run-a", 1)
    before = snapshot(tmp_path)
    for server_round, run_id in ((-1, "run-a"), (0, "run-a"), (2.0, "run-a"), (2, "../x")):
        reply = ask_run(tmp_path, run_id, server_round)  # type: ignore[arg-type]
        assert reply.error.reason == "site-0 refused: policy (request)"
    assert snapshot(tmp_path) == before


def test_a_raised_noise_floor_applies_to_a_run_already_under_way(tmp_path: Path) -> None:
    assert not ask_run(tmp_path, "run-a", 1).has_error()  # calibrated sigma ~0.8
    reply = ask_run(tmp_path, "run-a", 2, {"policy-min-noise-multiplier": 2.0})
    assert reply.error.reason == "site-0 refused: policy (min-noise-multiplier)"


def test_a_first_run_refused_on_its_budget_creates_no_state(tmp_path: Path) -> None:
    reply = ask_run(tmp_path / "state", "run-a", 1, **{"noise-multiplier": 0.3})
    assert reply.error.reason == "site-0 refused: budget (max-epsilon-run)"
    assert not (tmp_path / "state").exists()  # not even the signing key


def test_an_exception_before_training_leaves_as_a_fixed_code(tmp_path: Path) -> None:
    app, context = deployed_site(tmp_path)
    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1, "run-a")})
    context.run_config = {"face-width": 12}  # the model cannot be built: GroupNorm's groups
    reply = app(train_message(content), context)  # type: ignore[operator]
    assert reply.error.reason == "site-internal-error"


def test_a_round_that_fails_after_reading_data_is_charged_and_never_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.training import round as round_module

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something went wrong with example 17")

    monkeypatch.setattr(round_module, "train_round", crash)
    reply = ask_run(tmp_path, "run-a", 1)
    assert reply.error.reason == "site-0 refused: state (training-failed)"
    [failed] = SiteStore(tmp_path).lifetime()
    assert failed.round == 1 and [e.name for e in failed.events] == ["face", "emotion"]
    monkeypatch.undo()
    again = ask_run(tmp_path, "run-a", 1)
    assert again.error.reason == "site-0 refused: replay (one-release-per-round)"


def test_a_deployed_site_without_a_state_directory_refuses_to_train() -> None:
    app = build_client_app(parse_run_config(SMALL).to_flat())
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={"partition-id": 0, "num-partitions": 8},
    )
    settings = parse_run_config(SMALL)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    reply = app(train_message(content), context)  # type: ignore[operator]
    assert reply.error.reason == "site-0 refused: policy (state-dir)"  # no lifetime, no training


def test_after_a_release_without_dp_no_dp_round_claims_a_finite_lifetime(tmp_path: Path) -> None:
    allow = {"policy-require-dp": False}
    assert not ask_run(tmp_path, "plain", 1, allow, dp=False).has_error()  # the policy allowed it
    reply = ask_run(tmp_path, "dp-run", 1, allow)
    assert reply.error.reason == "site-0 refused: budget (max-epsilon-lifetime)"
    assert [r.private for r in SiteStore(tmp_path).lifetime()] == [False]


def test_a_new_run_past_the_lifetime_cap_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    for server_round in (1, 2, 3):  # run A spends its whole run budget: epsilon 7.98
        assert not ask_run(tmp_path, "run-a", server_round).has_error()
    before = snapshot(tmp_path)
    # A new run id does not reset the spend: its first round would take the lifetime past 8.
    reply = ask_run(tmp_path, "run-b", 1, {"policy-max-epsilon-lifetime": 8.0})
    assert reply.error.reason == "site-0 refused: budget (max-epsilon-lifetime)"
    assert snapshot(tmp_path) == before


def test_a_run_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    # `re.match` with `$` accepted "run-a\n"; ids are checked with fullmatch
    reply = ask_run(tmp_path, "run-a\n", 1)
    assert reply.error.reason == "site-0 refused: policy (request)"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
