"""Person-level DP-SGD: people are sampled and clipped, not images.

The guarantee's unit is a person when adding or removing *all* of one person's images changes the
clipped, summed gradient by at most C, and when the sampling rate the accountant records is the rate at
which people are drawn. Real faces: ORL people (10 images each) through facefed's scratch face network,
and dlib's pretrained tail on frozen features of real ORL chips.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from client.training.dp_random import SeededRandomness
from client.training.fast_dp import FastDpSgd, Units, person_batch
from client.training.privacy_state import SitePrivacyState
from client.training.site_policy import PolicyRefusal, SitePolicy, check_run
from client.training.train import expected_batch, train_round
from common.config import parse_run_config
from common.data.orl import load_orl
from common.data.preprocess import face_tensor
from common.errors import ConfigError
from common.model_spec import ModelSpec
from common.models import CosineHead, FaceEmbedder, FaceTrainer, cosface_loss
from tests.client.training.test_fast_dp import pretrained_tail_batch
from tests.client.training.test_round import SMALL, release, tiny_site

PERSON = {**SMALL, "dp-unit": "person", "person-max-images": 4, "face-batch": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=1)
def orl_faces() -> tuple[torch.Tensor, torch.Tensor]:
    """6 ORL people x 10 real face images."""
    orl = load_orl()
    keep = orl.labels < 6
    return face_tensor(orl.images[keep]), torch.from_numpy(orl.labels[keep]).long()


def scratch_model() -> FaceTrainer:
    torch.manual_seed(0)
    return FaceTrainer(FaceEmbedder(8), CosineHead(6))


def step_of(
    model: torch.nn.Module, clip: float, loss=cosface_loss, physical_batch: int = 128
) -> FastDpSgd:
    """A noise-free step of ``model`` clipping at ``clip`` (only its clipped sums are used)."""
    return FastDpSgd(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loss,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=1,
        sample_rate=0.5,
        accountant=RDPAccountant(),
        randomness=SeededRandomness(torch.Generator().manual_seed(0)),
        physical_batch=physical_batch,
    )


def dense_units(people: torch.Tensor) -> Units:
    _, index = torch.unique(people, return_inverse=True)
    return Units(index, int(index.max()) + 1 if len(index) else 0)


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def brute_force(model: torch.nn.Module, x, y, people, clip: float) -> torch.Tensor:
    """Each person's summed gradient from autograd, one person at a time, clipped and summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    for person in torch.unique(people):
        rows = people == person
        loss = cosface_loss(model(x[rows]), y[rows]) * int(rows.sum())  # the sum of their losses
        g = flat(list(torch.autograd.grad(loss, params)))
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    return total


@pytest.mark.parametrize("kind", ["scratch", "pretrained-tail"])
def test_each_persons_summed_gradient_is_clipped_as_one(kind: str) -> None:
    if kind == "scratch":
        x, y = orl_faces()
        rows = torch.tensor([0, 1, 2, 10, 20, 21, 30, 31, 32, 33])
        model, x, y = scratch_model(), x[rows], y[rows]
    else:
        tail, x, y = pretrained_tail_batch(12)
        torch.manual_seed(0)
        model = FaceTrainer(tail, CosineHead(int(y.max()) + 1))
    clip = 0.05  # below every person's norm: every person is clipped
    batch = step_of(model, clip).clipped_sum(x, y, dense_units(y))
    expected = brute_force(model, x, y, y, clip)
    torch.testing.assert_close(flat(batch.grads), expected, rtol=1e-4, atol=1e-6)
    assert len(batch.per_sample_norms) == len(torch.unique(y))
    assert bool((batch.per_sample_norms > clip).all())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    removed=st.integers(0, 4),
    clip=st.sampled_from([0.01, 0.1, 1.0]),
    order_seed=st.integers(0, 2**16),
)
def test_adding_or_removing_all_of_one_persons_images_moves_the_sum_by_at_most_c(
    counts: list[int], removed: int, clip: float, order_seed: int
) -> None:
    x_all, y_all = orl_faces()
    removed %= len(counts)
    rows = torch.cat([torch.arange(k) + 10 * person for person, k in enumerate(counts)])
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(order_seed))]
    x, y = x_all[rows], y_all[rows]
    model = scratch_model()  # the same model and head for both neighbours
    dp = step_of(model, clip)
    with_person = flat(dp.clipped_sum(x, y, dense_units(y)).grads)
    keep = y != removed
    without = flat(dp.clipped_sum(x[keep], y[keep], dense_units(y[keep])).grads)
    assert float((with_person - without).norm()) <= clip * (1 + 1e-4)


def test_at_example_level_one_persons_images_move_the_sum_by_more_than_c() -> None:
    """Why the unit matters: 5 images of one person, each clipped alone, add up to about 5 C."""
    x, y = orl_faces()
    rows = torch.tensor([0, 1, 2, 3, 4, 10, 11, 20])
    x, y = x[rows], y[rows]
    clip = 0.01
    dp = step_of(scratch_model(), clip)
    keep = y != 0
    change = flat(dp.clipped_sum(x, y).grads) - flat(dp.clipped_sum(x[keep], y[keep]).grads)
    assert float(change.norm()) > 3 * clip


class Uniforms:
    """Randomness whose uniforms are given: person_batch must draw people with exactly them."""

    secret = False

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = draws

    def uniform(self, n: int) -> torch.Tensor:
        draw = self.draws.pop(0)
        assert len(draw) == n
        return draw

    def normal(self, shape, std, dtype):  # pragma: no cover - not used
        raise AssertionError


def test_a_person_is_drawn_exactly_when_their_uniform_is_below_the_rate() -> None:
    people = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3])
    person_u = torch.tensor([0.29, 0.31, 0.05, 0.9], dtype=torch.float64)
    order_u = torch.linspace(0.9, 0.1, 5, dtype=torch.float64)  # one per image of people 0 and 2
    rows, units = person_batch(people, 4, 0.3, 2, Uniforms([person_u, order_u]))
    chosen = set(people[rows].tolist())
    assert chosen == {0, 2}  # 0.29 and 0.05 are below 0.3; 0.31 and 0.9 are not
    assert int((people[rows] == 0).sum()) == 2  # capped at 2 of person 0's three images
    assert int((people[rows] == 2).sum()) == 2
    assert units.count == 2
    assert torch.equal(units.index, torch.unique(people[rows], return_inverse=True)[1])


def test_person_batches_never_exceed_the_cap_and_sample_people_at_the_rate() -> None:
    people = torch.repeat_interleave(torch.arange(50), torch.arange(50) % 7 + 1)
    randomness = SeededRandomness(torch.Generator().manual_seed(3))
    drawn = 0
    for _ in range(400):
        rows, units = person_batch(people, 50, 0.2, 3, randomness)
        per_person = torch.bincount(people[rows], minlength=50)
        assert int(per_person.max()) <= 3
        assert units.count == int((per_person > 0).sum())
        drawn += units.count
    rate = drawn / (400 * 50)
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (400 * 50))


class Recording(SeededRandomness):
    def __init__(self) -> None:
        super().__init__(torch.Generator().manual_seed(0))
        self.sizes: list[int] = []

    def uniform(self, n: int) -> torch.Tensor:
        self.sizes.append(n)
        return super().uniform(n)


def test_the_recorded_sampling_rate_is_the_rate_people_were_drawn_at() -> None:
    s = parse_run_config({**PERSON, "emotion-steps": 0, "face-steps": 3})
    data = tiny_site()  # 5 people x 10 images
    face, emotion = ModelSpec.from_settings(s).build()
    privacy = SitePrivacyState(accountant="rdp", noise_multiplier=1.0)
    randomness = Recording()
    outcome = train_round(
        face,
        CosineHead(data.num_identities),
        emotion,
        data,
        s,
        privacy,
        torch.Generator().manual_seed(0),
        randomness,
    )
    (event,) = outcome.events
    people = data.num_identities
    assert event.unit == "person"
    assert event.sample_rate == 1 / math.ceil(people / expected_batch(s.face_batch, people))
    # each step drew people first: one uniform per person (then one per image of those drawn)
    assert randomness.sizes.count(people) >= 3
    assert all(n <= len(data.face_y) for n in randomness.sizes)
    assert privacy.history == [event]


def test_the_ledger_record_carries_each_models_unit() -> None:
    from common.privacy.site_record import RECORD_NAME, RoundReport

    content = release(RecordDict(), 1, **PERSON).content
    report, _, _ = RoundReport.from_record(dict(content.config_records[RECORD_NAME]))
    units = {m.name: m.unit for m in report.mechanisms}
    assert units == {"face": "person", "emotion": "example"}
    body = report.entry_body("test-run", "0" * 64, "rdp")
    assert body["privacy_unit"] == "person (face), example (emotion)"


def test_a_site_never_mixes_units_for_one_model() -> None:
    state = RecordDict()
    release(state, 1)  # example-level face
    with pytest.raises(PolicyRefusal, match=r"example level before.*dp-unit"):
        release(state, 2, **PERSON)


def test_a_site_whose_policy_requires_person_level_refuses_an_example_level_run() -> None:
    policy = SitePolicy(dp_unit="person", min_batch=1)
    with pytest.raises(PolicyRefusal, match="dp-unit"):
        check_run(policy, parse_run_config(SMALL), 0, deployed=True)
    assert check_run(policy, parse_run_config(PERSON), 0, deployed=True) == 8.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"person-max-images": 0}, "person-max-images must be in 1..10000"),
        ({"person-max-images": 10**23}, "person-max-images must be in 1..10000"),
        ({"face-train-limit": 100}, "face-train-limit keeps images across all people"),
        ({"dp-path": "opacus"}, "fast DP path only"),
        ({"face-steps": 0}, "no person ids"),
    ],
)
def test_person_level_settings_that_cannot_hold_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config({**PERSON, **overrides})


def test_seeded_person_batches_reproduce() -> None:
    people = torch.from_numpy(np.repeat(np.arange(10), 4))
    a = person_batch(people, 10, 0.5, 2, SeededRandomness(torch.Generator().manual_seed(1)))
    b = person_batch(people, 10, 0.5, 2, SeededRandomness(torch.Generator().manual_seed(1)))
    assert torch.equal(a[0], b[0])
