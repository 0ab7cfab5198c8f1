"""A site's federated rounds: cumulative epsilon, budget refusal, and what leaves the site.

These call the client's round logic and the ClientApp itself directly, on a small slice of real faces
(ORL identities, FER2013 training images).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from client.training.egress import guard_stats
from client.training.privacy_state import STATE_KEY, SitePrivacyState
from client.training.round import HEAD_KEY, RoundRelease, run_round
from client.training.site_policy import SitePolicy
from client.training.train import SiteTensors
from common.config import parse_run_config
from common.crypto.signing import generate_private_key
from common.data.fer2013 import load_fer2013
from common.data.orl import load_orl
from common.data.preprocess import emotion_tensor, face_tensor
from common.errors import DataError, PrivacyBudgetError
from common.models import EmotionNet, FaceEmbedder
from common.privacy.events import DpSgdEvent
from common.serde import to_arrays
from tests.messages import train_message

SMALL = {
    # a deployed site refuses example-level face DP on LFW-layout faces (site_policy.py)
    "face-sources": "orl,eyaleb",
    "face-steps": 2,
    "emotion-steps": 2,
    "face-batch": 16,
    "emotion-batch": 32,
    "num-rounds": 3,
    "accountant": "rdp",
    "max-epsilon": 8.0,
}


@functools.lru_cache(maxsize=1)
def tiny_site() -> SiteTensors:
    orl = load_orl()
    keep = orl.labels < 5  # 5 people x 10 images
    fer = load_fer2013("Training")
    rows = np.random.default_rng(0).choice(len(fer), 200, replace=False)
    return SiteTensors(
        face_x=face_tensor(orl.images[keep]),
        face_y=torch.from_numpy(orl.labels[keep]),
        emotion_x=emotion_tensor(fer.images[rows]),
        emotion_y=torch.from_numpy(fer.labels[rows]),
    )


def initial_arrays(settings):
    torch.manual_seed(0)
    return to_arrays(FaceEmbedder(settings.face_width), EmotionNet(settings.emotion_width))


KEY = generate_private_key()


def config(server_round: int, run_id: str = "test-run") -> ConfigRecord:
    return ConfigRecord({"server-round": server_round, "run-id": run_id})


def release(
    state: RecordDict,
    server_round: int,
    run_id: str = "test-run",
    other_runs: Sequence[DpSgdEvent] = (),
    policy: SitePolicy | None = None,
    **overrides: object,
) -> RoundRelease:
    """One round of the tiny site at its run budget, signed with the test key."""
    settings = parse_run_config({**SMALL, **overrides})
    return run_round(
        initial_arrays(settings),
        config(server_round, run_id),
        state,
        tiny_site(),
        settings,
        budget=settings.privacy.max_epsilon,
        site_index=0,
        signing_key=KEY,
        policy=policy,
        other_runs=other_runs,
    )


def run(state: RecordDict, server_round: int, run_id: str = "test-run", **overrides):
    return release(state, server_round, run_id, **overrides).content


def test_epsilon_grows_each_round_and_matches_opacus_offline() -> None:
    state = RecordDict()
    epsilons = [run(state, r)["metrics"]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= SMALL["max-epsilon"]

    history = SitePrivacyState.load(state, "rdp").history
    assert len(history) == 6  # two models x three rounds
    offline = RDPAccountant()
    offline.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    assert math.isclose(epsilons[-1], offline.get_epsilon(delta=1e-5), rel_tol=1e-9)


def test_prv_accountant_is_cumulative_too() -> None:
    state = RecordDict()
    eps1 = run(state, 1, accountant="prv")["metrics"]["epsilon"]
    eps2 = run(state, 2, accountant="prv")["metrics"]["epsilon"]
    offline = PRVAccountant()
    offline.history = [
        (e.noise_multiplier, e.sample_rate, e.steps)
        for e in SitePrivacyState.load(state, "prv").history
    ]
    assert eps1 < eps2
    assert math.isclose(eps2, offline.get_epsilon(delta=1e-5), rel_tol=1e-6)


def test_site_at_its_budget_refuses_to_train_and_state_is_untouched() -> None:
    state = RecordDict()
    for r in (1, 2, 3):  # calibrated to spend the whole budget in exactly num-rounds rounds
        run(state, r)
    history_before = list(SitePrivacyState.load(state, "rdp").history)
    with pytest.raises(PrivacyBudgetError, match="above the site's budget 8"):
        run(state, 4)
    assert SitePrivacyState.load(state, "rdp").history == history_before


def test_tighter_node_budget_is_enforced_from_the_first_round() -> None:
    state = RecordDict()
    settings = parse_run_config(SMALL)
    # The noise was calibrated for 8.0 by another run; a site whose own budget is 0.01 refuses.
    SitePrivacyState("rdp", noise_multiplier=0.8).save(state)
    with pytest.raises(PrivacyBudgetError, match="refusing to train"):
        run_round(
            initial_arrays(settings),
            config(1),
            state,
            tiny_site(),
            settings,
            budget=0.01,
            site_index=0,
            signing_key=KEY,
        )


def test_corrupt_accountant_state_fails_closed() -> None:
    state = RecordDict()
    run(state, 1)
    record = state.config_records[STATE_KEY]
    record["steps"] = [1]  # lengths no longer agree
    with pytest.raises(PrivacyBudgetError, match="unreadable"):
        run(state, 2)


def test_switching_accountant_mid_run_is_refused() -> None:
    state = RecordDict()
    run(state, 1, accountant="rdp")
    with pytest.raises(PrivacyBudgetError, match="refusing to mix accountants"):
        run(state, 2, accountant="prv")


def test_reply_carries_shared_arrays_and_scalars_only_and_head_stays_local() -> None:
    state = RecordDict()
    reply = run(state, 1)
    assert set(reply.array_records) == {"arrays"}
    assert set(reply.config_records) == {"privacy"}  # the signed ledger record, scalars and bytes
    keys = list(reply.array_records["arrays"].keys())
    assert all(k.startswith(("face.", "emotion.")) for k in keys)
    assert HEAD_KEY in state.array_records  # the identity head is kept in the site's own state
    metrics = reply["metrics"]
    # Only data-independent values: no losses, example counts or training time (un-noised, they
    # would tell the coordinator about the site's data).
    assert set(metrics) == {
        "site-index",
        "dp",
        "epsilon",
        "epsilon-lifetime",
        "delta",
        "steps",
        "noise-multiplier",
        "secret-noise",
    }
    assert metrics["steps"] == 4 and metrics["secret-noise"] == 1


def test_a_site_with_one_person_gets_a_clear_error() -> None:
    data = tiny_site()
    one = SiteTensors(
        face_x=data.face_x[:10],
        face_y=torch.zeros(10, dtype=torch.int64),
        emotion_x=data.emotion_x,
        emotion_y=data.emotion_y,
    )
    settings = parse_run_config(SMALL)
    with pytest.raises(DataError, match="at least 2 identities"):
        run_round(initial_arrays(settings), config(1), RecordDict(), one, settings, 8.0, 0, KEY)


def test_non_private_mode_reports_infinite_epsilon() -> None:
    reply = run(RecordDict(), 1, dp=False)
    assert reply["metrics"]["dp"] == 0 and reply["metrics"]["epsilon"] == -1.0
    assert "privacy" not in reply.config_records  # no DP release, no ledger record


@pytest.mark.parametrize(
    ("dp", "face_steps"), [(True, 2), (False, 2), (True, 0)], ids=["dp", "non-private", "no-face"]
)
def test_client_app_can_be_called_directly(dp: bool, face_steps: int) -> None:
    from client.training.app import build_client_app
    from client.training.site_policy import SitePolicies, SitePolicy

    settings = parse_run_config({**SMALL, "dp": dp, "face-steps": face_steps})
    policies = SitePolicies(SitePolicy(require_dp=dp))
    app = build_client_app(settings.to_flat(), site_policies=policies, research=True)
    content = RecordDict({"arrays": initial_arrays(settings), "config": config(1)})
    msg = train_message(content)
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={"partition-id": 0, "num-partitions": 8},
    )
    reply = app(msg, context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    # Every metric leaving the site is finite (the egress guard would refuse inf or NaN).
    assert reply.content["metrics"]["epsilon"] > 0 if dp else reply.content["metrics"]["dp"] == 0
    assert STATE_KEY in context.state
    # The egress guard saw the reply and found nothing but model arrays, scalars and the ledger record.
    assert guard_stats(context)["messages_seen"] == 1
    assert guard_stats(context)["messages_refused"] == 0
