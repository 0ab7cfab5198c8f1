"""The fast DP-SGD path is the same mechanism as Opacus's: clipping, noise, divisor and accounting.

Real batches: ORL faces (112x112) for the face model with its cosine head, FER2013 training images for
the emotion model, both at reduced widths (the same layers as the defaults) to keep the tests fast. Opacus's per-sample gradients (``GradSampleModule``) and
``DPOptimizer`` are the reference.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn

import client.training.train as train
from client.training.dp_random import SecretRandomness, SeededRandomness
from client.training.fast_dp import FastDpSgd, Units, physical_chunks, poisson_indices
from client.training.privacy_state import SitePrivacyState
from client.training.train import SiteTensors, train_round
from common.config import parse_run_config
from common.data.chips import dataset_chips
from common.data.fer2013 import load_fer2013
from common.data.orl import load_orl
from common.data.preprocess import emotion_tensor, face_tensor
from common.errors import ConfigError
from common.facenet.emotion_input import emotion_features
from common.facenet.resnet import BLOCKS, FaceTail, chip_tensor
from common.facenet.transfer import EmotionHead, frozen_features, gray_to_chip
from common.facenet.weights import default_pretrained_path, load_pretrained
from common.models import (
    CosineHead,
    EmotionNet,
    EmotionVGG,
    FaceEmbedder,
    FaceTrainer,
    cosface_loss,
)
from tests.specs import scatter_transfer

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=1)
def real_site() -> SiteTensors:
    """5 ORL people x 10 faces, and 200 FER2013 training images."""
    orl = load_orl()
    keep = orl.labels < 5
    fer = load_fer2013("Training")
    rows = np.random.default_rng(0).choice(len(fer), 200, replace=False)
    return SiteTensors(
        face_x=face_tensor(orl.images[keep]),
        face_y=torch.from_numpy(orl.labels[keep]).long(),
        emotion_x=emotion_tensor(fer.images[rows]),
        emotion_y=torch.from_numpy(fer.labels[rows]).long(),
    )


@functools.lru_cache(maxsize=1)
def _pretrained_features(n: int) -> tuple[FaceTail, torch.Tensor, torch.Tensor]:
    """dlib's pretrained tail (2 residual blocks + embedding layer) and the frozen trunk's features of
    ``n`` real ORL face chips of 4 people."""
    trunk, tail = load_pretrained(default_pretrained_path()).split(2)
    orl = dataset_chips("orl")
    rows = np.flatnonzero(orl.labels < 4)[:: max(1, 40 // n)][:n]
    return (
        tail,
        frozen_features(trunk, chip_tensor(orl.chips[rows])),
        torch.from_numpy(np.unique(orl.labels[rows], return_inverse=True)[1]),
    )


def pretrained_tail_batch(n: int) -> tuple[FaceTail, torch.Tensor, torch.Tensor]:
    tail, features, labels = _pretrained_features(n)
    return copy.deepcopy(tail), features, labels


@functools.lru_cache(maxsize=1)
def _emotion_features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen trunk's maps (7 blocks, 96 px: 64 x 11 x 11) of ``n`` real FER2013 faces."""
    site = real_site()
    trunk, _ = load_pretrained(default_pretrained_path()).split(len(BLOCKS) - 7)
    return frozen_features(trunk, gray_to_chip(site.emotion_x[:n], 96)), site.emotion_y[:n]


@functools.lru_cache(maxsize=1)
def _scatter_features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The default emotion model's input (7 blocks at 48 px beside the log scattering at 2 scales,
    standardised with the shipped statistics: 145 x 5 x 5) of ``n`` real FER2013 faces."""
    site = real_site()
    network = load_pretrained(default_pretrained_path())
    spec = scatter_transfer(head_width=16)
    return frozen_features(emotion_features(spec, network), site.emotion_x[:n]), site.emotion_y[:n]


def model_and_batch(kind: str, n: int = 8) -> tuple[nn.Module, Loss, torch.Tensor, torch.Tensor]:
    """A seeded narrow model (same layers as the default), its loss, and a real batch of ``n``."""
    site = real_site()
    torch.manual_seed(0)
    if kind == "face":
        rows = torch.randperm(len(site.face_y), generator=torch.Generator().manual_seed(1))[:n]
        model = FaceTrainer(FaceEmbedder(8), CosineHead(site.num_identities))
        return model, cosface_loss, site.face_x[rows], site.face_y[rows]
    if kind == "pretrained-tail":
        tail, features, labels = pretrained_tail_batch(n)
        torch.manual_seed(0)  # the head's init, whether or not the features were cached
        return FaceTrainer(tail, CosineHead(int(labels.max()) + 1)), cosface_loss, features, labels
    if kind == "emotion-head":  # the transfer route: a conv head on dlib's early features
        features, labels = _emotion_features(n)
        torch.manual_seed(0)  # the head's init, whether or not the features were cached
        return EmotionHead(64, 3, width=16), F.cross_entropy, features, labels
    if kind == "emotion-scatter":  # the default: trunk map and log scattering, standardised
        features, labels = _scatter_features(n)
        torch.manual_seed(0)
        return EmotionHead(64 + 81, 3, width=16), F.cross_entropy, features, labels
    if (
        kind == "emotion-vgg"
    ):  # dropout off: Opacus's forward pass and ours would drop different units
        return EmotionVGG(4, dropout=0.0), F.cross_entropy, site.emotion_x[:n], site.emotion_y[:n]
    return EmotionNet(16), F.cross_entropy, site.emotion_x[:n], site.emotion_y[:n]


def fast_dp(
    model: nn.Module, loss: Loss, *, clip: float, sigma: float = 0.0, seed: int = 0, **kw: object
) -> FastDpSgd:
    return FastDpSgd(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loss,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=kw.pop("expected", 1),  # type: ignore[arg-type]
        sample_rate=0.1,
        accountant=kw.pop("accountant", RDPAccountant()),
        randomness=kw.pop("randomness", SeededRandomness(torch.Generator().manual_seed(seed))),
        **kw,  # type: ignore[arg-type]
    )


def opacus_grads(
    model: nn.Module,
    loss: Loss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clip: float,
    sigma: float = 0.0,
    expected: int = 1,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Opacus's DPOptimizer gradient (clipped sum + noise) / expected, before the optimizer step."""
    gsm = GradSampleModule(model)
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected,
        generator=torch.Generator().manual_seed(seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss(gsm(x), y).backward()
    opt.pre_step()
    grads = [p.grad.detach().clone() for p in opt.params]
    gsm._close()
    return grads


@functools.lru_cache(maxsize=8)
def clipped_reference(kind: str, clip: float) -> tuple[torch.Tensor, ...]:
    """Opacus's clipped sum (noise 0, divisor 1) on the real batch of ``model_and_batch(kind)``."""
    model, loss, x, y = model_and_batch(kind)
    return tuple(opacus_grads(model, loss, x, y, clip=clip))


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()) + 1e-8)


# --- noise 0: the clipped sum is Opacus's -----------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["face", "emotion", "emotion-vgg", "pretrained-tail", "emotion-head", "emotion-scatter"]
)
@pytest.mark.parametrize(
    ("clip", "conv_method"),
    [(1.0, "grouped"), (1.0, "unfold"), (1e6, None)],
    ids=["clipped-grouped", "clipped-unfold", "unclipped-auto"],
)
def test_clipped_sum_equals_opacus_per_sample_reference(
    kind: str, clip: float, conv_method: str | None
) -> None:
    # Arrange: gradient norms of these untrained models are ~30-300, so C = 1 clips every example
    # and C = 1e6 clips none.
    reference = list(clipped_reference(kind, clip))
    # Act
    model, loss, x, y = model_and_batch(kind)
    batch = fast_dp(model, loss, clip=clip, conv_method=conv_method).clipped_sum(x, y)
    # Assert
    assert_same(batch.grads, reference)
    assert (batch.per_sample_norms > 0).all()


@pytest.mark.parametrize("kind", ["emotion", "emotion-vgg", "emotion-head", "face"])
@pytest.mark.parametrize("physical_batch", [1, 3, 8])
def test_a_batch_clipped_in_physical_chunks_sums_to_opacus_per_sample_reference(
    kind: str, physical_batch: int
) -> None:
    # Arrange: 8 examples in chunks of 1, 3 (uneven: 3 + 3 + 2) and 8 (one chunk)
    reference = list(clipped_reference(kind, 1.0))
    model, loss, x, y = model_and_batch(kind)
    whole = fast_dp(model, loss, clip=1.0, physical_batch=1024).clipped_sum(x, y)
    # Act
    batch = fast_dp(model, loss, clip=1.0, physical_batch=physical_batch).clipped_sum(x, y)
    # Assert: the same sum, and each example's norm in the batch's own order
    assert_same(batch.grads, reference)
    torch.testing.assert_close(batch.per_sample_norms, whole.per_sample_norms)
    assert batch.loss == pytest.approx(whole.loss, rel=1e-5)


def test_physical_chunks_keep_every_unit_whole_and_stay_within_the_size() -> None:
    # 9 examples of 5 people, interleaved; person 3 has none; person 4 alone exceeds the size
    people = torch.tensor([2, 0, 2, 4, 0, 4, 1, 4, 4])
    chunks = physical_chunks(len(people), 3, Units(people, 5))

    rows = torch.cat([c.rows for c in chunks])
    assert sorted(rows.tolist()) == list(range(9))  # every example exactly once
    ids = torch.cat([c.unit_ids for c in chunks if c.unit_ids is not None])
    assert ids.tolist() == [0, 1, 2, 3, 4]  # every person in exactly one chunk
    for c in chunks:
        assert c.units is not None and c.unit_ids is not None
        assert torch.equal(c.unit_ids[c.units.index], people[c.rows])  # local ids map back
        assert len(c.rows) <= 3 or len(c.unit_ids) == 1  # only a lone person may exceed it
    assert [len(c.rows) for c in chunks] == [3, 2, 4]  # {0, 1}, {2, 3}, {4}
    assert [len(c.rows) for c in physical_chunks(7, 3)] == [3, 3, 1]


def test_a_physical_batch_below_one_is_refused() -> None:
    model, loss, _, _ = model_and_batch("emotion")
    with pytest.raises(ValueError, match="physical_batch"):
        fast_dp(model, loss, clip=1.0, physical_batch=0)


@pytest.mark.parametrize(
    "kind", ["face", "emotion", "emotion-vgg", "pretrained-tail", "emotion-head"]
)
def test_equivalence_check_detects_a_wrong_clip(kind: str) -> None:
    reference = list(clipped_reference(kind, 1.0))
    model, loss, x, y = model_and_batch(kind)
    batch = fast_dp(model, loss, clip=1.01).clipped_sum(x, y)
    with pytest.raises(AssertionError):
        assert_same(batch.grads, reference)


def test_every_clipped_example_contributes_at_most_c() -> None:
    model, loss, x, y = model_and_batch("emotion", n=1)
    batch = fast_dp(model, loss, clip=0.5).clipped_sum(x, y)
    total = torch.cat([g.flatten() for g in batch.grads]).norm()
    assert batch.per_sample_norms.item() > 0.5
    assert total == pytest.approx(0.5, rel=1e-4)


# --- noise on: same draw as Opacus, right standard deviation ---------------------------------------


def test_noised_step_equals_opacus_with_the_same_generator() -> None:
    model, loss, x, y = model_and_batch("emotion")
    reference = opacus_grads(model, loss, x, y, clip=1.0, sigma=1.3, expected=12, seed=7)
    model, loss, x, y = model_and_batch("emotion")
    dp = fast_dp(model, loss, clip=1.0, sigma=1.3, expected=12, seed=7)
    dp.step(x, y)
    assert_same([p.grad for p in dp.params], reference)


def _noise_samples(sigma: float, clip: float, expected: int, secret: bool = False) -> np.ndarray:
    model, loss, x, y = model_and_batch("emotion")
    randomness = (
        SecretRandomness() if secret else SeededRandomness(torch.Generator().manual_seed(3))
    )
    dp = fast_dp(model, loss, clip=clip, sigma=sigma, expected=expected, randomness=randomness)
    clipped = dp.clipped_sum(x, y).grads
    dp.step(x, y)
    noise = [p.grad * expected - c for p, c in zip(dp.params, clipped, strict=True)]
    return torch.cat([n.flatten() for n in noise]).double().numpy()


@pytest.mark.parametrize("secret", [True, False], ids=["secret", "seeded"])
def test_noise_std_is_sigma_c_by_ks_test_that_rejects_a_wrong_sigma(secret: bool) -> None:
    sigma, clip = 0.8, 2.0
    samples = _noise_samples(sigma, clip, expected=10, secret=secret)  # ~81k coordinates
    right = stats.kstest(samples, "norm", args=(0.0, sigma * clip))
    too_big = stats.kstest(samples, "norm", args=(0.0, 1.1 * sigma * clip))
    too_small = stats.kstest(samples, "norm", args=(0.0, sigma * clip / 1.1))
    # secret draws differ every run: a correct sampler fails this bound once in 10^4 runs
    assert right.pvalue > (1e-4 if secret else 0.01)
    assert too_big.pvalue < 1e-6
    assert too_small.pvalue < 1e-6


# --- accounting and fail-closed preconditions ------------------------------------------------------


def test_each_step_records_sigma_and_q_once_even_for_an_empty_batch() -> None:
    model, loss, x, y = model_and_batch("emotion")
    accountant = RDPAccountant()
    dp = fast_dp(model, loss, clip=1.0, sigma=1.1, expected=8, accountant=accountant)
    dp.step(x[:0], y[:0])
    dp.step(x, y)
    assert accountant.history == [(1.1, 0.1, 2)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dp.params)


def test_an_empty_batch_of_units_has_a_zero_norm_per_unit_and_a_zero_sum() -> None:
    model, loss, x, y = model_and_batch("emotion")
    dp = fast_dp(model, loss, clip=1.0, sigma=1.1, expected=8, accountant=RDPAccountant())

    batch = dp.clipped_sum(x[:0], y[:0], Units(torch.zeros(0, dtype=torch.long), 2))

    assert torch.equal(batch.per_sample_norms, torch.zeros(2))
    assert all(g.abs().sum() == 0 for g in batch.grads)
    with pytest.raises(ValueError, match="one unit per example"):
        dp.clipped_sum(x[:0], y[:0], Units(torch.zeros(1, dtype=torch.long), 1))


def test_poisson_sampling_includes_each_example_with_probability_q() -> None:
    rng = SecretRandomness()
    sizes = [len(poisson_indices(1000, 0.05, rng)) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)
    assert np.var(sizes) == pytest.approx(1000 * 0.05 * 0.95, rel=0.3)  # binomial, not fixed size


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False)),
        nn.Sequential(nn.Flatten(), nn.LSTM(4, 4)),
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")),
    ],
    ids=["batchnorm", "unknown-layer", "reflect-padding"],
)
def test_refuses_models_it_cannot_clip_per_example(model: nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"dp-path|GroupNorm"):
        fast_dp(model, F.cross_entropy, clip=1.0)


def test_refuses_an_in_place_change_of_a_captured_output() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="in place"):
        fast_dp(model, F.cross_entropy, clip=1.0).clipped_sum(
            torch.randn(3, 4), torch.zeros(3).long()
        )


def test_refuses_a_layer_called_twice() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, lin)
    with pytest.raises(ConfigError, match="twice"):
        fast_dp(model, F.cross_entropy, clip=1.0).clipped_sum(
            torch.randn(3, 4), torch.zeros(3).long()
        )


# --- train_round: both paths give the accountant exactly the same events ---------------------------

SMALL: dict[str, int | float | str] = {
    "face-steps": 2,
    "emotion-steps": 2,
    "face-batch": 8,
    "emotion-batch": 16,
    "accountant": "rdp",
    "face-width": 8,
    "emotion-width": 8,
}


def _round(dp_path: str, **overrides: int) -> tuple[SitePrivacyState, float]:
    settings = parse_run_config({**SMALL, "dp-path": dp_path, **overrides})
    site = real_site()
    torch.manual_seed(0)
    privacy = SitePrivacyState(accountant="rdp", noise_multiplier=1.2)
    outcome = train_round(
        FaceEmbedder(8),
        CosineHead(site.num_identities),
        EmotionNet(8),
        site,
        settings,
        privacy,
        torch.Generator().manual_seed(0),
        SecretRandomness(),
    )
    return privacy, outcome.emotion_loss


def test_fast_and_opacus_rounds_record_identical_events() -> None:
    opacus_state, _ = _round("opacus")
    fast_state, fast_loss = _round("fast")
    assert fast_state.history == opacus_state.history
    assert [(e.noise_multiplier, e.sample_rate, e.steps) for e in fast_state.history] == [
        (1.2, 1 / math.ceil(50 / 8), 2),
        (1.2, 1 / math.ceil(200 / 16), 2),
    ]
    assert math.isfinite(fast_loss)


def test_fast_round_refuses_to_report_when_the_accountant_missed_a_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Forgetful(RDPAccountant):
        def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
            if not getattr(self, "skipped", False):
                self.skipped = True
                return
            super().step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    monkeypatch.setattr(train, "create_accountant", lambda _name: Forgetful())
    with pytest.raises(RuntimeError, match="refusing to report"):
        _round("fast", **{"face-steps": 0})
