"""Model state <-> Flower ``ArrayRecord``: which weights are SHARED and which stay LOCAL.

Only the face backbone and the emotion network travel, in one ArrayRecord (Flower's DP clipping mods
accept exactly one) with keys prefixed ``face.`` and ``emotion.``. The identity head (each site's
class-centre matrix) is LOCAL: it never appears in an outgoing record, because its rows are per-person
templates of that site's enrolled people.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SHARED_PREFIXES = ("face.", "emotion.")


def to_arrays(face: torch.nn.Module, emotion: torch.nn.Module) -> ArrayRecord:
    """Pack the shared weights of both models into one ArrayRecord."""
    record = ArrayRecord()
    for prefix, model in (("face.", face), ("emotion.", emotion)):
        for key, value in _plain_state_dict(model).items():
            record[prefix + key] = encode(value.detach().cpu().numpy())
    return record


def from_arrays(arrays: ArrayRecord, face: torch.nn.Module, emotion: torch.nn.Module) -> None:
    """Load an ArrayRecord produced by :func:`to_arrays` into the two models (strict)."""
    state = {key: torch.from_numpy(decode(array).copy()) for key, array in arrays.items()}
    for prefix, model in (("face.", face), ("emotion.", emotion)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        model.load_state_dict(part, strict=True)
    extra = [k for k in state if not k.startswith(SHARED_PREFIXES)]
    if extra:
        raise ValueError(f"unexpected keys in model arrays: {extra[:5]}")


def manifest(face: torch.nn.Module, emotion: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The agreed parameter manifest: every shared key and its shape (used by the egress guard)."""
    return {k: tuple(v.shape) for k, v in to_arrays(face, emotion).to_torch_state_dict().items()}


def _plain_state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    # Opacus's GradSampleModule prefixes keys with "_module."; strip it so records are wrapper-agnostic.
    return {k.removeprefix("_module."): v for k, v in model.state_dict().items()}


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over sorted keys, shapes, dtypes and bytes: the model version hash."""
    import hashlib

    digest = hashlib.sha256()
    for key, arr in sorted(arrays.items()):
        nd = np.ascontiguousarray(decode(arr))
        digest.update(f"{key}|{nd.dtype.str}|{nd.shape}|".encode())
        digest.update(nd.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def encode(value: np.ndarray) -> Array:
    """``Array(value)``: the same ``.npy`` bytes, with the header written once per dtype and shape."""
    if value.flags.c_contiguous:
        try:
            header = _npy_header(str(value.dtype), tuple(value.shape))
        except (TypeError, ValueError):
            header = None
        if header is not None and header[1] == value.dtype:
            data = header[0] + value.tobytes()
            return Array(str(value.dtype), tuple(value.shape), "numpy.ndarray", data)
    return Array(value)


def decode(array: Array) -> np.ndarray:
    """``array.numpy()``, without re-parsing the header of an array in NumPy's standard layout.

    Flower ships each array as ``.npy`` bytes and decodes them with ``np.load``, whose header parser
    (``ast.literal_eval``) costs ~0.1 ms per array: for the shared models' 40 arrays, a few ms per
    decode, and a reply is decoded several times on each side (egress guard, validation, hashing,
    aggregation). When the bytes are exactly the header NumPy writes for the array's declared dtype
    and shape followed by exactly its data, they are viewed in place (read-only); anything else goes
    through ``np.load``, so the result is always what ``array.numpy()`` returns.
    """
    try:
        header = _npy_header(str(array.dtype), tuple(int(d) for d in array.shape))
    except (TypeError, ValueError):
        header = None
    data = array.data
    if (
        header is not None
        and array.stype == "numpy.ndarray"
        and isinstance(data, bytes)
        and data.startswith(header[0])
        and len(data) == len(header[0]) + header[1].itemsize * header[2]
    ):
        view = np.frombuffer(data, dtype=header[1], count=header[2], offset=len(header[0]))
        return view.reshape(array.shape)
    return array.numpy()


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> tuple[bytes, np.dtype, int]:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    kind = np.dtype(dtype)
    if kind.hasobject or kind.fields is not None or kind.subdtype is not None:
        raise ValueError("only plain dtypes have a fixed layout")
    fields = {
        "descr": np.lib.format.dtype_to_descr(kind),
        "fortran_order": False,
        "shape": shape,
    }
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, fields)
    except ValueError:  # a header too long for format 1.0: np.save writes 2.0
        out = io.BytesIO()
        np.lib.format.write_array_header_2_0(out, fields)
    return out.getvalue(), kind, math.prod(shape)
