"""A fast DP-SGD step: per-sample clipping from one forward and one output-gradient backward pass.

The mechanism is exactly Opacus's ``DPOptimizer`` with Poisson sampling (Abadi et al. 2016, "Deep
Learning with Differential Privacy", https://arxiv.org/abs/1607.00133): every example's gradient is
clipped to L2 norm ``C`` with factor ``min(1, C / (norm + 1e-6))``, the clipped gradients are summed,
Gaussian noise of standard deviation ``sigma * C`` is added to every parameter, the result is divided by
the expected batch size, and the wrapped optimizer steps. Each step records itself with the accountant.

Only the way per-sample gradients are obtained differs, which is why it is faster on a CPU:

* the backward pass asks autograd only for the gradient of the loss w.r.t. each layer's *output*, so the
  weight-gradient kernels of a plain ``loss.backward()`` (which Opacus runs and then discards) never run;
* Linear layers never materialise per-example gradients: their norms come from the "ghost norm"
  identity ``||g a^T|| = ||g|| ||a||`` (Goodfellow 2015, https://arxiv.org/abs/1510.01799; Li et al.
  2022, https://arxiv.org/abs/2110.05679) and their clipped sum from one matmul; the cosine head's
  per-example gradients (n x classes x 128) are formed in float64, so that the norm checked is the
  norm of the vector released;
* every norm is formed in float64, from the float32 values themselves: in float32 the square of an
  output gradient below ~4e-23 is 0, and the coordinator can choose weights that make an example's
  ``||g||`` that small and its ``||a||`` ~1e19, so a float32 norm of 0 would let the example through
  unclipped (``tests/client/training/test_clipping_attacks.py``). The clip factors are then rounded
  towards zero into the model's dtype;
* convolutions instantiate per-sample weight gradients, per layer with whichever of two kernels is
  faster there: one weight-gradient convolution with the batch folded into the groups (large feature
  maps), or a batched matmul of output gradients and unfolded inputs (small maps, many channels); a
  grouped (depthwise) convolution is done per group, not as Opacus's dense block-diagonal product;
* GroupNorm's per-sample gradients are closed-form sums over the spatial positions.

Anything the step cannot clip per example (an unknown parametrised layer, BatchNorm, a layer called
twice) is refused at construction: the fast path fails closed and names ``dp-path = "opacus"`` as the fix.

**Person-level DP** (``unit = "person"``) changes the unit that is sampled and clipped, nothing else:
each step Poisson-samples *people* at rate q (:func:`person_batch`), takes up to a cap of each sampled
person's images, and clips each person's **summed** gradient to ``C`` (every example of a person gets
its person's factor). Adding or removing all of one person's images then changes the clipped sum by at
most ``C``, which is what the accountant's ``(sigma, q, steps)`` assumes of one unit. A person's
summed gradient is formed in float64 and released as it is, times its factor: the vector whose norm
was checked is the vector that is added (a person's gradients may cancel, and two roundings of their
sum may differ by more than C; ``tests/client/training/test_clipping_attacks.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from opacus.accountants import IAccountant
from torch import nn

from client.training.dp_random import DpRandomness
from common import config
from common.errors import ConfigError
from common.models import CosineHead

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Canaries(Protocol):
    """Audit canaries: adds the sampled canaries' clipped gradients to a step's clipped sum."""

    def add(self, grads: list[torch.Tensor], sample_rate: float, randomness: DpRandomness) -> None:
        """Add, in place, the gradient of every canary that this step samples at ``sample_rate``."""
        ...


_SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, CosineHead)


@dataclass(frozen=True)
class Units:
    """Which privacy unit each example of a batch belongs to (person-level DP).

    Attributes:
        index: ``(n,)`` int64, the unit of each example, dense in ``0..count-1``.
        count: the number of units in the batch.
    """

    index: torch.Tensor
    count: int

    def __post_init__(self) -> None:
        if self.index.dim() != 1 or (len(self.index) and int(self.index.max()) >= self.count):
            raise ValueError(f"Expected a (n,) unit index below {self.count=}")


@dataclass(frozen=True)
class ClippedBatch:
    """One batch's clipped, summed gradient (before noise), aligned with ``FastDpSgd.params``."""

    grads: list[torch.Tensor]
    per_sample_norms: torch.Tensor
    loss: float


# Per-sample gradients of 64 examples at a time: their per-sample tensors stay in cache. On real FER2013
# faces, a DP step of the default emotion head at batch 2,048 takes 0.46 s on one CPU thread (a simulated
# site's) against 0.67 s in chunks of 128 and 0.83 s in chunks of 256; on two threads 0.28 s against
# 0.33 s (``python -m bench.physical_chunks``; BENCHMARKS.md, issue 6, "Physical chunks").
PHYSICAL_BATCH = 64

# The smallest clip norm (the run config's floor too): below ~1e-38 the factors themselves are
# float32 subnormals, whose rounding can double what a unit adds. No real run clips below 1e-3.
MIN_CLIP = config.MIN_CLIP


@dataclass(frozen=True)
class PhysicalChunk:
    """Rows of a batch whose per-sample gradients are formed together.

    Attributes:
        rows: ``(m,)`` int64 rows of the batch.
        units: with person-level units, the chunk's own (dense) unit index of those rows.
        unit_ids: with person-level units, which of the batch's units the chunk holds, in the
            order of ``units``' ids.
    """

    rows: torch.Tensor
    units: Units | None = None
    unit_ids: torch.Tensor | None = None


def physical_chunks(n: int, size: int, units: Units | None = None) -> list[PhysicalChunk]:
    """Split a batch of ``n`` examples into chunks of at most ``size`` examples, never splitting a unit.

    Clipping is per unit, so a unit split across two chunks would be clipped twice, each part to C:
    the unit could add up to 2 C and the accountant's sensitivity would be wrong. Without ``units``
    every example is its own unit and the chunks are consecutive rows. With ``units``, whole units
    are packed in order of their ids; a unit with more than ``size`` examples is a chunk of its own,
    and a unit without examples joins the open chunk.
    """
    if units is None:
        return [PhysicalChunk(torch.arange(i, min(i + size, n))) for i in range(0, n, size)]
    counts = torch.bincount(units.index, minlength=units.count).tolist()
    rows_by_unit = torch.argsort(units.index, stable=True)  # rows grouped by unit id
    chunks: list[PhysicalChunk] = []
    first, start, filled = 0, 0, 0  # the open chunk's first unit, first grouped row, and rows
    for unit, count in enumerate([*counts, None]):
        if count is None or (count > 0 and filled > 0 and filled + count > size):
            rows = rows_by_unit[start : start + filled]
            ids = torch.arange(first, unit)
            chunks.append(PhysicalChunk(rows, Units(units.index[rows] - first, unit - first), ids))
            first, start, filled = unit, start + filled, 0
        filled += count or 0
    return chunks


def poisson_indices(n: int, sample_rate: float, randomness: DpRandomness) -> torch.Tensor:
    """Poisson sampling: each of ``n`` examples is included independently with ``sample_rate``.

    One uniform per example, as Opacus's ``UniformWithReplacementSampler`` draws, but from the
    release's randomness (the OS CSPRNG unless a research run opted into seeded noise).
    """
    return (randomness.uniform(n) < sample_rate).nonzero().reshape(-1)


def person_batch(
    people: torch.Tensor,
    num_people: int,
    sample_rate: float,
    max_images: int,
    randomness: DpRandomness,
) -> tuple[torch.Tensor, Units]:
    """Poisson sampling of people: each of ``num_people`` is included independently with
    ``sample_rate``; of each included person, at most ``max_images`` of their examples, chosen at
    random (all of them if they have fewer).

    Args:
        people: ``(n,)`` int64, the person of each example, in ``0..num_people-1``.

    Returns:
        The indices of the chosen examples, and the person (as a dense unit index) of each.
    """
    if max_images < 1:
        raise ValueError(f"Expected {max_images=} >= 1")
    chosen = randomness.uniform(num_people) < sample_rate
    rows = chosen[people].nonzero().reshape(-1)
    if len(rows) == 0:
        return rows, Units(rows, 0)
    # a random order within each person (secondary key), grouped by person (primary key)
    order = torch.argsort(randomness.uniform(len(rows)))
    rows = rows[order]
    rows = rows[torch.argsort(people[rows], stable=True)]
    person = people[rows]
    starts = torch.ones_like(person, dtype=torch.bool)
    starts[1:] = person[1:] != person[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(rows)), 0), 0).values
    keep = (torch.arange(len(rows)) - first) < max_images
    rows, person = rows[keep], person[keep]
    _, dense = torch.unique_consecutive(person, return_inverse=True)
    return rows, Units(dense, int(dense.max()) + 1)


def _check_supported(module: nn.Module, params: list[nn.Parameter]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    covered: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"layer {name!r} ({type(sub).__name__}) mixes the examples of a batch, so per-sample "
                "clipping is impossible; replace it with GroupNorm"
            )
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(sub) not in _SUPPORTED:
            raise ConfigError(
                f"the fast DP path cannot clip layer {name!r} ({type(sub).__name__}) per sample; "
                'set dp-path = "opacus"'
            )
        if isinstance(sub, nn.Conv2d) and (
            sub.padding_mode != "zeros" or isinstance(sub.padding, str)
        ):
            raise ConfigError(
                f"the fast DP path supports only explicit zero padding (layer {name!r}); "
                'set dp-path = "opacus"'
            )
        layers.append(sub)
        covered.update(id(p) for p in own)
    missing = [p for p in params if id(p) not in covered]
    if missing:
        raise ConfigError(
            f"{len(missing)} optimizer parameter(s) belong to no module of the model, so they would "
            "escape clipping; build the optimizer from the model's parameters"
        )
    return layers


class _Capture:
    """Holds each supported layer's input and output during one forward pass."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.calls: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.versions: dict[nn.Module, tuple[int, int]] = {}
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(
        self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if layer in self.calls:
            raise ConfigError(
                f"layer {type(layer).__name__} is called twice in one forward pass; the fast DP path "
                'does not support weight sharing; set dp-path = "opacus"'
            )
        self.calls[layer] = (inputs[0].detach(), output)
        self.versions[layer] = (inputs[0]._version, output._version)

    def check_unmodified(self) -> None:
        """Refuse if a captured input or output was changed in place after the layer ran."""
        for layer, (a, out) in self.calls.items():
            if (a._version, out._version) != self.versions[layer]:
                raise ConfigError(
                    f"the input or output of layer {type(layer).__name__} is modified in place "
                    '(e.g. inplace=True activations); set dp-path = "opacus" or drop inplace'
                )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _LayerGrads:
    """A layer's per-sample squared gradient norms and, given clip factors, its clipped sum."""

    def __init__(
        self,
        norm_sq: torch.Tensor,
        clipped: Callable[[torch.Tensor], dict[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.norm_sq = norm_sq
        self.clipped = clipped


# Below this, a float32 sum of squares may have lost entries to underflow (each square under ~1e-38):
# such rows are summed again, scaled (:func:`_scaled_norm`). Above it, what underflow can lose (under
# 1e-30 for 1e8 entries) is far below float32's own rounding.
_TINY_NORM_SQ = 1e-20


def _scaled_norm(t: torch.Tensor) -> torch.Tensor:
    """Float64 L2 norms of the rows of ``t``, each row scaled by its largest entry first, so that no
    square underflows or overflows (a float64 model's 1e-162 squares to 0 as well). Rows with a
    non-finite entry give NaN (the caller treats them as broken)."""
    t = t.double()
    top = t.abs().amax(dim=1)
    scale = torch.where(top > 0, top, torch.ones((), dtype=t.dtype))
    return top * torch.linalg.vector_norm(t / scale[:, None], dim=1)


def _row_norm_sq(t: torch.Tensor) -> torch.Tensor:
    """Float64 squared L2 norms of the rows of ``t``, never lowered by underflow.

    The plain norm is exact enough unless it is tiny or overflows; only those rows (rare) are redone
    scaled (:func:`_scaled_norm`), which would cost twice the time on the large per-sample tensors of
    a convolution.
    """
    norm_sq = torch.linalg.vector_norm(t, dim=1).double().square()
    redo = (norm_sq < _TINY_NORM_SQ) | torch.isinf(norm_sq)
    if bool(redo.any()):
        norm_sq[redo] = _scaled_norm(t[redo]).square()
    return norm_sq


def _instantiated(
    per_sample: dict[torch.Tensor, torch.Tensor], units: Units | None = None
) -> _LayerGrads:
    """Norms and clipped sum from per-sample gradients ``(n, *shape)``: the vector released for
    each unit is exactly the one whose norm was checked, times its factor.

    Per example, the per-sample tensor itself. Per person, its examples' sum, formed in float64 and
    released from that same sum: a person's gradients may cancel (2**24 + 1 - 2**24), and a norm
    of one rounding of the sum with a clipped sum of another let the difference through unclipped.
    """
    if units is None:  # vector_norm and a matrix-vector product: no (n, |W|) temporaries.
        rows = {p: g.flatten(1) for p, g in per_sample.items()}
    else:
        rows = {
            p: torch.zeros(units.count, g[0].numel(), dtype=torch.float64).index_add_(
                0, units.index, g.flatten(1).double()
            )
            for p, g in per_sample.items()
        }
    norm_sq = torch.stack([_row_norm_sq(r) for r in rows.values()]).sum(0)

    def clipped(factors: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
        if units is not None:  # each person's factor (all its examples carry the same one)
            factors = factors.new_zeros(units.count).scatter_(0, units.index, factors)
        return {p: (factors.to(r.dtype) @ r).view(p.shape) for p, r in rows.items()}

    return _LayerGrads(norm_sq, clipped)


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, units: Units | None) -> _LayerGrads:
    if a.dim() != 2:  # a sequence dimension: instantiate
        per_sample = {layer.weight: torch.einsum("n...o,n...i->noi", g, a)}
        if layer.bias is not None:
            per_sample[layer.bias] = g.flatten(1, -2).sum(1)
        return _instantiated({p: v for p, v in per_sample.items() if p.requires_grad}, units)
    bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
    gd, ad = g.detach().double(), a.double()
    if units is not None:  # each person's summed gradient, in float64 (see _instantiated)
        per_sample = {layer.weight: torch.einsum("no,ni->noi", gd, ad)}
        if bias is not None:
            per_sample[bias] = gd
        return _instantiated({p: v for p, v in per_sample.items() if p.requires_grad}, units)
    g_norm = _scaled_norm(gd)
    norm_sq = torch.zeros_like(g_norm)
    if layer.weight.requires_grad:
        norm_sq = norm_sq + (g_norm * _scaled_norm(ad)).square()  # ghost: ||g a^T|| = ||g|| ||a||
    if bias is not None:
        norm_sq = norm_sq + g_norm.square()

    def clipped(factors: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
        # in float64: a float32 ``g * factor`` rounds on the subnormal grid (unbounded relative
        # error when g is subnormal), and ``a`` up to 3e38 would scale that error past C
        h = gd * factors.double()[:, None]
        out = {layer.weight: h.T @ ad} if layer.weight.requires_grad else {}
        if bias is not None:
            out[bias] = h.sum(0)
        return out

    return _LayerGrads(norm_sq, clipped)


def _cosine_head(
    layer: CosineHead, e: torch.Tensor, g: torch.Tensor, cos: torch.Tensor, units: Units | None
) -> _LayerGrads:
    # out = e @ Wn^T with Wn = W / r row-wise. Example n's gradient w.r.t. row c of W is
    # (g_nc / r_c) (e_n - wn_c cos_nc). It is formed per example, in float64, and released as it is:
    # a norm from the identity ||e_n - wn_c cos_nc||^2 = ||e_n||^2 - cos_nc^2 is 0 for a face on a
    # class centre, while a clipped sum formed as ``h e - wn (h cos)`` keeps a rounding residual that
    # a row of tiny norm r_c scales up (tests/client/training/test_clipping_attacks.py).
    w = layer.weight.detach().double()
    r = w.norm(dim=1).clamp_min(1e-12)
    wn = w / r[:, None]
    per_sample = (g.detach().double() / r)[:, :, None] * (
        e.double()[:, None, :] - wn[None] * cos.detach().double()[:, :, None]
    )
    return _instantiated({layer.weight: per_sample}, units)


ConvMethod = Literal["unfold", "grouped"]
# Which per-sample convolution kernel is faster depends on the layer's shape, the device and the thread
# count; it is timed once per key and remembered (both compute the same numbers).
_CONV_CHOICE: dict[tuple[object, ...], ConvMethod] = {}


def _conv_unfold(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients as (output grads) x (unfolded inputs)^T, one matmul per group."""
    n, groups = a.shape[0], layer.groups
    cols = F.unfold(
        a,
        layer.kernel_size,
        dilation=layer.dilation,
        padding=layer.padding,  # type: ignore[arg-type]
        stride=layer.stride,
    )  # (n, c_in * k, L)
    g = g.reshape(n, layer.out_channels, -1)
    if groups == 1:
        return torch.bmm(g, cols.transpose(1, 2)).reshape(n, *layer.weight.shape)
    return torch.einsum(
        "ngol,ngpl->ngop",
        g.reshape(n, groups, -1, g.shape[-1]),
        cols.reshape(n, groups, -1, cols.shape[-1]),
    ).reshape(n, *layer.weight.shape)


def _conv_grouped(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients from one weight-gradient convolution with the batch as groups."""
    n = a.shape[0]
    c_out, c_in_g, kh, kw = layer.weight.shape
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * c_out, *g.shape[2:]),
        a.reshape(1, n * a.shape[1], *a.shape[2:]),
        a.new_empty(n * c_out, c_in_g, kh, kw),  # only its shape is read
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        n * layer.groups,
        [False, True, False],
    )
    return grad_w.reshape(n, c_out, c_in_g, kh, kw)


_CONV_METHODS = {"unfold": _conv_unfold, "grouped": _conv_grouped}


def _conv_weight(
    layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, method: ConvMethod | None
) -> torch.Tensor:
    if method is not None:
        return _CONV_METHODS[method](layer, a, g)
    key = (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        tuple(a.shape[1:]),
        a.device.type,
        torch.get_num_threads(),
    )
    if key not in _CONV_CHOICE:
        seconds: dict[ConvMethod, float] = {}
        for name, fn in _CONV_METHODS.items():
            fn(layer, a, g)  # warm-up
            if a.device.type == "cuda":
                torch.cuda.synchronize(a.device)
            start = time.perf_counter()
            fn(layer, a, g)
            if a.device.type == "cuda":
                torch.cuda.synchronize(a.device)
            seconds[name] = time.perf_counter() - start  # type: ignore[index]
        _CONV_CHOICE[key] = min(seconds, key=seconds.__getitem__)
        logger.debug("conv %s: %s (%s)", key, _CONV_CHOICE[key], seconds)
    return _CONV_METHODS[_CONV_CHOICE[key]](layer, a, g)


def _conv(
    layer: nn.Conv2d,
    a: torch.Tensor,
    g: torch.Tensor,
    method: ConvMethod | None,
    units: Units | None,
) -> _LayerGrads:
    per_sample: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        per_sample[layer.weight] = _conv_weight(layer, a, g, method)
    if layer.bias is not None and layer.bias.requires_grad:
        per_sample[layer.bias] = g.flatten(2).sum(2)
    return _instantiated(per_sample, units)


def _group_norm(
    layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, units: Units | None
) -> _LayerGrads:
    per_sample: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        xhat = F.group_norm(a, layer.num_groups, eps=layer.eps)
        per_sample[layer.weight] = (xhat * g).flatten(2).sum(2)
    if layer.bias is not None and layer.bias.requires_grad:
        per_sample[layer.bias] = g.flatten(2).sum(2)
    return _instantiated(per_sample, units)


def _round_down(factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 clip factors in ``dtype``, each rounded towards zero (never up past C / norm)."""
    low = factors.to(dtype)
    return torch.where(low.double() > factors, torch.nextafter(low, torch.zeros_like(low)), low)


def _zero_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t`` with the examples in ``rows`` set to zero (``where``, so that NaN and inf go too)."""
    return torch.where(rows.view(-1, *([1] * (t.dim() - 1))), torch.zeros((), dtype=t.dtype), t)


def _layer_grads(
    layer: nn.Module,
    a: torch.Tensor,
    out: torch.Tensor,
    g: torch.Tensor,
    conv_method: ConvMethod | None,
    units: Units | None,
) -> _LayerGrads:
    if isinstance(layer, nn.Conv2d):
        return _conv(layer, a, g, conv_method, units)
    if isinstance(layer, nn.Linear):
        return _linear(layer, a, g, units)
    if isinstance(layer, nn.GroupNorm):
        return _group_norm(layer, a, g, units)
    return _cosine_head(layer, a, g, out, units)  # type: ignore[arg-type]


class FastDpSgd:
    """DP-SGD on ``module`` with ``optimizer``: per-sample clipping, Gaussian noise, accounting.

    Args:
        module: the model; every trainable parameter must sit in a Conv2d, Linear, GroupNorm or
            CosineHead that is called once per forward pass.
        optimizer: steps on the noised gradient (post-processing, so any optimizer keeps the guarantee).
        loss_fn: ``loss_fn(output, labels)``, the *mean* loss over the batch (as with Opacus's
            ``loss_reduction="mean"``).
        noise_multiplier: sigma; the noise standard deviation is ``sigma * max_grad_norm``.
        max_grad_norm: the per-sample clipping bound C.
        expected_batch_size: the divisor of the noised sum, ``int(N * q)`` as Opacus computes it.
        sample_rate: the Poisson sampling rate q, recorded with every step.
        accountant: records ``(sigma, q)`` once per step, after the noise is added.
        randomness: the source of the noise (:mod:`client.training.dp_random`; secret unless a research
            run opted into seeded noise).
        conv_method: how per-sample convolution gradients are formed; ``None`` times both kernels
            once per layer shape and keeps the faster (they compute the same numbers).
        canaries: an empirical privacy audit only (:mod:`client.training.canaries`): extra units
            whose clipped gradients join the sum, each sampled like any unit. Never set on a site.
        physical_batch: the most examples whose per-sample gradients are formed at once. A larger
            Poisson batch is clipped in chunks of whole units and their clipped sums added: the
            same sum (each unit's factor depends on its own gradient only), in less memory, and
            on a CPU faster (the per-sample tensors stay in cache; BENCHMARKS.md, issue 6).

    Raises:
        ConfigError: a layer or parameter that cannot be clipped per example (fail closed).
        ValueError: a clip norm, noise multiplier or batch size out of range.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        sample_rate: float,
        accountant: IAccountant,
        randomness: DpRandomness,
        conv_method: ConvMethod | None = None,
        canaries: Canaries | None = None,
        physical_batch: int = PHYSICAL_BATCH,
    ) -> None:
        if physical_batch < 1:
            raise ValueError(f"Expected {physical_batch=} >= 1")
        if not (math.isfinite(max_grad_norm) and max_grad_norm >= MIN_CLIP):
            raise ValueError(f"Expected a finite clip norm >= {MIN_CLIP:g}, got {max_grad_norm=}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"Expected a finite noise multiplier >= 0, got {noise_multiplier=}")
        if expected_batch_size < 1:
            raise ValueError(f"Expected {expected_batch_size=} >= 1")
        self.params = [
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        self._layers = _check_supported(module, self.params)
        self.module = module
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.randomness = randomness
        self.conv_method = conv_method
        self.canaries = canaries
        self.physical_batch = physical_batch

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, units: Units | None = None
    ) -> ClippedBatch:
        """The sum over the batch of each unit's gradient clipped to ``max_grad_norm``.

        A unit is one example, or with ``units`` one person: the sum of a person's examples'
        gradients is clipped as one (``per_sample_norms`` then holds one norm per person). The
        batch is clipped in chunks of at most ``physical_batch`` examples that never split a unit
        (:func:`physical_chunks`); ``per_sample_norms`` keeps the batch's own order.
        """
        chunks = physical_chunks(len(y), self.physical_batch, units)
        if len(chunks) <= 1:
            return self._clipped_chunk(x, y, units)
        parts = [self._clipped_chunk(x[c.rows], y[c.rows], c.units) for c in chunks]
        grads = [
            torch.stack(summands).sum(0) for summands in zip(*(p.grads for p in parts), strict=True)
        ]
        norms = parts[0].per_sample_norms.new_zeros(len(y) if units is None else units.count)
        for chunk, part in zip(chunks, parts, strict=True):
            norms[chunk.rows if units is None else chunk.unit_ids] = part.per_sample_norms
        loss = sum(p.loss * len(c.rows) for c, p in zip(chunks, parts, strict=True)) / len(y)
        return ClippedBatch(grads, norms, loss)

    def _clipped_chunk(
        self, x: torch.Tensor, y: torch.Tensor, units: Units | None = None
    ) -> ClippedBatch:
        """:meth:`clipped_sum` of one physical chunk, all its per-sample gradients at once."""
        zeros = [torch.zeros_like(p) for p in self.params]
        if units is not None and len(units.index) != len(y):
            raise ValueError(f"Expected one unit per example, got {len(units.index)} for {len(y)}")
        if len(y) == 0:  # Poisson sampling drew nobody: the sum is zero, the step still happens
            count = 0 if units is None else units.count  # a unit without examples has norm 0
            return ClippedBatch(zeros, torch.zeros(count, device=x.device), float("nan"))
        capture = _Capture(self._layers)
        try:
            loss = self.loss_fn(self.module(x), y)
        finally:
            capture.remove()
        capture.check_unmodified()
        calls = list(capture.calls.items())
        # The mean loss times n: each example's own gradient, as Opacus's loss_reduction="mean" scales it.
        scaled = loss * len(y)
        outputs = torch.autograd.grad(scaled, [out for _, (_, out) in calls], allow_unused=True)
        used = [(layer, a, out, g) for (layer, (a, out)), g in zip(calls, outputs, strict=True)]
        used = [(layer, a, out, g) for layer, a, out, g in used if g is not None]
        layer_grads = [
            _layer_grads(layer, a, out, g, self.conv_method, units) for layer, a, out, g in used
        ]
        norms = torch.stack([lg.norm_sq for lg in layer_grads]).sum(0).clamp_min(0).sqrt()
        broken = ~torch.isfinite(norms)
        if bool(broken.any()):
            # A unit whose gradient is not finite (a model that overflows on one of its examples)
            # contributes nothing; like any other unit's clipped share it is bounded by C. Raising
            # instead would tell the coordinator whether the batch held such an example, outside DP.
            rows = broken if units is None else broken[units.index]
            layer_grads = [
                _layer_grads(
                    layer,
                    _zero_rows(a, rows),
                    _zero_rows(out, rows),
                    _zero_rows(g, rows),
                    self.conv_method,
                    units,
                )
                for layer, a, out, g in used
            ]
            norms = torch.stack([lg.norm_sq for lg in layer_grads]).sum(0).clamp_min(0).sqrt()
        factors = _round_down(
            (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), used[0][2].dtype
        )
        if units is not None:  # every example carries its person's factor
            factors = factors[units.index]
        summed = {id(p): z for p, z in zip(self.params, zeros, strict=True)}
        for lg in layer_grads:
            for p, value in lg.clipped(factors).items():
                summed[id(p)] = summed[id(p)] + value.to(p.dtype)
        grads = [summed[id(p)] for p in self.params]
        return ClippedBatch(grads, norms.detach().to(torch.float32), float(loss.detach()))

    def noise(self) -> list[torch.Tensor]:
        """One draw of N(0, (sigma * C)^2) per coordinate, per parameter in optimizer order."""
        std = self.noise_multiplier * self.max_grad_norm
        if std == 0:
            return [torch.zeros_like(p) for p in self.params]
        return [
            self.randomness.normal(tuple(p.shape), std, p.dtype).to(p.device) for p in self.params
        ]

    def step(self, x: torch.Tensor, y: torch.Tensor, units: Units | None = None) -> float:
        """One DP-SGD step on the Poisson-sampled batch ``(x, y)`` (of people, with ``units``);
        returns its mean loss."""
        batch = self.clipped_sum(x, y, units)
        if self.canaries is not None:
            self.canaries.add(batch.grads, self.sample_rate, self.randomness)
        for p, grad, noise in zip(self.params, batch.grads, self.noise(), strict=True):
            p.grad = (grad + noise) / self.expected_batch_size
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.optimizer.step()
        return batch.loss
