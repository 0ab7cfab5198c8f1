"""Attacks on the fast DP path's per-example clipping: each test states the guarantee it attacks.

The guarantee: whatever the model's weights (the coordinator sends them) and the run's clip norm C
(the run config sets it), one example adds at most C to the clipped sum, because its norm is never
under-estimated. A failing test is a break of that; a passing one is an attack kept as a regression
test. Real FER2013 faces where the data matters.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

from client.training.dp_random import SecretRandomness
from client.training.fast_dp import FastDpSgd, Units
from client.training.site_policy import SitePolicy, check_run
from common.config import parse_run_config
from common.data.fer2013 import load_fer2013
from common.data.preprocess import emotion_tensor
from common.errors import ConfigError
from common.models import CosineHead, EmotionNet, cosface_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def dp_step(model: nn.Module, loss: object, clip: float) -> FastDpSgd:
    """The fast DP step on ``model``'s trainable parameters, with secret noise (only the clipped
    sum is looked at)."""
    return FastDpSgd(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        loss,  # type: ignore[arg-type]
        noise_multiplier=1.0,
        max_grad_norm=clip,
        expected_batch_size=1,
        sample_rate=0.5,
        accountant=RDPAccountant(),
        randomness=SecretRandomness(),
    )


def shares(
    model: nn.Module, loss: object, x: torch.Tensor, y: torch.Tensor, clip: float
) -> list[float]:
    """What each example, clipped alone, adds to the clipped sum (float64 norm of all parameters)."""
    dp = dp_step(model, loss, clip)
    out = []
    for i in range(len(y)):
        grads = dp.clipped_sum(x[i : i + 1], y[i : i + 1]).grads
        out.append(torch.cat([g.flatten() for g in grads]).double().norm().item())
    return out


def hostile_emotion_net() -> EmotionNet:
    """Global emotion weights a coordinator may send: the last GroupNorm's gain blows the classifier's
    input up to norm ~1e19 (its square still finite in float32), and the bias saturates class 0, so a
    class-0 face's output gradient is ~1e-23, whose square underflows to 0 in float32."""
    torch.manual_seed(0)
    net = EmotionNet(32)
    with torch.no_grad():
        net.features[4][1].weight.fill_(3e17)
        net.classifier.weight.zero_()
        net.classifier.bias.copy_(torch.tensor([52.5, 0, 0, 0, 0, 0, 0]))
    return net


def test_an_output_gradient_whose_square_underflows_still_has_its_example_clipped() -> None:
    # Arrange: a clip norm the run config may set (the site's policy has no floor), real class-0 faces
    clip = 1e-6
    run = parse_run_config({"emotion-clip": clip, "face-sources": "orl,eyaleb"})
    check_run(SitePolicy(), run, 0, deployed=True)
    fer = load_fer2013("Training")
    rows = np.flatnonzero(fer.labels == 0)[:2]
    x, y = emotion_tensor(fer.images[rows]), torch.from_numpy(fer.labels[rows]).long()
    # Act
    added = shares(hostile_emotion_net(), F.cross_entropy, x, y, clip)
    # Assert: before the fix the computed norm was 0 and each face added about 520 C
    assert max(added) <= clip * (1 + 1e-5), f"one example adds {max(added) / clip:.0f} x C"


def _scaled_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1e-24 * F.cross_entropy(
        out, y
    )  # output gradients ~1e-25: their squares are 0 in float32


def _layer_case(layer: str) -> tuple[nn.Module, torch.Tensor]:
    """A one-layer model of each kind the fast path clips, and a (seeded) input for it: of norm ~1e18
    for the ghost norms (Linear, CosineHead), of norm ~1 for the per-sample instantiated ones."""
    torch.manual_seed(0)
    if layer == "linear":
        return nn.Linear(16, 4), torch.randn(4, 16) * 3e17
    if layer == "cosine-head":
        return CosineHead(4, 16), torch.randn(4, 16) * 3e17
    if layer == "conv":
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()), torch.randn(4, 2, 5, 5)
    return nn.Sequential(nn.GroupNorm(1, 2), nn.Flatten()), torch.randn(4, 2, 3, 3)


def _float64_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each example's gradient norm by autograd in float64, where nothing underflows."""
    wide = copy.deepcopy(model).double()
    params = [p for p in wide.parameters() if p.requires_grad]
    norms = []
    for i in range(len(y)):
        loss = _scaled_loss(wide(x[i : i + 1].double()), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norms.append(float(torch.cat([g.flatten() for g in grads]).norm()))
    return norms


@pytest.mark.parametrize("layer", ["linear", "cosine-head", "conv", "group-norm"])
def test_no_layer_lowers_an_example_norm_by_float32_underflow(layer: str) -> None:
    """Unit level, every layer kind: tiny output gradients (the loss scaled by 1e-24), so that every
    square of a gradient entry underflows in float32. The ghost norms multiply ||g||^2 by ||a||^2
    (with ||a|| ~1e18 the product is what matters); the instantiated ones sum squares of entries."""
    model, x = _layer_case(layer)
    y = torch.tensor([0, 1, 2, 3])
    expected = _float64_norms(model, x, y)
    # Act
    norms = dp_step(model, _scaled_loss, 1e-9).clipped_sum(x, y).per_sample_norms
    added = shares(model, _scaled_loss, x, y, clip=1e-9)
    # Assert: the norms are the true ones (before the fix: 0, or a fraction, for every layer kind)
    assert norms.tolist() == pytest.approx(expected, rel=1e-4, abs=0)
    assert max(added) <= 1e-9 * (1 + 1e-5), f"one example adds {max(added) / 1e-9:.0f} x C"


def test_a_person_whose_images_cancel_in_float32_adds_at_most_c() -> None:
    """Found by the second review: a person's norm came from a float32 sum of its images' gradients,
    and the clipped sum from another float32 computation (factor first, then the sum). Images with
    gradients 2**24, 1 and -2**24 sum to 0 in float32 in the first order, and the 1 survives in the
    second, so the person added 1.0 with C = 3e-6. The released vector must be the one whose norm
    was checked."""
    torch.manual_seed(0)
    model = nn.Conv2d(2, 1, 1, bias=False)  # a 1x1 image's weight gradient is its pixels
    clip = 3e-6
    dp = dp_step(model, lambda out, y: out.sum() / len(y), clip)
    x = torch.tensor([[2.0**24, 4e-6], [1.0, 0.0], [-(2.0**24), 0.0]]).view(3, 2, 1, 1)
    y = torch.zeros(3, dtype=torch.long)
    batch = dp.clipped_sum(x, y, Units(torch.zeros(3, dtype=torch.long), 1))
    added = torch.cat([g.flatten() for g in batch.grads]).double().norm().item()
    assert added <= clip * (1 + 1e-5), f"one person added {added:.3g} = {added / clip:.3g} C"


def test_an_embedding_on_a_class_centre_adds_at_most_c() -> None:
    """Found by the second review: the cosine head's norm was (g/r)^2 (||e||^2 - cos^2), which is 0
    for an embedding on a class centre, while the float32 clipped sum ``h e - wn (h cos)`` kept its
    rounding residual, scaled up by 1/r for a row of tiny norm: 1.4e8 C."""
    clip = 1e-6
    worst = 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        head = CosineHead(2, 512)
        with torch.no_grad():
            head.weight[0].mul_(1e6)
            head.weight[1].mul_(1e-9)
        e = F.normalize(head.weight.detach()[1:2], dim=1)  # a face embedded on class 1's centre
        grads = dp_step(head, cosface_loss, clip).clipped_sum(e, torch.tensor([0])).grads
        worst = max(worst, torch.cat([g.flatten() for g in grads]).double().norm().item())
    assert worst <= clip * (1 + 1e-5), f"one example added {worst:.3g} = {worst / clip:.3g} C"


DENORM = 2.0**-149  # the smallest float32 subnormal


def _added(model: nn.Module, x: torch.Tensor, clip: float) -> float:
    """What one example adds, with the loss its output's mean (output gradient = the weights')."""
    dp = dp_step(model, lambda out, y: out.mean(), clip)
    grads = dp.clipped_sum(x, torch.zeros(len(x), dtype=torch.long)).grads
    return torch.cat([g.flatten() for g in grads]).double().norm().item()


def _subnormal_gradient_model(d: int, k: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A trained Linear whose output gradient is k x 2**-149 everywhere (a frozen layer after it)."""
    first = nn.Linear(d, d, bias=False, dtype=dtype)
    second = nn.Linear(d, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        first.weight.zero_()
        second.weight.fill_(k * DENORM)
    second.weight.requires_grad_(False)
    return nn.Sequential(first, second)


def test_a_subnormal_output_gradient_times_its_factor_cannot_round_past_c() -> None:
    """Found by the third review: ``g * factor`` in float32 rounds on the subnormal grid, and an
    input of ~3e33 scaled the rounding past C (1.0002 C at C = 1)."""
    d = 1024
    x = torch.full((1, d), 1.0 / (DENORM * d * 2323.51))  # factor x g = 2323.51 subnormals
    added = _added(_subnormal_gradient_model(d, 3000), x, clip=1.0)
    assert added <= 1.0 + 1e-5, f"one example added {added:.7f} C (C = 1)"


def test_a_float64_layer_whose_gradient_squares_underflow_is_still_clipped() -> None:
    """Found by the third review: in a float64 model an output gradient of 1.5e-162 squares to 0,
    so the ghost norm was 0 and the example added 19.5 C."""
    first = nn.Linear(1, 1_000_000, bias=False, dtype=torch.float64)
    second = nn.Linear(1_000_000, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        first.weight.zero_()
        second.weight.fill_(1.5e-162)
    second.weight.requires_grad_(False)
    x = torch.full((1, 1), 1.3e154, dtype=torch.float64)
    added = _added(nn.Sequential(first, second), x, clip=1e-6)
    assert added <= 1e-6 * (1 + 1e-5), f"one example added {added / 1e-6:.2f} C"


@pytest.mark.parametrize("clip", [1e-13, 5.7e-45, 0.0])
def test_a_clip_norm_too_small_to_round_safely_is_refused(clip: float) -> None:
    """Below ~1e-38 the clip factors are float32 subnormals themselves (a person added 1.96 C at
    C = 5.7e-45): the run config and the DP step both refuse a clip norm below 1e-12."""
    with pytest.raises(ConfigError, match="emotion-clip must be a finite number >= 1e-12"):
        parse_run_config({"emotion-clip": clip})
    with pytest.raises(ValueError, match="clip norm >= 1e-12"):
        _added(nn.Linear(2, 1), torch.ones(1, 2), clip)
